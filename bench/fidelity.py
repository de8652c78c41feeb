"""Fidelity at equal tokens: does pruning the Sheared-LLaMA way give a better small model for the
tokens spent than the simple alternatives?

Every arm ends at the same target shape, spends the same total training tokens (pruning +
continued pretraining), reads the same data and is scored on the same held-out samples:

  a  paper     learned masks, uniform init, Lagrangian schedule, then continued pretraining
  b  default   the project's defaults (projected schedule, importance init, ...), then continued
  c  oneshot   one-shot activation-importance slice, then continued pretraining on all the tokens
  d  random    random structured slice, then continued pretraining on all the tokens
  e  scratch   the target shape from random init, trained on all the tokens
  f  static    arm b with the static initial domain mix (no dynamic batch loading)

    python bench/fidelity.py --preset cpu            # embedded SmolLM2-135M, local corpus, 2 cores
    python bench/fidelity.py --preset gpu            # one GPU, >= 30M tokens per arm
    python bench/fidelity.py --preset cpu --arms b,c # a subset

Writes bench/results/fidelity-<preset>.md, .json and a loss-vs-tokens PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # data_prep is a top-level folder of the repository, not installed
    sys.path.insert(0, str(REPO))

DOMAINS = ("code", "legal", "docs", "changelog")
ARMS = {
    "a": "paper: learned masks, uniform init, Lagrangian",
    "b": "project defaults",
    "c": "one-shot importance + continued",
    "d": "random slice + continued",
    "e": "target shape from scratch",
    "f": "project defaults, static mix",
}
TARGET = {"num_layers": 24, "hidden_size": 512, "num_attention_heads": 6, "num_key_value_heads": 3,
          "intermediate_size": 1024}


@dataclass
class Preset:
    prune_steps: int
    prune_batch: int
    continue_steps: int
    continue_batch: int
    seq_len: int
    eval_sequences: int
    eval_interval: int
    corpus_bytes: int
    precision: str = "fp32"
    extra: list = field(default_factory=list)

    @property
    def prune_tokens(self) -> int:
        return self.prune_steps * self.prune_batch * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.prune_tokens + self.continue_steps * self.continue_batch * self.seq_len


PRESETS = {
    # the demo's budget: 60 x 4 x 128 pruning + 20 x 8 x 128 continued = 51,200 tokens per arm
    "cpu": Preset(prune_steps=60, prune_batch=4, continue_steps=20, continue_batch=8, seq_len=128,
                  eval_sequences=32, eval_interval=10, corpus_bytes=400_000),
    # one H200: 64 x 4096-token batches x 128 steps = 33.6M tokens per arm (not yet measured)
    "gpu": Preset(prune_steps=64, prune_batch=128, continue_steps=128, continue_batch=256, seq_len=512,
                  eval_sequences=256, eval_interval=16, corpus_bytes=60_000_000, precision="amp_bf16"),
}
