"""Importance scores for one-shot structured pruning, in exactly the layouts of the masks.

    layer         [L]          block influence (1 - cos(stream in, stream out)) or the loss increase when skipped
    kv_group      [L, G]       sum (or max) of the scores of its query heads
    q_head        [L, G, g]    mean norm of the head's contribution to the attention output
    intermediate  [L, m]       mean |up * act(gate)| (the input of down_proj), times ||down_proj column||
    hidden        [d]          mean |RMSNorm output| summed over every norm of the model

Higher is more important. One calibration pass (Minitron-style activation statistics) with
forward hooks that are removed afterwards; the "skip" layer metric adds one pass per layer over
the first few calibration batches. `random_scores` and `magnitude_scores` are the data-free
baselines. No Composer here.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from composer_sheared.pruning.apply import check_supported
from composer_sheared.shapes import ModelShape

__all__ = ["STRUCTURES", "LAYER_METRICS", "compute_importance", "random_scores", "magnitude_scores",
           "structure_shapes"]

STRUCTURES = ("layer", "kv_group", "q_head", "intermediate", "hidden")
LAYER_METRICS = ("block_influence", "skip_loss")


def structure_shapes(source: ModelShape) -> dict[str, tuple]:
    """The score (and mask) layout of every structure for `source`."""
    L, G, g = source.num_layers, source.num_key_value_heads, source.group_size
    return {"layer": (L,), "kv_group": (L, G), "q_head": (L, G, g),
            "intermediate": (L, source.intermediate_size), "hidden": (source.hidden_size,)}


def _shape_of(shape_source: Any) -> ModelShape:
    if isinstance(shape_source, ModelShape):
        return shape_source
    return check_supported(shape_source)


def _wanted(structures: Optional[Iterable[str]]) -> tuple[str, ...]:
    names = STRUCTURES if structures is None else tuple(structures)
    unknown = sorted(set(names) - set(STRUCTURES))
    if unknown:
        raise ValueError(f"unknown structure(s) {unknown}; expected a subset of {STRUCTURES}")
    return names


def _as_batch(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(f"a calibration batch must be a tensor of token ids or a dict with 'input_ids', "
                         f"got {type(batch).__name__}")
    out = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("attention_mask") is not None:
        out["attention_mask"] = batch["attention_mask"].to(device)
    return out


def _token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T] float weights of the tokens that count (padding excluded)."""
    mask = batch.get("attention_mask")
    return (torch.ones_like(batch["input_ids"]) if mask is None else mask).float()


def _hidden_of(output: Any) -> torch.Tensor:
    # Decoder layers return a tuple in transformers < 4.54 and a tensor from then on.
    return output[0] if isinstance(output, (tuple, list)) else output


def _lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy and the number of tokens it is over."""
    logits = model(**batch).logits[:, :-1].float()
    labels = batch["input_ids"][:, 1:]
    weight = _token_mask(batch)[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return torch.stack([(ce * weight.reshape(-1)).sum(), weight.sum()])


class _Stats:
    """Token-weighted running sums of [.., T]-shaped statistics, one accumulator per key."""

    def __init__(self):
        self.sums: dict[Any, torch.Tensor] = {}
        self.tokens = 0.0
        self.weight: Optional[torch.Tensor] = None  # [B, T] of the current batch

    def add(self, key, per_token: torch.Tensor) -> None:
        """per_token: [B, T, ...]; adds the weighted sum over B and T (in fp32)."""
        w = self.weight.reshape(self.weight.shape + (1,) * (per_token.dim() - 2))
        s = (per_token.float() * w).sum((0, 1))
        self.sums[key] = s if key not in self.sums else self.sums[key] + s

    def mean(self, key) -> torch.Tensor:
        return self.sums[key] / max(self.tokens, 1.0)


def _check_metrics(layer_metric: str, kv_reduce: str) -> None:
    if layer_metric not in LAYER_METRICS:
        raise ValueError(f"layer_metric={layer_metric!r}; expected one of {LAYER_METRICS}")
    if kv_reduce not in ("sum", "max"):
        raise ValueError(f"kv_reduce={kv_reduce!r}; expected 'sum' or 'max'")


def _head_norm_hook(o_proj: nn.Linear, num_heads: int, head_dim: int, stats: _Stats, i: int):
    """Pre-hook of o_proj: the norm of each head's own contribution to the attention output."""
    w = o_proj.weight.float().reshape(-1, num_heads, head_dim)  # [d, H, hd]
    # ||W_o[:, h] x_h|| via the per-head Gram matrix: hd^2 instead of d*hd work and memory per
    # token and head.
    gram = torch.einsum("dhk,dhl->hkl", w, w)  # [H, hd, hd]

    def hook(module, args):
        xh = args[0].float().reshape(*args[0].shape[:-1], num_heads, head_dim)  # every head's context vector
        sq = torch.einsum("bthk,hkl,bthl->bth", xh, gram.to(xh.device), xh)
        stats.add(("head", i), sq.clamp_min(0).sqrt())
    return hook


def _channel_hook(down_proj: nn.Linear, stats: _Stats, i: int):
    """Pre-hook of down_proj: |its input| times the norm of the column each channel writes."""
    col_norm = down_proj.weight.float().norm(dim=0)  # [m]

    def hook(module, args):
        stats.add(("inter", i), args[0].abs() * col_norm.to(args[0].device))
    return hook


def _norm_hook(stats: _Stats):
    def hook(module, args, out):
        stats.add("hidden", out.abs())
    return hook


def _block_influence_hook(stats: _Stats, i: int):
    """Forward hook of a decoder layer: 1 - cos(its residual input, its output)."""
    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        cos = F.cosine_similarity(x.float(), _hidden_of(out).float(), dim=-1)
        stats.add(("layer", i), 1 - cos)
    return hook


def _register_hooks(model: nn.Module, source: ModelShape, wanted: Sequence[str], layer_metric: str,
                    stats: _Stats) -> list:
    """The forward hooks that accumulate the activation statistics of `wanted` into `stats`."""
    base, handles = model.model, []
    norm_hook = _norm_hook(stats)
    for i, layer in enumerate(base.layers):
        if "kv_group" in wanted or "q_head" in wanted:
            hook = _head_norm_hook(layer.self_attn.o_proj, source.num_attention_heads, source.head_dim, stats, i)
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook))
        if "intermediate" in wanted:
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(_channel_hook(layer.mlp.down_proj, stats, i)))
        if "hidden" in wanted:
            handles += [layer.input_layernorm.register_forward_hook(norm_hook),
                        layer.post_attention_layernorm.register_forward_hook(norm_hook)]
        if "layer" in wanted and layer_metric == "block_influence":
            handles.append(layer.register_forward_hook(_block_influence_hook(stats, i), with_kwargs=True))
    if "hidden" in wanted:
        handles.append(base.norm.register_forward_hook(norm_hook))
    return handles


def _calibrate(model: nn.Module, batches: Iterable[Any], stats: _Stats, keep: int, progress: bool
               ) -> list[dict[str, torch.Tensor]]:
    """One forward pass over `batches` (the hooks collect); returns the first `keep` batches."""
    device = next(model.parameters()).device
    kept: list[dict[str, torch.Tensor]] = []
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="calibration", leave=False)
    for batch in it:
        batch = _as_batch(batch, device)
        stats.weight = _token_mask(batch)
        stats.tokens += float(stats.weight.sum())
        model(**batch)
        if len(kept) < keep:
            kept.append(batch)
    if stats.tokens == 0:
        raise ValueError("no calibration tokens: `batches` was empty")
    return kept


def _activation_scores(stats: _Stats, source: ModelShape, wanted: Sequence[str], layer_metric: str, kv_reduce: str
                       ) -> dict[str, torch.Tensor]:
    """The scores of every wanted structure from the collected means (a skip-loss `layer` aside)."""
    L, G, g = source.num_layers, source.num_key_value_heads, source.group_size
    scores: dict[str, torch.Tensor] = {}
    if "kv_group" in wanted or "q_head" in wanted:
        heads = torch.stack([stats.mean(("head", i)) for i in range(L)]).reshape(L, G, g)
        if "q_head" in wanted:
            scores["q_head"] = heads
        if "kv_group" in wanted:
            scores["kv_group"] = heads.sum(-1) if kv_reduce == "sum" else heads.amax(-1)
    if "intermediate" in wanted:
        scores["intermediate"] = torch.stack([stats.mean(("inter", i)) for i in range(L)])
    if "hidden" in wanted:
        scores["hidden"] = stats.mean("hidden")
    if "layer" in wanted and layer_metric == "block_influence":
        scores["layer"] = torch.stack([stats.mean(("layer", i)) for i in range(L)])
    return scores


@torch.no_grad()
def compute_importance(
    model: nn.Module,
    batches: Iterable[Any],
    structures: Optional[Iterable[str]] = None,
    layer_metric: str = "block_influence",
    kv_reduce: str = "sum",
    skip_batches: int = 2,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Activation-based importance of every unit of every structure (higher = keep).

    `batches`: an iterable of token-id tensors [B, T] or dicts with ``input_ids`` (and optionally
    ``attention_mask``). `structures`: the score names wanted (default: all five). `layer_metric`:
    ``block_influence`` (ShortGPT: 1 - cosine between a layer's residual input and output, mean over
    tokens) or ``skip_loss`` (the increase of the LM loss when the layer is skipped, over the first
    `skip_batches` batches; one extra pass per layer). `kv_reduce`: ``sum`` or ``max`` of a KV
    group's query-head scores. The model is put in eval mode and restored afterwards.
    """
    source = check_supported(model)
    wanted = _wanted(structures)
    _check_metrics(layer_metric, kv_reduce)
    skip = layer_metric == "skip_loss" and "layer" in wanted
    stats = _Stats()
    handles = _register_hooks(model, source, wanted, layer_metric, stats)
    was_training = model.training
    model.eval()
    try:
        kept = _calibrate(model, batches, stats, skip_batches if skip else 0, progress)
        for h in handles:  # the skip-loss passes must not add to the statistics
            h.remove()
        scores = _activation_scores(stats, source, wanted, layer_metric, kv_reduce)
        if skip:
            scores["layer"] = _skip_loss(model, kept, progress)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: scores[n].float().cpu() for n in STRUCTURES if n in scores}


def _skip_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], progress: bool) -> torch.Tensor:
    """Per layer: LM loss with that layer replaced by the identity minus the dense loss."""
    layers = model.model.layers

    def mean_loss() -> torch.Tensor:
        tot = sum(_lm_loss(model, b) for b in batches)
        return tot[0] / tot[1]

    def identity(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) + tuple(out[1:]) if isinstance(out, (tuple, list)) else x

    dense = mean_loss()
    out = torch.empty(len(layers))
    it = range(len(layers))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="layer skip loss", leave=False)
    for i in it:
        h = layers[i].register_forward_hook(identity, with_kwargs=True)
        try:
            out[i] = mean_loss() - dense
        finally:
            h.remove()
    return out


def random_scores(shape_source: Any, seed: int = 0, structures: Optional[Iterable[str]] = None
                  ) -> dict[str, torch.Tensor]:
    """Uniform random scores (the random-pruning baseline); the same for the same seed.
    `shape_source`: a ModelShape or a supported HF model."""
    source = _shape_of(shape_source)
    gen = torch.Generator().manual_seed(int(seed))
    shapes = structure_shapes(source)
    return {n: torch.rand(shapes[n], generator=gen) for n in STRUCTURES if n in _wanted(structures)}


@torch.no_grad()
def magnitude_scores(model: nn.Module, structures: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Data-free scores from weight norms: a unit scores the product of the norms of the weight
    slices that read it and write it (heads: W_q rows x W_o columns; FFN channels: gate and up rows
    x down column; hidden channels: embedding column x the sum of the |RMSNorm weights|; layers: the
    Frobenius norms of o_proj and down_proj, the two writes to the stream)."""
    source = check_supported(model)
    wanted = _wanted(structures)
    G, g, hd, H = source.num_key_value_heads, source.group_size, source.head_dim, source.num_attention_heads
    base = model.model
    f = lambda t: t.detach().float().cpu()  # noqa: E731
    heads, inter, layer = [], [], []
    norm_sum = f(base.norm.weight).abs()
    for lyr in base.layers:
        att, mlp = lyr.self_attn, lyr.mlp
        q = f(att.q_proj.weight).reshape(H, hd, -1).flatten(1).norm(dim=1)
        o = f(att.o_proj.weight).reshape(-1, H, hd).permute(1, 0, 2).flatten(1).norm(dim=1)
        heads.append((q * o).reshape(G, g))
        inter.append(f(mlp.gate_proj.weight).norm(dim=1) * f(mlp.up_proj.weight).norm(dim=1)
                     * f(mlp.down_proj.weight).norm(dim=0))
        norm_sum = norm_sum + f(lyr.input_layernorm.weight).abs() + f(lyr.post_attention_layernorm.weight).abs()
        layer.append(f(att.o_proj.weight).norm() + f(mlp.down_proj.weight).norm())
    hidden = f(base.embed_tokens.weight).norm(dim=0) * norm_sum
    heads_t = torch.stack(heads)
    scores = {"layer": torch.stack(layer), "kv_group": heads_t.sum(-1), "q_head": heads_t,
              "intermediate": torch.stack(inter), "hidden": hidden}
    return {n: scores[n] for n in STRUCTURES if n in wanted}
