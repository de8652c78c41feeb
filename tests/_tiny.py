"""Shared helpers for the train.py tests: synthetic MDS data and a tiny model YAML."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SEQ, VOCAB = 32, 128
DOMAINS = ("alpha", "beta")


def make_data(root: Path, domains=DOMAINS, n_train: int = 48, n_eval: int = 8, seq: int = SEQ) -> Path:
    from data_prep.tokenize_domains import write_mds_sequences

    rng = np.random.default_rng(0)
    for i, dom in enumerate(domains):
        # each domain is a different periodic pattern + noise, so losses differ between domains
        def seqs(n):
            for _ in range(n):
                start = rng.integers(0, VOCAB)
                s = (start + np.arange(seq) * (i + 1)) % VOCAB
                noise = rng.random(seq) < 0.2 * (i + 1)
                s[noise] = rng.integers(0, VOCAB, noise.sum())
                yield s
        write_mds_sequences(str(root / "train" / dom), seqs(n_train), seq, VOCAB)
        write_mds_sequences(str(root / "eval" / dom), seqs(n_eval), seq, VOCAB)
    (root / "stats.json").write_text(json.dumps({"seq_len": seq, "vocab_size": VOCAB}))
    return root


TINY_MODEL = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB, "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
TINY_TARGET = {"num_layers": 2, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
               "intermediate_size": 64}


def prune_yaml(data: Path, out: Path, steps: int = 4) -> dict:
    return {
        "run_name": "tiny-prune",
        "model": {"config": dict(TINY_MODEL)},
        "data": {"local": str(data), "domains": list(DOMAINS), "proportions": [0.5, 0.5],
                 "eval_subset_num_batches": 1},
        "max_seq_len": SEQ,
        "global_train_batch_size": 4,
        "device_eval_batch_size": 4,
        "max_duration": f"{steps}ba",
        "eval_interval": "2ba",
        "precision": "fp32",
        "optimizer": {"lr": 1.0e-3},
        "scheduler": {"t_warmup": "1ba"},
        "pruning": {"target": dict(TINY_TARGET), "lagrangian_warmup": "2ba"},
        "dynamic_loading": {"rule": "doremi", "reference_losses": [4.0, 4.5]},
        "save_folder": str(out),
        "save_interval": f"{steps}ba",
        "progress_bar": False,
    }


def env() -> dict:
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "PYTHONPATH": str(REPO) + os.pathsep + e.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"})
    return e
