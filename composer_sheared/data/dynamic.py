"""DynamicStreamingDataset: per-domain MDS data mixed by proportions that change during training.

Reads ``<local>/<split>/<domain>/`` (as ``data_prep/tokenize_domains.py`` writes it) through
Streaming's shard readers, by random access (local files, or shards downloaded on demand from
``remote``; see ``reader.py``). What is read where is decided by ``schedule.py``: a pure
function of (seed, global batch index, change log), which is what makes multi-worker loading,
multi-rank loading and exact resume agree.

A change of proportions is scheduled at a batch index, never "now": ``set_proportions`` puts it
just past the DataLoader's prefetch window, records it in a shared log (``control.py``) that live
workers re-read, and ``state_dict`` carries the log, so an interrupted and an uninterrupted run
see the same change at the same batch.

Core layer: torch and streaming only, no Composer.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from composer_sheared.data.control import MAX_WORKERS, NUM_WORKERS, RANK, START_BATCH, WORLD_SIZE, ControlBlock
from composer_sheared.data.integrity import check_tokens, check_vocab, data_vocab_size
from composer_sheared.data.mixing import validate_proportions
from composer_sheared.data.reader import MDSDirectory
from composer_sheared.data.schedule import DomainOrder, batch_plan, counts_before, proportions_at

__all__ = ["DynamicStreamingDataset", "resolve_world", "token_item"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


def resolve_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """(rank, world size): explicit values, else torch.distributed, else RANK/WORLD_SIZE."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


def token_item(tokens: np.ndarray, domain_id: int, sample_id: Optional[int] = None) -> dict[str, Any]:
    """The item format shared by train and eval datasets (HF models shift the labels themselves)."""
    input_ids = torch.from_numpy(np.asarray(tokens).astype(np.int64, copy=True))
    item = {"input_ids": input_ids, "labels": input_ids.clone(), "domain_id": int(domain_id)}
    if sample_id is not None:
        item["sample_id"] = int(sample_id)
    return item


def _open_domain(local: str, remote: Optional[str], split: str, domain: str, reader_kwargs: dict,
                 verify: str = "open") -> MDSDirectory:
    dom_local = os.path.join(local, split, domain)
    dom_remote = None if remote is None else os.path.join(remote, split, domain)
    if dom_remote is None and not os.path.isfile(os.path.join(dom_local, "index.json")):
        raise FileNotFoundError(f"domain {domain!r} split {split!r}: no MDS index at "
                                f"{os.path.join(dom_local, 'index.json')} (run data_prep/tokenize_domains.py)")
    return MDSDirectory(dom_local, dom_remote, **reader_kwargs, name=f"domain {domain!r} split {split!r}",
                        verify=verify)


class DynamicStreamingDataset(IterableDataset):
    """Infinite stream of samples whose per-batch domain mix follows changeable proportions.

    Args:
        local: root holding ``<split>/<domain>/`` MDS directories (or the cache dir for remote).
        domains: domain names, in the order of ``proportions``.
        proportions: initial domain weights (non-negative, sum 1).
        batch_size: per-device batch size; a global batch is ``batch_size * world_size`` samples.
        split: sub-directory to read.
        remote: optional remote root, same layout; shards are fetched by Streaming on demand.
        shuffle: shuffle each domain's order (one new permutation per pass over the domain).
        seed: seeds the domain draws and the permutations.
        lookahead: batches between the consumer position given to ``set_proportions`` and the
            batch a change takes effect at. Must exceed what the DataLoader can have prefetched
            (``num_workers * prefetch_factor`` plus one batch in flight per worker). ``None``:
            ``max(8, 3 * num_workers + 2)``, which covers the default prefetch factor of 2.
        rank, world_size: override the distributed setup (both or neither).
        return_sample_ids: add ``sample_id`` (index inside the domain) to each item.
        max_changes: capacity of the shared change log.
        reader_kwargs: ``download_retry``, ``download_timeout``, ``allow_unsafe_types`` for the
            shard readers (see ``reader.MDSDirectory``).
        verify: shard hash checks against ``index.json``: ``"open"`` (all local shards now; reads
            the whole split once), ``"lazy"`` (each shard when a process first reads it: for data
            much larger than what a run reads), ``"size"`` (file sizes only; always done).
        vocab_size: every token read must be below it (e.g. the model's; checked against
            ``<local>/stats.json`` at once); default: the ``vocab_size`` of that file, if any.

    Items: ``{"input_ids": LongTensor[T], "labels": LongTensor[T], "domain_id": int}``.
    Use it with ``DataLoader(ds, batch_size=batch_size, num_workers=...)``; the stream has no end,
    so train for a number of batches/tokens rather than epochs.
    """

    def __init__(self, local: str, domains: Sequence[str], proportions: Sequence[float], batch_size: int,
                 split: str = "train", remote: Optional[str] = None, shuffle: bool = True, seed: int = 17, *,
                 lookahead: Optional[int] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None, return_sample_ids: bool = False, max_changes: int = 8192,
                 reader_kwargs: Optional[dict] = None, verify: str = "open", vocab_size: Optional[int] = None):
        super().__init__()
        self.domains = list(domains)
        if not self.domains:
            raise ValueError("domains is empty")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"duplicate domain names: {self.domains}")
        p0 = validate_proportions(proportions, len(self.domains))
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if lookahead is not None and lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        self.local, self.remote, self.split = local, remote, split
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.lookahead, self.return_sample_ids = lookahead, return_sample_ids
        self._rank_override = (rank, world_size) if (rank is not None or world_size is not None) else None
        if self._rank_override is not None:
            resolve_world(rank, world_size)  # fail early on a bad override

        kwargs = dict(reader_kwargs or {})
        self._streams = [_open_domain(local, remote, split, d, kwargs, verify) for d in self.domains]
        first = next((s for s in self._streams if s.seq_len is not None), None)
        for d, s in zip(self.domains, self._streams):
            if first is not None and s.seq_len not in (None, first.seq_len):
                # else: "stack expects each tensor to be equal size" in the first mixed batch
                raise ValueError(f"domain {d!r} split {split!r}: {s.index_path} holds samples of {s.seq_len} "
                                 f"tokens, {first.index_path} of {first.seq_len}: every domain needs one "
                                 f"sequence length")
        # tokens per sample, from the shards' index (None if the index does not say)
        self.seq_len = None if first is None else first.seq_len
        self.seq_len_source = None if first is None else first.index_path
        data_vocab = data_vocab_size(local)
        if vocab_size is not None and data_vocab is not None:
            check_vocab(local, vocab_size)  # hash-checked shards skip the per-sample check below
        self.vocab_size = vocab_size if vocab_size is not None else data_vocab
        self.sizes = [len(s) for s in self._streams]
        for d, n in zip(self.domains, self.sizes):
            if n == 0:
                raise ValueError(f"domain {d!r} split {split!r} under {local} has no samples")

        self._control = ControlBlock(len(self.domains), capacity=max_changes)
        self._control.write_changes([(0, p0)])
        self.world()  # records the process group's rank for the workers if there is one already

    # -- world ----------------------------------------------------------------------------
    def world(self) -> tuple[int, int]:
        """(rank, world size): override, else torch.distributed, else what the main process saw, else env.

        DataLoader workers never see an initialised process group, so whenever the main process
        does, it records rank and world size in the shared block for them.
        """
        if self._rank_override is not None:
            return resolve_world(*self._rank_override)
        dist = torch.distributed
        header = self._control.header
        if dist.is_available() and dist.is_initialized():
            rank, world = resolve_world()
            header[RANK], header[WORLD_SIZE] = rank, world
            return rank, world
        if int(header[WORLD_SIZE]) > 0:
            return resolve_world(int(header[RANK]), int(header[WORLD_SIZE]))
        return resolve_world()

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world()[1]

    # -- proportions ----------------------------------------------------------------------
    @property
    def changes(self) -> list[tuple[int, list[float]]]:
        """The change log: ``[(first batch index, proportions), ...]``."""
        return [(s, p.tolist()) for s, p in self._control.read_changes()[1]]

    @property
    def proportions(self) -> list[float]:
        """The most recently set proportions (possibly not yet in effect)."""
        return self._control.read_changes()[1][-1][1].tolist()

    def proportions_at(self, batch: int) -> list[float]:
        return proportions_at(self._control.read_changes()[1], batch).tolist()

    def set_proportions(self, proportions: Sequence[float], current_batch: Optional[int] = None) -> int:
        """Use ``proportions`` from a batch just past the prefetch window; returns that batch index.

        ``current_batch`` is the index of the next global batch the consumer will take (for
        Composer: ``state.timestamp.batch_in_epoch``). With it, the start batch is
        ``current_batch + lookahead`` on every rank and in every rerun, which exact resume
        needs. Without it the change starts right after what workers have already claimed
        (takes effect sooner; the exact batch then depends on timing), or at the start batch if
        no iteration is running yet.
        """
        p = validate_proportions(proportions, len(self.domains))
        ctrl = self._control
        workers = max(int(ctrl.header[NUM_WORKERS]), 1)
        # A worker may claim one more batch between our read and our write: keep a worker's
        # stride of margin past the furthest claim.
        safe = max(ctrl.max_claim(), int(ctrl.header[START_BATCH]) - 1) + 1 + workers
        if current_batch is None:
            # Nothing claimed since the (re)start: no batch is in flight, so the change can apply
            # from the very next batch.
            start = int(ctrl.header[START_BATCH]) if ctrl.max_claim() < int(ctrl.header[START_BATCH]) else safe
        else:
            lookahead = self.lookahead if self.lookahead is not None else max(8, 3 * int(ctrl.header[NUM_WORKERS]) + 2)
            start = int(current_batch) + lookahead
            if start < safe:
                warnings.warn(f"DynamicStreamingDataset: workers already prefetched up to batch {safe - 1}; "
                              f"change requested for batch {start} moved to {safe}. Raise `lookahead` "
                              f"(now {lookahead}) above num_workers * prefetch_factor + num_workers, "
                              f"or resume will not be exact.")
                start = safe
        last = ctrl.read_changes()[1][-1][0]
        start = max(start, last)
        ctrl.append_change(start, p)
        log.info("domain proportions %s from global batch %d", np.round(p, 4).tolist(), start)
        return start

    # -- checkpointing (the methods Composer's State calls for a train dataset) ------------
    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Resume point and change log; ``num_samples`` is global (all ranks)."""
        g = self.global_batch_size
        if not from_beginning:
            num_samples += int(self._control.header[START_BATCH]) * g
        return {
            "version": STATE_VERSION,
            "sample_in_epoch": int(num_samples),
            "global_batch_size": g,
            "seed": self.seed,
            "domains": list(self.domains),
            "changes": self.changes,
        }

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if obj.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported DynamicStreamingDataset state version {obj.get('version')!r}")
        if list(obj["domains"]) != self.domains:
            raise ValueError(f"checkpoint domains {obj['domains']} differ from dataset domains {self.domains}")
        if int(obj["seed"]) != self.seed:
            warnings.warn(f"checkpoint seed {obj['seed']} differs from dataset seed {self.seed}; "
                          f"samples after resume will differ from the original run")
        g = self.global_batch_size
        if int(obj["global_batch_size"]) != g:
            warnings.warn(f"global batch size changed from {obj['global_batch_size']} to {g}; resume is not exact")
        samples = int(obj["sample_in_epoch"])
        if samples % g:
            warnings.warn(f"{samples} samples is not a whole number of global batches of {g}; rounding down")
        changes = [(int(s), validate_proportions(p, len(self.domains), what=f"checkpoint proportions at batch {s}"))
                   for s, p in obj["changes"]]
        self._control.write_changes(changes)
        self._control.header[START_BATCH] = samples // g
        self._control.reset_claims()

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        if nworkers > MAX_WORKERS:
            raise ValueError(f"at most {MAX_WORKERS} DataLoader workers are supported, got {nworkers}")
        rank, world = self.world()
        g, b = self.batch_size * world, self.batch_size
        ctrl = self._control
        ctrl.header[NUM_WORKERS] = nworkers
        start = int(ctrl.header[START_BATCH])
        ctrl.claims[wid] = start - 1
        orders = [DomainOrder(self.seed, d, n, self.shuffle) for d, n in enumerate(self.sizes)]
        last_epoch = [-1] * len(self.domains)

        version, changes = -1, None
        done = start  # every batch < done is already counted in `counts`
        counts = None
        k = start + wid
        while True:
            # Claim before reading the log: a change is only ever scheduled past every claim.
            ctrl.claims[wid] = k
            if ctrl.version() != version:
                version, changes = ctrl.read_changes()
            if counts is None:
                counts = counts_before(self.seed, g, changes, len(self.domains), start)
            # Advance the counts over other workers' batches between our last batch and this one.
            for j in range(done, k):
                doms, _ = batch_plan(self.seed, j, g, proportions_at(changes, j), counts)
                counts += np.bincount(doms, minlength=len(self.domains))
            doms, draws = batch_plan(self.seed, k, g, proportions_at(changes, k), counts)
            counts += np.bincount(doms, minlength=len(self.domains))
            done = k + 1

            mine = slice(rank * b, (rank + 1) * b)
            my_doms, my_draws = doms[mine], draws[mine]
            idxs = np.empty(b, dtype=np.int64)
            for d in np.unique(my_doms):
                mask = my_doms == d
                idxs[mask] = orders[d].index(my_draws[mask])
                epoch = int(my_draws[mask].max()) // self.sizes[d]
                if epoch > last_epoch[d]:
                    if epoch > 0:
                        log.info("domain %r: pass %d over its %d samples starts (new %sorder)",
                                 self.domains[d], epoch, self.sizes[d], "shuffled " if self.shuffle else "")
                    last_epoch[d] = epoch
            vocab = self.vocab_size
            for d, idx in zip(my_doms.tolist(), idxs.tolist()):
                tokens = self._streams[d][idx]["tokens"]
                # Hash-checked data cannot hold stray ids; other data is checked per sample.
                if vocab is not None and not self._streams[d].all_hashed and tokens.max() >= vocab:
                    check_tokens(tokens, vocab, f"domain {self.domains[d]!r} split {self.split!r}: shard file "
                                                f"{self._streams[d].shard_file(idx)}, sample "
                                                f"{self._streams[d].locate(idx)[1]} of the shard ({idx} of the domain)")
                yield token_item(tokens, d, idx if self.return_sample_ids else None)
            k += nworkers

    def plan(self, first_batch: int, num_batches: int, rank: Optional[int] = None) -> list[list[tuple[int, int]]]:
        """(domain_id, sample index) of each sample of batches [first_batch, +num_batches) for a rank.

        The same computation ``__iter__`` does, without reading data: for tests and tools.
        """
        r, world = self.world()
        r = r if rank is None else rank
        g, b = self.batch_size * world, self.batch_size
        _, changes = self._control.read_changes()
        counts = counts_before(self.seed, g, changes, len(self.domains), first_batch)
        orders = [DomainOrder(self.seed, d, n, self.shuffle) for d, n in enumerate(self.sizes)]
        out = []
        for k in range(first_batch, first_batch + num_batches):
            doms, draws = batch_plan(self.seed, k, g, proportions_at(changes, k), counts)
            counts += np.bincount(doms, minlength=len(self.domains))
            sl = slice(r * b, (r + 1) * b)
            out.append([(int(d), int(orders[d].index(np.array([n]))[0]))
                        for d, n in zip(doms[sl], draws[sl])])
        return out
