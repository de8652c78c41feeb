"""The recipe config is validated as a whole, before anything loads; each error names its key."""
from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from composer_sheared.config import ConfigError, PruningConfig, load_config
from tests.conftest import prune_yaml


def _load(cfg: dict, tmp_path, *overrides):
    y = tmp_path / "c.yaml"
    OmegaConf.save(OmegaConf.create(cfg), y)
    return load_config(str(y), list(overrides))


def _keys(err: pytest.ExceptionInfo) -> list[str]:
    return [k for k, _ in err.value.problems]


def test_valid_config_resolves_the_target(mds, tmp_path):
    cfg, resolved = _load(prune_yaml(mds, tmp_path / "o"), tmp_path)
    assert cfg.pruning.target["num_layers"] == 3
    assert (resolved.source.num_layers, resolved.target.num_layers) == (4, 3)
    assert resolved.target.num_attention_heads == 4


@pytest.mark.parametrize("overrides, key, needle", [
    (["max_durations=3ba"], "max_durations", "max_durations"),
    (["pruning.lagrangian_wamup=2ba"], "pruning.lagrangian_wamup", ""),
    (["optimizer.lr=fast"], "optimizer.lr", ""),
    (["global_train_batch_size=big"], "global_train_batch_size", ""),
    (["data.domains=[alpha]"], "data.proportions", "2 entries"),
    (["dynamic_loading.reference_losses=[1.0]"], "dynamic_loading.reference_losses", "1 reference losses"),
    (["pruning.target.num_layers=9"], "pruning.target", "larger than the source"),
    (["pruning.target.num_attention_heads=3"], "pruning.target", "not a multiple"),
    (["pruning.target=no-such-shape"], "pruning.target", "unknown target shape"),
    (["data.proportions=[1.5,-0.5]"], "data.proportions", "non-negative"),
    (["data.proportions=[0.3,0.3]"], "data.proportions", "sum to 1"),
    (["data.domains=[alpha,alpha]"], "data.domains", "unique"),
    (["max_duration=4 batches"], "max_duration", "duration such as"),
    (["pruning.lagrangian_warmup=soon"], "pruning.lagrangian_warmup", "duration such as"),
    (["scheduler.t_warmup=1 epoch"], "scheduler.t_warmup", "duration such as"),
    (["dynamic_loading.reference_losses=[abc,4]"], "dynamic_loading.reference_losses", "'alpha' must be a finite"),
    (["dynamic_loading.reference_losses=[.nan,4]"], "dynamic_loading.reference_losses", "'alpha' must be a finite"),
    (["dynamic_loading.reference_losses={alpha: 4, beta: .inf}"], "dynamic_loading.reference_losses", "'beta'"),
    (["model.tokenizer=/no/such/tokenizer"], "model.tokenizer", "does not exist"),
    (["data.domains={a: 1}"], "data.domains", "expected a list, got a dict"),
    (["optimizer.betas={a: 1}"], "optimizer.betas", "expected a list, got a dict"),
    (["data.domains=[alpha,gamma]"], "data.domains[1]", "['alpha', 'beta']"),
    (["max_seq_len=64"], "max_seq_len", "32 tokens"),
    (["data.local=/no/such/data"], "data.local", "/no/such/data"),
    (["model.config.shape=nope"], "model.config.shape", "unknown shape"),
    (["pruning.train_gates=noisy"], "pruning.train_gates", "'sampled' or 'smooth'"),
    (["pruning.schedule=lagrangian", "pruning.train_gates=smooth"], "pruning.train_gates", "needs pruning.schedule"),
    (["data.download_timeout=0"], "data.download_timeout", "positive number of seconds"),
    (["data.download_retry=-1"], "data.download_retry", "0 or more"),
])
def test_bad_config_names_key(mds, tmp_path, overrides, key, needle):
    with pytest.raises(ConfigError) as err:
        _load(prune_yaml(mds, tmp_path / "o"), tmp_path, *overrides)
    assert key in _keys(err), str(err.value)
    assert needle in str(err.value)


def test_yaml_syntax_error_gives_file_line_col(tmp_path):
    y = tmp_path / "broken.yaml"
    y.write_text("seed: 1\ndata:\n  domains: [a, b\n  local: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(y))
    assert _keys(err)[0].startswith(f"{y}:4:") and "YAML syntax error" in str(err.value)


def test_finished_run_folder_needs_autoresume_or_overwrite(mds, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ep0-ba4-rank0.pt").write_bytes(b"x")
    with pytest.raises(ConfigError) as err:
        _load(prune_yaml(mds, out), tmp_path)
    assert _keys(err) == ["save_folder"] and "autoresume=true" in str(err.value)
    _load(prune_yaml(mds, out), tmp_path, "save_overwrite=true")
    _load(prune_yaml(mds, out), tmp_path, "autoresume=true")


def test_one_lagrangian_warmup_default():
    from composer_sheared.algorithms import ShearingPruning

    default = inspect.signature(ShearingPruning).parameters["lagrangian_warmup"].default
    assert PruningConfig().lagrangian_warmup == default == "0.2dur"


def test_dynamic_batch_loading_rejects_non_finite_references():
    from composer_sheared.callbacks import DynamicBatchLoading

    for bad in ([float("nan"), 1.0], {"a": 1.0, "b": float("inf")}, ["abc", 1.0]):
        with pytest.raises(ValueError, match="reference loss of domain '(a|b)' must be a finite number"):
            DynamicBatchLoading(["a", "b"], bad)
    assert DynamicBatchLoading(["a", "b"], [1.0, 2.0]).references == [1.0, 2.0]


def test_no_hf_directory_from_a_non_finite_model(tmp_path):
    from types import SimpleNamespace

    import torch
    from composer.models import HuggingFaceModel

    from composer_sheared.run.builders import NonFiniteModelError, save_hf_result
    from tests.conftest import tiny_model

    cfg, _ = load_config(None, ["model.config={hidden_size: 32}", "data.local=x", "data.domains=[a]",
                                "data.proportions=[1.0]"], check_paths=False)
    hf = tiny_model()
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    state = SimpleNamespace(model=HuggingFaceModel(hf), fsdp_enabled=False)
    with pytest.raises(NonFiniteModelError, match="up_proj"):
        save_hf_result(state, cfg, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[0, 0] = 0.0
    assert save_hf_result(state, cfg, None, tmp_path / "hf") == tmp_path / "hf"


def test_download_bounds_reach_the_train_and_eval_readers(mds, tmp_path, monkeypatch):
    """data.download_timeout / data.download_retry are what every remote download of the run is
    bounded by (the first download of each reader is its index.json)."""
    import composer_sheared.data.eval_sets as eval_sets
    import composer_sheared.data.reader as reader
    from composer_sheared.run.builders import build_dataloaders

    cfg, _ = _load(prune_yaml(mds, tmp_path / "o"), tmp_path, "data.download_timeout=7", "data.download_retry=4")
    cfg.data.local, cfg.data.remote = str(tmp_path / "cache"), "s3://bucket/data"  # nothing local yet
    calls = []

    def fetch(url, local, timeout, attempts):
        calls.append((url.rsplit("/", 3)[-3:], timeout, attempts))
        raise FileNotFoundError(f"{url}: stop here")

    monkeypatch.setattr(reader, "fetch", fetch)
    monkeypatch.setattr(eval_sets, "fetch", fetch)
    with pytest.raises(FileNotFoundError, match="stop here"):
        build_dataloaders(cfg, 2)
    cfg.data.domains = cfg.data.domains[:1]
    monkeypatch.setattr("composer_sheared.data.DynamicStreamingDataset", lambda *a, **k: [])
    with pytest.raises(FileNotFoundError, match="stop here"):
        build_dataloaders(cfg, 2)
    assert [c[0][0] for c in calls] == ["train", "eval"]
    assert all(c[1:] == (7.0, 5) for c in calls), calls
