"""Fidelity at equal tokens: does pruning the Sheared-LLaMA way give a better small model for the
tokens spent than the simple alternatives?

Every arm ends at the same target shape, spends the same total training tokens (pruning +
continued pretraining), reads the same data and is scored on the same held-out samples:

  a  paper     learned masks, uniform init, Lagrangian schedule, then continued pretraining
  b  projected projected schedule + importance init + smooth gates, then continued (no distillation)
  c  oneshot   one-shot activation-importance slice, then continued pretraining on all the tokens
  d  random    random structured slice, then continued pretraining on all the tokens
  e  scratch   the target shape from random init, trained on all the tokens
  f  static    arm b with the static initial domain mix (no dynamic batch loading)
  g  defaults  arm b with knowledge distillation from the source in both stages (alpha 0.5, T 1):
               the recipes' defaults
  h  oneshot+kd arm c with the same distillation in its continued pretraining
  i  sampled   arm b with sampled (hard-concrete) gates instead of smooth ones
  j  sampled+kd arm i with distillation in both stages (arm g with sampled gates)

Distillation is off in every arm but g, h and j, whatever the recipes say.

    python bench/fidelity.py --preset cpu            # embedded SmolLM2-135M, local corpus, 2 cores
    python bench/fidelity.py --preset gpu            # one GPU, >= 30M tokens per arm
    python bench/fidelity.py --preset cpu --arms b,c # a subset

Writes bench/results/fidelity-<preset>.md, .json and a loss-vs-tokens PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # data_prep is a top-level folder of the repository, not installed
    sys.path.insert(0, str(REPO))

from composer_sheared.demo.data import DOMAINS, build_data as build_demo_data, demo_target  # noqa: E402

ARMS = {
    "a": "paper: learned masks, uniform init, Lagrangian",
    "b": "projected schedule + importance init + smooth gates",
    "c": "one-shot importance + continued",
    "d": "random slice + continued",
    "e": "target shape from scratch",
    "f": "arm b with the static mix",
    "g": "arm b + distillation (the paper recipes)",
    "h": "one-shot importance + continued with distillation",
    "i": "arm b with sampled gates",
    "j": "arm g with sampled gates",
}
# Continued-pretraining lr per arm: each arm's best of the lrs tried for it (b, c, g, h, i; the
# sweep is in bench/results/fidelity-cpu.md). Without distillation, a model from learned masks has
# already trained at the target shape and loses ground when a fresh optimizer re-warms to a high lr;
# a one-shot slice, a random slice or a random init need the large steps. With distillation both
# kinds did best at 5e-4. Untried arms take the value of their kind.
CONTINUE_LR = {"a": 5e-4, "b": 1e-4, "c": 5e-4, "d": 5e-4, "e": 5e-4, "f": 1e-4, "g": 5e-4, "h": 5e-4, "i": 5e-4,
               "j": 5e-4}
PRUNING_ARMS = ("a", "b", "f", "g", "i", "j")
DISTILLING_ARMS = ("g", "h", "j")
TARGET = demo_target()


@dataclass
class Preset:
    prune_steps: int
    prune_batch: int
    continue_steps: int
    continue_batch: int
    seq_len: int
    eval_sequences: int
    eval_interval: int
    corpus_bytes: int
    precision: str = "fp32"
    extra: list = field(default_factory=list)

    @property
    def prune_tokens(self) -> int:
        return self.prune_steps * self.prune_batch * self.seq_len

    @property
    def eval_batches(self) -> int:  # of 8 sequences
        return max(1, self.eval_sequences // 8)

    @property
    def total_tokens(self) -> int:
        return self.prune_tokens + self.continue_steps * self.continue_batch * self.seq_len


PRESETS = {
    # the demo's budget: 60 x 4 x 128 pruning + 20 x 8 x 128 continued = 51,200 tokens per arm
    "cpu": Preset(prune_steps=60, prune_batch=4, continue_steps=20, continue_batch=8, seq_len=128,
                  eval_sequences=32, eval_interval=10, corpus_bytes=400_000),
    # a quick end-to-end check of the bench itself (not a result)
    "smoke": Preset(prune_steps=2, prune_batch=2, continue_steps=2, continue_batch=2, seq_len=128,
                    eval_sequences=8, eval_interval=1, corpus_bytes=100_000),
    # one H200: 64 x 4096-token batches x 128 steps = 33.6M tokens per arm (not yet measured)
    "gpu": Preset(prune_steps=64, prune_batch=128, continue_steps=128, continue_batch=256, seq_len=512,
                  eval_sequences=256, eval_interval=16, corpus_bytes=60_000_000, precision="amp_bf16"),
}


def _log(msg: str) -> None:
    print(f"[fidelity] {msg}", flush=True)


def build_data(out: Path, src_dir: Path, p: Preset) -> Path:
    return build_demo_data(out, src_dir, p.seq_len, p.corpus_bytes, p.eval_sequences, log=_log)


def run_stage(yaml: str, overrides: list[str], log_file: Path) -> float:
    """One train.py stage as a subprocess (what a user runs); returns its wall time."""
    import subprocess

    t = time.time()
    with open(log_file, "w") as fh:
        r = subprocess.run([sys.executable, str(REPO / "train.py"), str(REPO / yaml), *overrides], cwd=REPO,
                           stdout=fh, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"[fidelity] train.py {yaml} failed (exit {r.returncode}); see {log_file}")
    return time.time() - t


def eval_curve(metrics: Path, token_offset: int, tokens_per_step: int) -> list[tuple[int, float]]:
    """(tokens, mean eval loss over the domains) from a run's JSONL metrics."""
    from composer_sheared.demo.plots import read_jsonl

    by_step: dict[int, dict[str, float]] = {}
    for rec in read_jsonl(metrics):
        for k, v in (rec.get("metrics") or {}).items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "metrics" and parts[1] in DOMAINS and parts[2] == "LanguageCrossEntropy":
                by_step.setdefault(int(rec["step"]), {})[parts[1]] = float(v)
    return [(token_offset + s * tokens_per_step, sum(d.values()) / len(d))
            for s, d in sorted(by_step.items()) if len(d) == len(DOMAINS)]


def random_init_dir(src_dir: Path, target: dict, out: Path, seed: int) -> Path:
    """The target shape with fresh weights (the from-scratch arm), saved as a HF directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from composer_sheared.storage.atomic import atomic_directory
    from composer_sheared.shapes import ModelShape, resolve_target

    cfg = AutoConfig.from_pretrained(src_dir)
    shape = resolve_target(ModelShape.from_hf_config(cfg), target)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shape.to_hf_config(cfg), torch_dtype=torch.float32)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src_dir).save_pretrained(tmp)
    return out


def _arm_dir(d: Path, reuse: Optional[dict]) -> Optional[dict]:
    """Empty the arm's folder, or (reusing a pruned model that is still there) only its continued
    stage's outputs; returns `reuse`, or None where there is no pruned model left to reuse."""
    reuse = reuse if reuse and (d / "pruned_hf" / "config.json").exists() else None
    if reuse:
        shutil.rmtree(d / "continue", ignore_errors=True)
        shutil.rmtree(d / "final_hf", ignore_errors=True)
        for old in d.glob("seed*"):
            shutil.rmtree(old)
    else:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    return reuse


def _common_overrides(p: Preset, mds: Path, refs: list[float]) -> list[str]:
    """The overrides both stages of every arm share: data, sequence length, evals, references."""
    # In-training evals (the curve, and what dynamic loading reacts to) read the first 8 samples per
    # domain; the before/after numbers of the table read all eval_sequences.
    return [f"data.local={mds}", f"max_seq_len={p.seq_len}", "device_eval_batch_size=8",
            f"eval_interval={p.eval_interval}ba", "data.eval_subset_num_batches=1",
            f"dynamic_loading.reference_losses=[{','.join(f'{r:.6f}' for r in refs)}]",
            f"precision={p.precision}", *p.extra]


def _prune_stage(arm: str, p: Preset, src_dir: Path, d: Path, common: list[str], teacher: list[str],
                 res: dict) -> None:
    """A pruning arm's pruning stage into d/pruned_hf; adds its wall time and eval curve to `res`."""
    prune_over = [f"model.source={src_dir}", f"max_duration={p.prune_steps}ba", f"save_folder={d / 'prune'}",
                  f"global_train_batch_size={p.prune_batch}", f"hf_save_dir={d / 'pruned_hf'}",
                  "pruning.eval_shape=target", "save_overwrite=true"]
    if arm == "a":  # the paper: Lagrangian, uniform init, Adam's own betas for masks and multipliers
        prune_over += ["pruning.schedule=lagrangian", "pruning.mask_init=uniform", "pruning.mask_betas=null"]
    if arm == "f":
        prune_over += ["dynamic_loading=null"]
    if arm in ("i", "j"):
        prune_over += ["pruning.train_gates=sampled"]
    # the arms that do not distil still run the source alongside, as a monitor only (alpha 0: the
    # run is the same), to log the student's excess loss over it on each training batch
    prune_over += teacher if arm in DISTILLING_ARMS else [teacher[0], "distillation.alpha=0"]
    res["prune_wall_s"] = run_stage("yamls/demo/prune_smollm2.yaml", common + prune_over, d / "prune.log")
    res["curve"] += eval_curve(d / "prune" / "metrics.jsonl", 0, p.prune_batch * p.seq_len)


def _start_model(arm: str, p: Preset, src_dir: Path, mds: Path, d: Path, common: list[str], teacher: list[str],
                 reuse: Optional[dict], res: dict) -> Path:
    """The model the arm's continued stage starts from: pruned (or the reused pruned model, with its
    pruning results and the pruning part of its curve), sliced one-shot, or freshly initialised."""
    start = d / "pruned_hf"
    if reuse:
        res.update({k: v for k, v in reuse.items() if k.startswith("prune")})
        res["curve"] = [c for c in reuse["curve"] if c[0] < p.prune_tokens] if arm in PRUNING_ARMS else []
    elif arm in PRUNING_ARMS:
        _prune_stage(arm, p, src_dir, d, common, teacher, res)
    elif arm in ("c", "d", "h"):
        start = _oneshot_slice(arm, src_dir, start, mds)
    else:
        start = random_init_dir(src_dir, TARGET, start, seed=0)
    return start


def _oneshot_slice(arm: str, src_dir: Path, out: Path, mds: Path) -> Path:
    """The one-shot slice of arms c, h (activation importance) and d (random)."""
    from composer_sheared.cli.oneshot import run as oneshot_run

    return oneshot_run(src_dir, out, TARGET, "random" if arm == "d" else "importance",
                       data=str(mds), domains=list(DOMAINS), calib_batches=8, batch_size=4, seed=0)


def _summarise(res: dict, refs: list[float], d: Path) -> None:
    """The table's numbers from the per-domain losses, and the pruning stage's training-loss stats."""
    for key in ("pruned", "final"):
        res[f"{key}_mean"] = sum(res[key].values()) / len(DOMAINS)
        res[f"{key}_max_excess"] = max(res[key][dom] - r for dom, r in zip(DOMAINS, refs))
    if (d / "prune" / "metrics.jsonl").exists():
        res.update(prune_loss_stats(d / "prune" / "metrics.jsonl"))


def run_arm(arm: str, p: Preset, src_dir: Path, mds: Path, refs: list[float], work: Path,
            reuse: Optional[dict] = None, seeds: tuple[int, ...] = ()) -> dict:
    """One arm. `reuse`: this arm's earlier result, whose pruned model (work/<arm>/pruned_hf) is kept
    and only continued again (e.g. with another continued lr). `seeds`: extra seeds for the
    continued stage alone (the recipe's seed 17 is the table's run)."""
    from composer_sheared.eval.domain_loss import domain_losses

    d = work / arm
    reuse = _arm_dir(d, reuse)
    common = _common_overrides(p, mds, refs)
    teacher = [f"distillation.teacher={src_dir}", "distillation.alpha=0.5"]
    res: dict = {"arm": arm, "label": ARMS[arm], "curve": []}
    t0 = time.time()
    # pruning arms spend part of the tokens pruning; the others continue for all of them
    pruning = arm in PRUNING_ARMS
    cont_steps = p.continue_steps if pruning else p.total_tokens // (p.continue_batch * p.seq_len)
    offset = p.prune_tokens if pruning else 0
    start = _start_model(arm, p, src_dir, mds, d, common, teacher, reuse, res)
    res["pruned"] = domain_losses(start, mds, DOMAINS, p.eval_batches, 8, desc=f"{arm} pruned")
    res["curve"].append((offset, sum(res["pruned"].values()) / len(DOMAINS)))
    res["final"], res["continue_wall_s"], curve = continue_stage(arm, start, d, common, teacher, cont_steps, p, offset,
                                                                 mds)
    res["curve"] += curve
    res["curve"].append((p.total_tokens, sum(res["final"].values()) / len(DOMAINS)))
    res["wall_s"] = time.time() - t0 + (reuse.get("prune_wall_s", 0.0) if reuse else 0.0)
    if seeds:  # the continued stage again from the same pruned model, with other data orders
        t1 = time.time()
        res["continue_seeds"] = {str(recipe_seed()): sum(res["final"].values()) / len(DOMAINS)}
        for seed in seeds:
            final, _, _ = continue_stage(arm, start, d, common, teacher, cont_steps, p, offset, mds, seed=seed)
            res["continue_seeds"][str(seed)] = sum(final.values()) / len(DOMAINS)
        res["seeds_wall_s"] = time.time() - t1
    res["continue_lr"] = CONTINUE_LR[arm]
    res["tokens"] = offset + cont_steps * p.continue_batch * p.seq_len
    _summarise(res, refs, d)
    _log(f"arm {arm}: pruned {res['pruned_mean']:.3f} final {res['final_mean']:.3f} ({res['wall_s']:.0f} s)")
    return res


def recipe_seed() -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(REPO / "yamls" / "demo" / "continue_smollm2.yaml").seed)


def continue_stage(arm: str, start: Path, d: Path, common: list[str], teacher: list[str], steps: int, p: Preset,
                   offset: int, mds: Path, seed: Optional[int] = None) -> tuple[dict, float, list]:
    """One arm's continued pretraining from `start` (`teacher`: the distillation overrides, used by
    the distilling arms only). Returns (per-domain final losses, wall time, in-training eval curve).
    A `seed` other than the recipe's runs in its own folder, d/seed<N>."""
    from composer_sheared.eval.domain_loss import domain_losses

    sub = d if seed is None else d / f"seed{seed}"
    sub.mkdir(parents=True, exist_ok=True)
    over = [f"model.source={start}", f"max_duration={steps}ba", f"save_folder={sub / 'continue'}",
            f"global_train_batch_size={p.continue_batch}", f"hf_save_dir={sub / 'final_hf'}", "save_overwrite=true",
            f"optimizer.lr={CONTINUE_LR[arm]}"]
    over += teacher if arm in DISTILLING_ARMS else ["distillation=null"]
    if seed is not None:
        over.append(f"seed={seed}")
    if arm == "f":
        over += ["dynamic_loading=null"]
    wall = run_stage("yamls/demo/continue_smollm2.yaml", common + over, sub / "continue.log")
    curve = eval_curve(sub / "continue" / "metrics.jsonl", offset, p.continue_batch * p.seq_len)
    desc = f"{arm} final" + ("" if seed is None else f" seed {seed}")
    return domain_losses(sub / "final_hf", mds, DOMAINS, p.eval_batches, 8, desc=desc), wall, curve


def prune_loss_stats(metrics: Path, window: int = 5) -> dict:
    """The pruning stage's LM training loss: first and max per batch, and first and max of its
    `window`-batch running mean (one 512-token batch swings by +-1 nat with the domain it draws);
    the same for the gap to the source on the same batch (the teacher monitor's excess loss);
    and the lowest stray of the expected size below the warm-up target."""
    from composer_sheared.demo.plots import read_jsonl, series

    recs = read_jsonl(metrics)
    _, loss = series(recs, "distill/ce_loss")  # the LM loss alone when distillation mixes in KL
    if not loss:
        _, loss = series(recs, "loss/train/total")
    _, stray = series(recs, "shearing/stray")
    _, gap = series(recs, "distill/excess_loss")
    _, source = series(recs, "distill/teacher_ce_loss")
    out = {"prune_window": window, "prune_min_stray": min(stray) if stray else None}
    if source and loss:  # how often the unpruned source itself lands over "first loss + 1 nat" on these batches
        out["prune_source_max_loss"] = max(source)
        out["prune_source_over_first_plus_1"] = sum(x > loss[0] + 1.0 for x in source)
    for name, xs in (("loss", loss), ("gap", gap)):
        run = [sum(xs[i:i + window]) / window for i in range(len(xs) - window + 1)]
        out.update({f"prune_first_{name}": xs[0] if xs else None, f"prune_max_{name}": max(xs) if xs else None,
                    f"prune_last_{name}": sum(xs[-window:]) / len(xs[-window:]) if xs else None,
                    f"prune_first_{name}_mean": run[0] if run else None,
                    f"prune_max_{name}_mean": max(run) if run else None})
    return out


def plot(results: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        xs, ys = zip(*sorted(r["curve"])) if r["curve"] else ((), ())
        ax.plot(xs, ys, marker=".", label=f"{r['arm']}: {r['label']}")
    ax.set_xlabel("training tokens (pruning + continued pretraining)")
    ax.set_ylabel("mean eval loss over domains (nats/token)")
    ax.set_ylim(top=min(12.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _intro_md(results: list[dict], refs: list[float], p: Preset, preset: str) -> list[str]:
    """The title and what every arm shares: the target, the token budget, the eval and the references."""
    return [f"# Fidelity at equal tokens ({preset} preset)\n",
            f"Source SmolLM2-135M-Instruct (embedded) -> target {TARGET}. Every arm spends "
            f"{p.total_tokens:,} training tokens ({p.seq_len}-token samples); pruning arms prune for "
            f"{p.prune_steps} x {p.prune_batch} then continue for {p.continue_steps} x {p.continue_batch}; the "
            f"others continue for all the tokens. Eval: token-mean cross-entropy on the same {p.eval_sequences} "
            f"held-out samples per domain. Reference (source) losses: "
            + ", ".join(f"{d} {r:.3f}" for d, r in zip(DOMAINS, refs)) + f". Arms' wall time "
            f"{sum(r['wall_s'] for r in results) / 60:.1f} min in all on 2 CPU cores; arms "
            f"that ran side by side with other work took longer, so compare wall times within a row only.\n"]


def _table_md(results: list[dict]) -> list[str]:
    """One row per arm: mean loss after pruning and after continued, per domain, worst excess."""
    L = ["| arm | method | after pruning (sliced) | after continued | " + " | ".join(DOMAINS)
         + " | max excess over ref | continued lr | wall s |",
         "| --- | --- | --- | --- | " + " | ".join("---" for _ in DOMAINS) + " | --- | --- | --- |"]
    for r in results:
        L.append(f"| {r['arm']} | {r['label']} | {r['pruned_mean']:.3f} | **{r['final_mean']:.3f}** | "
                 + " | ".join(f"{r['final'][d]:.3f}" for d in DOMAINS)
                 + f" | {r['final_max_excess']:.3f} | {r.get('continue_lr', 5e-4):g} | {r['wall_s']:.0f} |")
    return L


def _masks_vs_oneshot_md(b: dict, c: dict) -> list[str]:
    """The headline comparison, and whether it stands out of the continued stage's seed spread."""
    L = [f"- learned masks (b) vs one-shot + continued (c), no distillation in either: after continued "
         f"{c['final_mean'] - b['final_mean']:+.3f} nats in favour of b; after pruning alone "
         f"{c['pruned_mean'] - b['pruned_mean']:+.3f}."]
    if b.get("continue_seeds") and c.get("continue_seeds"):
        seeds = {k: list(r["continue_seeds"].values()) for k, r in (("b", b), ("c", c))}
        mb, mc = (sum(v) / len(v) for v in seeds.values())
        spread = min(max(v) - min(v) for v in seeds.values())
        verdict = ("smaller than either arm's seed range: not separable from the data order" if abs(mc - mb) < spread
                   else "larger than the smaller seed range")
        L.append(f"  Over the continued stage's seeds (below): b {mb:.3f}, c {mc:.3f}, {mc - mb:+.3f} in favour of b, "
                 f"{verdict}.")
    return L


def _comparisons_md(results: list[dict]) -> list[str]:
    """The pairwise differences the arms were designed for, for each pair that ran."""
    by = {r["arm"]: r for r in results}
    L = _masks_vs_oneshot_md(by["b"], by["c"]) if "b" in by and "c" in by else []
    if "g" in by and "h" in by:
        L.append(f"- arm g vs one-shot + continued, both distilling (h): after continued "
                 f"{by['h']['final_mean'] - by['g']['final_mean']:+.3f} nats in favour of g; after pruning alone "
                 f"{by['h']['pruned_mean'] - by['g']['pruned_mean']:+.3f}.")
    for x, y, text in (("e", "b", "from scratch (e) minus learned masks (b)"),
                       ("d", "c", "random (d) minus one-shot importance (c)")):
        if x in by and y in by:
            L.append(f"- {text}: {by[x]['final_mean'] - by[y]['final_mean']:+.3f} nats.")
    if "b" in by and "f" in by:
        L.append(f"- largest per-domain excess over the reference: dynamic (b) {by['b']['final_max_excess']:.3f}, "
                 f"static (f) {by['f']['final_max_excess']:.3f}.")
    if "b" in by and "a" in by:
        text = "paper's method (a) minus projected schedule + importance init (b)"
        L.append(f"- {text}: {by['a']['final_mean'] - by['b']['final_mean']:+.3f} nats.")
    for x, y, text in (("i", "b", "sampled gates (i) minus smooth gates (b)"),
                       ("j", "g", "with distillation, sampled gates (j) minus smooth gates (g)"),
                       ("h", "j", "one-shot + continued with distillation (h) minus arm j")):
        if x in by and y in by:
            L.append(f"- {text}: after pruning {by[x]['pruned_mean'] - by[y]['pruned_mean']:+.3f} nats, after "
                     f"continued {by[x]['final_mean'] - by[y]['final_mean']:+.3f}.")
    if "b" in by and "g" in by:
        L.append(f"- distillation (g) minus none (b): {by['g']['final_mean'] - by['b']['final_mean']:+.3f} nats "
                 f"(wall {by['g']['wall_s']:.0f} s vs {by['b']['wall_s']:.0f} s).")
    return L


def _pruning_md(r: dict) -> str:
    """One pruning arm's training loss, its gap to the source, and how far the expected params
    strayed below the warm-up target (a pruning arm only: one with `prune_min_stray`)."""
    low = -100 * r["prune_min_stray"]
    where = (f"fell at most {low:.2f}% of (source - target) below the warm-up target" if low > 0 else
             f"never fell below the warm-up target (closest {-low:.2f}% of source - target above it)")
    means = (f" ({r['prune_window']}-batch running mean: first {r['prune_first_loss_mean']:.3f}, max "
             f"{r['prune_max_loss_mean']:.3f})" if r.get("prune_max_loss_mean") is not None else "")
    gap = ""
    if r.get("prune_max_gap") is not None:
        run_max = r.get("prune_max_gap_mean")
        gap = (f"; gap to the source on the same batch (LM loss minus the source's): first "
               f"{r['prune_first_gap']:.3f}, max {r['prune_max_gap']:.3f}"
               + (f" (running mean max {run_max:.3f})" if run_max is not None else "")
               + f", mean of the last {r['prune_window']} {r['prune_last_gap']:.3f}")
    if r.get("prune_source_max_loss") is not None:
        gap += (f"; the source's own loss on the same batches reached {r['prune_source_max_loss']:.3f}, "
                f"over the first loss + 1 nat on {r['prune_source_over_first_plus_1']} batches")
    return (f"- arm {r['arm']} pruning: LM train loss first {r['prune_first_loss']:.3f}, max "
            f"{r['prune_max_loss']:.3f}{means}{gap}; expected params {where}.")


def _per_arm_md(results: list[dict], key: str, heading: str, line) -> list[str]:
    """A heading and one line per arm that recorded `key` (nothing when none did)."""
    rows = [r for r in results if r.get(key)]
    return [heading, *(f"- arm {r['arm']}: {line(r[key])}" for r in rows)] if rows else []


def _seed_line(seeds: dict) -> str:
    v = sorted(seeds.items())
    vals = [x for _, x in v]
    return (", ".join(f"seed {k}: {x:.3f}" for k, x in v)
            + f"; mean {sum(vals) / len(vals):.3f}, range {max(vals) - min(vals):.3f}")


def _seeds_md(results: list[dict]) -> list[str]:
    """The continued stage's spread over data orders, for the arms run with extra seeds."""
    return _per_arm_md(results, "continue_seeds",
                       "\nSeed spread of the continued stage alone (same pruned model, same lr; the seed moves the "
                       "data order), mean eval loss after continued:\n", _seed_line)


def _lr_sweep_md(results: list[dict]) -> list[str]:
    """Each swept arm's loss at every continued lr tried: where CONTINUE_LR comes from."""
    return _per_arm_md(results, "lr_sweep",
                       "\nContinued lr, mean eval loss after continued pretraining at each lr tried (same pruned "
                       "model, same tokens); the table uses each arm's `continue_lr`:\n",
                       lambda sweep: ", ".join(f"{float(lr):g}: {v:.3f}" for lr, v in
                                               sorted(sweep.items(), key=lambda kv: float(kv[0]))))


def write_report(results: list[dict], refs: list[float], p: Preset, preset: str, out_dir: Path, total_s: float) -> Path:
    """bench/results/fidelity-<preset>.md from the arms' results (written whole: temp file, then rename)."""
    L = [*_intro_md(results, refs, p, preset), *_table_md(results), "", *_comparisons_md(results),
         *(_pruning_md(r) for r in results if r.get("prune_min_stray") is not None),
         *_seeds_md(results), *_lr_sweep_md(results), f"\n![loss vs tokens](fidelity-{preset}.png)\n"]
    path = out_dir / f"fidelity-{preset}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(L) + "\n")
    tmp.replace(path)
    return path


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--work", default=str(REPO / "runs" / "fidelity"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--from-json", action="store_true",
                    help="only redraw the table and plot from bench/results/fidelity-<preset>.json")
    ap.add_argument("--reuse-pruned", action="store_true",
                    help="keep each rerun arm's pruned model from the last run and redo only its continued pretraining")
    ap.add_argument("--seeds", default="",
                    help="extra seeds for the continued stage of each arm run (e.g. 18,19): the data order moves "
                         "the result by tenths of a nat at the cpu preset's size")
    return ap


def _redraw(preset: str, out: Path) -> int:
    """--from-json: the table and plot again from the saved results, running nothing."""
    payload = json.loads((out / f"fidelity-{preset}.json").read_text())
    refs = [payload["source"][d] for d in DOMAINS]
    plot(payload["arms"], out / f"fidelity-{preset}.png")
    md = write_report(payload["arms"], refs, PRESETS[preset], preset, out, payload.get("total_s", 0.0))
    print(md.read_text())
    return 0


def _earlier_results(json_path: Path, p: Preset, source: dict, arms: list[str]) -> tuple[list[dict], dict]:
    """(the earlier run's arms not rerun now, {arm: its earlier result}) when that run had the same
    preset config and source losses; nothing otherwise, as its numbers would not compare."""
    if not json_path.exists():
        return [], {}
    old = json.loads(json_path.read_text())
    same_source = set(old.get("source", {})) == set(source) and all(
        abs(old["source"][k] - v) < 1e-3 for k, v in source.items())
    if old.get("config") == asdict(p) and same_source:
        return [r for r in old["arms"] if r["arm"] not in arms], {r["arm"]: r for r in old["arms"]}
    return [], {}


def _save_results(json_path: Path, preset: str, p: Preset, source: dict, results: list[dict], t0: float) -> None:
    """The results so far (temp file, then rename): a long run that stops still leaves a table."""
    payload = {"preset": preset, "config": asdict(p), "target": TARGET, "source": source, "arms": results,
               "total_s": time.time() - t0}
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(json_path)


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
    except ValueError:
        ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if recipe_seed() in seeds:
        ap.error(f"--seeds: {recipe_seed()} is the recipe's own seed, already run")
    if args.from_json:
        return _redraw(args.preset, Path(args.out))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown {unknown}; expected some of {sorted(ARMS)}")
    p = PRESETS[args.preset]
    work, out_dir = Path(args.work) / args.preset, Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from composer_sheared.eval.domain_loss import domain_losses
    from composer_sheared.demo.embedded import ensure_smollm2

    src = ensure_smollm2()
    mds = build_data(work, src, p)
    source = domain_losses(src, mds, DOMAINS, p.eval_batches, 8, desc="source")
    refs = [source[d] for d in DOMAINS]
    _log("source losses " + ", ".join(f"{d} {v:.3f}" for d, v in source.items()))
    json_path = out_dir / f"fidelity-{args.preset}.json"
    results, previous = _earlier_results(json_path, p, source, arms)
    for arm in arms:
        _log(f"arm {arm}: {ARMS[arm]}")
        results.append(run_arm(arm, p, src, mds, refs, work, previous.get(arm) if args.reuse_pruned else None,
                               seeds))
        results.sort(key=lambda r: r["arm"])
        _save_results(json_path, args.preset, p, source, results, t0)
    plot(results, out_dir / f"fidelity-{args.preset}.png")
    md = write_report(results, refs, p, args.preset, out_dir, time.time() - t0)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
