"""Per-domain evaluation datasets: one Composer Evaluator per domain is built on these."""
from __future__ import annotations

import os
import random
import re
import time
from typing import Any, Callable, Optional

from streaming import StreamingDataset

from composer_sheared.data.dynamic import token_item
from composer_sheared.data.checks import read_index
from composer_sheared.data.integrity import ShardChecker, check_tokens, data_vocab_size
from composer_sheared.data.remote import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT, fetch, remote_join

__all__ = ["TokenStreamingDataset", "domain_eval_dataset"]


class TokenStreamingDataset(StreamingDataset):
    """A StreamingDataset over a ``tokens`` MDS column yielding the training item format.

    Shards are checked against ``index.json`` when it opens (sizes; hashes per ``verify``, see
    ``integrity.ShardChecker``; shards fetched from a remote are hash-checked when first read)
    and tokens against ``vocab_size`` on every read. ``name`` labels error messages.
    """

    def __init__(self, *, domain_id: int = 0, return_sample_ids: bool = False, name: Optional[str] = None,
                 verify: str = "open", vocab_size: Optional[int] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.domain_id, self.return_sample_ids = int(domain_id), return_sample_ids
        self.name, self.vocab_size = name, vocab_size
        remote = any(s.remote is not None for s in self.streams)
        self._checker = ShardChecker(self.shards, name or "eval data", verify, remote=remote)

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        shard_id, shard_sample = self.spanner[sample_id]
        if shard_id not in self._checker.verified and self._checker.present(shard_id):
            self._checker.check(shard_id, sample=shard_sample)
        sample = super().get_item(sample_id, retry)  # fetches a remote shard if needed
        if shard_id not in self._checker.verified:  # just fetched
            self._checker.check(shard_id, sample=shard_sample)
        tokens = sample["tokens"]
        if self.vocab_size is not None and tokens.max() >= self.vocab_size:
            shard = self.shards[shard_id]
            check_tokens(tokens, self.vocab_size,
                         f"{self.name or 'eval data'}: shard file "
                         f"{os.path.join(shard.dirname, shard.split, shard.file_pairs[0][0].basename)}, "
                         f"sample {shard_sample} of the shard")
        return token_item(tokens, self.domain_id, sample_id if self.return_sample_ids else None)


def domain_eval_dataset(local: str, domain: str, split: str = "eval", remote: Optional[str] = None,
                        batch_size: Optional[int] = None, domain_id: int = 0, verify: str = "open",
                        vocab_size: Optional[int] = None, **streaming_kwargs: Any) -> TokenStreamingDataset:
    """Unshuffled ``<local>/<split>/<domain>`` (partitioned over ranks by Streaming).

    ``batch_size`` is the per-device eval batch size (Streaming uses it to partition).
    ``vocab_size`` defaults to the one in ``<local>/stats.json``, if any. With ``remote``, the
    split's index and shards are fetched into ``local`` now (``remote.fetch``: at most
    ``download_retry + 1`` tries of ``download_timeout`` seconds, once per node): an eval split
    is small, and a shard missing on the remote is then an error here, whatever the number of
    DataLoader workers, instead of a failure in Streaming's background download thread (an
    empty eval with 0 workers, a hang with 2).
    """
    dom_local = os.path.join(local, split, domain)
    name = f"domain {domain!r} split {split!r}"
    timeout = float(streaming_kwargs.pop("download_timeout", None) or DEFAULT_TIMEOUT)
    retry = streaming_kwargs.pop("download_retry", None)
    attempts = DEFAULT_ATTEMPTS if retry is None else int(retry) + 1
    index = os.path.join(dom_local, "index.json")
    if remote is not None:
        dom_remote = remote_join(remote, split, domain)
        fetch(remote_join(dom_remote, "index.json"), index, timeout, attempts)
        for shard in read_index(index).shards:
            part = shard.get("zip_data") or shard["raw_data"]
            if not os.path.isfile(os.path.join(dom_local, shard["raw_data"]["basename"])):
                fetch(remote_join(dom_remote, part["basename"]), os.path.join(dom_local, part["basename"]),
                      timeout, attempts)
    elif not os.path.isfile(index):
        raise FileNotFoundError(f"{name}: no MDS index at {index} (run data_prep/tokenize_domains.py)")
    if read_index(index).samples == 0:
        raise ValueError(f"{name}: {index} lists no samples; re-create the data (data_prep/tokenize_domains.py)")
    streaming_kwargs.setdefault("shuffle", False)
    vocab_size = vocab_size if vocab_size is not None else data_vocab_size(local)
    return _retrying_shm_race(lambda: TokenStreamingDataset(
        local=dom_local, remote=None, batch_size=batch_size, domain_id=domain_id,
        name=name, verify=verify, vocab_size=vocab_size, **streaming_kwargs))


SHM_ATTEMPTS = 5


def _distributed() -> bool:
    """More than one rank meets at Streaming's barriers (llm-foundry initialises a process group
    of one even for a single process: there a retry is as safe as without one)."""
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def _retrying_shm_race(make: Callable[[], Any], attempts: int = SHM_ATTEMPTS) -> Any:
    """Streaming picks a free shared-memory prefix by looking, then creating it: two jobs on one host
    that build datasets in the same instant can pick the same one, and the second dies with
    FileExistsError '/000NNN_locals' (mosaicml/streaming#884). Alone in its process group a job can
    simply try again, and the next look sees the prefix taken. Under torch.distributed the ranks
    meet at barriers inside that call, and a retry on one rank would pair the wrong barriers, so
    there the error is re-raised with what to do."""
    for attempt in range(attempts):
        try:
            return make()
        except FileExistsError as e:
            if not re.search(r"/?\d{6}_[a-z_]+", str(e)):
                raise
            if _distributed():
                raise RuntimeError(f"Streaming's shared-memory prefix was taken by another job on this host at the same "
                                   f"moment ({e}); relaunch, or start jobs on one host a few seconds apart") from e
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())  # de-synchronise from the other job
