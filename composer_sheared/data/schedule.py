"""The deterministic sample schedule behind DynamicStreamingDataset.

Every sample is a pure function of (seed, global batch index, change log):

- slot ``s`` of global batch ``k`` gets a uniform ``u = hash(seed, k * G + s)`` (counter-based,
  so any batch can be computed without drawing the ones before it) and its domain is the
  inverse CDF of the proportions in force at batch ``k``;
- a domain's n-th draw overall (counted over all earlier batches and earlier slots, all ranks
  together) is position ``n % N`` of pass ``n // N`` of that domain, each pass a fresh
  permutation seeded by (seed, domain, pass).

So no sample repeats inside a pass on any rank, ranks never overlap (they own disjoint slot
ranges of the same global batch), and a resumed run only needs the batch index and the log.
numpy only; no torch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

__all__ = ["Change", "proportions_at", "slot_uniforms", "draw_domains", "counts_before", "DomainOrder"]

Change = tuple  # (start_batch: int, proportions: np.ndarray)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrap-around arithmetic is intended)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _seed_key(seed: int) -> np.uint64:
    return _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)[0]


def slot_uniforms(seed: int, first_batch: int, num_batches: int, global_batch_size: int) -> np.ndarray:
    """Uniforms in [0, 1) for every slot of batches [first_batch, first_batch + num_batches)."""
    start = np.uint64(first_batch * global_batch_size)
    counters = np.arange(num_batches * global_batch_size, dtype=np.uint64) + start
    z = _mix64(counters * _GOLDEN + _seed_key(seed))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def proportions_at(changes: Sequence[Change], batch: int) -> np.ndarray:
    """Proportions in force at ``batch``: the last change starting at or before it."""
    current = changes[0][1]
    for start, p in changes:
        if start > batch:
            break
        current = p
    return current


def _domains_from_uniforms(u: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(proportions)
    cdf = cdf / cdf[-1]
    # side="right": a domain with proportion 0 owns an empty interval and is never drawn.
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(proportions) - 1)


def draw_domains(seed: int, batch: int, global_batch_size: int, proportions: np.ndarray) -> np.ndarray:
    """Domain of every slot of one global batch."""
    return _domains_from_uniforms(slot_uniforms(seed, batch, 1, global_batch_size), proportions)


def counts_before(seed: int, global_batch_size: int, changes: Sequence[Change], num_domains: int,
                  batch: int, chunk_slots: int = 1 << 20) -> np.ndarray:
    """How many samples each domain contributed to global batches [0, batch).

    Replayed from the log in vectorised chunks: resuming at batch 100k with G=32 takes well
    under a second.
    """
    counts = np.zeros(num_domains, dtype=np.int64)
    bounds = [int(s) for s, _ in changes] + [batch]
    per_chunk = max(1, chunk_slots // global_batch_size)
    for i, (start, p) in enumerate(changes):
        lo, hi = max(int(start), 0), min(bounds[i + 1], batch)
        for b in range(lo, hi, per_chunk):
            n = min(per_chunk, hi - b)
            doms = _domains_from_uniforms(slot_uniforms(seed, b, n, global_batch_size), p)
            counts += np.bincount(doms, minlength=num_domains)
    return counts


class DomainOrder:
    """Sample order of one domain: pass ``n`` is a permutation seeded by (seed, domain, n)."""

    def __init__(self, seed: int, domain_id: int, size: int, shuffle: bool = True, cache: int = 2):
        if size <= 0:
            raise ValueError(f"domain {domain_id} has no samples")
        self.seed, self.domain_id, self.size, self.shuffle = seed, domain_id, size, shuffle
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.domain_id, epoch]))
            perm = rng.permutation(self.size)
            self._cache[epoch] = perm
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return perm

    def index(self, draws: np.ndarray) -> np.ndarray:
        """Sample index (within the domain) of each draw number."""
        draws = np.asarray(draws, dtype=np.int64)
        if not self.shuffle:
            return draws % self.size
        epochs = draws // self.size
        out = np.empty_like(draws)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self.permutation(int(e))[draws[mask] % self.size]
        return out


def batch_plan(seed: int, batch: int, global_batch_size: int, proportions: np.ndarray,
               counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(domain, draw number) of each slot of global batch ``batch``, given the counts before it."""
    doms = draw_domains(seed, batch, global_batch_size, proportions)
    draws = np.empty(global_batch_size, dtype=np.int64)
    for d in np.unique(doms):
        slots = np.nonzero(doms == d)[0]
        draws[slots] = counts[d] + np.arange(len(slots))
    return doms, draws
