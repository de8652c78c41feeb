"""train.py through its CLI: a tiny random model pruned, sliced and trained further; DDP on CPU;
a rerun into a finished folder; a diverging run; config errors before anything is created."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from composer_sheared.demo.plots import read_jsonl, series
from tests.conftest import TARGET, prune_yaml

pytestmark = pytest.mark.slow  # every test starts train.py in a subprocess


def _write(cfg: dict, path: Path) -> Path:
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_prune_slice_continue_and_rerun(mds, tmp_path, run_train):
    import torch
    from transformers import AutoModelForCausalLM

    run = tmp_path / "prune"
    y = _write(prune_yaml(mds, run), tmp_path / "prune.yaml")
    _ok(run_train(y, "max_duration=4ba"))
    model = AutoModelForCausalLM.from_pretrained(run / "pruned_hf")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (
        TARGET["num_layers"], TARGET["hidden_size"], TARGET["num_attention_heads"], TARGET["num_key_value_heads"],
        TARGET["intermediate_size"])
    assert (run / "pruned_hf" / "generation_config.json").exists()
    recs = read_jsonl(run / "metrics.jsonl")
    steps, exp = series(recs, "shearing/expected_params")
    assert steps == [1, 2, 3, 4] and all(v > 0 for v in exp)
    assert series(recs, "dbl/weight/alpha")[0], "dynamic loading logged no weights"
    assert series(recs, "metrics/alpha/LanguageCrossEntropy")[0], "no per-domain eval"
    assert (run / "ep0-ba4-rank0.pt").exists(), "no checkpoint"

    # a second run into the finished folder: refused without save_overwrite (exit 2, nothing touched) ...
    r = run_train(y, "max_duration=2ba", "save_interval=2ba")
    assert r.returncode == 2 and "error: save_folder:" in r.stderr and "Traceback" not in r.stderr
    # ... and with it, the earlier run's checkpoints and metrics are gone, not mixed with the new run's
    _ok(run_train(y, "max_duration=2ba", "save_interval=2ba", "save_overwrite=true"))
    assert sorted(p.name for p in run.glob("ep*.pt")) == ["ep0-ba2-rank0.pt"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"run"' in line[:8] for line in lines) == 1
    assert series(read_jsonl(run / "metrics.jsonl"), "shearing/expected_params")[0] == [1, 2]

    # continued pretraining from the sliced directory
    r = run_train(y, "pruning=null", "model.config=null", f"model.source={run / 'pruned_hf'}",
                  f"save_folder={tmp_path / 'cont'}", "max_duration=3ba")
    _ok(r)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "cont" / "hf")
    assert final.config.hidden_size == TARGET["hidden_size"]
    assert not torch.equal(final.model.embed_tokens.weight, model.model.embed_tokens.weight), "weights did not train"


@pytest.mark.serial
def test_ddp_two_ranks_cpu(mds, tmp_path, run_train):
    y = _write(prune_yaml(mds, tmp_path / "ddp"), tmp_path / "ddp.yaml")
    composer = str(Path(sys.executable).parent / "composer")
    _ok(run_train(y, "max_duration=3ba", "save_interval=3ba", launcher=[composer, "-n", "2"]))
    assert (tmp_path / "ddp" / "pruned_hf" / "model.safetensors").exists()
    assert series(read_jsonl(tmp_path / "ddp" / "metrics.jsonl"), "shearing/expected_params")[0] == [1, 2, 3]


def test_nan_loss_stops_the_run_and_saves_nothing(mds, tmp_path, run_train):
    # dynamic loading is on (prune_yaml): the run must stop at the batch, not at the next eval
    y = _write(prune_yaml(mds, tmp_path / "nan", steps=8), tmp_path / "nan.yaml")
    r = run_train(y, "optimizer.lr=1e10", "eval_interval=8ba")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "error: loss is NaN at batch" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nan" / "pruned_hf").exists()
    assert not list((tmp_path / "nan").glob("ep*.pt"))


def test_config_errors_exit_2_before_anything_is_created(mds, tmp_path, run_train):
    out = tmp_path / "never"
    y = _write(prune_yaml(mds, out), tmp_path / "bad.yaml")
    r = run_train(y, "pruning.target.num_layers=9", "data.proportions=[1.5,-0.5]", "max_duration=4 batches",
                  "dynamic_loading.reference_losses=[.nan,4]", "model.tokenizer=/no/such/tokenizer",
                  "pruning.mask_lr=abc", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    # the first bad type stops the merge; the rest are validated together
    assert r.stderr.startswith("error: pruning.mask_lr:"), r.stderr
    r = run_train(y, "pruning.target.num_layers=9", "data.proportions=[1.5,-0.5]", "max_duration=4 batches",
                  "dynamic_loading.reference_losses=[.nan,4]", "model.tokenizer=/no/such/tokenizer", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for key in ("pruning.target", "data.proportions", "max_duration", "dynamic_loading.reference_losses",
                "model.tokenizer"):
        assert f"error: {key}: " in r.stderr, (key, r.stderr)
    assert not out.exists()


def test_downstream_evaluator_in_the_recipe(mds, tmp_path, run_train, tokenizer):
    """`downstream.task_dir` adds the next-line accuracy to every eval of a recipe run."""
    import random

    from data_prep import next_line_task as nlt
    from tests.conftest import prune_yaml

    rnd = random.Random(0)
    docs = {dom: [nlt.Doc(f"{dom}-{k}", "\n".join(" ".join(f"w{rnd.randrange(2, 96)}" for _ in range(5))
                                                   for _ in range(10))) for k in range(6)]
            for dom in ("alpha", "beta")}
    nlt.build_next_line_task(str(tmp_path / "task"), docs, items=8, seed=0)
    tokenizer.save_pretrained(tmp_path / "tok")
    cfg = prune_yaml(mds, tmp_path / "run", steps=2)
    cfg.pop("pruning")
    cfg["model"]["tokenizer"] = str(tmp_path / "tok")
    cfg["downstream"] = {"task_dir": str(tmp_path / "task"), "batch_size": 2}
    y = tmp_path / "run.yaml"
    OmegaConf.save(OmegaConf.create(cfg), y)
    _ok(run_train(y, "eval_interval=2ba", "save_hf=false"))
    accs = [rec["metrics"][k] for rec in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            for k in rec.get("metrics", {}) if k == "metrics/next_line/NextLineAccuracy"]
    assert accs and all(0.0 <= a <= 1.0 for a in accs)
    bad = run_train(y, f"downstream.task_dir={tmp_path / 'nope'}")
    assert bad.returncode == 2 and "downstream.task_dir" in bad.stderr
