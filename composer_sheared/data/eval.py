"""Per-domain evaluation datasets: one Composer Evaluator per domain is built on these."""
from __future__ import annotations

import os
from typing import Any, Optional

from streaming import StreamingDataset

from composer_sheared.data.dynamic import token_item

__all__ = ["TokenStreamingDataset", "domain_eval_dataset"]


class TokenStreamingDataset(StreamingDataset):
    """A StreamingDataset over a ``tokens`` MDS column yielding the training item format."""

    def __init__(self, *, domain_id: int = 0, return_sample_ids: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.domain_id, self.return_sample_ids = int(domain_id), return_sample_ids

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        sample = super().get_item(sample_id, retry)
        return token_item(sample["tokens"], self.domain_id, sample_id if self.return_sample_ids else None)


def domain_eval_dataset(local: str, domain: str, split: str = "eval", remote: Optional[str] = None,
                        batch_size: Optional[int] = None, domain_id: int = 0, **streaming_kwargs: Any
                        ) -> TokenStreamingDataset:
    """Unshuffled ``<local>/<split>/<domain>`` (partitioned over ranks by Streaming).

    ``batch_size`` is the per-device eval batch size (Streaming uses it to partition).
    """
    dom_local = os.path.join(local, split, domain)
    dom_remote = None if remote is None else os.path.join(remote, split, domain)
    if dom_remote is None and not os.path.isfile(os.path.join(dom_local, "index.json")):
        raise FileNotFoundError(f"domain {domain!r} split {split!r}: no MDS index at "
                                f"{os.path.join(dom_local, 'index.json')} (run data_prep/tokenize_domains.py)")
    streaming_kwargs.setdefault("shuffle", False)
    return TokenStreamingDataset(local=dom_local, remote=dom_remote, batch_size=batch_size,
                                 domain_id=domain_id, **streaming_kwargs)
