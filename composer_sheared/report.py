"""Metrics logging (JSONL) and the demo report: PNG plots + report.md.

`JSONLLogger` is a Composer LoggerDestination that appends every logged metric to a JSONL file
(rank 0 only), so reports are built from logged metrics, not from scraped stdout. The plotting
functions read those files; matplotlib is imported lazily (Agg backend).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from composer.loggers import LoggerDestination

__all__ = ["JSONLLogger", "read_jsonl", "series", "plot_domain_weights", "plot_expected_params",
           "plot_domain_losses", "plot_train_loss"]



def _save(fig, out) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)

def _plain(v: Any) -> Any:
    try:
        import torch

        if isinstance(v, torch.Tensor):
            v = v.detach().float().cpu()
            return v.item() if v.numel() == 1 else v.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


class JSONLLogger(LoggerDestination):
    """Append `{"step": batch, "metrics": {...}}` lines (and one `{"hparams": ...}` line)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = None

    def _write(self, record: dict) -> None:
        from composer.utils import dist

        if dist.get_global_rank() != 0:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        self._write({"hparams": _plain(hyperparameters)})

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        self._write({"step": step, "metrics": _plain(metrics)})

    def close(self, state, logger) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def hparams(records: Iterable[dict]) -> dict:
    out: dict = {}
    for r in records:
        out.update(r.get("hparams", {}))
    return out


def series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, last value per step wins."""
    by_step: dict[int, float] = {}
    for r in records:
        m = r.get("metrics", {})
        if key in m and r.get("step") is not None and isinstance(m[key], (int, float)):
            by_step[int(r["step"])] = float(m[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def metric_keys(records: Iterable[dict], prefix: str) -> list[str]:
    keys: list[str] = []
    for r in records:
        for k in r.get("metrics", {}):
            if k.startswith(prefix) and k not in keys:
                keys.append(k)
    return keys


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
        ax.set_title(f"domain weights: {title}")
        ax.set_xlabel("step")
        ax.set_ylabel("weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, out)
    return Path(out) if drawn else None


def plot_expected_params(records: list[dict], out: str | os.PathLike, source_params: Optional[int] = None,
                         schedule: Optional[tuple[list[int], list[float]]] = None) -> Optional[Path]:
    """Expected parameter count of the masked model vs the (warmed-up) target, over steps."""
    plt = _plt()
    s_exp, v_exp = series(records, "shearing/expected_params")
    s_tgt, v_tgt = series(records, "shearing/target_params")
    s_cur, v_cur = schedule if schedule else series(records, "shearing/current_target_params")
    if not s_exp:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(s_exp, [v / 1e6 for v in v_exp], label="expected params (masks)")
    if s_cur:
        ax.plot(s_cur, [v / 1e6 for v in v_cur], "--", label="target during warm-up")
    if s_tgt:
        ax.plot(s_tgt, [v / 1e6 for v in v_tgt], ":", label="final target")
    if source_params:
        ax.axhline(source_params / 1e6, color="grey", lw=0.8, label="source")
    ax.set_xlabel("step")
    ax.set_ylabel("parameters (M)")
    ax.set_title("pruning: expected vs target parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out)
    return Path(out)


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
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("per-domain eval loss")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
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
    ax.set_xlabel("step (stages concatenated)")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out)
    return Path(out) if drawn else None
