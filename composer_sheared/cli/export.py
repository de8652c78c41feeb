"""Export a pruning run's checkpoint as a sliced HF model directory (with its model card).

    composer-sheared export CHECKPOINT OUT_DIR [--source HF_DIR] [--tokenizer PATH]
    python -m composer_sheared.prune ...        (the older form, kept)
"""
from __future__ import annotations

import argparse
import sys

from composer_sheared.export.sliced import finalize

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="composer-sheared export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="Composer checkpoint (.pt) of a ShearingPruning run")
    p.add_argument("out_dir", help="directory to write the sliced HF model to (must not exist)")
    p.add_argument("--source", help="HF directory whose config.json describes the source (default: from the checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer path (default: the one stored in the checkpoint)")
    a = p.parse_args(argv)
    out = finalize(a.checkpoint, a.out_dir, a.source, a.tokenizer)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
