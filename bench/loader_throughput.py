"""Samples/s of DynamicStreamingDataset vs a plain StreamingDataset over the same MDS shards.

Writes its own shards (3 domains of random tokens) into a temporary directory, then, for each
``num_workers``, times both loaders side by side in one process: the plain one is Streaming's
own multi-stream mixing (``Stream(proportion=...)``, shuffled) yielding the same item format
(``input_ids``/``labels`` LongTensors), so the ratio isolates the cost of the dynamic schedule.
Worker start-up is excluded (timing starts after the first batch); runs alternate and the best
of ``--repeats`` is kept. Goal: ratio >= 0.95.

    python bench/loader_throughput.py [--samples 6000] [--workers 0 4]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from composer_sheared.data import DynamicStreamingDataset, TokenStreamingDataset  # noqa: E402
from data_prep.tokenize_domains import write_mds_sequences  # noqa: E402

DOMAINS = ["web", "code", "books"]
PROPS = [0.6, 0.3, 0.1]


def make_shards(root: str, per_domain: int, seq_len: int, vocab: int = 32000) -> None:
    rng = np.random.default_rng(0)
    for d in DOMAINS:
        seqs = (rng.integers(0, vocab, seq_len) for _ in range(per_domain))
        write_mds_sequences(os.path.join(root, "train", d), seqs, seq_len, vocab)


def _time(loader: DataLoader, batches: int) -> float:
    it = iter(loader)
    next(it)  # worker start-up, shard index loading: not what we measure
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["input_ids"])
    dt = time.perf_counter() - t0
    del it
    return n / dt


def plain(root: str, bs: int, workers: int) -> DataLoader:
    from streaming import Stream

    streams = [Stream(local=os.path.join(root, "train", d), proportion=p) for d, p in zip(DOMAINS, PROPS)]
    ds = TokenStreamingDataset(streams=streams, shuffle=True, batch_size=bs, shuffle_seed=17)
    return DataLoader(ds, batch_size=bs, num_workers=workers)


def dynamic(root: str, bs: int, workers: int) -> DataLoader:
    ds = DynamicStreamingDataset(root, DOMAINS, PROPS, batch_size=bs, seed=17)
    return DataLoader(ds, batch_size=bs, num_workers=workers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=6000, help="timed samples per run")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", default=None, help="write shards here and keep them (default: temp dir)")
    args = ap.parse_args(argv)

    root = args.keep or tempfile.mkdtemp(prefix="dbl_bench_")
    try:
        per_domain = args.samples + 4 * args.batch_size  # plain StreamingDataset must not run out in an epoch
        if not os.path.exists(os.path.join(root, "train", DOMAINS[0], "index.json")):
            make_shards(root, per_domain, args.seq_len)
        batches = args.samples // args.batch_size
        print(f"{len(DOMAINS)} domains x {per_domain} samples x {args.seq_len} tokens (uint16), "
              f"batch {args.batch_size}, {batches} timed batches, cpus={os.cpu_count()}")
        print(f"{'workers':>7} {'plain samples/s':>16} {'dynamic samples/s':>18} {'ratio':>6}")
        ratios = {}
        for w in args.workers:
            best = {"plain": 0.0, "dynamic": 0.0}
            for _ in range(args.repeats):
                for name, make in (("plain", plain), ("dynamic", dynamic)):
                    best[name] = max(best[name], _time(make(root, args.batch_size, w), batches))
            ratios[w] = best["dynamic"] / best["plain"]
            print(f"{w:>7} {best['plain']:>16.0f} {best['dynamic']:>18.0f} {ratios[w]:>6.2f}")
        worst = min(ratios.values())
        print(f"min ratio {worst:.2f} ({'meets' if worst >= 0.95 else 'below'} the 0.95 goal)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
