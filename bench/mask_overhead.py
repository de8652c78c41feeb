"""Masked / dense training-step time (and peak memory), measured side by side in one run.

    python bench/mask_overhead.py                                  # SmolLM2-135M shape, CPU
    python bench/mask_overhead.py --device cuda --shape llama2-7b-4layers --batch 4 --seq 4096
    python bench/mask_overhead.py --device cuda --shape llama3-8b-4layers --compile

One step = forward, backward, AdamW step, with random weights. Dense and masked steps alternate
so drift (thermal, other load) hits both alike; the ratio is the median of per-round ratios.
The masked target removes every structure (layers, KV groups, query heads, intermediate, hidden).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from composer_sheared import apply_shearing  # noqa: E402
from composer_sheared.shapes import NAMED_SHAPES, ModelShape  # noqa: E402


def build(shape: ModelShape, device: str, dtype: torch.dtype, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        tie_word_embeddings=shape.tie_word_embeddings, attn_implementation=attn, max_position_embeddings=8192,
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).train()


def prune_target(s: ModelShape) -> dict:
    g = s.group_size
    kv = max(1, s.num_key_value_heads * 2 // 3)
    return {
        "num_layers": max(1, s.num_layers * 2 // 3),
        "hidden_size": s.hidden_size * 3 // 4,
        "num_key_value_heads": kv,
        "num_attention_heads": kv * max(1, g - 1) if g > 1 else kv,
        "intermediate_size": s.intermediate_size * 2 // 3,
    }


def measure(shape: ModelShape, device: str, dtype: torch.dtype, batch: int, seq: int, rounds: int, warmup: int,
            attn: str = "sdpa", compile=False, fold: str = "auto") -> dict:
    """Dense and masked step times (median over interleaved rounds), per-round ratios and peak GiB
    (CUDA only). `compile`: False, True (inductor) or a torch.compile backend name."""
    if compile is True:
        compile = "inductor"
    cuda = device.startswith("cuda")
    torch.manual_seed(0)

    def make(masked: bool):
        model = build(shape, device, dtype, attn)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
        folded = {"auto": None, "weights": True, "activations": False}[fold]
        masks = apply_shearing(model, prune_target(shape), opt, fold_into_weights=folded) if masked else None
        if masks is not None:
            masks.warmup_progress.fill_(0.5)
        fwd = torch.compile(model, backend=compile) if compile else model
        return model, fwd, opt, masks

    ids = torch.randint(0, shape.vocab_size, (batch, seq), device=device)

    def step(fwd, opt, masks) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = fwd(input_ids=ids, labels=ids).loss
        if masks is not None:
            loss = loss + masks.last_lagrangian
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masks is not None:
            masks.constrain_()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    # Both models stay alive for the interleaved timing. A model's peak memory is its own static
    # footprint (weights) plus the most its steps allocate above everything already resident.
    models, footprint, peak = {}, {}, {}
    for name in ("dense", "masked"):
        before = torch.cuda.memory_allocated() if cuda else 0
        models[name] = make(name == "masked")
        footprint[name] = (torch.cuda.memory_allocated() - before) if cuda else 0
    for name, (_, fwd, opt, masks) in models.items():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        for _ in range(warmup):
            step(fwd, opt, masks)
        if cuda:
            peak[name] = (footprint[name] + torch.cuda.max_memory_allocated() - resident) / 2**30
    times = {"dense": [], "masked": []}
    for _ in range(rounds):
        for name, (_, fwd, opt, masks) in models.items():
            times[name].append(step(fwd, opt, masks))
    ratios = [m / d for m, d in zip(times["masked"], times["dense"])]
    return {"step_s": {n: statistics.median(t) for n, t in times.items()}, "peak_gib": peak, "ratios": ratios,
            "tokens": batch * seq, "target": prune_target(shape)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(NAMED_SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--compile", action="store_true", help="torch.compile both models (mask sampling included)")
    p.add_argument("--fold", choices=["auto", "weights", "activations"], default="auto",
                   help="how o_proj/down_proj are gated (auto: by cost)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
    shape = NAMED_SHAPES[a.shape]
    r = measure(shape, a.device, dtype, a.batch, a.seq, a.rounds, a.warmup, a.attn, a.compile, a.fold)
    results, peak, ratios = r["step_s"], r["peak_gib"], r["ratios"]
    tokens = a.batch * a.seq
    print(f"shape={a.shape} device={a.device} dtype={str(dtype).split('.')[-1]} attn={a.attn} "
          f"compile={a.compile} fold={a.fold} threads={torch.get_num_threads()} batch={a.batch}x{a.seq} target={prune_target(shape)}")
    print(f"{'variant':<8} {'step s':>9} {'tokens/s':>10} {'peak GiB':>9}")
    for n in ("dense", "masked"):
        mem = f"{peak[n]:9.2f}" if n in peak else f"{'-':>9}"
        print(f"{n:<8} {results[n]:9.4f} {tokens / results[n]:10.0f} {mem}")
    mem_ratio = f" memory masked/dense={peak['masked'] / peak['dense']:.3f}" if peak else ""
    print(f"masked/dense step time: median per-round ratio {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {a.rounds} rounds){mem_ratio}")


if __name__ == "__main__":
    main()
