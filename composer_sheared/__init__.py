"""Sheared-LLaMA targeted structured pruning and dynamic batch loading for Composer.

The method core (shapes, masks, slicing, data) imports no Composer; the Composer adapters
are imported lazily so `import composer_sheared.shapes` stays trainer-agnostic.
"""
from composer_sheared.shapes import ModelShape, validate_target

__version__ = "0.1.0"

_LAZY = {
    "apply_shearing": "composer_sheared.pruning",
    "prune_to_target": "composer_sheared.pruning",
    "ShearingMasks": "composer_sheared.pruning",
    "oneshot_prune": "composer_sheared.pruning",
    "compute_importance": "composer_sheared.pruning",
    "ShearingPruning": "composer_sheared.algorithms",
    "Distillation": "composer_sheared.algorithms",
    "DynamicBatchLoading": "composer_sheared.callbacks",
    "DynamicStreamingDataset": "composer_sheared.data",
}

__all__ = ["ModelShape", "validate_target", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'composer_sheared' has no attribute {name!r}")
