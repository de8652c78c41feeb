"""The plugin inside llm-foundry's own trainer (`train_from_yaml`), configured from YAML alone:
the registered `dynamic_streaming` loader, `shearing_pruning` at its defaults, `dynamic_batch_loading`
over foundry's `eval/<label>` evaluators, foundry's `hf_checkpointer` exporting the sliced model, and
`distillation`. Each run is a subprocess, as a user's launch is."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from tests.conftest import DOMAINS, REPO, SEQ, TARGET, make_data, subprocess_env, tiny_model, tiny_tokenizer

import llmfoundry  # noqa: E402,F401  (part of the tested set: a missing foundry must fail, not skip)

# foundry's own text loader builds Streaming datasets with no retry on a shared-memory prefix race
pytestmark = pytest.mark.serial

RECIPE = REPO / "yamls" / "foundry" / "tiny_prune.yaml"
RUN = "from llmfoundry.command_utils import train_from_yaml; import sys; train_from_yaml(sys.argv[1], sys.argv[2:])"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("foundry")
    model_dir = root / "model"
    tiny_model(attn_implementation="sdpa").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return model_dir, make_data(root / "mds")


def foundry(yaml: Path, model_dir: Path, data: Path, out: Path, *overrides: str, timeout: int = 300):
    args = [f"variables.model={model_dir}", f"variables.data={data}", f"variables.save_folder={out}", *overrides]
    return subprocess.run([sys.executable, "-c", RUN, str(yaml), *args], cwd=out.parent, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def series(out: Path, key: str) -> list[float]:
    return [r["metrics"][key] for r in records(out) if key in r.get("metrics", {})]


def final_state(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoints" / "ep0-ba6-rank0.pt", map_location="cpu", weights_only=False)
    return ckpt["state"]


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    model_dir, data = inputs
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    ok(foundry(RECIPE, model_dir, data, out))
    return out


@pytest.mark.slow
def test_prunes_from_yaml_alone_and_exports_the_sliced_target(inputs, uninterrupted):
    from transformers import AutoModelForCausalLM

    from composer_sheared.export.sliced import masked_model_from_checkpoint
    from composer_sheared.shapes import ModelShape

    model_dir, _ = inputs
    out = uninterrupted
    # the algorithm had no calibration in its YAML: it drew it from the train loader's data
    assert series(out, "shearing/stray")  # the projected schedule ran (importance init's default)
    # dynamic batch loading found foundry's eval/<domain> evaluators and moved the weights
    w = series(out, f"dbl/weight/{DOMAINS[0]}")
    assert w[0] == 0.5 and any(abs(x - 0.5) > 1e-4 for x in w[1:]), w
    # hf_checkpointer wrote the sliced model: exactly the target config, loadable by transformers
    hf_dir = out / "hf" / "huggingface" / "ba6"
    sliced = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    got = ModelShape.from_hf_config(sliced.config)
    want = ModelShape.from_hf_config(tiny_model().config)
    assert got == type(want)(**{**want.as_dict(), **TARGET})
    assert not [k for k in sliced.state_dict() if "shearing" in k]
    # with the project's model card and provenance, like every other HF directory it writes
    import json

    from huggingface_hub import ModelCard

    card = ModelCard.load(hf_dir / "README.md")
    prov = json.loads((hf_dir / "provenance.json").read_text())
    assert card.data.base_model == str(model_dir) and "pruned" in card.data.tags
    assert {k: prov["target"][k] for k in got.as_dict()} == got.as_dict() and prov["target"]["params"] == got.num_params()
    assert prov["source"]["shape"]["num_layers"] == want.num_layers
    assert prov["stages"] == [{"stage": "pruning", "tokens": prov["stages"][0]["tokens"], "steps": 6}]
    assert prov["stages"][0]["tokens"] > 0 and prov["settings"]["target"] == TARGET, prov
    # and it computes what the masked model of the final checkpoint computes
    masked = masked_model_from_checkpoint(out / "checkpoints" / "ep0-ba6-rank0.pt", str(model_dir))[0].eval()
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(sliced(ids).logits, masked(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_uninterrupted_one(inputs, uninterrupted, tmp_path):
    model_dir, data = inputs
    out = tmp_path / "run"
    killed = foundry(RECIPE, model_dir, data, out, f"code_paths=[{REPO / 'tests' / 'foundry_kill.py'}]",
                     "callbacks.kill_at_batch.batch=4")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "checkpoints" / "ep0-ba4-rank0.pt").exists() and not (out / "checkpoints" / "ep0-ba6-rank0.pt").exists()
    ok(foundry(RECIPE, model_dir, data, out))  # the recipe sets autoresume: true
    a, b = final_state(uninterrupted), final_state(out)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        if isinstance(a["model"][k], torch.Tensor):
            assert_close(b["model"][k], a["model"][k], atol=1e-6, rtol=0, msg=k)
        else:  # the masks' extra state: shapes, schedule settings
            assert b["model"][k] == a["model"][k], k
    assert [float(x) for x in a["model"]["model.shearing_masks.log_alpha.hidden"]] != \
        [float(x) for x in torch.load(out / "checkpoints" / "ep0-ba4-rank0.pt", weights_only=False)["state"]["model"][
            "model.shearing_masks.log_alpha.hidden"]]  # the masks trained after the resume
    dbl_a, dbl_b = a["callbacks"]["DynamicBatchLoading"], b["callbacks"]["DynamicBatchLoading"]
    assert dbl_b["weights"] == pytest.approx(dbl_a["weights"], abs=1e-6)
    assert dbl_b["history"] == dbl_a["history"]


@pytest.mark.slow
def test_distillation_from_a_foundry_yaml(inputs, tmp_path):
    model_dir, data = inputs
    out = tmp_path / "run"
    ok(foundry(RECIPE, model_dir, data, out, "algorithms.distillation.alpha=0.5", "max_duration=2ba",
               "callbacks.hf_checkpointer.save_interval=2ba", "save_interval=2ba"))
    kd, excess = series(out, "distill/kd_loss"), series(out, "distill/excess_loss")
    assert len(kd) == 2 and all(x > 0 for x in kd), kd
    assert len(excess) == 2


def test_loader_and_algorithm_are_registered_with_foundry(inputs):
    from llmfoundry import registry

    from composer_sheared.algorithms import Distillation, ShearingPruning
    from composer_sheared.callbacks import DynamicBatchLoading
    from composer_sheared.foundry import build_dynamic_streaming_dataloader
    from composer_sheared.loggers import JSONLLogger

    assert registry.dataloaders.get("dynamic_streaming") is build_dynamic_streaming_dataloader
    assert registry.algorithms.get("shearing_pruning") is ShearingPruning
    assert registry.algorithms.get("distillation") is Distillation
    assert registry.callbacks.get("dynamic_batch_loading") is DynamicBatchLoading
    assert registry.loggers.get("sheared_jsonl") is JSONLLogger


def test_loader_rejects_bad_dataset_config_by_key(inputs):
    _, data = inputs
    build = __import__("composer_sheared.foundry", fromlist=["x"]).build_dynamic_streaming_dataloader
    base = {"local": str(data), "domains": list(DOMAINS)}
    with pytest.raises(ValueError, match=r"train_loader.dataset.max_seq_len: 64, but .*index.json holds samples of 32"):
        build(None, 4, {**base, "max_seq_len": 64})
    with pytest.raises(ValueError, match=r"train_loader.dataset.shufle: unknown key"):
        build(None, 4, {**base, "shufle": False})
    with pytest.raises(ValueError, match=r"train_loader.dataset.domains: required"):
        build(None, 4, {"local": str(data)})
    with pytest.raises(ValueError, match=r"train_loader.dataset: .*'gamma'"):
        build(None, 4, {**base, "domains": ["alpha", "gamma"]})
    spec = build(tiny_tokenizer(), 4, {**base, "max_seq_len": SEQ})
    batch = next(iter(spec.dataloader))
    assert batch["input_ids"].shape == (4, SEQ) and spec.get_num_tokens_in_batch(batch) == 4 * SEQ
    assert spec.dataloader.dataset.proportions == [0.5, 0.5]  # uniform when the YAML gives none
