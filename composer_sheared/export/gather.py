"""The trained HF model out of a Composer State, whole, on rank 0: what every export starts from
(train.py's final HF directory, foundry's hf_checkpointer in a pruning run). Composer adapter."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["composer_model_of", "gathered_hf_model", "sliced_hf_model"]


def composer_model_of(state):
    model = state.model
    while hasattr(model, "module") and not hasattr(model, "model"):
        model = model.module  # DDP
    return model


@contextlib.contextmanager
def gathered_hf_model(state) -> Iterator[Optional[torch.nn.Module]]:
    """Rank 0: the HF model with all its weights (gathered to CPU under FSDP), in eval mode for the
    block; other ranks: None. Collective under FSDP: every rank must enter it."""
    from composer.utils import dist

    from composer_sheared.algorithms import find_hf_model

    composer_model = composer_model_of(state)
    ctx = contextlib.nullcontext()
    if state.fsdp_enabled:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        ctx = FSDP.summon_full_params(composer_model, writeback=False, rank0_only=True, offload_to_cpu=True)
    with ctx:
        if dist.get_global_rank() != 0:
            yield None
            return
        hf = find_hf_model(composer_model)
        was_training = hf.training
        hf.eval()
        try:
            yield hf
        finally:
            hf.train(was_training)


def sliced_hf_model(state, dtype: Optional[torch.dtype] = None):
    """Rank 0: a new HF model of exactly the pruning target, the function of the eval-mode masks;
    other ranks: None."""
    from composer_sheared.pruning import prune_to_target

    with gathered_hf_model(state) as hf:
        if hf is None:
            return None
        sliced = prune_to_target(hf)
        return sliced if dtype is None else sliced.to(dtype=dtype)
