"""Model shapes: the architecture a pruning run starts from and the one it must end at.

A target is an architecture, not a ratio (it names the pruned model's config): every kept layer keeps the
same number of heads, KV heads and intermediate dims, so the pruned model is a standard uniform
HF config. Pure Python: no torch, no Composer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["ModelShape", "validate_target", "resolve_target", "NAMED_SHAPES"]

# Model classes whose module layout apply_shearing/prune_to_target know.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v (not on o_proj)

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelShape":
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        if getattr(cfg, "mlp_bias", False):
            raise ValueError("config.mlp_bias=True is not supported (MLP projections must have no bias)")
        if model_type == "llama" and getattr(cfg, "attention_bias", False):
            raise ValueError("config.attention_bias=True is not supported for llama (o_proj bias)")
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
        )

    def to_hf_config(self, base: Any) -> Any:
        """A copy of the HF config `base` with this shape's dims (head_dim written explicitly)."""
        cfg = base.__class__.from_dict(base.to_dict())
        cfg.num_hidden_layers = self.num_layers
        cfg.hidden_size = self.hidden_size
        cfg.num_attention_heads = self.num_attention_heads
        cfg.num_key_value_heads = self.num_key_value_heads
        cfg.head_dim = self.head_dim
        cfg.intermediate_size = self.intermediate_size
        cfg.vocab_size = self.vocab_size
        cfg.tie_word_embeddings = self.tie_word_embeddings
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None and len(layer_types) != self.num_layers:
            cfg.layer_types = list(layer_types[: self.num_layers])
        return cfg

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def layer_params(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads, self.num_key_value_heads
        attn = d * hd * (2 * q + 2 * kv)
        if self.qkv_bias:
            attn += hd * (q + 2 * kv)
        mlp = 3 * d * self.intermediate_size
        return attn + mlp + 2 * d  # two RMSNorm weights

    def num_embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def num_non_embedding_params(self) -> int:
        return self.num_layers * self.layer_params() + self.hidden_size  # + final norm

    def num_params(self) -> int:
        """Equals sum(p.numel()) of the HF model of this shape."""
        return self.num_non_embedding_params() + self.num_embedding_params()

    def replace(self, **changes: Any) -> "ModelShape":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = [f.name for f in dataclasses.fields(ModelShape)]
_PRUNABLE = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def validate_target(source: ModelShape, target: ModelShape) -> None:
    """Raise ValueError naming the field and both values for every impossible target."""
    errors = []
    for name in _PRUNABLE:
        s, t = getattr(source, name), getattr(target, name)
        if not isinstance(t, int) or isinstance(t, bool):
            errors.append(f"target.{name} must be an int, got {t!r}")
        elif t <= 0:
            errors.append(f"target.{name}={t} must be positive (source has {s})")
        elif t > s:
            errors.append(f"target.{name}={t} is larger than the source's {name}={s}")
    for name in ("head_dim", "vocab_size", "tie_word_embeddings", "qkv_bias"):
        s, t = getattr(source, name), getattr(target, name)
        if s != t:
            errors.append(f"target.{name}={t!r} differs from the source's {name}={s!r}; it cannot be pruned")
    if not errors:
        if target.num_attention_heads % target.num_key_value_heads:
            errors.append(
                f"target.num_attention_heads={target.num_attention_heads} is not a multiple of "
                f"target.num_key_value_heads={target.num_key_value_heads}"
            )
        elif target.group_size > source.group_size:
            errors.append(
                f"target query heads per KV head ({target.num_attention_heads}/{target.num_key_value_heads}"
                f"={target.group_size}) is larger than the source's ({source.num_attention_heads}/"
                f"{source.num_key_value_heads}={source.group_size}); heads can only be removed"
            )
    if errors:
        raise ValueError("invalid pruning target: " + "; ".join(errors))


def resolve_target(source: ModelShape, target: "ModelShape | Mapping[str, Any] | str") -> ModelShape:
    """A full, validated target from a ModelShape, a partial mapping (missing fields are the
    source's), or the name of a shape in NAMED_SHAPES."""
    if isinstance(target, str):
        if target not in NAMED_SHAPES:
            raise ValueError(f"unknown target shape {target!r}; known: {sorted(NAMED_SHAPES)}")
        target = NAMED_SHAPES[target]
    if isinstance(target, Mapping):
        unknown = sorted(set(target) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown target field(s) {unknown}; expected a subset of {_FIELDS}")
        target = source.replace(**dict(target))
    if not isinstance(target, ModelShape):
        raise ValueError(f"target must be a ModelShape, a mapping or a shape name, got {type(target).__name__}")
    validate_target(source, target)
    return target


_LLAMA2_7B = ModelShape(32, 4096, 32, 32, 128, 11008, 32000, False)
_LLAMA3_8B = ModelShape(32, 4096, 32, 8, 128, 14336, 128256, False)
NAMED_SHAPES = {
    "llama2-7b": _LLAMA2_7B,
    "sheared-2.7b": ModelShape(32, 2560, 20, 20, 128, 6912, 32000, False),
    "sheared-1.3b": ModelShape(24, 2048, 16, 16, 128, 5504, 32000, False),
    "llama3-8b": _LLAMA3_8B,
    "smollm2-135m": ModelShape(30, 576, 9, 3, 64, 1536, 49152, True),
    "llama2-7b-4layers": _LLAMA2_7B.replace(num_layers=4),
    "llama3-8b-4layers": _LLAMA3_8B.replace(num_layers=4),
}
