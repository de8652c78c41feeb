"""Attach ShearingMasks to a HF Llama-family model with hooks, without copying its modelling code.

Where each gate acts (METHOD.md, mask table):
  - a pre-hook on the CausalLM draws the gates once per forward pass;
  - o_proj input   x head gates          (each head's context vector);
  - down_proj input x intermediate gates (the up * act(gate) product);
  - o_proj / down_proj output x layer gate x hidden gates;
  - embedding output x hidden gates;
  - every RMSNorm: variance over the kept hidden dims only, output x hidden gates.
Because every write to the residual stream is gated, the stream is exactly zero on dropped
dims, so the masked model computes what the sliced one will.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from composer_sheared.pruning.hard_concrete import TEMPERATURE
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
        return norm.weight * h.to(dtype) * cur["hidden"].to(dtype)

    return forward


def _scale_input(key: str, layer: int, masks: ShearingMasks):
    def hook(module, args):
        x = args[0]
        return (x * masks.current[key][layer].to(x.dtype),) + tuple(args[1:])

    return hook


def _scale_output(key: str, layer: int | None, masks: ShearingMasks):
    def hook(module, args, out):
        m = masks.current[key]
        m = m if layer is None else m[layer]
        return out * m.to(out.dtype)

    return hook


def _register(model: nn.Module, masks: ShearingMasks) -> list:
    st = masks.structures
    base = model.model
    def draw_gates(module, args):
        masks()

    handles = [model.register_forward_pre_hook(draw_gates)]
    if "hidden" in st:
        handles.append(base.embed_tokens.register_forward_hook(_scale_output("hidden", None, masks)))
        for norm in [base.norm] + [n for layer in base.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
            norm.forward = _masked_rmsnorm(norm, masks)
    out_gated = "hidden" in st or "layer" in st
    for i, layer in enumerate(base.layers):
        o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
        if "kv_group" in st or "q_head" in st:
            handles.append(o_proj.register_forward_pre_hook(_scale_input("head", i, masks)))
        if "intermediate" in st:
            handles.append(down_proj.register_forward_pre_hook(_scale_input("intermediate", i, masks)))
        if out_gated:
            handles.append(o_proj.register_forward_hook(_scale_output("out", i, masks)))
            handles.append(down_proj.register_forward_hook(_scale_output("out", i, masks)))
    return handles


def add_mask_param_groups(optimizer: torch.optim.Optimizer, masks: ShearingMasks, mask_lr: float, lambda_lr: float) -> None:
    """Masks and multipliers get their own groups, own lr and no weight decay. The multipliers'
    gradient is negated inside the Lagrangian, so a positive lr performs the ascent."""
    for params, lr in ((masks.mask_parameters(), mask_lr), (masks.lambda_parameters(), lambda_lr)):
        if params:
            optimizer.add_param_group({"params": params, "lr": lr, "initial_lr": lr, "weight_decay": 0.0})


def apply_shearing(
    model: nn.Module,
    target: ModelShape | Mapping[str, Any] | str,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    *,
    mask_lr: float = 1.0,
    lambda_lr: float = 1.0,
    eval_shape: str = "target",
    temperature: float = TEMPERATURE,
    init_mean: float = 5.0,
) -> ShearingMasks:
    """Attach pruning masks for `target` to a HF Llama/Mistral/Qwen2 causal LM and return them.

    The masks become the child module ``model.shearing_masks``; if `optimizers` is given, a
    param group for the masks (lr `mask_lr`) and one for the Lagrange multipliers (`lambda_lr`)
    are added. Add ``masks.last_lagrangian`` to the LM loss after each training forward.
    """
    source = check_supported(model)
    if hasattr(model, MASKS_ATTR):
        raise ValueError(f"{type(model).__name__} already has pruning masks")
    target = resolve_target(source, target)
    masks = ShearingMasks(source, target, temperature=temperature, init_mean=init_mean, eval_shape=eval_shape)
    param = next(model.parameters())
    masks.to(device=param.device)
    masks.train(model.training)
    setattr(model, MASKS_ATTR, masks)
    masks._handles = _register(model, masks)
    if optimizers is not None:
        for opt in [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers:
            add_mask_param_groups(opt, masks, mask_lr, lambda_lr)
    return masks


def remove_shearing(model: nn.Module) -> ShearingMasks:
    """Detach the hooks and masks (e.g. to evaluate the dense source again)."""
    masks = get_masks(model)
    for h in masks._handles:
        h.remove()
    base = model.model
    for norm in [base.norm] + [n for layer in base.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
        norm.__dict__.pop("forward", None)
    delattr(model, MASKS_ATTR)
    return masks
