"""Composer adapters for the pruning core."""
from composer_sheared.algorithms.shearing_pruning import ShearingPruning, find_hf_model, masks_of

__all__ = ["ShearingPruning", "find_hf_model", "masks_of"]
