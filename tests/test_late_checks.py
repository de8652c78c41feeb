"""Problems the config, config.json or the index files reveal are found in the one validation
pass, each as `error: <key>: ...`, before any weight loads; the unclear ones name key or file."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from composer_sheared.config import ConfigError, load_config
from tests.conftest import DOMAINS, SEQ, make_data, prune_yaml, tiny_model, tiny_tokenizer


def _load(cfg: dict, tmp_path, *overrides):
    y = tmp_path / "c.yaml"
    OmegaConf.save(OmegaConf.create(cfg), y)
    return load_config(str(y), list(overrides))


def _problems(cfg: dict, tmp_path, *overrides) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        _load(cfg, tmp_path, *overrides)
    return dict(err.value.problems)


@pytest.mark.parametrize("overrides, key, needle", [
    (["device_eval_batch_size=-1"], "device_eval_batch_size", "positive integer"),
    (["device_train_microbatch_size=-2"], "device_train_microbatch_size", "positive integer"),
    (["optimizer.lr=-0.1"], "optimizer.lr", "non-negative"),
    (["optimizer.lr=.nan"], "optimizer.lr", "finite"),
    (["seed=-1"], "seed", "non-negative"),
    (["load_path=/no/such/ckpt.pt"], "load_path", "/no/such/ckpt.pt does not exist"),
    (["max_duration=0ba"], "max_duration", "positive duration"),
    (["max_duration=4096tok", "scheduler.t_warmup=1ba"], "scheduler.t_warmup", "different units"),
    (["dynamic_loading.eta=.nan"], "dynamic_loading.eta", "finite positive"),
    (["dynamic_loading.c=-1"], "dynamic_loading.c", "non-negative"),
    (["model.config.hidden_size=abc"], "model.config.hidden_size", "expected int"),
    (["model.config.tie_word_embeddings=3"], "model.config.tie_word_embeddings", "expected bool"),
    # schedules that cannot do their job
    (["eval_interval=1ep"], "eval_interval", "endless"),
    (["eval_interval=0ba"], "eval_interval", "never fires"),
    (["eval_interval=8ba"], "eval_interval", "longer than the run"),
    (["eval_interval=2dur"], "eval_interval", "longer than the run"),
    (["pruning.lagrangian_warmup=9ba"], "pruning.lagrangian_warmup", "never reach the target"),
    (["pruning.lagrangian_warmup=1.5dur"], "pruning.lagrangian_warmup", "longer than the run"),
    (["scheduler.t_warmup=5ba"], "scheduler.t_warmup", "longer than the run"),
])
def test_late_case_is_a_config_error(mds, tmp_path, overrides, key, needle):
    problems = _problems(prune_yaml(mds, tmp_path / "o"), tmp_path, *overrides)
    assert key in problems, problems
    assert needle in problems[key], problems[key]


def test_schedules_that_fit_the_run_pass(mds, tmp_path):
    # the boundaries: one eval at the run's end, a warm-up as long as the run, a run in tokens
    _load(prune_yaml(mds, tmp_path / "o"), tmp_path, "eval_interval=4ba", "pruning.lagrangian_warmup=4ba")
    _load(prune_yaml(mds, tmp_path / "o"), tmp_path, f"max_duration={4 * 4 * SEQ}tok", "scheduler.t_warmup=0.1dur",
          "eval_interval=2ba", "pruning.lagrangian_warmup=4ba")
    # without dynamic loading an eval interval in epochs is Composer's business
    _load(prune_yaml(mds, tmp_path / "o"), tmp_path, "dynamic_loading=null", "eval_interval=1ep")


def test_cli_missing_load_path_exits_2_and_creates_nothing(mds, tmp_path, capsys):
    import train

    out = tmp_path / "never"
    y = tmp_path / "c.yaml"
    OmegaConf.save(OmegaConf.create(prune_yaml(mds, out)), y)
    assert train.cli([str(y), f"load_path={tmp_path / 'nope.pt'}"]) == 2
    err = capsys.readouterr().err
    assert f"error: load_path: {tmp_path / 'nope.pt'} does not exist" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_stats_json_reads_the_sample_length_from_the_shards(tmp_path):
    data = make_data(tmp_path / "mds")
    (data / "stats.json").unlink()
    problems = _problems(prune_yaml(data, tmp_path / "o"), tmp_path, f"max_seq_len={2 * SEQ}")
    assert "max_seq_len" in problems, problems
    assert "index.json" in problems["max_seq_len"] and f"{SEQ} tokens" in problems["max_seq_len"]
    _load(prune_yaml(data, tmp_path / "o"), tmp_path)  # the right length passes


# ---- the source model's files, checked from their headers --------------------------------------
def _source(tmp_path, name="src"):
    d = tmp_path / name
    tiny_model().save_pretrained(d)
    return d


def _from_source(mds, tmp_path, src, *overrides):
    cfg = prune_yaml(mds, tmp_path / "o")
    cfg["model"] = {"source": str(src)}
    return _problems(cfg, tmp_path, *overrides)


def test_truncated_safetensors_names_the_file(mds, tmp_path):
    src = _source(tmp_path)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    problems = _from_source(mds, tmp_path, src)
    assert str(weights) in problems["model.source"] and "truncated" in problems["model.source"]


def test_config_json_that_does_not_describe_the_weights(mds, tmp_path):
    src = _source(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 2 * cfg["intermediate_size"]}))
    problems = _from_source(mds, tmp_path, src)
    msg = problems["model.source"]
    assert f"{src / 'config.json'} does not describe the weights" in msg and "mlp" in msg, msg
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 2}))
    assert "lack" in _from_source(mds, tmp_path, src)["model.source"]


def test_intact_source_passes(mds, tmp_path):
    cfg = prune_yaml(mds, tmp_path / "o")
    cfg["model"] = {"source": str(_source(tmp_path))}
    _, resolved = _load(cfg, tmp_path)
    assert resolved.source.num_layers == 4


# ---- one-shot CLI: everything checkable before the weights load --------------------------------
def _garbage_weights(d):
    """A source whose weights cannot load: any check made after loading would fail differently."""
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


@pytest.mark.parametrize("case", ["phi", "target", "vocab"])
def test_oneshot_checks_before_loading_weights(mds, tmp_path, case):
    from transformers import PhiConfig

    from composer_sheared.cli.oneshot import run

    src, target, data = tmp_path / "src", {"num_layers": 3}, None
    if case == "phi":
        PhiConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4).save_pretrained(src)
        needle = "phi"
    else:
        tiny_model().config.save_pretrained(src)
        if case == "target":
            target, needle = {"num_layers": 9}, "larger than the source"
        else:
            data = tmp_path / "wide"
            make_data(data)
            (data / "stats.json").write_text(json.dumps({"seq_len": SEQ, "vocab_size": 1000}))
            needle = "1000-token vocabulary"
    _garbage_weights(src)
    with pytest.raises(SystemExit) as err:
        run(src, tmp_path / "out", target, "importance" if data else "magnitude", data=str(data) if data else None,
            domains=list(DOMAINS) if data else None)
    assert needle in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_evaluate_names_a_model_dir_without_tokenizer(tmp_path, capsys):
    from composer_sheared.cli.evaluate import main

    bare = _source(tmp_path, "bare")
    assert main([str(bare), "--tasks", "next_line", "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert f"{bare}" in err and "no tokenizer" in err
    tiny_tokenizer().save_pretrained(bare)
    from composer_sheared.eval.harness import model_names as _model_names

    assert list(_model_names([str(bare)]).values()) == [str(bare)]
