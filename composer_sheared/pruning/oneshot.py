"""One-shot structured pruning to an exact target: scores -> per-row top-k binary gates -> the
same slicing as a learned run, so the result is a plain HF model of exactly the target config.

    scores = compute_importance(model, batches)          # or random_scores(model, seed)
    small = oneshot_prune(model, "sheared-1.3b", scores)  # or {"hidden_size": 512, ...}

`scores_to_log_alpha` turns the same scores into an initialisation for learned masks.
No Composer here.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from transformers import PreTrainedModel

from composer_sheared.pruning.apply import check_supported
from composer_sheared.pruning.importance import compute_importance, magnitude_scores, random_scores
from composer_sheared.pruning.masks import structures_for
from composer_sheared.pruning.slicing import prune_with_gates
from composer_sheared.shapes import ModelShape, resolve_target

__all__ = ["METHODS", "scores_to_gates", "scores_to_log_alpha", "method_scores", "oneshot_prune"]

METHODS = ("importance", "random", "magnitude")


def _rows_scores(scores: Mapping[str, torch.Tensor], source: ModelShape, target: Any):
    """(structure, its scores) for every structure the target prunes; errors name what is wrong."""
    target = resolve_target(source, target)
    for name, st in structures_for(source, target).items():
        if name not in scores:
            raise ValueError(f"no scores for {name!r}, which the target {target.as_dict()} prunes")
        s = torch.as_tensor(scores[name]).float()
        if tuple(s.shape) != tuple(st.shape):
            raise ValueError(f"scores[{name!r}] has shape {tuple(s.shape)}, expected {tuple(st.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores[{name!r}] has non-finite values")
        yield st, s


def scores_to_gates(scores: Mapping[str, torch.Tensor], source: ModelShape, target: Any) -> dict[str, torch.Tensor]:
    """Binary gates keeping, per row, the target count of highest-scoring units (ties: lowest index).
    Only the structures the target prunes get gates (the layout of ShearingMasks)."""
    gates = {}
    for st, s in _rows_scores(scores, source, target):
        # A stable descending sort makes ties deterministic.
        idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., : st.target]
        gates[st.name] = torch.zeros_like(s).scatter_(-1, idx, 1.0)
    return gates


def scores_to_log_alpha(scores: Mapping[str, torch.Tensor], source: ModelShape, target: Any,
                        spread: float = 10.0) -> dict[str, torch.Tensor]:
    """An initial log_alpha per pruned structure: within each row, ranks mapped linearly to
    [-spread, +spread], the best unit highest (copy into ``masks.log_alpha[name]``)."""
    out = {}
    for st, s in _rows_scores(scores, source, target):
        n = st.row_size
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(n).expand_as(order))  # 0 = best
        out[st.name] = spread - 2.0 * spread * ranks.float() / (n - 1)
    return out


def method_scores(model: torch.nn.Module, method: str, batches: Optional[Iterable[Any]] = None, seed: int = 0,
                  **importance_kwargs: Any) -> dict[str, torch.Tensor]:
    """Scores of a named one-shot method: ``importance`` (needs calibration `batches`),
    ``random`` (seeded) or ``magnitude`` (weight norms)."""
    if method == "importance":
        if batches is None:
            raise ValueError("method 'importance' needs calibration batches")
        return compute_importance(model, batches, **importance_kwargs)
    if method == "random":
        return random_scores(model, seed)
    if method == "magnitude":
        return magnitude_scores(model)
    raise ValueError(f"unknown one-shot method {method!r}; expected one of {METHODS}")


def oneshot_prune(model: PreTrainedModel, target: Any, scores: Mapping[str, torch.Tensor]) -> PreTrainedModel:
    """A new HF model of exactly `target` keeping the top-scoring units of `model` (binary gates,
    no soft-value scaling). `target`: a ModelShape, a partial mapping or a shape name."""
    source = check_supported(model)
    target = resolve_target(source, target)
    return prune_with_gates(model, target, scores_to_gates(scores, source, target))
