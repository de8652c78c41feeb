"""Attach ShearingMasks to a HF Llama-family model without copying its modelling code.

Where each gate acts (one gate per structure the target can remove):
  - a forward pre-hook on the CausalLM draws the gates once per forward pass;
  - o_proj: input features x head gates (each head's context vector), outputs x layer x hidden;
  - down_proj: input features x intermediate gates, outputs x layer x hidden;
  - embedding output x hidden gates (a forward hook);
  - every RMSNorm: variance over the kept hidden dims only, output x hidden gates.
o_proj, down_proj and the norms get an instance-level `forward` (the module, its parameters and
state-dict keys stay HF's). Because every write to the residual stream is gated, the stream is
exactly zero on dropped dims, so the masked model computes what the sliced one will.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from composer_sheared.defaults import EVAL_SHAPE, INIT_MEAN, LAMBDA_LR, MASK_LR, SCHEDULE, TEMPERATURE
from composer_sheared.pruning.masks import ShearingMasks
from composer_sheared.shapes import ModelShape, resolve_target

SUPPORTED_MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MASKS_ATTR = "shearing_masks"


def check_supported(model: nn.Module) -> ModelShape:
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise ValueError(
            f"{name} is not supported by composer_sheared; expected a HF causal LM of class "
            f"{', '.join(SUPPORTED_MODELS)} (pass the HF model, e.g. HuggingFaceModel.model)"
        )
    return ModelShape.from_hf_config(model.config)


def get_masks(model: nn.Module) -> ShearingMasks:
    masks = getattr(model, MASKS_ATTR, None)
    if not isinstance(masks, ShearingMasks):
        raise ValueError(f"{type(model).__name__} has no pruning masks; call apply_shearing(model, target) first")
    return masks


def _masked_rmsnorm(norm: nn.Module, masks: ShearingMasks):
    eps = norm.variance_epsilon

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        cur = masks.current
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        variance = h.pow(2).sum(-1, keepdim=True) / cur["hidden_kept"]
        h = h * torch.rsqrt(variance + eps)
        # Gate the [d] weight, not the [tokens, d] output: same result, one small multiply.
        return (norm.weight * cur["hidden"].to(norm.weight.dtype)) * h.to(dtype)

    return forward


def _gated_linear(linear: nn.Linear, masks: ShearingMasks, layer: int, in_key: str | None, out_key: str | None,
                  fold: bool | None):
    """`linear` with its input features scaled by gates `in_key` and its outputs by `out_key`.

    Two equal ways to compute it: scale the activations (cost ~ tokens * (in + out)), or scale
    the weight (~ 2 * in * out, and only a weight-sized tensor saved for backward). The cheaper
    one is picked from the shapes (static per compiled graph) unless `fold` forces one.
    """
    weight_cost = 2 * linear.in_features * linear.out_features
    act_per_token = linear.in_features + linear.out_features

    def forward(x: torch.Tensor) -> torch.Tensor:
        cur = masks.current
        g_in = None if in_key is None else cur[in_key][layer]
        g_out = None if out_key is None else cur[out_key][layer]
        use_weight = fold if fold is not None else (x.numel() // x.shape[-1]) * act_per_token > weight_cost
        if use_weight:
            w = linear.weight
            if g_out is not None:
                w = w * g_out.to(w.dtype)[:, None]
            if g_in is not None:
                w = w * g_in.to(w.dtype)[None, :]
            return F.linear(x, w, linear.bias)
        if g_in is not None:
            x = x * g_in.to(x.dtype)
        y = F.linear(x, linear.weight, linear.bias)
        return y if g_out is None else y * g_out.to(y.dtype)

    return forward


def _scale_embedding(masks: ShearingMasks):
    def hook(module, args, out):
        return out * masks.current["hidden"].to(out.dtype)

    return hook


def _patched_modules(model: nn.Module) -> list[nn.Module]:
    base = model.model
    mods = [base.norm]
    for layer in base.layers:
        mods += [layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.o_proj, layer.mlp.down_proj]
    return mods


def _register(model: nn.Module, masks: ShearingMasks, fold: bool | None) -> list:
    st = masks.structures
    base = model.model

    def draw_gates(module, args):
        masks()

    handles = [model.register_forward_pre_hook(draw_gates)]
    if "hidden" in st:
        handles.append(base.embed_tokens.register_forward_hook(_scale_embedding(masks)))
        for norm in [base.norm] + [n for layer in base.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.forward = _masked_rmsnorm(norm, masks)
    out_key = "out" if ("hidden" in st or "layer" in st) else None
    head_key = "head" if ("kv_group" in st or "q_head" in st) else None
    inter_key = "intermediate" if "intermediate" in st else None
    for i, layer in enumerate(base.layers):
        if head_key or out_key:
            o_proj = layer.self_attn.o_proj
            o_proj.forward = _gated_linear(o_proj, masks, i, head_key, out_key, fold)
        if inter_key or out_key:
            down = layer.mlp.down_proj
            down.forward = _gated_linear(down, masks, i, inter_key, out_key, fold)
    return handles


def add_mask_param_groups(optimizer: torch.optim.Optimizer, masks: ShearingMasks, mask_lr: float, lambda_lr: float,
                          betas: tuple[float, float] | None = None) -> None:
    """Masks and multipliers get their own groups, own lr and no weight decay. The multipliers'
    gradient is negated inside the Lagrangian, so a positive lr performs the ascent. `betas`
    overrides an Adam-type optimizer's betas for these two groups only."""
    for params, lr in ((masks.mask_parameters(), mask_lr), (masks.lambda_parameters(), lambda_lr)):
        if params:
            group = {"params": params, "lr": lr, "initial_lr": lr, "weight_decay": 0.0}
            if betas is not None:
                if "betas" not in optimizer.defaults:
                    raise ValueError(f"mask_betas given but {type(optimizer).__name__} has no betas")
                group["betas"] = tuple(float(b) for b in betas)
            optimizer.add_param_group(group)


def apply_shearing(
    model: nn.Module,
    target: ModelShape | Mapping[str, Any] | str,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    *,
    mask_lr: float = MASK_LR,
    lambda_lr: float = LAMBDA_LR,
    eval_shape: str = EVAL_SHAPE,
    temperature: float = TEMPERATURE,
    init_mean: float = INIT_MEAN,
    fold_into_weights: bool | None = None,
    mask_betas: tuple[float, float] | None = None,
    schedule: str = SCHEDULE,
    init_log_alpha: Mapping[str, torch.Tensor] | None = None,
    clamp: bool | None = None,
    gate_values: str | None = None,
    train_gates: str | None = None,
) -> ShearingMasks:
    """Attach pruning masks for `target` to a HF Llama/Mistral/Qwen2 causal LM and return them.

    The masks become the child module ``model.shearing_masks``; if `optimizers` is given, a
    param group for the masks (lr `mask_lr`) and one for the Lagrange multipliers (`lambda_lr`)
    are added. Add ``masks.last_lagrangian`` to the LM loss after each training forward.
    `fold_into_weights` picks how o_proj/down_proj are gated (None: by cost, from the shapes).
    `mask_betas` sets Adam betas for the mask and multiplier groups (None: the optimizer's own, as
    the reference code). A small beta1 settles the Lagrangian game in far fewer steps: on tiny
    models, (0.7, 0.999) within ~20 steps at constant lr (tests/test_algorithm.py), (0.0, 0.999)
    tracks the warming-up target throughout under a cosine schedule (the demo uses it).

    `schedule`: "lagrangian" (the paper: multipliers push the expected size to the warm-up target)
    or "projection" (each forward shifts every row's logits so its expected kept fraction equals
    the warm-up target exactly; the multipliers stay unused). `init_log_alpha` gives starting logits
    per structure (e.g. from importance scores); `clamp` and `gate_values` default per schedule
    (see ShearingMasks). `train_gates`: "smooth" (the projected schedule's default:
    noise-free gates that fade units out in order over the warm-up, then the exact top-k) or
    "sampled" (hard-concrete noise; the only choice for the Lagrangian).
    """
    source = check_supported(model)
    if hasattr(model, MASKS_ATTR):
        raise ValueError(f"{type(model).__name__} already has pruning masks")
    target = resolve_target(source, target)
    masks = ShearingMasks(source, target, temperature=temperature, init_mean=init_mean, eval_shape=eval_shape,
                          schedule=schedule, init_log_alpha=dict(init_log_alpha or {}), clamp=clamp,
                          gate_values=gate_values, train_gates=train_gates)
    param = next(model.parameters())
    masks.to(device=param.device)
    masks.train(model.training)
    setattr(model, MASKS_ATTR, masks)
    masks._handles, masks._fold = _register(model, masks, fold_into_weights), fold_into_weights
    if optimizers is not None:
        for opt in [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers:
            add_mask_param_groups(opt, masks, mask_lr, lambda_lr, mask_betas)
    return masks


def remove_shearing(model: nn.Module) -> ShearingMasks:
    """Detach the hooks and masks (e.g. to evaluate the dense source again)."""
    masks = get_masks(model)
    for h in masks._handles:
        h.remove()
    for module in _patched_modules(model):
        module.__dict__.pop("forward", None)
    delattr(model, MASKS_ATTR)
    return masks


@contextlib.contextmanager
def unmasked(model: nn.Module) -> Iterator[ShearingMasks]:
    """The dense source function for the duration of the block, the same masks (same parameter
    objects, so optimizer groups stay valid) attached again afterwards."""
    masks = remove_shearing(model)
    try:
        yield masks
    finally:
        setattr(model, MASKS_ATTR, masks)
        masks._handles = _register(model, masks, getattr(masks, "_fold", None))
