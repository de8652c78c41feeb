"""Foundry's `hf_checkpointer` in a pruning run: export the sliced model, not the masked one.

The checkpointer rebuilds the model from its config and loads the gathered state dict, which
fails on the masks' keys, and would in any case save the full-size source. `export_sliced`
(called by ShearingPruning at INIT for every foundry HuggingFaceCheckpointer) swaps its model
gathering for the sliced model: exactly the target config, the function of the eval-mode masks.
Everything else (save folder, upload, MLflow registration, intervals) stays foundry's. It
replaces a private method, so it is tested against the pinned foundry (tests/test_foundry.py)."""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

__all__ = ["export_sliced", "sliced_hf_model"]


def _composer_model(state):
    model = state.model
    while hasattr(model, "module") and not hasattr(model, "model"):
        model = model.module  # DDP
    return model


def sliced_hf_model(state, dtype: Optional[torch.dtype] = None):
    """Rank 0: a new HF model of the pruning target with the trained weights sliced (on CPU under
    FSDP); other ranks: None. Collective under FSDP: every rank must call it."""
    from composer.utils import dist

    from composer_sheared.algorithms import find_hf_model
    from composer_sheared.pruning import prune_to_target

    composer_model = _composer_model(state)
    ctx = contextlib.nullcontext()
    if state.fsdp_enabled:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        ctx = FSDP.summon_full_params(composer_model, writeback=False, rank0_only=True, offload_to_cpu=True)
    sliced = None
    with ctx:
        if dist.get_global_rank() == 0:
            hf = find_hf_model(composer_model)
            was_training = hf.training
            hf.eval()
            try:
                sliced = prune_to_target(hf)
            finally:
                hf.train(was_training)
            if dtype is not None:
                sliced = sliced.to(dtype=dtype)
    return sliced


def export_sliced(checkpointer: Any) -> None:
    """Make a foundry HuggingFaceCheckpointer save the sliced model (idempotent)."""
    if getattr(checkpointer, "_sheared_export", False):
        return

    def _get_hf_model(state):
        from composer.utils import dist

        checkpointer.last_checkpoint_batch = state.timestamp.batch
        tokenizer = _composer_model(state).tokenizer
        model = sliced_hf_model(state, dtype=checkpointer.dtype)
        if dist.get_global_rank() == 0:
            model, tokenizer = checkpointer.transform_model_and_tokenizer(model, tokenizer)
            if checkpointer.pretrained_model_name is not None:
                model.name_or_path = checkpointer.pretrained_model_name
        return model, tokenizer

    checkpointer._get_hf_model = _get_hf_model
    checkpointer._sheared_export = True
