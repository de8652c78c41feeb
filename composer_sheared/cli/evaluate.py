"""`composer-sheared evaluate`: lm-evaluation-harness tasks over HF directories, side by side.

    composer-sheared evaluate MODEL_DIR [NAME=MODEL_DIR ...] --tasks sheared-llama \\
        [--include-path DIR] [--out DIR] [--limit N] [--device cpu] [--batch-size 16]
    python -m composer_sheared.evaluate ...      (the older form, kept)

The work is composer_sheared.eval.harness's; see its docstring for the tasks and the table.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from composer_sheared.eval import harness
from composer_sheared.eval.harness import PRESETS, model_names, evaluate_models, format_table, resolve_tasks, write_results

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=harness.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="HF model directories, optionally NAME=DIR")
    ap.add_argument("--tasks", nargs="+", required=True,
                    help=f"presets {sorted(PRESETS)} and/or lm-eval task names (space or comma separated)")
    ap.add_argument("--include-path", help="directory of custom lm-eval task YAML (e.g. data_prep/next_line_task.py output)")
    ap.add_argument("--out", default="eval", help="directory for eval.md and eval.json")
    ap.add_argument("--limit", type=float, help="at most this many samples per task (a fraction if < 1); for quick checks")
    ap.add_argument("--num-fewshot", type=int, help="shots for tasks named directly (presets keep their own)")
    ap.add_argument("--device", help="cpu, cuda, cuda:0 ... (default: cuda when present)")
    ap.add_argument("--dtype", help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        models = model_names(args.models)
        specs = resolve_tasks(args.tasks, args.num_fewshot)
        result = evaluate_models(models, specs, args.include_path, args.device, args.batch_size,
                                 None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit),
                                 args.dtype)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    md, js = write_results(result, args.out)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
