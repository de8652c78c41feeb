"""Resume of a pruning run after a SIGKILL equals the uninterrupted run.

A real train.py subprocess (tiny model, dynamic loading, two microbatches per step, checkpoint
every 2 batches) is SIGKILLed, a half-written checkpoint is left beside it, and it is rerun with
autoresume; log_alpha, lambdas, all weights, the
optimizer moments and the losses after the kill must match an uninterrupted run at 1e-6. Plus
the gate-noise keying and the setting-aside of unfinished checkpoint files, in-process.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from composer_sheared.run.checkpointing import set_aside_unfinished_checkpoints
from tests import conftest as _tiny

STEPS, KILL_AFTER = 8, 4
CKPT = "ep0-ba{}-rank0.pt"


def _config(data: Path, out: Path, schedule: str = "projection") -> Path:
    cfg = _tiny.prune_yaml(data, out, steps=STEPS)
    cfg["pruning"]["schedule"] = schedule  # the paper's method resumes exactly too
    cfg["pruning"]["mask_init"] = "importance" if schedule == "projection" else "uniform"
    cfg.update(run_name="resume", save_interval="2ba", autoresume=True, save_hf=False,
               device_train_microbatch_size=2)  # 2 microbatches per step: each needs its own noise
    cfg["pruning"]["lagrangian_warmup"] = "6ba"  # the kill falls inside the warm-up
    path = out.parent / f"{out.name}.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def _train(yaml: Path, kill_when=None) -> subprocess.CompletedProcess | None:
    """Run train.py; with `kill_when`, SIGKILL it as soon as kill_when() is true."""
    args = [sys.executable, "train.py", str(yaml)]
    if kill_when is None:
        return subprocess.run(args, cwd=_tiny.REPO, env=_tiny.subprocess_env(), capture_output=True, text=True, timeout=300)
    proc = subprocess.Popen(args, cwd=_tiny.REPO, env=_tiny.subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not kill_when():
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return None


def _latest_is(folder: Path, batch: int):
    link = folder / "latest-rank0.pt"
    return lambda: link.is_symlink() and os.readlink(link) == CKPT.format(batch)


def _final(folder: Path) -> dict:
    state = torch.load(folder / CKPT.format(STEPS), weights_only=False, map_location="cpu")["state"]
    tensors = {f"model/{k}": v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    for name, per_param in state["optimizers"]["DecoupledAdamW"]["state"].items():
        tensors.update({f"adam/{name}/{k}": v for k, v in per_param.items() if isinstance(v, torch.Tensor)})
    losses = {}  # step -> loss; a resumed run appends, so the last record of a step wins
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss/train/total" in rec.get("metrics", {}):
            losses[rec["step"]] = rec["metrics"]["loss/train/total"]
    return {"tensors": tensors, "losses": losses, "timestamp": int(state["timestamp"]["Timestamp"]["batch"])}


def _assert_same(ref: dict, got: dict) -> None:
    assert got["timestamp"] == ref["timestamp"] == STEPS
    names = ref["tensors"]
    assert any("log_alpha" in k for k in names) and any("lambda_1" in k for k in names)
    assert set(got["tensors"]) == set(names)
    torch.testing.assert_close({k: got["tensors"][k].double() for k in names},
                               {k: ref["tensors"][k].double() for k in names}, atol=1e-6, rtol=0.0)
    after = [s for s in ref["losses"] if s >= KILL_AFTER]
    assert len(after) == STEPS - KILL_AFTER
    for s in after:
        assert got["losses"][s] == pytest.approx(ref["losses"][s], abs=1e-6, rel=0), f"loss at step {s}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _tiny.make_data(tmp_path_factory.mktemp("mds"))


@pytest.fixture(scope="module", params=["projection", "lagrangian"])
def schedule(request):
    return request.param


@pytest.fixture(scope="module")
def uninterrupted(data, schedule, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    r = _train(_config(data, out, schedule))
    assert r.returncode == 0, r.stderr[-3000:]
    return _final(out)


@pytest.mark.slow
def test_sigkill_then_autoresume_equals_the_uninterrupted_run(data, schedule, uninterrupted, tmp_path):
    """Killed right after the ba4 checkpoint, and again while writing the ba6 one (simulated: the
    first half of a checkpoint file beside a `latest` that still points to ba4). One resume must
    recover from both: set the partial file aside, then replay batches 5-8 exactly."""
    out = tmp_path / "run"
    yaml = _config(data, out, schedule)
    _train(yaml, kill_when=_latest_is(out, KILL_AFTER))
    assert not (out / CKPT.format(KILL_AFTER + 2)).exists()
    whole = (out / CKPT.format(KILL_AFTER)).read_bytes()
    partial = out / CKPT.format(KILL_AFTER + 2)
    partial.write_bytes(whole[: len(whole) // 2])
    r = _train(yaml)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"set aside {partial}" in r.stderr
    assert (out / "incomplete" / partial.name).read_bytes() == whole[: len(whole) // 2]
    _assert_same(uninterrupted, _final(out))


# ---- setting unfinished checkpoints aside (no training) ------------------------------------
def _complete(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:  # torch.save's format: a zip archive
        zf.writestr("archive/data.pkl", b"x" * 64)
    return path


def _truncated(path: Path) -> Path:
    _complete(path)
    path.write_bytes(path.read_bytes()[:40])
    return path


def _link(folder: Path, batch: int) -> None:
    os.symlink(CKPT.format(batch), folder / "latest-rank0.pt")


def test_set_aside_keeps_what_latest_points_to(tmp_path):
    for b in (2, 4):
        _complete(tmp_path / CKPT.format(b))
    _link(tmp_path, 4)
    _truncated(tmp_path / CKPT.format(6))
    _complete(tmp_path / CKPT.format(8))  # complete but never confirmed by `latest`
    _truncated(tmp_path / "ep0-ba6-rank1.pt")  # another rank's file is that rank's business
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.warns(UserWarning) as caught:
        moved = set_aside_unfinished_checkpoints(str(tmp_path))
    messages = [str(w.message) for w in caught]
    assert f"set aside {tmp_path / CKPT.format(6)} (unreadable" in messages[0]
    assert f"set aside {tmp_path / CKPT.format(8)} (newer than" in messages[1] and len(messages) == 2
    assert moved == [tmp_path / "incomplete" / CKPT.format(b) for b in (6, 8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [CKPT.format(2), CKPT.format(4), "ep0-ba6-rank1.pt", "incomplete", "latest-rank0.pt", "metrics.jsonl"])
    assert os.readlink(tmp_path / "latest-rank0.pt") == CKPT.format(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set_aside_unfinished_checkpoints(str(tmp_path)) == []  # idempotent, silent


def test_set_aside_repoints_a_missing_or_unreadable_latest(tmp_path):
    # Killed between Composer removing the old `latest` and linking the new one.
    _complete(tmp_path / CKPT.format(2))
    _complete(tmp_path / CKPT.format(4))
    _truncated(tmp_path / CKPT.format(6))
    with pytest.warns(UserWarning) as caught:
        set_aside_unfinished_checkpoints(str(tmp_path))
    assert "now points to" in str(caught[-1].message)
    assert os.readlink(tmp_path / "latest-rank0.pt") == CKPT.format(4)
    assert not (tmp_path / CKPT.format(6)).exists()
    # `latest` pointing at an unreadable file falls back to the newest readable one.
    os.unlink(tmp_path / "latest-rank0.pt")
    _truncated(tmp_path / CKPT.format(4))
    _link(tmp_path, 4)
    with pytest.warns(UserWarning) as caught:
        set_aside_unfinished_checkpoints(str(tmp_path))
    assert len(caught) == 2  # the file set aside, the link re-pointed
    assert os.readlink(tmp_path / "latest-rank0.pt") == CKPT.format(2)
    assert (tmp_path / "incomplete" / CKPT.format(4)).exists()


def test_set_aside_a_first_checkpoint_killed_mid_write(tmp_path):
    _truncated(tmp_path / CKPT.format(2))
    with pytest.warns(UserWarning, match="resuming from the start"):
        set_aside_unfinished_checkpoints(str(tmp_path))
    assert not (tmp_path / "latest-rank0.pt").exists() and not (tmp_path / CKPT.format(2)).exists()
    assert set_aside_unfinished_checkpoints(None) == []
    assert set_aside_unfinished_checkpoints("s3://bucket/run") == []
    assert set_aside_unfinished_checkpoints(str(tmp_path / "missing")) == []


# ---- gate noise keyed by (seed, step, rank, microbatch) ------------------------------------
def _masks():
    from composer_sheared.pruning import ShearingMasks
    from composer_sheared.shapes import ModelShape

    src = ModelShape(num_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=4, intermediate_size=32, vocab_size=50)
    # sampled gates (the paper's schedule): the ones that draw noise
    return ShearingMasks(src, dataclasses.replace(src, hidden_size=12, intermediate_size=16), schedule="lagrangian").train()


def _gates(masks):
    return torch.cat([v.flatten() for v in masks().values() if v is not None])


def test_gate_noise_follows_the_key_not_the_global_rng():
    masks = _masks()
    masks.set_noise_key(17, 5, 0)
    torch.manual_seed(0)
    first, second = _gates(masks), _gates(masks)  # two microbatches of one step
    masks.set_noise_key(17, 5, 0)
    torch.manual_seed(123)  # whatever the global RNG did in between
    assert torch.equal(_gates(masks), first) and torch.equal(_gates(masks), second)
    assert not torch.equal(first, second)
    for key in ((17, 6, 0), (17, 5, 1), (18, 5, 0)):
        masks.set_noise_key(*key)
        assert not torch.equal(_gates(masks), first), key
    # without a key: the global RNG, as before
    unkeyed = _masks()
    torch.manual_seed(3)
    a = _gates(unkeyed)
    torch.manual_seed(3)
    assert torch.equal(_gates(unkeyed), a)
