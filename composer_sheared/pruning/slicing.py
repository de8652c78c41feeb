"""Fold the final (top-k) gate values into the weights they multiply and slice a plain HF model
of exactly the target config out of the masked source.

`gates` (optional everywhere) replaces the masks' own deterministic gates with explicit binary
ones, {structure: 0/1 tensor in the mask layout, exactly the target count of ones per row}; that is
how one-shot pruning (pruning/oneshot.py) slices a plain model with the same code."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import no_init_weights

from composer_sheared.pruning.apply import check_supported, get_masks
from composer_sheared.pruning.masks import ShearingMasks
from composer_sheared.shapes import resolve_target


def _kept(gates: torch.Tensor) -> torch.Tensor:
    return gates.nonzero(as_tuple=True)[0]


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight rows (or columns) of the given heads, head by head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


def check_gates(masks: ShearingMasks, gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Explicit gates as float tensors, or ValueError naming the structure that does not fit."""
    if set(gates) != set(masks.structures):
        raise ValueError(f"gates for {sorted(gates)}, but the target {masks.target.as_dict()} prunes exactly "
                         f"{sorted(masks.structures)}")
    out = {}
    for name, st in masks.structures.items():
        z = torch.as_tensor(gates[name]).float()
        if tuple(z.shape) != tuple(st.shape):
            raise ValueError(f"gates[{name!r}] has shape {tuple(z.shape)}, expected {tuple(st.shape)}")
        if not bool(((z == 0) | (z == 1)).all()):
            raise ValueError(f"gates[{name!r}] must be binary (0 or 1)")
        counts = z.sum(-1)
        if not bool((counts == st.target).all()):
            raise ValueError(f"gates[{name!r}] keeps {sorted(set(counts.int().flatten().tolist()))} units per row, "
                             f"the target keeps {st.target}")
        out[name] = z
    return out


@torch.no_grad()
def sliced_state_dict(model: nn.Module, masks: ShearingMasks, gates: dict[str, torch.Tensor] | None = None
                      ) -> tuple[dict[str, torch.Tensor], list[int]]:
    src = masks.source
    L, G, g, hd, d, m = (src.num_layers, src.num_key_value_heads, src.group_size, src.head_dim,
                         src.hidden_size, src.intermediate_size)
    dev = next(model.parameters()).device
    if gates is None:
        z = masks.deterministic_gates("target")
    else:
        z = {n: t.to(dev) for n, t in check_gates(masks, gates).items()}
    ones = lambda *s: torch.ones(s, device=dev)  # noqa: E731
    layer_z = z.get("layer", ones(L))
    kv_z = z.get("kv_group", ones(L, G))
    q_z = z.get("q_head", ones(L, G, g))
    inter_z = z.get("intermediate", ones(L, m))
    hid_z = z.get("hidden", ones(d))
    keep_h = _kept(hid_z)
    base = model.model
    f = lambda t: t.detach().float()  # noqa: E731  fold in fp32, cast back at the end

    sd = {"model.embed_tokens.weight": (f(base.embed_tokens.weight) * hid_z)[:, keep_h]}
    kept_layers = _kept(layer_z).tolist()
    for new, i in enumerate(kept_layers):
        lyr, pre = base.layers[i], f"model.layers.{new}."
        att, mlp = lyr.self_attn, lyr.mlp
        head_z = (kv_z[i][:, None] * q_z[i]).flatten()  # [H], grouped by KV head
        kept_groups = _kept(kv_z[i])
        kept_heads = torch.cat([grp * g + _kept(q_z[i, grp]) for grp in kept_groups.tolist()])
        q_rows, kv_rows = _rows(kept_heads, hd), _rows(kept_groups, hd)
        out_z = layer_z[i] * hid_z  # scales every write of this layer to the stream
        sd[pre + "input_layernorm.weight"] = (f(lyr.input_layernorm.weight) * hid_z)[keep_h]
        sd[pre + "post_attention_layernorm.weight"] = (f(lyr.post_attention_layernorm.weight) * hid_z)[keep_h]
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            proj = getattr(att, name)
            sd[pre + f"self_attn.{name}.weight"] = f(proj.weight)[rows][:, keep_h]
            if proj.bias is not None:
                sd[pre + f"self_attn.{name}.bias"] = f(proj.bias)[rows]
        o = f(att.o_proj.weight) * out_z[:, None] * head_z.repeat_interleave(hd)[None, :]
        sd[pre + "self_attn.o_proj.weight"] = o[keep_h][:, q_rows]
        keep_m = _kept(inter_z[i])
        for name in ("gate_proj", "up_proj"):
            sd[pre + f"mlp.{name}.weight"] = f(getattr(mlp, name).weight)[keep_m][:, keep_h]
        down = f(mlp.down_proj.weight) * out_z[:, None] * inter_z[i][None, :]
        sd[pre + "mlp.down_proj.weight"] = down[keep_h][:, keep_m]
    sd["model.norm.weight"] = (f(base.norm.weight) * hid_z)[keep_h]
    if src.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else:
        sd["lm_head.weight"] = f(model.lm_head.weight)[:, keep_h]
    return sd, kept_layers


@torch.no_grad()
def prune_to_target(model: PreTrainedModel, masks: ShearingMasks | None = None,
                    gates: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """A new HF model of exactly `masks.target`, equal in function to the eval-mode masked source
    (or, with explicit binary `gates`, to the source with those units removed)."""
    masks = get_masks(model) if masks is None else masks
    sd, kept_layers = sliced_state_dict(model, masks, gates)
    cfg = masks.target.to_hf_config(model.config)
    if getattr(model.config, "layer_types", None) is not None:
        cfg.layer_types = [model.config.layer_types[i] for i in kept_layers]
    if hasattr(cfg, "max_window_layers") and cfg.max_window_layers > cfg.num_hidden_layers:
        cfg.max_window_layers = cfg.num_hidden_layers
    dtype = next(model.parameters()).dtype
    cfg.torch_dtype = dtype
    with no_init_weights():
        pruned = type(model)._from_config(
            cfg, torch_dtype=dtype, attn_implementation=model.config._attn_implementation
        )
    pruned.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    if cfg.tie_word_embeddings:
        pruned.tie_weights()
    pruned.generation_config = model.generation_config
    return pruned.to(next(model.parameters()).device).eval()


def prune_with_gates(model: PreTrainedModel, target, gates: dict[str, torch.Tensor]) -> PreTrainedModel:
    """Slice a plain (unmasked) HF model to `target` (a ModelShape, a partial mapping or a shape
    name), keeping exactly the units whose binary gate is 1."""
    source = check_supported(model)
    # explicit gates: the paper's schedule, whose soft gate values these binary gates leave as they are
    masks = ShearingMasks(source, resolve_target(source, target), schedule="lagrangian")
    return prune_to_target(model, masks, gates=gates)
