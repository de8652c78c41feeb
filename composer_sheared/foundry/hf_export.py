"""Foundry's `hf_checkpointer` in a pruning run: export the sliced model, not the masked one.

The checkpointer rebuilds the model from its config and loads the gathered state dict, which
fails on the masks' keys, and would in any case save the full-size source. `export_sliced`
(called by ShearingPruning at INIT for every foundry HuggingFaceCheckpointer) swaps its model
gathering for the sliced model: exactly the target config, the function of the eval-mode masks.
Everything else (save folder, upload, MLflow registration, intervals) stays foundry's. It
replaces a private method, so it is tested against the pinned foundry (tests/test_foundry.py)."""
from __future__ import annotations

from typing import Any

from composer_sheared.export.gather import composer_model_of, sliced_hf_model

__all__ = ["export_sliced", "sliced_hf_model"]


def export_sliced(checkpointer: Any) -> None:
    """Make a foundry HuggingFaceCheckpointer save the sliced model (idempotent)."""
    if getattr(checkpointer, "_sheared_export", False):
        return

    def _get_hf_model(state):
        from composer.utils import dist

        checkpointer.last_checkpoint_batch = state.timestamp.batch
        tokenizer = composer_model_of(state).tokenizer
        model = sliced_hf_model(state, dtype=checkpointer.dtype)
        if dist.get_global_rank() == 0:
            model, tokenizer = checkpointer.transform_model_and_tokenizer(model, tokenizer)
            if checkpointer.pretrained_model_name is not None:
                model.name_or_path = checkpointer.pretrained_model_name
        return model, tokenizer

    checkpointer._get_hf_model = _get_hf_model
    checkpointer._sheared_export = True
