"""The pruning core: hard-concrete masks, their schedules, hooks into HF models, slicing, and the
one-shot baselines (importance / random / magnitude scores to an exact target).
Trainer-agnostic (no Composer imports)."""
from composer_sheared.pruning.apply import SUPPORTED_MODELS, apply_shearing, get_masks, remove_shearing
from composer_sheared.pruning.importance import compute_importance, magnitude_scores, random_scores
from composer_sheared.pruning.masks import ShearingMasks
from composer_sheared.pruning.oneshot import oneshot_prune, scores_to_gates, scores_to_log_alpha
from composer_sheared.pruning.slicing import prune_to_target, prune_with_gates

__all__ = ["SUPPORTED_MODELS", "ShearingMasks", "apply_shearing", "compute_importance", "get_masks",
           "magnitude_scores", "oneshot_prune", "prune_to_target", "prune_with_gates", "random_scores",
           "remove_shearing", "scores_to_gates", "scores_to_log_alpha"]
