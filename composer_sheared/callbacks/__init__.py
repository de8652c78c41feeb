"""Composer callbacks (Composer adapter layer)."""
from composer_sheared.callbacks.dynamic_batch_loading import DynamicBatchLoading, check_references, update_weights
from composer_sheared.callbacks.finite_loss import NonFiniteLossError, StopOnNonFiniteLoss

__all__ = ["DynamicBatchLoading", "NonFiniteLossError", "StopOnNonFiniteLoss", "check_references", "update_weights"]
