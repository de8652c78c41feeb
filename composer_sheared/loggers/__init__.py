"""Composer logger destinations (Composer adapter layer)."""
from composer_sheared.loggers.jsonl import JSONLLogger

__all__ = ["JSONLLogger"]
