"""llm-foundry adapters: what a foundry YAML names, registered through entry points (pyproject.toml).

    algorithms:  shearing_pruning (ShearingPruning), distillation (Distillation)
    callbacks:   dynamic_batch_loading (DynamicBatchLoading)
    dataloaders: dynamic_streaming (build_dynamic_streaming_dataloader)

and foundry's own ``hf_checkpointer`` exports the sliced model in a pruning run (``hf_export``).
Nothing here imports llm-foundry at import time: the package works without it installed.
"""
from composer_sheared.foundry.dataloader import DATASET_KEYS, build_dynamic_streaming_dataloader
from composer_sheared.foundry.hf_export import export_sliced, sliced_hf_model

__all__ = ["DATASET_KEYS", "build_dynamic_streaming_dataloader", "export_sliced", "sliced_hf_model"]
