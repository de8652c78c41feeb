"""Calibration batches for importance scores: a fixed, unshuffled slice of the training split,
taken round-robin over the domains, identical on every rank (so every rank initialises the
masks alike). Core: no Composer."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["calibration_batches", "CALIBRATION_BATCHES", "CALIBRATION_BATCH_SIZE", "CALIBRATION_KEYS"]

from composer_sheared.defaults import CALIBRATION_BATCH_SIZE, CALIBRATION_BATCHES, CALIBRATION_KEYS  # noqa: E402


def calibration_batches(local: str, domains: Sequence[str], num_batches: int, batch_size: int,
                        split: str = "train", remote: Optional[str] = None) -> list[dict[str, torch.Tensor]]:
    """`num_batches` dicts with ``input_ids`` [batch_size, seq]: sample i of every domain in turn."""
    from composer_sheared.data.eval_sets import domain_eval_dataset

    if num_batches <= 0 or batch_size <= 0:
        raise ValueError(f"calibration needs num_batches > 0 and batch_size > 0, got {num_batches}, {batch_size}")
    # world_size-independent: read the samples directly, not through Streaming's rank partition
    datasets = [domain_eval_dataset(local, d, split=split, remote=remote, batch_size=1) for d in domains]
    need = num_batches * batch_size
    rows, i = [], 0
    while len(rows) < need:
        progressed = False
        for ds in datasets:
            if i < ds.num_samples and len(rows) < need:
                rows.append(ds.get_item(i)["input_ids"])
                progressed = True
        if not progressed:
            break
        i += 1
    if len(rows) < need:
        raise ValueError(f"calibration wants {need} samples but {split!r} of {list(domains)} has only {len(rows)}")
    ids = torch.stack(rows)
    return [{"input_ids": ids[b * batch_size:(b + 1) * batch_size]} for b in range(num_batches)]
