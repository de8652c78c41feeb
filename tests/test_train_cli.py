"""train.py through its CLI: a tiny random model pruned, sliced and trained further; DDP on CPU;
wrong YAML fails fast naming the key or path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tiny  # noqa: E402

REPO = _tiny.REPO
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _tiny.make_data(tmp_path_factory.mktemp("mds"))


def _write(cfg: dict, path: Path) -> Path:
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def _run(args, timeout=240):
    return subprocess.run(args, cwd=REPO, env=_tiny.env(), capture_output=True, text=True, timeout=timeout)


def test_prune_slice_continue_cli(data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from composer_sheared.report import read_jsonl, series

    y = _write(_tiny.prune_yaml(data, tmp_path / "prune"), tmp_path / "prune.yaml")
    r = _run([sys.executable, "train.py", str(y), "max_duration=4ba"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pruned = tmp_path / "prune" / "pruned_hf"
    model = AutoModelForCausalLM.from_pretrained(pruned)
    c = model.config
    t = _tiny.TINY_TARGET
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (
        t["num_layers"], t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["intermediate_size"])
    assert (pruned / "generation_config.json").exists()
    recs = read_jsonl(tmp_path / "prune" / "metrics.jsonl")
    steps, exp = series(recs, "shearing/expected_params")
    assert len(steps) == 4 and all(v > 0 for v in exp)
    assert series(recs, "dbl/weight/alpha")[0], "dynamic loading logged no weights"
    assert series(recs, "metrics/alpha/LanguageCrossEntropy")[0], "no per-domain eval"
    assert list((tmp_path / "prune").glob("ep0-ba4*.pt")), "no checkpoint"

    # continued pretraining from the sliced directory
    r = _run([sys.executable, "train.py", str(y), "pruning=null", "model.config=null", f"model.source={pruned}",
              f"save_folder={tmp_path / 'cont'}", "max_duration=3ba"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "cont" / "hf")
    assert final.config.hidden_size == t["hidden_size"]
    assert not torch.equal(final.model.embed_tokens.weight, model.model.embed_tokens.weight), "weights did not train"


def test_ddp_two_ranks_cpu(data, tmp_path):
    y = _write(_tiny.prune_yaml(data, tmp_path / "ddp"), tmp_path / "ddp.yaml")
    composer = Path(sys.executable).parent / "composer"
    r = _run([str(composer), "-n", "2", "train.py", str(y), "max_duration=3ba", "save_interval=3ba"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "ddp" / "pruned_hf" / "model.safetensors").exists()
    recs = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert any("shearing/expected_params" in r.get("metrics", {}) for r in recs)


# --- fail-fast config errors (in-process: config loading + data checks are pure Python) -------
def _load(cfg: dict, tmp_path, *overrides):
    import train

    y = _write(cfg, tmp_path / "c.yaml")
    c = train.load_config(str(y), list(overrides))
    train.check_data(c)
    return c


def test_valid_config_loads(data, tmp_path):
    c = _load(_tiny.prune_yaml(data, tmp_path / "o"), tmp_path)
    assert c.pruning.target["num_layers"] == 2


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(max_durations="3ba"), "max_durations"),
    (lambda c: c["pruning"].update(lagrangian_wamup="2ba"), "pruning.lagrangian_wamup"),
    (lambda c: c["optimizer"].update(lr="fast"), "optimizer.lr"),
    (lambda c: c.update(global_train_batch_size="big"), "global_train_batch_size"),
    (lambda c: c["data"].update(domains=["alpha"]), "data.proportions"),
    (lambda c: c["dynamic_loading"].update(reference_losses=[1.0]), "dynamic_loading.reference_losses"),
])
def test_bad_key_or_type_names_key(data, tmp_path, mutate, needle):
    import train

    cfg = _tiny.prune_yaml(data, tmp_path / "o")
    mutate(cfg)
    with pytest.raises(train.ConfigError, match=needle.replace(".", r"\.")):
        _load(cfg, tmp_path)


def test_missing_data_dir_names_path(data, tmp_path):
    import train

    cfg = _tiny.prune_yaml(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(train.ConfigError, match="nope"):
        _load(cfg, tmp_path)


def test_domain_not_in_data_names_domain(data, tmp_path):
    import train

    cfg = _tiny.prune_yaml(data, tmp_path / "o")
    cfg["data"]["domains"] = ["alpha", "gamma"]
    with pytest.raises(train.ConfigError, match=r"data\.domains\[1\]='gamma'.*\['alpha', 'beta'\]"):
        _load(cfg, tmp_path)


def test_seq_len_mismatch(data, tmp_path):
    import train

    with pytest.raises(train.ConfigError, match="max_seq_len=64"):
        _load(_tiny.prune_yaml(data, tmp_path / "o"), tmp_path, "max_seq_len=64")


def test_cli_exit_code_and_message(data, tmp_path):
    y = _write(_tiny.prune_yaml(data, tmp_path / "o"), tmp_path / "bad.yaml")
    r = _run([sys.executable, "train.py", str(y), "pruning.mask_lr=abc"], timeout=120)
    assert r.returncode == 2
    assert "pruning.mask_lr" in r.stderr and "Traceback" not in r.stderr
