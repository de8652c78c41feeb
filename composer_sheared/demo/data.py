"""The demo's data and target, shared with bench/ (fidelity, the GPU program): the local corpus of
DOMAINS tokenized into per-domain MDS shards, the local next-line task, and the recipe's target."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from data_prep.local_corpus import DOMAINS

__all__ = ["DOMAINS", "DEMO_RECIPES", "PROMPTS", "demo_target", "build_data", "build_next_line"]

DEMO_RECIPES = ("demo/prune_smollm2", "demo/continue_smollm2")
PROMPTS = [  # the report's greedy generations
    "def fibonacci(n):\n",
    "Permission is hereby granted, free of charge,",
    "The capital of France is",
    "  * Fixed a crash when",
]


def _note(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def demo_target() -> dict:
    """The shape the demo prunes to, as its pruning recipe states it (bench/fidelity.py reads it too)."""
    from omegaconf import OmegaConf

    from composer_sheared.recipes import recipe_path

    return dict(OmegaConf.to_container(OmegaConf.load(recipe_path(DEMO_RECIPES[0])).pruning.target))


def build_data(out: Path, tokenizer_dir: Path, seq_len: int, max_bytes: int, eval_sequences: int,
               fresh: bool = False, *, mds: Optional[Path] = None, workers: Optional[int] = None,
               log: Callable[[str], None] = _note) -> Path:
    """The local corpus of DOMAINS tokenized into per-domain MDS shards (the demo's and the fidelity
    bench's data): `mds` (default out/mds), its text under out/corpus; kept when its stats.json
    records the same seq_len and eval_sequences, unless `fresh`."""
    from data_prep.local_corpus import build_local_corpus
    from data_prep.tokenize_domains import tokenize_domains

    mds = out / "mds" if mds is None else mds
    corpus = out / "corpus"
    stats_file = mds / "stats.json"
    if stats_file.exists() and not fresh:
        stats = json.loads(stats_file.read_text())
        if stats.get("seq_len") == seq_len and stats.get("eval_sequences") == eval_sequences:
            log(f"reusing {mds}")
            return mds
    if corpus.exists():
        shutil.rmtree(corpus)
    build_local_corpus(str(corpus), domains=DOMAINS, max_bytes_per_domain=max_bytes)
    tokenize_domains(str(corpus), str(mds), str(tokenizer_dir), seq_len, eval_sequences, overwrite=True,
                     workers=workers or min(2, os.cpu_count() or 1))
    return mds


def build_next_line(out: Path, corpus_bytes: int) -> Optional[Path]:
    """A local 4-choice next-line task from held-out files of the same kinds (none of the training
    corpus): the demo's downstream measure. None (with a note) when the machine has too few files."""
    from data_prep.local_corpus import build_local_corpus
    from data_prep.next_line_task import build_from_paths

    heldout, task = out / "heldout", out / "next_line"
    try:
        if heldout.exists():
            shutil.rmtree(heldout)
        build_local_corpus(str(heldout), domains=DOMAINS, max_bytes_per_domain=2 * corpus_bytes)
        build_from_paths(str(task), [str(heldout)], exclude=[str(out / "corpus")], items=48, seed=0,
                         context_lines=4, max_context_chars=200, max_line_chars=100)
    except ValueError as err:
        print(f"[demo] no downstream task: {err}", flush=True)
        return None
    return task
