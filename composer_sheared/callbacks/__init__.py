"""Composer callbacks (Composer adapter layer)."""
from composer_sheared.callbacks.dynamic_batch_loading import DynamicBatchLoading, update_weights

__all__ = ["DynamicBatchLoading", "update_weights"]
