"""Random access to one MDS directory through Streaming's ``Stream`` and shard readers.

DynamicStreamingDataset only needs "give me sample i of domain d"; a ``StreamingDataset`` per
domain would also register shared memory for its own partitioning and caching (and in
mosaicml-streaming 0.13 every new instance keeps descriptors to all earlier ones' segments
open), none of which is used here. ``Stream.get_shards`` gives the same readers Streaming uses
internally; a missing shard is fetched from ``remote`` (and decompressed) by
``Stream.prepare_shard``, as ``StreamingDataset.get_item`` does, but through ``remote.fetch``
(bounded time, named errors, one download per node shared by all workers). Plain picklable
objects, so DataLoader workers get their own copy (shards verified before the copy stay
verified). Shard sizes and hashes are checked against ``index.json`` (see ``integrity.py``).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
from streaming.base.stream import Stream
from streaming.base.world import World

from composer_sheared.data.checks import read_index
from composer_sheared.data.integrity import ShardChecker
from composer_sheared.data.remote import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT, fetch, remote_join

__all__ = ["MDSDirectory", "BoundedStream"]


class BoundedStream(Stream):
    """A Stream whose downloads are ``remote.fetch``: bounded, named on failure, once per node.

    ``download_retry`` keeps Streaming's meaning (re-attempts after the first try).
    """

    def _download_file(self, from_basename: str, to_basename: Optional[str] = None) -> str:
        local = os.path.join(self.local, self.split, to_basename or from_basename)
        if self.remote is None:
            if not os.path.isfile(local):
                raise FileNotFoundError(f"{local}: no such file, and no remote to fetch it from")
            return local
        return fetch(remote_join(self.remote, self.split, from_basename), local, self.download_timeout,
                     self.download_retry + 1)


class MDSDirectory:
    """Samples of ``local`` (optionally mirrored from ``remote``) by global index.

    ``name`` labels error messages; ``verify`` is the hash-check mode of ``ShardChecker``.
    ``download_timeout`` bounds each connect or read of a download, ``download_retry`` the
    re-attempts (see ``remote.fetch``).
    """

    def __init__(self, local: str, remote: Optional[str] = None, download_retry: int = DEFAULT_ATTEMPTS - 1,
                 download_timeout: float = DEFAULT_TIMEOUT, allow_unsafe_types: bool = False, *,
                 name: Optional[str] = None, verify: str = "open"):
        index = os.path.join(local, "index.json")
        if remote is not None:
            fetch(remote_join(remote, "index.json"), index, download_timeout, download_retry + 1)
        elif not os.path.isfile(index):
            raise FileNotFoundError(f"no MDS index at {index}")
        info = read_index(index)  # a ValueError naming the file, not Streaming's KeyError or JSONDecodeError
        self.seq_len = info.seq_len
        self.stream = BoundedStream(remote=remote, local=local)
        self.stream.apply_default({"split": None, "download_retry": download_retry,
                                   "download_timeout": download_timeout, "validate_hash": None,
                                   "keep_zip": False})
        self.shards = self.stream.get_shards(World.detect(), allow_unsafe_types)
        counts = np.array([s.samples for s in self.shards], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self.num_samples = int(self._ends[-1]) if len(counts) else 0
        self.checker = ShardChecker(self.shards, name or local, verify, remote=remote is not None)
        self.index_path = index

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, Any]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.stream.local} ({self.num_samples} samples)")
        shard_id, local_idx = self.locate(idx)
        shard = self.shards[shard_id]
        if shard_id not in self.checker.verified:
            if not self.checker.present(shard_id):
                self.stream.prepare_shard(shard)  # fetch from remote and/or decompress
            self.checker.check(shard_id, sample=local_idx)
        try:
            return shard[local_idx]
        except FileNotFoundError:
            # Removed since it was checked: fetch/extract again, then read.
            self.stream.prepare_shard(shard)
            return shard[local_idx]

    @property
    def all_hashed(self) -> bool:
        """Every shard matched its recorded hash in this process: no per-sample check is needed."""
        return len(self.checker.hashed) == len(self.shards)

    def locate(self, idx: int) -> tuple[int, int]:
        """(shard id, index inside that shard) of sample ``idx``."""
        shard_id = int(np.searchsorted(self._ends, idx, side="right"))
        return shard_id, idx - (int(self._ends[shard_id - 1]) if shard_id else 0)

    def shard_file(self, idx: int) -> str:
        shard = self.shards[self.locate(idx)[0]]
        return os.path.join(shard.dirname, shard.split, shard.file_pairs[0][0].basename)
