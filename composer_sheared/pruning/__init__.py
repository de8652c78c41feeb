"""The pruning core: hard-concrete masks, their Lagrangian, hooks into HF models, slicing.
Trainer-agnostic (no Composer imports)."""
from composer_sheared.pruning.apply import SUPPORTED_MODELS, apply_shearing, get_masks, remove_shearing
from composer_sheared.pruning.masks import ShearingMasks
from composer_sheared.pruning.slicing import prune_to_target

__all__ = ["SUPPORTED_MODELS", "ShearingMasks", "apply_shearing", "get_masks", "prune_to_target", "remove_shearing"]
