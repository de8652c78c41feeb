"""StopOnNonFiniteLoss: end training at the first batch whose loss is NaN or infinite.

A diverged run otherwise keeps stepping (every later weight is NaN), writes checkpoints of a
broken model and exits 0. Composer all-reduces the batch loss into ``state.total_loss_dict``
before ``BATCH_END``, so every rank sees the same value and raises at the same batch (no rank is
left waiting in a collective), and no checkpoint of that batch is written (checkpoints are saved
after ``BATCH_END``).
"""
from __future__ import annotations

import math

from composer.core import Callback, State
from composer.loggers import Logger

__all__ = ["NonFiniteLossError", "StopOnNonFiniteLoss", "check_loss"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def check_loss(loss: float, batch: int) -> None:
    """Raise NonFiniteLossError("loss is NaN at batch N") for a non-finite loss."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"loss is {'NaN' if math.isnan(loss) else loss} at batch {batch}")


class StopOnNonFiniteLoss(Callback):
    def __init__(self, key: str = "loss/train/total"):
        self.key = key

    def batch_end(self, state: State, logger: Logger) -> None:
        losses = getattr(state, "total_loss_dict", None) or {}
        if self.key in losses:
            check_loss(float(losses[self.key]), int(state.timestamp.batch))
