"""composer_sheared.storage.fetch against a local S3-compatible server (moto): a HF model directory goes
up and comes back loadable; a complete directory is skipped; an interrupted download resumes; an
empty prefix, a missing bucket and an unreachable endpoint fail with the URI named, leaving nothing."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from composer_sheared.storage.fetch import MANIFEST, FetchError, download_prefix, main, upload_directory
from tests.conftest import REPO, subprocess_env, tiny_model
from tests.s3 import s3  # noqa: F401  (fixture)


@pytest.fixture
def model_in_bucket(s3, tmp_path):  # noqa: F811
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "src")
    s3.client.create_bucket(Bucket="models")
    # a sibling whose name extends the prefix: it must not be fetched with it
    s3.client.put_object(Bucket="models", Key="llama/tiny-chat/config.json", Body=b"{}")
    upload_directory(tmp_path / "src", "s3://models/llama/tiny", progress=False)
    return model


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_download_loads_with_transformers_and_skips_when_complete(s3, model_in_bucket, tmp_path):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dl" / "tiny"
    assert download_prefix("s3://models/llama/tiny/", out, progress=False) == out
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "generation_config.json",
                                                            "model.safetensors", MANIFEST])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, model_in_bucket.model.layers[1].mlp.up_proj.weight)
    assert _siblings(out) == ["tiny"]  # no partial directory left

    # complete: skipped without the store (the bucket may be gone)
    s3.client.delete_object(Bucket="models", Key="llama/tiny/config.json")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    download_prefix("s3://models/llama/tiny", out, progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # ... but a damaged directory is not taken as complete
    (out / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FetchError, match="not a complete download"):
        download_prefix("s3://models/llama/tiny", out, progress=False)


def test_interrupted_download_resumes(s3, model_in_bucket, tmp_path, monkeypatch):  # noqa: F811
    from composer.utils import S3ObjectStore

    out = tmp_path / "tiny"
    real, calls = S3ObjectStore.download_object, []

    def flaky(self, name, filename, **kw):
        calls.append(name)
        if name.endswith("model.safetensors"):
            raise ConnectionError("connection reset")
        return real(self, name, filename, **kw)

    monkeypatch.setattr(S3ObjectStore, "download_object", flaky)
    with pytest.raises(FetchError, match=r"s3://models/llama/tiny/model.safetensors: download failed"):
        download_prefix("s3://models/llama/tiny", out, progress=False)
    assert not out.exists()  # nothing visible at the final path
    assert (tmp_path / ".tiny.fetch-partial" / "config.json").is_file()

    calls.clear()
    monkeypatch.setattr(S3ObjectStore, "download_object", lambda self, name, filename, **kw: (
        calls.append(name), real(self, name, filename, **kw))[1])
    download_prefix("s3://models/llama/tiny", out, progress=False)
    assert calls == ["llama/tiny/model.safetensors"]  # the finished files were kept
    assert json.loads((out / MANIFEST).read_text())["uri"] == "s3://models/llama/tiny"
    assert not (tmp_path / ".tiny.fetch-partial").exists()


def test_missing_prefix_bucket_and_endpoint_name_the_uri(s3, model_in_bucket, tmp_path, capsys):  # noqa: F811
    with pytest.raises(FetchError, match=r"^s3://models/llama/nope: no objects under this prefix"):
        download_prefix("s3://models/llama/nope", tmp_path / "a", progress=False)
    with pytest.raises(FetchError, match=r"^s3://no-such-bucket/x: cannot list the objects .*NoSuchBucket"):
        download_prefix("s3://no-such-bucket/x", tmp_path / "b", progress=False)
    with pytest.raises(FetchError, match=r"^/some/dir: expected an object-store URI"):
        download_prefix("/some/dir", tmp_path / "c", progress=False)
    with pytest.raises(FetchError, match=r"^ftp://host/x: unsupported object store"):
        download_prefix("ftp://host/x", tmp_path / "d", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

    # the CLI: exit 2, `error: <uri>: ...`, an unreachable endpoint included
    env = {**subprocess_env(), **s3.env, "S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}
    r = subprocess.run([sys.executable, "-m", "composer_sheared.fetch", "s3://models/llama/tiny",
                        str(tmp_path / "e"), "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: s3://models/llama/tiny: cannot list the objects"), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "e").exists()

    # the same entry point in-process, against the live server
    assert main(["s3://models/llama/tiny", str(tmp_path / "f"), "--no-progress"]) == 0
    assert (tmp_path / "f" / "model.safetensors").is_file()
    assert main(["s3://models/llama/gone", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err.startswith("error: s3://models/llama/gone: no objects under this prefix")


class StallingProxy:
    """An S3 endpoint in front of moto that forwards every request, except that the objects whose
    keys end with `stall` get their status and headers but never a byte of the body (a server
    that wedges mid-download); `stall=""` stalls every request before it answers."""

    def __init__(self, upstream: str, stall: str):
        self.released = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                if not stall:
                    proxy.released.wait(60)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                up = http.client.HTTPConnection(urlsplit(upstream).netloc, timeout=30)
                up.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = up.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.end_headers()
                if self.command == "GET" and urlsplit(self.path).path.endswith(stall):
                    self.wfile.flush()
                    proxy.released.wait(60)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)
                up.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalling(s3, monkeypatch):  # noqa: F811
    """Start a StallingProxy(stall) and point S3_ENDPOINT_URL at it."""
    proxies = []

    def start(stall):
        proxies.append(StallingProxy(s3.endpoint, stall))
        monkeypatch.setenv("S3_ENDPOINT_URL", proxies[-1].endpoint)
        return proxies[-1]

    yield start
    for p in proxies:
        p.close()


BOUND = r"no complete answer in 2 attempt\(s\) of at most 1s per connect or read"


@pytest.mark.timeout(30)  # the unbounded client waits 60 s per read, 5 reads per file: a hang, not a pass
def test_server_stalling_mid_download_is_a_bounded_error_naming_the_object(stalling, model_in_bucket, tmp_path):
    stalling("model.safetensors")
    t0 = time.monotonic()
    with pytest.raises(FetchError, match=rf"^s3://models/llama/tiny/model\.safetensors: download failed: {BOUND} "
                                         r".*; rerun to resume"):
        download_prefix("s3://models/llama/tiny", tmp_path / "tiny", timeout=1, attempts=2, progress=False)
    took = time.monotonic() - t0
    assert took < 10, took  # 2 reads of 1 s and the small files' requests; loose for a busy box
    assert not (tmp_path / "tiny").exists()
    partial = tmp_path / ".tiny.fetch-partial"
    assert (partial / "config.json").is_file() and not (partial / "model.safetensors").exists()


@pytest.mark.timeout(30)
def test_stalled_server_and_cli_bounds(stalling, model_in_bucket, tmp_path, capsys):
    stalling("")  # answers nothing: the listing is the first request to run out of attempts
    t0 = time.monotonic()
    assert main(["s3://models/llama/tiny", str(tmp_path / "tiny"), "--timeout", "1", "--attempts", "2",
                 "--no-progress"]) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert err.startswith("error: s3://models/llama/tiny: cannot list the objects: "), err
    assert "no complete answer in 2 attempt(s) of at most 1s per connect or read" in err and "rerun" in err, err
    assert not (tmp_path / "tiny").exists()

    with pytest.raises(SystemExit):
        main(["s3://models/llama/tiny", str(tmp_path / "tiny"), "--attempts", "0"])
    assert "--attempts: expected an integer >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="timeout: expected a positive number of seconds"):
        download_prefix("s3://models/llama/tiny", tmp_path / "tiny", timeout=0)
