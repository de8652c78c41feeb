"""Every HF directory the project writes carries a model card and provenance.json, and a pruned
model does not keep its chat-model source's chat template as its default."""
import json
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from composer_sheared.config import load_config
from composer_sheared.export.model_card import PROVENANCE, SOURCE_TEMPLATES, add_evals, finish_hf_dir
from tests.conftest import TARGET, TINY, tiny_model, tiny_tokenizer

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def _chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def _source(root, license="mit"):
    """A tiny chat-model source directory whose card states a license."""
    root.mkdir()
    tiny_model(seed=7).save_pretrained(root)
    _chat_tokenizer().save_pretrained(root)
    (root / "README.md").write_text(f"---\nlicense: {license}\nlibrary_name: transformers\n---\n# a chat model\n")
    return root


def _card(hf_dir):
    return ModelCard.load(hf_dir / "README.md")


def _assert_base_model_without_chat_template(out, prov):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template is None
    assert TEMPLATE in "".join(p.read_text() for p in (out / SOURCE_TEMPLATES).iterdir())
    assert prov["chat_template_set_aside"] and "Chat template" in _card(out).text


def _assert_target(out, prov):
    shape = {k: prov["target"][k] for k in TARGET}
    assert shape == TARGET
    assert f"| this model | {TARGET['num_layers']} | {TARGET['hidden_size']} |" in _card(out).text
    config = json.loads((out / "config.json").read_text())
    assert config.get("_name_or_path", out.name) == out.name


def _train_save(cfg, hf, tok, out, tokens, batches):
    from composer.core import Timestamp
    from composer.models import HuggingFaceModel

    from composer_sheared.run.builders import save_hf_result

    state = SimpleNamespace(model=HuggingFaceModel(hf), fsdp_enabled=False,
                            timestamp=Timestamp(batch=batches, token=tokens))
    return save_hf_result(state, cfg, tok, out)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(source dir, the pruning run's HF output) through builders.save_hf_result, with eval metrics logged."""
    from composer_sheared.pruning import apply_shearing
    from composer_sheared.shapes import ModelShape

    tmp = tmp_path_factory.mktemp("train")
    src = _source(tmp / "src")
    run = tmp / "run"
    cfg, _ = load_config(None, [f"model.source={src}", f"save_folder={run}", "data.local=x", "data.domains=[alpha]",
                                "data.proportions=[1.0]", f"pruning.target={json.dumps(TARGET)}"], check_paths=False)
    run.mkdir()  # what the run's JSONLLogger wrote
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"run": {"name": "t", "start_batch": 0}},
        {"step": 2, "metrics": {"metrics/alpha/LanguageCrossEntropy": 4.5, "loss/train/total": 5.0}},
        {"step": 4, "metrics": {"metrics/alpha/LanguageCrossEntropy": 4.25, "metrics/train/LanguageCrossEntropy": 4.0}}]))
    hf = tiny_model(seed=7)
    apply_shearing(hf, ModelShape(**{**ModelShape.from_hf_config(hf.config).as_dict(), **TARGET}))
    out = _train_save(cfg, hf, _chat_tokenizer(), run / "pruned_hf", tokens=640, batches=5)
    return src, out


def test_pruning_run_output_has_card_provenance_and_no_default_chat_template(pruned):
    src, out = pruned
    prov = json.loads((out / PROVENANCE).read_text())
    data = _card(out).data
    assert data.base_model == str(src) and data.license == "mit" and data.library_name == "transformers"
    assert {"composer-sheared", "sheared-llama", "pruned"} <= set(data.tags)
    _assert_target(out, prov)
    assert prov["source"]["shape"]["hidden_size"] == TINY["hidden_size"]
    assert prov["stages"] == [{"stage": "pruning", "tokens": 640, "steps": 5}]
    assert prov["settings"]["pruning"]["target"] == TARGET
    assert prov["evals"] == {"last evaluation of the run (step 4)": {"alpha": {"LanguageCrossEntropy": 4.25}}}
    assert "| alpha | 4.25 |" in _card(out).text
    _assert_base_model_without_chat_template(out, prov)
    assert (src / "tokenizer_config.json").read_text().count("chat_template")  # the source keeps its own


def test_continued_run_inherits_the_lineage(pruned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, pruned_dir = pruned
    cfg, _ = load_config(None, [f"model.source={pruned_dir}", f"save_folder={tmp_path}", "data.local=x",
                                "data.domains=[alpha]", "data.proportions=[1.0]"], check_paths=False)
    hf = AutoModelForCausalLM.from_pretrained(pruned_dir)
    out = _train_save(cfg, hf, AutoTokenizer.from_pretrained(pruned_dir), tmp_path / "hf", tokens=256, batches=2)
    prov = json.loads((out / PROVENANCE).read_text())
    data = _card(out).data
    assert data.base_model == str(src) and data.license == "mit" and "pruned" in data.tags
    assert [s["stage"] for s in prov["stages"]] == ["pruning", "continued pretraining"]
    assert prov["source"]["path"] == str(pruned_dir) and prov["source_provenance"]["stages"][0]["tokens"] == 640
    _assert_target(out, prov)


def test_oneshot_output_has_card_provenance_and_no_default_chat_template(tmp_path):
    from composer_sheared.cli.oneshot import run

    src = _source(tmp_path / "src", license="apache-2.0")
    out = run(src, tmp_path / "out", dict(TARGET), "random", seed=0)
    prov = json.loads((out / PROVENANCE).read_text())
    data = _card(out).data
    assert data.base_model == str(src) and data.license == "apache-2.0"
    assert prov["settings"] == {"method": "random", "seed": 0} and prov["stages"] == []
    _assert_target(out, prov)
    _assert_base_model_without_chat_template(out, prov)
    assert (out / "oneshot_pruning.json").is_file()


def test_exported_checkpoint_has_card_with_the_checkpoints_tokens(tmp_path):
    from composer_sheared.export.sliced import finalize
    from tests.conftest import make_trainer

    src = _source(tmp_path / "src")
    trainer, _ = make_trainer(max_duration="2ba", warmup="1ba", tokenizer=_chat_tokenizer(),
                              save_folder=str(tmp_path / "ck"), save_interval="2ba")
    trainer.fit()
    trainer.close()
    out = finalize(tmp_path / "ck" / "ep0-ba2-rank0.pt", tmp_path / "out", source=str(src))
    prov = json.loads((out / PROVENANCE).read_text())
    assert _card(out).data.base_model == str(src)
    assert prov["stages"] == [{"stage": "pruning", "tokens": 2 * 4 * 16, "steps": 2}]  # 2 batches of 4 x 16
    _assert_target(out, prov)
    _assert_base_model_without_chat_template(out, prov)


def test_name_or_path_names_the_output_and_evals_can_be_added(tmp_path):
    out = tmp_path / "final"
    out.mkdir()
    tiny_model().save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "_name_or_path": "smollm2 135M (gguf internal name)"}))
    finish_hf_dir(out, out.name, "test", None, {}, None, base_model="org/model")
    assert json.loads((out / "config.json").read_text())["_name_or_path"] == "final"
    prov = add_evals(out, {"loss": {"pruned": {"code": 4.125, "mean": 4.5}}})
    assert prov["evals"] == json.loads((out / PROVENANCE).read_text())["evals"]
    card = _card(out)
    assert card.data.base_model == "org/model" and "| pruned | 4.125 | 4.5 |" in card.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no staging directory left behind
