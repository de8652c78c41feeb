"""Greedy decode speed of a source model against its pruned version, side by side in one run.

Each model is an HF directory or a shape, built with random weights:
``NAME`` from composer_sheared.shapes.NAMED_SHAPES, ``NAME-4layers`` (that shape with 4 layers) or
``NAME:field=value,...`` (that shape with the fields replaced). Runs alternate between the two
models (and which goes first), so load on a shared machine hits both alike; the fastest of the
repeats is reported (the run least disturbed by other load). Tokens/s counts new tokens (batch x new tokens / wall time of ``generate``,
prefill included). The expected speed-up is the ratio of per-token FLOPs (2 x the matmul weights
+ the attention over the mean context, the decode-time analogue of composer_sheared.run.plan).

    python bench/decode_speed.py llama2-7b-4layers sheared-2.7b-4layers
    python bench/decode_speed.py runs/cache/smollm2-135m runs/demo/prune/hf --batch-sizes 1 16
    python bench/decode_speed.py ... --device cuda   # bf16; default: CPU fp32, plus CUDA bf16 when present
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from composer_sheared.run.plan import matmul_params  # noqa: E402
from composer_sheared.shapes import NAMED_SHAPES, ModelShape  # noqa: E402


def parse_shape(spec: str) -> ModelShape:
    name, _, fields = spec.partition(":")
    m = re.fullmatch(r"(.+)-(\d+)layers", name)
    base_name, layers = (m.group(1), int(m.group(2))) if m and name not in NAMED_SHAPES else (name, None)
    if base_name not in NAMED_SHAPES:
        raise SystemExit(f"error: {spec!r} is neither a model directory nor a shape; shapes: {sorted(NAMED_SHAPES)}")
    shape = NAMED_SHAPES[base_name] if layers is None else NAMED_SHAPES[base_name].replace(num_layers=layers)
    for kv in filter(None, fields.split(",")):
        k, _, v = kv.partition("=")
        if k not in shape.as_dict():
            raise SystemExit(f"error: {spec!r}: unknown shape field {k!r}; fields: {sorted(shape.as_dict())}")
        shape = shape.replace(**{k: type(getattr(shape, k))(v) if k != "tie_word_embeddings" else v == "true"})
    return shape


def load(spec: str, device: str, dtype: torch.dtype):
    """(model, shape, description)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if os.path.isfile(os.path.join(spec, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(spec, torch_dtype=dtype)
        return model.to(device).eval(), ModelShape.from_hf_config(AutoConfig.from_pretrained(spec)), spec
    shape = parse_shape(spec)
    cfg = shape.to_hf_config(LlamaConfig(max_position_embeddings=4096))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    # the rotary inverse frequencies are a non-persistent buffer: to_empty left them uninitialised
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # random weights (speed does not depend on them); norms stay 1
        for n, p in model.named_parameters():
            p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02, generator=g)
    return model.eval(), shape, f"random {spec}"


def decode_flops(shape: ModelShape, context: float) -> float:
    """FLOPs per generated token: weight matmuls + QK^T and AV over `context` positions."""
    return 2.0 * matmul_params(shape) + 4.0 * shape.num_layers * shape.num_attention_heads * shape.head_dim * context


def time_generate(model, batch: int, prompt: int, new: int, vocab: int, device: str) -> float:
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=0, eos_token_id=None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    assert out.shape == (batch, prompt + new), out.shape
    return time.perf_counter() - t


def run(args, device: str, dtype: torch.dtype) -> list[str]:
    models = [load(s, device, dtype) for s in (args.source, args.pruned)]
    vocab = min(m.config.vocab_size for m, _, _ in models)
    for m, _, _ in models:  # warm-up (allocations, first-call overheads)
        time_generate(m, 1, 8, 4, vocab, device)
    ctx = args.prompt_len + args.new_tokens / 2
    f_src, f_prn = (decode_flops(s, ctx) for _, s, _ in models)
    lines = [f"\n### {device} {str(dtype).replace('torch.', '')}: {models[0][2]} vs {models[1][2]}\n",
             f"prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy; fastest of {args.repeats} "
             f"interleaved runs; torch threads {torch.get_num_threads()}.\n",
             f"Per-token FLOPs: source {f_src / 1e9:.3f} G, pruned {f_prn / 1e9:.3f} G (matmul weights "
             f"{matmul_params(models[0][1]) / 1e6:.1f}M vs {matmul_params(models[1][1]) / 1e6:.1f}M): "
             f"FLOP ratio source/pruned **{f_src / f_prn:.2f}x**.\n",
             "| batch | source tok/s | pruned tok/s | speed-up pruned/source | FLOP ratio | speed-up / FLOP ratio |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b in args.batch_sizes:
        times = [[], []]
        for r in range(args.repeats):
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                times[k].append(time_generate(models[k][0], b, args.prompt_len, args.new_tokens, vocab, device))
                print(f"  batch {b} run {r} {'source' if k == 0 else 'pruned'}: {times[k][-1]:.2f} s", flush=True)
        tps = [b * args.new_tokens / min(t) for t in times]
        speedup = tps[1] / tps[0]
        lines.append(f"| {b} | {tps[0]:.1f} | {tps[1]:.1f} | {speedup:.2f}x | {f_src / f_prn:.2f}x | "
                     f"{speedup / (f_src / f_prn):.2f} |")
        print(lines[-1], flush=True)
    del models
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="HF dir or shape (see above)")
    ap.add_argument("pruned", help="HF dir or shape")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: CPU fp32, then CUDA bf16 when present")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", help="append the markdown tables to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(args.device, torch.float32 if args.device == "cpu" else torch.bfloat16)] if args.device else \
        [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
    lines = []
    for device, dtype in runs:
        lines += run(args, device, dtype)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
