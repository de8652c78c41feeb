"""Composer adapters for the pruning core."""
from composer_sheared.algorithms.distillation import Distillation, apply_distillation
from composer_sheared.algorithms.shearing_pruning import ShearingPruning, find_hf_model, masks_of

__all__ = ["Distillation", "ShearingPruning", "apply_distillation", "find_hf_model", "masks_of"]
