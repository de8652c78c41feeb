"""Dry-run plan math: tokens, training FLOPs and GPU-hours of a pruning or training run.

Pure Python (no torch). FLOP model, per trained token (PaLM appendix B convention):

    6 * N_matmul  +  12 * L * H * head_dim * seq_len

- ``N_matmul`` = every weight that takes part in a matmul: the decoder layers' projections and
  the LM head (vocab x d, also when it is tied to the input embedding). The input embedding
  lookup and the RMSNorm weights are not matmuls and are left out.
- the attention term counts QK^T and AV for forward + backward (x3), without halving for the
  causal mask (the PaLM convention; FlashAttention skips about half of it in practice).
- A *masked* pruning run computes the whole source model (masks multiply activations, they skip
  no work), so pruning costs the source's FLOPs; the mask and multiplier parameters are negligible.
- Activation checkpointing re-runs the forward pass (about +1/3 hardware FLOPs); MFU counts model
  FLOPs only, so the estimate below does not include it: pick a lower MFU when it is on.

GPU-hours = FLOPs / (peak * MFU) / 3600 with peak bf16 dense 312 TFLOP/s (A100) and 989 TFLOP/s
(H100 SXM).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from composer_sheared.shapes import ModelShape

__all__ = ["PEAK_TFLOPS", "PAPER_PARAMS", "flops_per_token", "Plan", "make_plan", "format_plan", "params_without_norms"]

PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0}

# Parameter counts printed in the Sheared-LLaMA paper / model cards (they exclude RMSNorm weights).
PAPER_PARAMS = {"sheared-2.7b": 2_701_393_920, "sheared-1.3b": 1_345_323_008, "llama2-7b": 6_738_415_616}


def params_without_norms(shape: ModelShape) -> int:
    """Parameters without the RMSNorm weights (2 per layer + the final norm): the paper's count."""
    return shape.num_params() - (2 * shape.num_layers + 1) * shape.hidden_size


def matmul_params(shape: ModelShape) -> int:
    norms = 2 * shape.num_layers * shape.hidden_size
    layers = shape.num_layers * shape.layer_params() - norms
    return layers + shape.vocab_size * shape.hidden_size  # + LM head


def flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token; see the module docstring."""
    attn = 12 * shape.num_layers * shape.num_attention_heads * shape.head_dim * seq_len
    return 6.0 * matmul_params(shape) + attn


@dataclass
class Plan:
    stage: str  # "pruning" or "training"
    source: dict
    target: Optional[dict]
    source_params: int
    source_params_no_norm: int
    target_params: Optional[int]
    target_params_no_norm: Optional[int]
    batch_size: int
    seq_len: int
    steps: int
    tokens_per_step: int
    total_tokens: int
    flops_per_token: float
    total_flops: float
    mfu: float
    num_gpus: int
    gpu_hours: dict = field(default_factory=dict)
    wall_hours: dict = field(default_factory=dict)
    paper_check: Optional[dict] = None

    def as_dict(self) -> dict:
        return asdict(self)


def make_plan(
    source: ModelShape,
    target: Optional[ModelShape],
    batch_size: int,
    seq_len: int,
    steps: int,
    mfu: float = 0.4,
    num_gpus: int = 8,
) -> Plan:
    """`target` given = a masked pruning run (source FLOPs); None = plain training of `source`."""
    if min(batch_size, seq_len, steps, num_gpus) <= 0:
        raise ValueError(f"batch_size, seq_len, steps and num_gpus must be positive, got "
                         f"{batch_size}, {seq_len}, {steps}, {num_gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    tokens_per_step = batch_size * seq_len
    total_tokens = tokens_per_step * steps
    fpt = flops_per_token(source, seq_len)
    total = fpt * total_tokens
    gpu_hours = {gpu: total / (peak * 1e12 * mfu) / 3600 for gpu, peak in PEAK_TFLOPS.items()}
    paper_check = None
    if target is not None:
        tp = params_without_norms(target)
        for name, count in PAPER_PARAMS.items():
            if name != "llama2-7b" and abs(tp - count) / count < 0.05:
                paper_check = {
                    "name": name,
                    "paper": count,
                    "ours_no_norm": tp,
                    "ours_with_norm": target.num_params(),
                    "rel_diff_with_norm": target.num_params() / count - 1,
                    "rel_diff_no_norm": tp / count - 1,
                }
    return Plan(
        stage="pruning" if target is not None else "training",
        source=source.as_dict(),
        target=target.as_dict() if target is not None else None,
        source_params=source.num_params(),
        source_params_no_norm=params_without_norms(source),
        target_params=target.num_params() if target is not None else None,
        target_params_no_norm=params_without_norms(target) if target is not None else None,
        batch_size=batch_size,
        seq_len=seq_len,
        steps=steps,
        tokens_per_step=tokens_per_step,
        total_tokens=total_tokens,
        flops_per_token=fpt,
        total_flops=total,
        mfu=mfu,
        num_gpus=num_gpus,
        gpu_hours=gpu_hours,
        wall_hours={gpu: h / num_gpus for gpu, h in gpu_hours.items()},
        paper_check=paper_check,
    )


def _shape_line(d: dict) -> str:
    return (f"layers {d['num_layers']}, hidden {d['hidden_size']}, heads {d['num_attention_heads']}"
            f" (kv {d['num_key_value_heads']}, head_dim {d['head_dim']}), ffn {d['intermediate_size']},"
            f" vocab {d['vocab_size']}{', tied' if d['tie_word_embeddings'] else ''}")


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_plan(plan: Plan) -> str:
    p = plan
    lines = [f"== plan: {p.stage} run =="]
    lines.append(f"source : {_shape_line(p.source)}")
    lines.append(f"         params {p.source_params:,} (without RMSNorm weights {p.source_params_no_norm:,})")
    if p.target is not None:
        lines.append(f"target : {_shape_line(p.target)}")
        lines.append(f"         params {p.target_params:,} (without RMSNorm weights {p.target_params_no_norm:,});"
                     f" {p.target_params / p.source_params:.1%} of the source")
        if p.paper_check:
            c = p.paper_check
            lines.append(f"         paper ({c['name']}): {c['paper']:,} -> ours with norms {c['rel_diff_with_norm']:+.4%},"
                         f" without norms {c['rel_diff_no_norm']:+.4%}")
    lines.append(f"batch  : {p.batch_size} x {p.seq_len} = {p.tokens_per_step:,} tokens/step; {p.steps:,} steps;"
                 f" {p.total_tokens:,} tokens ({_si(p.total_tokens)})")
    what = "source model (masked pruning computes all of it)" if p.stage == "pruning" else "model"
    lines.append(f"flops  : {_si(p.flops_per_token)}FLOP/token of the {what};"
                 f" total {p.total_flops:.3e} FLOP (6*N_matmul + 12*L*H*hd*seq per token)")
    for gpu, h in p.gpu_hours.items():
        lines.append(f"{gpu:7s}: {h:,.1f} GPU-hours at {p.mfu:.0%} MFU of {PEAK_TFLOPS[gpu]:.0f} TFLOP/s bf16"
                     f" = {p.wall_hours[gpu]:,.2f} h on {p.num_gpus} GPUs")
    return "\n".join(lines)
