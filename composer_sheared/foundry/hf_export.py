"""Foundry's `hf_checkpointer` in a pruning run: export the sliced model, not the masked one.

The checkpointer rebuilds the model from its config and loads the gathered state dict, which
fails on the masks' keys, and would in any case save the full-size source. `export_sliced`
(called by ShearingPruning at INIT for every foundry HuggingFaceCheckpointer) swaps its model
gathering for the sliced model: exactly the target config, the function of the eval-mode masks.
Each saved directory also gets the project's model card and provenance.json, written through
the checkpointer's public `save_additional_contents` hook (rank 0, before foundry uploads the
directory). Everything else (save folder, upload, MLflow registration, intervals) stays
foundry's. `_get_hf_model` is a private method, so this is tested against the pinned foundry
(tests/test_foundry.py)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from composer_sheared.export.gather import composer_model_of, sliced_hf_model

__all__ = ["export_sliced", "sliced_hf_model"]


def export_sliced(checkpointer: Any, settings: Optional[Mapping[str, Any]] = None) -> None:
    """Make a foundry HuggingFaceCheckpointer save the sliced model, with its model card (idempotent).
    `settings` are the pruning settings the card states."""
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

    def save_additional_contents(state, logger, save_dir: str) -> None:
        from composer_sheared.export.model_card import finish_foundry_output

        finish_foundry_output(save_dir, f"{state.run_name}-ba{int(state.timestamp.batch)}", state, settings or {})

    checkpointer._get_hf_model = _get_hf_model
    checkpointer.save_additional_contents = save_additional_contents
    checkpointer._sheared_export = True
