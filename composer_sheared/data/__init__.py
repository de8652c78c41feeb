"""Per-domain data for dynamic batch loading (core layer: torch + streaming, no Composer).

``from composer_sheared.data import DynamicStreamingDataset, domain_eval_dataset, update_weights``
"""
from composer_sheared.data.dynamic import DynamicStreamingDataset, resolve_world, token_item
from composer_sheared.data.eval_sets import TokenStreamingDataset, domain_eval_dataset
from composer_sheared.data.integrity import DataIntegrityError, check_vocab
from composer_sheared.data.mixing import RULES, excess_losses, update_weights, validate_proportions

__all__ = [
    "DynamicStreamingDataset",
    "TokenStreamingDataset",
    "domain_eval_dataset",
    "update_weights",
    "excess_losses",
    "validate_proportions",
    "resolve_world",
    "token_item",
    "RULES",
    "check_vocab",
    "DataIntegrityError",
]
