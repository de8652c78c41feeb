"""The llm-foundry recipes (yamls/foundry/*.yaml) as foundry reads them: its own config schema accepts
them, every algorithm and callback they name builds from foundry's registry, and the paper recipes
carry the hyperparameters of the train.py recipes they mirror. (tests/test_foundry.py runs the tiny
one end to end.)"""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import REPO

import llmfoundry  # noqa: E402,F401  (part of the tested set: a missing foundry must fail, not skip)

FOUNDRY = REPO / "yamls" / "foundry"
PAIRS = {"prune_2.7b.yaml": "prune_2.7b.yaml", "continue_2.7b.yaml": "continue_2.7b.yaml"}
DUMMY = {"model": "/m", "source": "/m", "pruned": "/p", "data": "/d", "save_folder": "/out"}


def foundry_cfg(name: str):
    cfg = OmegaConf.load(FOUNDRY / name)
    given = {k: v for k, v in DUMMY.items() if k in cfg.variables.keys() and OmegaConf.is_missing(cfg.variables, k)}
    cfg = OmegaConf.merge(cfg, {"variables": given})
    OmegaConf.resolve(cfg)
    return cfg


def recipe_cfg(name: str):
    cfg = OmegaConf.load(REPO / "yamls" / name)
    OmegaConf.resolve(cfg)  # ${oc.env:VAR,default} -> the defaults
    return OmegaConf.to_container(cfg)


@pytest.mark.parametrize("name", sorted(p.name for p in FOUNDRY.glob("*.yaml")))
def test_foundry_accepts_the_recipe_and_builds_what_it_names(name):
    from llmfoundry.command_utils.train import TRAIN_CONFIG_KEYS, TrainConfig
    from llmfoundry.utils.builders import build_algorithm, build_callback
    from llmfoundry.utils.config_utils import make_dataclass_and_log_config

    from composer_sheared.foundry import DATASET_KEYS

    cfg = foundry_cfg(name)
    logged, train_cfg = make_dataclass_and_log_config(cfg, TrainConfig, TRAIN_CONFIG_KEYS, transforms="all")
    for algo, kwargs in (train_cfg.algorithms or {}).items():
        build_algorithm(algo, dict(kwargs))
    for cb, kwargs in (train_cfg.callbacks or {}).items():
        build_callback(cb, dict(kwargs), train_config=logged)
    loader = train_cfg.train_loader
    assert loader["name"] == "dynamic_streaming"
    assert set(loader["dataset"]) <= {*DATASET_KEYS, "max_seq_len"}
    # one evaluator per training domain, so dynamic batch loading sees every domain's loss
    labels = sorted(e["label"] for e in train_cfg.eval_loaders)
    assert labels == sorted(train_cfg.callbacks["dynamic_batch_loading"]["domains"]) == sorted(loader["dataset"]["domains"])
    assert train_cfg.autoresume is True  # foundry 0.22 does not turn it on by itself


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_paper_recipes_match_the_train_py_recipes(name):
    f, r = OmegaConf.to_container(foundry_cfg(name)), recipe_cfg(PAIRS[name])
    opt, sch = f["optimizer"], f["scheduler"]
    assert (opt["lr"], opt["betas"], opt["weight_decay"]) == (r["optimizer"]["lr"], r["optimizer"]["betas"],
                                                               r["optimizer"]["weight_decay"])
    assert (sch["t_warmup"], sch["alpha_f"]) == (r["scheduler"]["t_warmup"], r["scheduler"]["alpha_f"])
    for key in ("max_seq_len", "global_train_batch_size", "device_train_microbatch_size", "device_eval_batch_size",
                "max_duration", "eval_interval", "precision", "save_interval", "seed"):
        assert f[key] == r[key], key
    ds = f["train_loader"]["dataset"]
    assert (ds["domains"], ds["proportions"]) == (r["data"]["domains"], r["data"]["proportions"])
    dbl, dl = f["callbacks"]["dynamic_batch_loading"], r["dynamic_loading"]
    assert (dbl["rule"], dbl["references"]) == (dl["rule"], dl["reference_losses"])
    assert (dbl.get("eta", 1.0), dbl.get("c", 1e-4)) == (dl.get("eta", 1.0), dl.get("c", 1e-4))
    fsdp = f["fsdp_config"]
    assert (fsdp["sharding_strategy"], fsdp["state_dict_type"]) == (r["fsdp"]["sharding_strategy"], r["fsdp"]["state_dict_type"])
    assert fsdp["activation_checkpointing"] is r["model"]["activation_checkpointing"] is True
    kd = f["algorithms"].get("distillation")
    assert (kd is None) == (r.get("distillation") is None)
    if kd:
        assert (kd["alpha"], kd["temperature"]) == (r["distillation"]["alpha"], r["distillation"]["temperature"])
    if "pruning" in r:
        p, sp = r["pruning"], f["algorithms"]["shearing_pruning"]
        for key in ("target", "lagrangian_warmup", "mask_lr", "lambda_lr", "schedule", "mask_init", "train_gates",
                    "eval_shape"):
            assert sp[key] == p[key], key
        assert sp["calibration"]["num_batches"] == p["calibration_batches"]


def test_readme_foundry_example_is_the_tested_recipe():
    import re

    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- foundry example:[^>]*-->\s*```yaml\n(.*?)```", text, re.S)
    assert block, "README has no foundry example block"
    shown = OmegaConf.to_container(OmegaConf.create(block.group(1)))
    recipe = OmegaConf.to_container(OmegaConf.load(FOUNDRY / "tiny_prune.yaml"))
    assert shown and {k: recipe[k] for k in shown} == shown
