"""DynamicStreamingDataset: proportions, switching, passes, ranks, resume (incl. a real Composer Trainer)."""
import collections
import logging
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from composer_sheared.data import DynamicStreamingDataset  # noqa: E402
from composer_sheared.data.schedule import draw_domains  # noqa: E402
from data_prep.tokenize_domains import write_mds_sequences  # noqa: E402

SEQ = 8
DOMAINS = ["a", "b", "c"]


def make_domains(root, sizes, split="train"):
    """Sequences whose first two tokens are (domain id, index inside the domain)."""
    for d, n in enumerate(sizes):
        seqs = (np.array([d, i] + [7] * (SEQ - 2), dtype=np.int64) for i in range(n))
        write_mds_sequences(os.path.join(root, split, DOMAINS[d]), seqs, SEQ, vocab_size=60000)
    return str(root)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_domains(tmp_path_factory.mktemp("dbl_data"), [1500, 1200, 1400])


def ids(batch):
    """(domain, index) of each sample, read from the tokens themselves."""
    toks = batch["input_ids"]
    assert torch.equal(batch["labels"], toks)
    assert torch.equal(toks[:, 0], batch["domain_id"])
    return list(zip(toks[:, 0].tolist(), toks[:, 1].tolist()))


def shares(samples):
    c = collections.Counter(d for d, _ in samples)
    return [c[i] / len(samples) for i in range(3)]


def test_proportions_then_switch_with_two_workers(data_root):
    bs = 10
    ds = DynamicStreamingDataset(data_root, DOMAINS, [0.6, 0.3, 0.1], batch_size=bs)
    it = iter(DataLoader(ds, batch_size=bs, num_workers=2))
    first = [s for _ in range(300) for s in ids(next(it))]
    assert len(first) == 3000
    np.testing.assert_allclose(shares(first), [0.6, 0.3, 0.1], atol=0.03)

    start = ds.set_proportions([0.1, 0.1, 0.8], current_batch=300)
    assert 300 < start <= 300 + 16  # just past the prefetch window
    between = [s for _ in range(300, start) for s in ids(next(it))]
    second = [s for _ in range(300) for s in ids(next(it))]
    np.testing.assert_allclose(shares(second), [0.1, 0.1, 0.8], atol=0.03)
    # Every sample is the pure function of (seed, batch, change log) the planner computes.
    plan = [s for b in ds.plan(0, start + 300) for s in b]
    assert first + between + second == plan


def test_no_repeat_within_a_pass_then_new_shuffled_pass(tmp_path, caplog):
    root = make_domains(tmp_path, [50, 40, 30])
    ds = DynamicStreamingDataset(root, DOMAINS, [0.2, 0.3, 0.5], batch_size=5)
    it = iter(DataLoader(ds, batch_size=5, num_workers=0))
    with caplog.at_level(logging.INFO, logger="composer_sheared.data.dynamic"):
        samples = [s for _ in range(60) for s in ids(next(it))]
    c_draws = [i for d, i in samples if d == 2]
    assert len(c_draws) >= 90
    passes = [c_draws[k:k + 30] for k in range(0, 90, 30)]
    for p in passes:
        assert sorted(p) == list(range(30))  # each pass is a permutation: no repeat inside it
    assert passes[0] != passes[1] and passes[1] != passes[2]  # and a new shuffled order each time
    assert passes[0] != list(range(30))
    assert any("'c': pass 1" in r.getMessage() for r in caplog.records)


def test_two_ranks_disjoint_and_follow_the_drawn_composition(data_root):
    b, world = 6, 2
    p = [0.5, 0.25, 0.25]
    ranks = [DynamicStreamingDataset(data_root, DOMAINS, p, batch_size=b, rank=r, world_size=world, seed=3)
             for r in range(world)]
    iters = [iter(DataLoader(ds, batch_size=b, num_workers=0)) for ds in ranks]
    for k in range(40):
        per_rank = [ids(next(it)) for it in iters]
        glob = per_rank[0] + per_rank[1]
        assert len(set(glob)) == b * world, f"batch {k}: ranks overlap"
        drawn = draw_domains(3, k, b * world, np.array(p))
        assert [d for d, _ in glob] == drawn.tolist()
    # a change reaches both ranks at the same batch
    starts = [ds.set_proportions([0, 0, 1], current_batch=40) for ds in ranks]
    assert starts[0] == starts[1]
    for ds in ranks:
        assert all(d == 2 for batch in ds.plan(starts[0], 3) for d, _ in batch)


def test_rank_from_environment(data_root, monkeypatch):
    ds = DynamicStreamingDataset(data_root, DOMAINS, [0.5, 0.25, 0.25], batch_size=4, seed=3)
    ref = DynamicStreamingDataset(data_root, DOMAINS, [0.5, 0.25, 0.25], batch_size=4, seed=3, rank=1, world_size=2)
    assert ds.global_batch_size == 4
    # (set after construction: Streaming itself would try to join a process group)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ds.global_batch_size == 8
    assert ds.plan(0, 5) == ref.plan(0, 5)


def test_invalid_proportions_raise_named_errors(data_root):
    with pytest.raises(ValueError, match="2 entries but there are 3 domains"):
        DynamicStreamingDataset(data_root, DOMAINS, [0.5, 0.5], batch_size=4)
    ds = DynamicStreamingDataset(data_root, DOMAINS, [0.5, 0.25, 0.25], batch_size=4)
    with pytest.raises(ValueError, match="non-negative"):
        ds.set_proportions([1.5, -0.25, -0.25])
    with pytest.raises(ValueError, match="sum to 1"):
        ds.set_proportions([0.5, 0.25, 0.3])
    with pytest.raises(FileNotFoundError, match="domain 'zzz'"):
        DynamicStreamingDataset(data_root, ["a", "zzz"], [0.5, 0.5], batch_size=4)


def test_change_reaches_live_workers_and_pickled_copies(data_root):
    ds = DynamicStreamingDataset(data_root, DOMAINS, [1, 0, 0], batch_size=4)
    copy = pickle.loads(pickle.dumps(ds))  # what a spawn-started worker gets
    ds.set_proportions([0, 1, 0], current_batch=0)
    assert copy.changes == ds.changes and copy.proportions == [0, 1, 0]


def test_state_dict_resume_matches_uninterrupted_run(data_root):
    bs = 4
    ds = DynamicStreamingDataset(data_root, DOMAINS, [0.6, 0.3, 0.1], batch_size=bs, seed=5)
    it = iter(DataLoader(ds, batch_size=bs, num_workers=2))
    full = [ids(next(it)) for _ in range(12)]
    start = ds.set_proportions([0.0, 0.0, 1.0], current_batch=12)
    full += [ids(next(it)) for _ in range(12, start + 6)]
    state = ds.state_dict(num_samples=10 * bs, from_beginning=True)
    assert state["changes"][-1][0] == start

    resumed = DynamicStreamingDataset(data_root, DOMAINS, [0.6, 0.3, 0.1], batch_size=bs, seed=5)
    resumed.load_state_dict(state)
    it2 = iter(DataLoader(resumed, batch_size=bs, num_workers=0))  # worker count may differ
    again = [ids(next(it2)) for _ in range(10, start + 6)]
    assert again == full[10:]
    assert all(d == 2 for b in again[start - 10:] for d, _ in b)
    # from_beginning=False counts from the resume point
    assert resumed.state_dict(2 * bs, False)["sample_in_epoch"] == 12 * bs


# --- exact resume through a real Composer Trainer checkpoint + autoresume ------------------------


def _trainer_run(root, save_folder, run_name, duration, crash_at=None, change_at=2):
    from composer import Trainer
    from composer.core import Callback, Event
    from composer.models import ComposerModel

    class Recorder(ComposerModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, batch):
            self.seen.append(ids(batch))
            return self.w * batch["input_ids"].float().mean()

        def loss(self, outputs, batch):
            return (outputs - 1.0) ** 2

    class Steer(Callback):
        """Changes the proportions before the checkpoint; crashes to simulate an interruption."""

        def run_event(self, event, state, logger):
            if event != Event.BATCH_END:
                return
            b = int(state.timestamp.batch)
            if b == change_at:
                state.train_dataloader.dataset.set_proportions(
                    [0.0, 0.0, 1.0], current_batch=int(state.timestamp.batch_in_epoch))
            if crash_at is not None and b == crash_at:
                raise KeyboardInterrupt("simulated interruption")

    ds = DynamicStreamingDataset(root, DOMAINS, [0.5, 0.5, 0.0], batch_size=4, seed=11)
    model = Recorder()
    trainer = Trainer(model=model, train_dataloader=DataLoader(ds, batch_size=4, num_workers=2),
                      max_duration=duration, optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
                      callbacks=[Steer()], save_folder=str(save_folder), save_interval="4ba",
                      save_num_checkpoints_to_keep=-1, run_name=run_name, autoresume=True,
                      device="cpu", progress_bar=False, log_to_console=False, seed=1)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        pass
    finally:
        trainer.close()
    return model.seen, ds


def test_exact_resume_through_composer_checkpoint(data_root, tmp_path):
    full, ds = _trainer_run(data_root, tmp_path / "full", "full", "14ba")
    assert len(full) == 14
    change = ds.changes[-1][0]
    assert 4 < change < 14  # scheduled before the checkpoint, effective after it
    assert all(d == 2 for b in full[change:] for d, _ in b)
    assert not any(d == 2 for b in full[:change] for d, _ in b)

    part, _ = _trainer_run(data_root, tmp_path / "cut", "cut", "14ba", crash_at=6)
    assert part == full[:6]
    rest, _ = _trainer_run(data_root, tmp_path / "cut", "cut", "14ba")  # autoresume from ba4
    assert rest == full[4:]


def test_set_before_iteration_applies_from_the_first_batch(data_root):
    ds = DynamicStreamingDataset(data_root, DOMAINS, [1, 0, 0], batch_size=4)
    assert ds.set_proportions([0, 0, 1]) == 0
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=0)))
    assert batch["domain_id"].tolist() == [2, 2, 2, 2]


def _rank_main(rank, world, root, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = DynamicStreamingDataset(root, DOMAINS, [0.5, 0.3, 0.2], batch_size=5, seed=9)  # rank from dist
        # spawn-started workers (the macOS default) see no process group and no RANK env
        it = iter(DataLoader(ds, batch_size=5, num_workers=1, multiprocessing_context="spawn"))
        got = [ids(next(it)) for _ in range(20)]
        start = ds.set_proportions([0.0, 1.0, 0.0], current_batch=20)
        got += [ids(next(it)) for _ in range(20, start + 3)]
        np.save(os.path.join(out, f"rank{rank}.npy"), np.array(got))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.serial
def test_two_real_ranks_with_gloo(data_root, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import multiprocessing as mp

    # fork: the ranks inherit the imports (spawn would re-import torch and this module per rank)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, data_root, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    for k in range(len(r0)):
        glob = [tuple(x) for x in r0[k]] + [tuple(x) for x in r1[k]]
        assert len(set(glob)) == 10, f"batch {k}: ranks overlap"
    doms = [[d for d, _ in b] for b in np.concatenate([r0, r1], axis=1).tolist()]
    for k in range(20):
        assert doms[k] == draw_domains(9, k, 10, np.array([0.5, 0.3, 0.2])).tolist()
    assert all(d == 1 for b in doms[-3:] for d in b)  # the change reached both ranks at the same batch
