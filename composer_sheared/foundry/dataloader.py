"""`train_loader: {name: dynamic_streaming, dataset: {...}}` for llm-foundry: a DataLoader over a
DynamicStreamingDataset, so `dynamic_batch_loading` can re-weight the domains of a foundry run.

The dataset keys are DynamicStreamingDataset's arguments; `max_seq_len` (which foundry recipes
usually put under `dataset`) is checked against the shards' sample length instead of cutting
samples, since a mismatch means the data was tokenized for another run."""
from __future__ import annotations

import inspect
from typing import Any, Optional

__all__ = ["DATASET_KEYS", "build_dynamic_streaming_dataloader"]


def _dataset_keys() -> tuple[str, ...]:
    from composer_sheared.data.dynamic import DynamicStreamingDataset

    params = inspect.signature(DynamicStreamingDataset.__init__).parameters
    return tuple(k for k in params if k not in ("self", "batch_size", "rank", "world_size"))


DATASET_KEYS = _dataset_keys()


def _error(key: str, message: str) -> ValueError:
    return ValueError(f"train_loader.dataset.{key}: {message}")


def build_dynamic_streaming_dataloader(tokenizer: Any, device_batch_size: int | float, dataset: dict[str, Any],
                                       num_workers: int = 0, drop_last: bool = True, pin_memory: bool = False,
                                       prefetch_factor: Optional[int] = None,
                                       persistent_workers: Optional[bool] = None, timeout: float = 0):
    """A Composer DataSpec over per-domain MDS data (`data_prep/tokenize_domains.py` output).

    `dataset`: local, domains, and optionally proportions (default: uniform), remote, split,
    shuffle, seed, lookahead, verify, vocab_size, reader_kwargs, ... (DynamicStreamingDataset's
    arguments) and max_seq_len. The batch size is foundry's device batch size."""
    from composer.core import DataSpec
    from torch.utils.data import DataLoader

    from composer_sheared.data.dynamic import DynamicStreamingDataset

    cfg = dict(dataset or {})
    max_seq_len = cfg.pop("max_seq_len", None)
    unknown = sorted(set(cfg) - set(DATASET_KEYS))
    if unknown:
        raise _error(unknown[0], f"unknown key; expected one of {', '.join(DATASET_KEYS)} or max_seq_len")
    for key in ("local", "domains"):
        if cfg.get(key) in (None, "", []):
            raise _error(key, "required")
    domains = [str(d) for d in cfg["domains"]]
    cfg["domains"] = domains
    cfg.setdefault("proportions", [1.0 / len(domains)] * len(domains))
    if int(device_batch_size) != device_batch_size or device_batch_size <= 0:
        raise ValueError(f"device_train_batch_size: {device_batch_size}: dynamic_streaming needs a positive whole "
                         f"number of samples per device")
    batch = int(device_batch_size)
    if tokenizer is not None and cfg.get("vocab_size") is None:
        cfg["vocab_size"] = len(tokenizer)  # a token id the tokenizer cannot produce is bad data
    try:
        ds = DynamicStreamingDataset(batch_size=batch, **cfg)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"train_loader.dataset: {err}") from err
    if max_seq_len is not None and ds.seq_len is not None and ds.seq_len != int(max_seq_len):
        raise _error("max_seq_len", f"{max_seq_len}, but {ds.seq_len_source} holds samples of {ds.seq_len} tokens "
                                    f"(tokenize the data with --seq-len {max_seq_len}, or set max_seq_len to "
                                    f"{ds.seq_len})")
    loader = DataLoader(ds, batch_size=batch, num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None,
                        persistent_workers=num_workers > 0 if persistent_workers is None else persistent_workers,
                        timeout=timeout)
    return DataSpec(loader, get_num_tokens_in_batch=lambda b: int(b["input_ids"].numel()))
