"""Synthetic per-domain MDS data for tests and hardware checks: domain i repeats the pattern
`start + i * position (mod vocab)`, a fraction of tokens replaced by noise, so domains differ in
loss and a tiny model can learn them. Deterministic for a given seed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["write_periodic_domains"]


def write_periodic_domains(root: Path, domains: Sequence[str], vocab: int, seq: int, n_train: int, n_eval: int,
                           noise: Callable[[int], float], seed: int = 0) -> Path:
    """root/{train,eval}/<domain> MDS shards and root/stats.json; `noise(i)`: the fraction of domain
    i's tokens replaced at random."""
    import numpy as np

    from data_prep.tokenize_domains import write_mds_sequences

    rng = np.random.default_rng(seed)
    for i, dom in enumerate(domains):
        def seqs(n):
            for _ in range(n):
                s = (rng.integers(0, vocab) + np.arange(seq) * (i + 1)) % vocab
                mask = rng.random(seq) < noise(i)
                s[mask] = rng.integers(0, vocab, mask.sum())
                yield s
        write_mds_sequences(str(root / "train" / dom), seqs(n_train), seq, vocab)
        write_mds_sequences(str(root / "eval" / dom), seqs(n_eval), seq, vocab)
    (root / "stats.json").write_text(json.dumps({"seq_len": seq, "vocab_size": vocab}))
    return root
