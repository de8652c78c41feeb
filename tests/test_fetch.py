"""composer_sheared.storage.fetch against a local S3-compatible server (moto): a HF model directory goes
up and comes back loadable; a complete directory is skipped; an interrupted download resumes; an
empty prefix, a missing bucket and an unreachable endpoint fail with the URI named, leaving nothing."""
from __future__ import annotations

import json
import subprocess
import sys

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
