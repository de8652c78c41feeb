"""The README's drop-in example (ShearingPruning + DynamicBatchLoading in a plain Composer
Trainer) runs as written."""
import re

from tests.conftest import REPO, make_data

README = REPO / "README.md"


def _example() -> str:
    text = README.read_text()
    marker = text.index("<!-- drop-in example")
    m = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert m, "no python block after the drop-in marker"
    return m.group(1)


def test_readme_first_screen_shows_commands():
    head = "\n".join(README.read_text().splitlines()[:25])
    assert "make demo" in head and "make test" in head


def test_readme_drop_in_example_runs(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    data = make_data(tmp_path / "mds", domains=("code", "docs"))
    monkeypatch.setenv("SHEARED_DATA", str(data))
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "readme_example"}
    exec(compile(_example(), str(README), "exec"), ns)
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned_hf").config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 48, 2, 64)
    assert ns["trainer"].state.timestamp.batch.value == 6
