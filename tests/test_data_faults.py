"""Damaged data: truncated or overwritten shards, a vocabulary larger than the model's."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from torch.utils.data import DataLoader

from composer_sheared.data import DataIntegrityError, DynamicStreamingDataset, check_vocab, domain_eval_dataset
from data_prep.tokenize_domains import write_mds_sequences

SEQ, VOCAB = 16, 1000
DOMAINS = ["a", "b"]


@pytest.fixture()
def root(tmp_path):
    """tokenize_domains' layout: <root>/{train,eval}/<domain>/ MDS with hashes, and stats.json."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("eval", 20)):
        for d in DOMAINS:
            write_mds_sequences(str(tmp_path / split / d), (rng.integers(0, VOCAB, SEQ) for _ in range(n)), SEQ, VOCAB)
    (tmp_path / "stats.json").write_text(json.dumps({"vocab_size": VOCAB, "seq_len": SEQ}))
    return tmp_path


def shard(root, split="train", domain="b"):
    index = json.loads((root / split / domain / "index.json").read_text())
    assert index["shards"][0]["raw_data"]["hashes"]  # the writer records hashes
    return root / split / domain / index["shards"][0]["raw_data"]["basename"]


def overwrite(path, byte, start_frac=0.5, length=64):
    """Overwrite ``length`` bytes inside the sample data region, keeping the file size."""
    data = bytearray(path.read_bytes())
    at = int(len(data) * start_frac)
    data[at:at + length] = bytes([byte]) * len(data[at:at + length])
    path.write_bytes(bytes(data))


def open_train(root, **kw):
    return DynamicStreamingDataset(str(root), DOMAINS, [0.5, 0.5], batch_size=4, **kw)


def read_all(ds, batches=150):
    it = iter(DataLoader(ds, batch_size=4, num_workers=0))
    for _ in range(batches):
        next(it)


def test_intact_data_opens_and_reads(root):
    read_all(open_train(root))
    ev = domain_eval_dataset(str(root), "b", batch_size=4)
    assert len(list(DataLoader(ev, batch_size=4))) == 5


def test_truncated_shard_is_named_when_the_dataset_opens(root):
    path = shard(root)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataIntegrityError, match=rf"domain 'b' split 'train': shard file {path} has \d+ bytes, "
                                                 rf"index.json says \d+"):
        open_train(root, verify="size")
    epath = shard(root, "eval")
    epath.write_bytes(epath.read_bytes()[:-10])
    with pytest.raises(DataIntegrityError, match=rf"domain 'b' split 'eval': shard file {epath} has"):
        domain_eval_dataset(str(root), "b", batch_size=4, verify="size")


@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_overwritten_bytes_fail_the_hash_check_at_open(root, byte):
    path = shard(root)
    overwrite(path, byte)
    with pytest.raises(DataIntegrityError, match=rf"domain 'b' split 'train': shard file {path} does not match "
                                                 rf"its xxh3_64 hash"):
        open_train(root)
    epath = shard(root, "eval")
    overwrite(epath, byte)
    with pytest.raises(DataIntegrityError, match=rf"domain 'b' split 'eval': shard file {epath} does not match"):
        domain_eval_dataset(str(root), "b", batch_size=4)


def test_lazy_hash_check_names_the_sample_being_read(root):
    overwrite(shard(root), 0x00)
    ds = open_train(root, verify="lazy")  # opens: only sizes were checked
    with pytest.raises(DataIntegrityError, match=r"domain 'b' .*shard\.00000\.mds \(reading sample \d+ of this "
                                                 r"shard\) does not match"):
        read_all(ds)


def test_tokens_outside_the_vocabulary_without_a_hash_check(root):
    # data without hashes (another writer) only has the vocabulary check: 0xFF bytes are token 65535
    overwrite(shard(root), 0xFF, start_frac=0.1, length=len(shard(root).read_bytes()))
    with pytest.raises(DataIntegrityError, match=r"domain 'b' split 'train': shard file .*shard\.00000\.mds, "
                                                 r"sample \d+ of the shard \(\d+ of the domain\): token id 65535 .* vocabulary of 1000"):
        read_all(open_train(root, verify="size"))
    overwrite(shard(root, "eval"), 0xFF, start_frac=0.1, length=10_000)
    ev = domain_eval_dataset(str(root), "b", batch_size=4, verify="size")
    with pytest.raises(DataIntegrityError, match=r"domain 'b' split 'eval': shard file .*, sample \d+ of the shard: "
                                                 r"token id 65535"):
        list(DataLoader(ev, batch_size=4))


def test_check_vocab_against_the_model(root, caplog):
    assert check_vocab(str(root), VOCAB) == VOCAB
    assert check_vocab(str(root), 4 * VOCAB) == VOCAB  # a larger embedding is fine
    (root / "stats.json").write_text(json.dumps({"vocab_size": 49152}))
    with pytest.raises(ValueError, match=r"stats.json: the data was tokenized with a vocabulary of 49152 tokens, "
                                         r"larger than the model's vocab_size 128"):
        check_vocab(str(root), 128)
    (root / "stats.json").write_text(json.dumps({"vocab_size": "many"}))
    with pytest.raises(ValueError, match=r"stats.json: 'vocab_size' should be a positive integer, got 'many'"):
        check_vocab(str(root), 128)
    (root / "stats.json").write_text(json.dumps({"vocab_size": VOCAB}))
    with pytest.raises(ValueError, match=r"vocabulary of 1000 tokens, larger than the model's vocab_size 999"):
        open_train(root, vocab_size=VOCAB - 1)  # the dataset given the model's vocabulary checks it too
    os.remove(root / "stats.json")
    assert check_vocab(str(root), 128) is None
    assert "cannot check" in caplog.text


def test_a_killed_runs_shared_block_is_removed_by_the_next_run(root):
    """A SIGKILLed process cannot unlink its /dev/shm block; the next dataset does it for it."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import sys, time; sys.path.insert(0, sys.argv[1])\n"
              "from composer_sheared.data import DynamicStreamingDataset\n"
              "ds = DynamicStreamingDataset(sys.argv[2], ['a', 'b'], [0.5, 0.5], batch_size=4)\n"
              "print(ds._control.path, flush=True); time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, repo, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        path = proc.stdout.readline().strip()
        assert os.path.basename(path).startswith(f"composer_sheared_dbl_{proc.pid}_") and os.path.exists(path)
    finally:
        proc.kill()
        proc.wait()
    assert os.path.exists(path)  # SIGKILL: nothing ran to remove it
    alive = open_train(root)  # a live block is never touched
    open_train(root)
    assert not os.path.exists(path)
    assert os.path.exists(alive._control.path)


def test_stale_temp_dirs_only_of_dead_owners_on_this_host_are_removed(tmp_path):
    from composer_sheared.storage.atomic import atomic_directory, host_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"dead": f".out.partial-{dead.pid}@{host_tag()}-abc123_x",
             "dead_old": f".out.old-{dead.pid}@{host_tag()}-zz9",
             "live": f".out.partial-{os.getpid()}@{host_tag()}-abc123_y",
             "other_host": f".out.partial-{dead.pid}@elsewhere-abc123_z",
             "other_dir": f".outer.partial-{dead.pid}@{host_tag()}-abc123_w"}
    for n in names.values():
        (tmp_path / n).mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", names["live"], names["other_host"], names["other_dir"]])


class _RacingSharedMemory:
    """Streaming's SharedMemory as seen by a job that loses the race for a prefix: the first create
    of a '_locals' block finds it already made by another job."""

    def __init__(self, real, fail_with):
        self.real, self.fail_with, self.creates = real, fail_with, 0

    def __call__(self, name, create=False, *args, **kwargs):
        if create and name.endswith("_locals"):
            self.creates += 1
            if self.creates == 1:
                raise FileExistsError(17, "File exists", self.fail_with or "/" + name)  # as the OS names it
        return self.real(name, create, *args, **kwargs)


def test_eval_dataset_retries_a_lost_shared_memory_race(root, monkeypatch):
    import streaming.base.shared.prefix as prefix

    racing = _RacingSharedMemory(prefix.SharedMemory, None)
    monkeypatch.setattr(prefix, "SharedMemory", racing)
    ev = domain_eval_dataset(str(root), "b", batch_size=4)
    assert racing.creates == 2  # lost once, then took the next free prefix
    assert len(list(DataLoader(ev, batch_size=4))) == 5


def test_shared_memory_race_is_not_retried_when_it_is_not_one(root, monkeypatch):
    """A FileExistsError about something other than a Streaming block passes through; under
    torch.distributed the race is an error that says what happened (a retry would pair the
    ranks' barriers wrongly)."""
    import streaming.base.shared.prefix as prefix

    import composer_sheared.data.eval_sets as data_eval

    monkeypatch.setattr(prefix, "SharedMemory", _RacingSharedMemory(prefix.SharedMemory, "/tmp/some_file"))
    with pytest.raises(FileExistsError, match="some_file"):
        domain_eval_dataset(str(root), "b", batch_size=4)
    monkeypatch.setattr(prefix, "SharedMemory", _RacingSharedMemory(prefix.SharedMemory.real, None))
    monkeypatch.setattr(data_eval, "_distributed", lambda: True)
    with pytest.raises(RuntimeError, match="another job on this host"):
        domain_eval_dataset(str(root), "b", batch_size=4)
