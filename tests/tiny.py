"""Tiny random HF models and tokenizers for tests (nothing is downloaded)."""
from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def tiny_config(family: str = "llama", **overrides):
    cfg_cls, _ = FAMILIES[family]
    kw = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    kw.update(overrides)
    return cfg_cls(**kw)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return FAMILIES[family][1](tiny_config(family, **overrides))


def tiny_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1}
    for i in range(2, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def randomize_masks(masks, seed: int = 1, scale: float = 3.0) -> None:
    """Spread log_alpha so top-k choices and soft values differ across units."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
