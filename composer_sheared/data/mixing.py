"""Domain-weight update rules of dynamic batch loading (Sheared-LLaMA, Xia et al. 2023).

Pure functions on plain sequences / numpy: no torch, no Composer, so the rule can be unit tested
against hand-computed values and reused from any training loop.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["RULES", "update_weights", "validate_proportions", "excess_losses"]

from composer_sheared.defaults import ETA, RULES, SMOOTHING  # noqa: E402

# Proportions are compared against 1 with this tolerance; float sums of 7 decimal weights are
# off by ~1e-16, user-typed YAML weights (0.67, 0.045, ...) are exact to 1e-12.
SUM_TOL = 1e-6


def validate_proportions(proportions: Sequence[float], num_domains: int, *, what: str = "proportions") -> np.ndarray:
    """Check a proportion vector and return it as float64; ValueError names the problem."""
    try:
        p = np.asarray(proportions, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a sequence of numbers, got {proportions!r}") from err
    if p.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence, got shape {p.shape}")
    if len(p) != num_domains:
        raise ValueError(f"{what} has {len(p)} entries but there are {num_domains} domains")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{what} contains a non-finite value: {p.tolist()}")
    if np.any(p < 0):
        bad = [i for i, v in enumerate(p) if v < 0]
        raise ValueError(f"{what} must be non-negative; negative at index {bad}: {p.tolist()}")
    total = float(p.sum())
    if abs(total - 1.0) > SUM_TOL:
        raise ValueError(f"{what} must sum to 1 (within {SUM_TOL}), got sum {total!r}: {p.tolist()}")
    return p


def excess_losses(losses: Sequence[float], references: Sequence[float]) -> np.ndarray:
    """Per-domain loss minus reference (unclipped)."""
    l = np.asarray(losses, dtype=np.float64)
    r = np.asarray(references, dtype=np.float64)
    if l.shape != r.shape or l.ndim != 1:
        raise ValueError(f"losses {l.shape} and references {r.shape} must be flat and of equal length")
    return l - r


def update_weights(weights: Sequence[float], losses: Sequence[float], references: Sequence[float],
                   rule: str, eta: float = ETA, c: float = SMOOTHING) -> np.ndarray:
    """One dynamic-batch-loading update of the domain weights.

    - ``"paper"`` (Algorithm 1): ``delta = max(l - ref, 0)``; ``w <- w * exp(eta * delta)``;
      normalise. With the default ``eta=1`` this is exactly the paper's rule.
    - ``"doremi"`` (reference code): ``w <- softmax(log w + eta * (l - ref))``, then
      ``w <- (1 - c) w + c / k`` so no domain's weight reaches 0.
    - ``"constant"``: weights unchanged (the fixed-mixture baseline).
    """
    if rule not in RULES:
        raise ValueError(f"unknown update rule {rule!r}; expected one of {RULES}")
    w = np.asarray(weights, dtype=np.float64)
    k = len(w)
    if w.ndim != 1 or k == 0:
        raise ValueError(f"weights must be a non-empty flat sequence, got {weights!r}")
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {w.tolist()}")
    diff = excess_losses(losses, references)
    if len(diff) != k:
        raise ValueError(f"{len(diff)} losses for {k} weights")
    if not np.isfinite(diff).all():
        raise ValueError(f"losses/references contain a non-finite value: losses={list(losses)}, "
                         f"references={list(references)}")

    if rule == "constant":
        return w / w.sum()
    if rule == "paper":
        new = w * np.exp(eta * np.maximum(diff, 0.0))
        return new / new.sum()
    # doremi: work in log space; log(0) = -inf keeps a zero weight at zero before smoothing.
    with np.errstate(divide="ignore"):
        logits = np.log(w / w.sum()) + eta * diff
    logits = logits - logits.max()
    soft = np.exp(logits)
    soft = soft / soft.sum()
    return (1.0 - c) * soft + c / k
