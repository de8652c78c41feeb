"""Data read from a real S3-compatible server (moto, 127.0.0.1): same samples as local reads,
each shard downloaded once per node, and every failure (a missing file, a stalled server, a
dead one) a bounded, named error; the config checks the remote's index files before loading."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import composer_sheared.data.remote as remote_mod
from composer_sheared.config import ConfigError, load_config
from composer_sheared.data import DynamicStreamingDataset, domain_eval_dataset
from composer_sheared.data.remote import RemoteDataError
from tests.conftest import DOMAINS, make_data, prune_yaml
from tests.s3 import CREDENTIALS, s3  # noqa: F401  (the fixture)

BUCKET, PREFIX = "data", "mds"
URL = f"s3://{BUCKET}/{PREFIX}"
FAST = {"download_timeout": 0.5, "download_retry": 1}  # two tries of at most 0.5 s per connect/read

pytestmark = pytest.mark.timeout(60)  # a hang fails the test instead of the suite


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("src"))


@pytest.fixture
def remote(s3, src):  # noqa: F811
    s3.client.create_bucket(Bucket=BUCKET)
    for f in sorted(src.rglob("*")):
        if f.is_file():
            s3.client.upload_file(str(f), BUCKET, f"{PREFIX}/{f.relative_to(src)}")
    return s3


def train_ds(local, remote=None, **kw):
    return DynamicStreamingDataset(str(local), list(DOMAINS), [0.5, 0.5], batch_size=4, remote=remote, seed=3, **kw)


def batches(ds, n, workers=0):
    it = iter(DataLoader(ds, batch_size=4, num_workers=workers))
    try:
        return [next(it)["input_ids"] for _ in range(n)]
    finally:
        # An endless stream's iterator (or one whose worker raised) waits up to 5 s per worker
        # when it is collected, also for a plain IterableDataset in torch 2.7: end the workers
        # now, so that wait does not fall into a later test's timing.
        for w in getattr(it, "_workers", []):
            w.terminate()


@pytest.fixture
def downloads(monkeypatch, tmp_path):
    """The remote files each attempt downloaded, from every process (DataLoader workers fork)."""
    log = tmp_path / "downloads.log"
    once = remote_mod._download_once

    def logged(url, tmp, timeout):
        with open(log, "a") as f:
            f.write(url + "\n")
        once(url, tmp, timeout)

    monkeypatch.setattr(remote_mod, "_download_once", logged)
    return lambda: log.read_text().split() if log.exists() else []


def test_remote_reads_match_local_and_download_each_shard_once(remote, src, tmp_path, downloads):
    want = batches(train_ds(src), 6)
    got = batches(train_ds(tmp_path / "cache", URL), 6, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    shards = [u for u in downloads() if u.endswith(".mds")]
    assert sorted(shards) == [f"{URL}/train/{d}/shard.00000.mds" for d in DOMAINS]  # once each, 2 workers
    ev_local = [b["input_ids"] for b in DataLoader(domain_eval_dataset(str(src), "beta", batch_size=4), batch_size=4)]
    ev = domain_eval_dataset(str(tmp_path / "cache"), "beta", remote=URL, batch_size=4)
    ev_remote = [b["input_ids"] for b in DataLoader(ev, batch_size=4, num_workers=2)]
    assert len(ev_remote) == 2 and all(torch.equal(a, b) for a, b in zip(ev_local, ev_remote))


@pytest.mark.parametrize("workers", [0, 2])
def test_missing_shard_is_an_error_naming_it(remote, tmp_path, workers):
    remote.client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/eval/beta/shard.00000.mds")
    with pytest.raises(FileNotFoundError, match=rf"{URL}/eval/beta/shard\.00000\.mds: no such file on the remote"):
        ev = domain_eval_dataset(str(tmp_path / "cache"), "beta", remote=URL, batch_size=4)
        list(DataLoader(ev, batch_size=4, num_workers=workers))
    remote.client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/train/alpha/shard.00000.mds")
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match=rf"{URL}/train/alpha/shard\.00000\.mds: no such file"):
        batches(train_ds(tmp_path / "cache", URL), 4, workers=workers)
    assert time.monotonic() - t0 < 15  # not retried: the remote answered


class Stall:
    """A server that accepts connections and never answers (a paused or wedged S3 endpoint)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def cached_indexes(src, cache):
    """The local cache as a reader leaves it after opening: index files only, no shards."""
    for f in [src / "stats.json", *src.glob("*/*/index.json")]:
        (cache / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, cache / f.relative_to(src))


@pytest.fixture
def creds(monkeypatch):
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)


def read_until_error(ds, workers, error, match):
    """Read until ``error``; seconds until it was raised."""
    t0 = time.monotonic()
    with pytest.raises(error, match=match):
        batches(ds, 4, workers=workers)
    return time.monotonic() - t0


@pytest.mark.parametrize("workers", [0, 2])
def test_stalled_server_is_a_bounded_error_naming_the_file(creds, src, tmp_path, monkeypatch, workers):
    stall = Stall()
    monkeypatch.setenv("S3_ENDPOINT_URL", stall.endpoint)
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteDataError, match=rf"{URL}/train/alpha/index\.json: no complete download in 2 "
                                                  rf"attempt\(s\) of at most 0\.5s per connect or read"):
            train_ds(tmp_path / "a", URL, reader_kwargs=FAST)
        assert time.monotonic() - t0 < 10
        # the endpoint just failed: the next file fails at once, by name
        with pytest.raises(RemoteDataError, match=rf"{URL}/eval/beta/index\.json: not tried: s3://{BUCKET} at "
                                                  rf"{stall.endpoint} gave no answer"):
            domain_eval_dataset(str(tmp_path / "a"), "beta", remote=URL, batch_size=4, **FAST)

        monkeypatch.setattr(remote_mod, "_DOWN", {})
        cache = tmp_path / "b"
        cached_indexes(src, cache)  # opens without the server; the shard reads stall
        took = read_until_error(train_ds(cache, URL, reader_kwargs=FAST), workers, RemoteDataError,
                                rf"{URL}/train/(alpha|beta)/shard\.00000\.mds: no complete download")
        assert took < 10
    finally:
        stall.close()


def test_dead_server_ends_the_read_promptly(creds, src, tmp_path, monkeypatch):
    dead = Stall()
    dead.close()  # the port no longer listens: connections are refused, as after the server was killed
    monkeypatch.setenv("S3_ENDPOINT_URL", dead.endpoint)
    cached_indexes(src, tmp_path)
    ds = train_ds(tmp_path, URL, reader_kwargs={"download_timeout": 5, "download_retry": 1})
    took = read_until_error(ds, 2, RemoteDataError, rf"{URL}/train/(alpha|beta)/shard\.00000\.mds: no complete "
                                                    rf"download in 2 attempt.*EndpointConnectionError")
    assert took < 10  # ~1 s: one retry after 0.5 s, none hidden below it (was 22 s); loose for a busy box


def _remote_config(tmp_path, *overrides):
    cfg = prune_yaml(tmp_path / "cache", tmp_path / "out")
    cfg["data"]["remote"] = URL
    y = tmp_path / "c.yaml"
    OmegaConf.save(OmegaConf.create(cfg), y)
    return load_config(str(y), list(overrides))


def test_config_checks_the_remote_index_files(remote, src, tmp_path):
    cfg, _ = _remote_config(tmp_path)  # fetches index.json and stats.json into the cache, all good
    assert (tmp_path / "cache" / "stats.json").is_file()
    assert sorted(p.parent.name for p in (tmp_path / "cache").glob("*/*/index.json")) == sorted(DOMAINS * 2)
    assert not list((tmp_path / "cache").rglob("*.mds"))  # no shard was fetched for the check

    with pytest.raises(ConfigError) as err:
        _remote_config(tmp_path, "data.domains=[alpha,gamma]")
    assert err.value.problems[0] == ("data.domains[1]", f"'gamma' has no split 'train': {URL}/train/gamma/"
                                                        f"index.json is not on the remote")
    with pytest.raises(ConfigError, match=r"max_seq_len: 64, but .*stats.json says the samples have 32 tokens"):
        _remote_config(tmp_path, "max_seq_len=64")

    shutil.rmtree(tmp_path / "cache")
    stats = json.loads((src / "stats.json").read_text())
    remote.client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/stats.json",
                             Body=json.dumps({**stats, "vocab_size": 1000}).encode())
    with pytest.raises(ConfigError) as err:
        _remote_config(tmp_path)
    assert [k for k, _ in err.value.problems] == ["data.remote"]
    assert "1000-token vocabulary, but the model has 128 embeddings" in str(err.value)


def test_dry_run_does_not_contact_the_remote(creds, tmp_path, monkeypatch):
    stall = Stall()
    monkeypatch.setenv("S3_ENDPOINT_URL", stall.endpoint)
    try:
        t0 = time.monotonic()
        cfg, _ = _remote_config(tmp_path, "dry_run=true")
        assert cfg.dry_run and time.monotonic() - t0 < 10 and not stall.conns
        assert not (tmp_path / "cache").exists()
    finally:
        stall.close()
