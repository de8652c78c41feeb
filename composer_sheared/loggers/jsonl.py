"""JSONLLogger: every logged metric as one JSON line, so reports read metrics, not stdout.

One file holds one run. Its first line is a header ``{"run": {"name", "start_batch", "time"}}``;
then ``{"hparams": {...}}`` and ``{"step": batch, "metrics": {...}}`` lines follow.

- A fresh run (timestamp 0 once checkpoint loading is done) truncates the file, so running into
  a finished run's folder never mixes the two runs' metrics.
- A resumed run (autoresume or load_path moved the timestamp past 0) appends, behind a new
  header with ``start_batch``; readers keep the last value per step, so the steps that the
  interrupted run logged after its last checkpoint are replaced by the resumed run's.

Whether the run resumes is known only at ``AFTER_LOAD``, so records logged before it (the
hyperparameters that algorithms log at ``INIT``) are buffered until then. A run that ends before
``AFTER_LOAD`` (a resume that failed while loading) leaves an existing file as it was. Rank 0 writes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from composer.core import State
from composer.loggers import Logger, LoggerDestination

__all__ = ["JSONLLogger", "plain"]


def plain(v: Any) -> Any:
    """A JSON-serialisable copy of a logged value (tensors become numbers or lists)."""
    import torch

    if isinstance(v, torch.Tensor):
        v = v.detach().float().cpu()
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


class JSONLLogger(LoggerDestination):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = None
        self._pending: list[dict] = []
        self._header: Optional[dict] = None  # set at AFTER_LOAD

    def after_load(self, state: State, logger: Logger) -> None:
        self._start(state.run_name, int(state.timestamp.batch))

    def _start(self, run_name: Optional[str], start_batch: int) -> None:
        from composer.utils import dist

        self._header = {"name": run_name, "start_batch": start_batch, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if dist.get_global_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a" if start_batch > 0 else "w", encoding="utf-8")
        pending, self._pending = self._pending, []
        for record in [{"run": self._header}, *pending]:
            self._write(record)

    def _write(self, record: dict) -> None:
        if self._header is None:
            self._pending.append(record)
        elif self._fh is not None:  # rank 0
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        self._write({"hparams": plain(hyperparameters)})

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        self._write({"step": step, "metrics": plain(metrics)})

    def close(self, state: State, logger: Logger) -> None:
        if self._header is None and self._pending:
            # No AFTER_LOAD: either used without a Trainer, or the run died while loading (a
            # refused or failed resume). Only the first may write; a file already there holds
            # an earlier run's history, which must survive.
            if self.path.exists() and self.path.stat().st_size > 0:
                self._pending = []
            else:
                self._start(state.run_name, 0)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
