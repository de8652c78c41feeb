"""The frozen teacher of distillation: a dense copy of the (masked) student, or a HF directory, in
eval mode without gradients, and its logits for a batch."""
from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

__all__ = ["frozen_copy", "load_teacher", "teacher_logits"]


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of a HF causal LM without pruning masks/hooks (the dense model)."""
    from composer_sheared.pruning.apply import MASKS_ATTR, remove_shearing

    teacher = copy.deepcopy(model)
    if hasattr(teacher, MASKS_ATTR):
        # deepcopy maps the hooks dict and the masks' handles to the copy's own, so this strips the
        # copy and leaves the student untouched
        remove_shearing(teacher)
    return _freeze(teacher)


def load_teacher(path_or_model: str | Path | nn.Module, dtype: Optional[torch.dtype | str] = None,
                 device: Optional[torch.device | str] = None) -> nn.Module:
    """A frozen teacher (eval mode, no gradients) from a HF model directory or a model.

    A model given with pruning masks attached is copied without them (see frozen_copy); another
    model is frozen in place."""
    from composer_sheared.pruning.apply import MASKS_ATTR

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"teacher dtype={dtype!r}: expected a torch dtype name such as 'float32' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    if isinstance(path_or_model, nn.Module):
        model = frozen_copy(path_or_model) if hasattr(path_or_model, MASKS_ATTR) else _freeze(path_or_model)
    elif isinstance(path_or_model, (str, Path)):
        path = Path(path_or_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"distillation teacher: {path} is not a HF model directory (no config.json)")
        from transformers import AutoModelForCausalLM

        model = _freeze(AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype or torch.float32))
    else:
        raise TypeError(f"distillation teacher: expected a HF model directory or an nn.Module, got "
                        f"{type(path_or_model).__name__}")
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model


def teacher_logits(teacher: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The teacher's logits for a batch of HF inputs, without gradients (labels are not passed, so
    the teacher computes no loss)."""
    inner = getattr(teacher, "module", teacher)  # FSDP keeps the wrapped model in .module
    accepted = set(inspect.signature(inner.forward).parameters)
    inputs = {k: v for k, v in batch.items() if k in accepted and k != "labels"}
    with torch.no_grad():
        out = teacher(**inputs)
    return (out["logits"] if isinstance(out, Mapping) else out.logits).detach()
