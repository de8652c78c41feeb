"""The demo report's inputs and plots: metrics JSONL files (see composer_sheared.loggers) -> PNGs.

matplotlib is imported lazily (Agg backend).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = ["read_jsonl", "series", "plot_domain_weights", "plot_domain_losses",
           "plot_train_loss", "plot_pruning_progress"]


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of the file's latest run: from its last fresh-run header (start_batch 0) to the end,
    resumed segments included, so two runs are never read (or plotted) as one."""
    p = Path(path)
    if not p.exists():
        return []
    records = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    starts = [i for i, r in enumerate(records) if r.get("run", {}).get("start_batch", 1) == 0]
    return records[starts[-1]:] if starts else records


def _style(ax, title: str, xlabel: str, ylabel: str, grid_axis: str = "both") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis=grid_axis)
    ax.legend(fontsize=8)


def _save(fig, out) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, last value per step wins."""
    by_step: dict[int, float] = {}
    for r in records:
        m = r.get("metrics", {})
        if key in m and r.get("step") is not None and isinstance(m[key], (int, float)):
            by_step[int(r["step"])] = float(m[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_domain_weights(stages: Sequence[tuple[str, list[dict]]], domains: Sequence[str], out: str | os.PathLike,
                        prefix: str = "dbl/weight/") -> Optional[Path]:
    """Domain weights over steps, one panel per stage (e.g. pruning, continued pretraining)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.8), squeeze=False)
    drawn = False
    for ax, (title, recs) in zip(axes[0], stages):
        for d in domains:
            s, v = series(recs, prefix + d)
            if s:
                ax.plot(s, v, marker=".", label=d)
                drawn = True
        _style(ax, f"domain weights: {title}", "step", "weight")
    _save(fig, out)
    return Path(out) if drawn else None


def plot_domain_losses(losses: dict[str, dict[str, float]], out: str | os.PathLike,
                       references: Optional[dict[str, float]] = None) -> Path:
    """Grouped bars: per-domain eval loss of each model (e.g. source / pruned / continued)."""
    plt = _plt()
    models = list(losses)
    domains = list(next(iter(losses.values())))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.6 * len(domains) + 2, 3.8))
    for i, name in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [losses[name].get(d, math.nan) for d in domains], width, label=name)
    if references:
        for j, d in enumerate(domains):
            if d in references:
                ax.hlines(references[d], j - 0.45, j + 0.45, colors="k", linestyles="dashed",
                          label="reference" if j == 0 else None)
    ax.set_xticks(range(len(domains)))
    ax.set_xticklabels(domains)
    _style(ax, "per-domain eval loss", "", "eval loss (nats/token)", grid_axis="y")
    _save(fig, out)
    return Path(out)


def plot_pruning_progress(records: list[dict], out: str | os.PathLike) -> Optional[Path]:
    """Pruning: the training loss (top) and the expected size of the masks against the warm-up
    target they are held to (bottom), over the same steps."""
    s_loss, loss = series(records, "loss/train/total")
    s_exp, exp = series(records, "shearing/expected_params")
    s_wt, wt = series(records, "shearing/warmup_target_params")
    if not (s_loss and s_exp):
        return None
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True)
    top.plot(s_loss, loss, label="total (LM, distillation, Lagrangian)")
    s_ce, ce = series(records, "distill/ce_loss")
    if s_ce:
        top.plot(s_ce, ce, label="LM cross-entropy", alpha=0.8)
    s_t, t_ce = series(records, "distill/teacher_ce_loss")
    if s_t:  # the source on the same batches: the distance between the two is what pruning costs
        top.plot(s_t, t_ce, ":", label="source on the same batch", color="black", alpha=0.7)
    _style(top, "pruning: training loss", "", "loss")
    bottom.plot(s_exp, [v / 1e6 for v in exp], label="expected (masks)")
    if s_wt:
        bottom.plot(s_wt, [v / 1e6 for v in wt], "--", label="warm-up target")
    _style(bottom, "expected parameters vs the warm-up target", "step", "params (M)")
    _save(fig, out)
    return Path(out)


def plot_train_loss(stages: Sequence[tuple[str, list[dict]]], out: str | os.PathLike,
                    key: str = "loss/train/total") -> Optional[Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    offset, drawn = 0, False
    for title, recs in stages:
        s, v = series(recs, key)
        if s:
            ax.plot([x + offset for x in s], v, label=title)
            offset += s[-1]
            drawn = True
    _style(ax, "training loss", "step (stages concatenated)", "train loss")
    _save(fig, out)
    return Path(out) if drawn else None
