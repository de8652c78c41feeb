"""A resume compares its config with the checkpointed run's: what defines the run may not change
(refused by key, every file left as it was), lr and duration may (each change named, and used);
a run killed during its final export finishes it on autoresume."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from composer_sheared.storage.atomic import host_tag
from composer_sheared.config import ConfigError, load_config, plain
from composer_sheared.run.resume import RUN_CONFIG, compare, read_run_config, write_run_config
from composer_sheared.demo.plots import read_jsonl, series
from tests.conftest import prune_yaml


def _yaml(cfg: dict, tmp_path):
    y = tmp_path / "c.yaml"
    OmegaConf.save(OmegaConf.create(cfg), y)
    return y


def _checkpointed(mds, tmp_path):
    """A run folder as a run leaves it: its config beside a checkpoint."""
    out = tmp_path / "out"
    cfg = prune_yaml(mds, out)
    cfg.update(autoresume=True, save_interval="2ba")
    y = _yaml(cfg, tmp_path)
    first, _ = load_config(str(y))
    write_run_config(plain(OmegaConf.structured(first)), out)
    (out / "ep0-ba2-rank0.pt").write_bytes(b"x")
    return y, out


@pytest.mark.parametrize("overrides, keys", [
    (["pruning.target.num_layers=2"], ["pruning.target.num_layers"]),
    (["seed=3", "data.proportions=[0.3,0.7]"], ["data.proportions", "seed"]),
    (["dynamic_loading.rule=constant", "scheduler.alpha_f=0.5"], ["dynamic_loading.rule", "scheduler.alpha_f"]),
])
def test_resume_that_changes_the_run_is_refused_by_key(mds, tmp_path, overrides, keys):
    y, out = _checkpointed(mds, tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(str(y), overrides)
    problems = dict(err.value.problems)
    assert sorted(problems) == keys, problems
    assert all(str(out / RUN_CONFIG) in m for m in problems.values())


def test_resume_may_change_lr_and_duration(mds, tmp_path):
    y, _ = _checkpointed(mds, tmp_path)
    _, resolved = load_config(str(y), ["optimizer.lr=0.002", "max_duration=8ba", "eval_interval=4ba"])
    assert resolved.resume_changes == [("eval_interval", "2ba", "4ba"), ("max_duration", "4ba", "8ba"),
                                       ("optimizer.lr", 0.001, 0.002)]
    _, resolved = load_config(str(y))
    assert resolved.resume_changes == []
    # a fresh run (no checkpoint yet) compares nothing
    (tmp_path / "out" / "ep0-ba2-rank0.pt").unlink()
    _, resolved = load_config(str(y), ["seed=3"])
    assert resolved.resume_changes == []


def test_compare_splits_defining_from_operational_keys():
    refused, changed = compare({"a": {"b": 1}, "optimizer": {"lr": 1.0, "eps": 1e-8}, "loggers": {"console": False}},
                               {"a": {"b": 1}, "optimizer": {"lr": 2, "eps": 1e-6}, "loggers": {"console": True},
                                "new": 5})
    assert refused == [("new", None, 5), ("optimizer.eps", 1e-8, 1e-6)]
    assert changed == [("loggers.console", False, True), ("optimizer.lr", 1.0, 2)]


def test_refused_resume_leaves_every_file_as_it_was(mds, tmp_path, capsys):
    import train

    y, out = _checkpointed(mds, tmp_path)
    (out / "metrics.jsonl").write_text('{"run": {"start_batch": 0}}\n{"step": 1, "metrics": {"x": 1}}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert train.cli([str(y), "pruning.target.num_layers=2"]) == 2
    err = capsys.readouterr().err
    assert "error: pruning.target.num_layers: 2, but the run being resumed has 3" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_finishes_on_autoresume_and_lr_change_is_used(mds, tmp_path, capsys):
    """A run killed while writing its final HF directory (simulated: the directory gone, a partial
    temp beside it) finishes the export on autoresume; a later resume with another lr trains with it."""
    import shutil

    import train

    out = tmp_path / "out"
    cfg = prune_yaml(mds, out, steps=2)
    cfg.update(run_name="resume", autoresume=True, save_interval="2ba")
    y = _yaml(cfg, tmp_path)
    assert train.cli([str(y)]) == 0
    assert read_run_config(out)["pruning"]["target"]["num_layers"] == 3
    shutil.rmtree(out / "pruned_hf")
    partial = out / f".pruned_hf.partial-999999999@{host_tag()}-x"
    partial.mkdir()
    capsys.readouterr()
    assert train.cli([str(y)]) == 0, capsys.readouterr().err[-3000:]
    assert "finishing the export" in capsys.readouterr().out
    assert (out / "pruned_hf" / "model.safetensors").is_file() and not partial.exists()

    assert train.cli([str(y), "max_duration=4ba", "save_interval=4ba", "optimizer.lr=0.002"]) == 0
    err = capsys.readouterr().err
    assert "resume: optimizer.lr changed from 0.001 to 0.002" in err and "max_duration changed" in err
    state = torch.load(out / "ep0-ba4-rank0.pt", weights_only=False, map_location="cpu")["state"]
    assert state["optimizers"]["DecoupledAdamW"]["param_groups"][0]["initial_lr"] == pytest.approx(0.002)
    assert state["schedulers"]["LambdaLR"]["base_lrs"][0] == pytest.approx(0.002)
    steps, lrs = series(read_jsonl(out / "metrics.jsonl"), "lr-DecoupledAdamW/group0")
    assert steps[-2:] == [3, 4] and lrs[-2] > 0.001 * 0.5, lrs  # the old rate, cosine-decayed, is < 0.0005 at 3/4
    assert read_run_config(out)["optimizer"]["lr"] == pytest.approx(0.002)
