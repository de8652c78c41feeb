"""The config a run was started with, kept beside its checkpoints, and what a resume may change.

A resume with another pruning target, data mix or seed would continue a different run from the
checkpoint's state (or die half-way through loading it), so each run writes its resolved config
to ``<save_folder>/run_config.yaml`` (temp file, then rename) and a resume compares against it:
keys that define the run must be equal; the operational keys in ``MAY_CHANGE`` may differ, and
each change is reported.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["RUN_CONFIG", "MAY_CHANGE", "flatten", "compare", "refusals", "write_run_config", "read_run_config"]

RUN_CONFIG = "run_config.yaml"

# Keys (or key prefixes) a resumed run may change. Everything else defines the run.
MAY_CHANGE = (
    "optimizer.lr", "max_duration", "eval_interval", "eval_first", "save_interval", "save_num_checkpoints_to_keep",
    "save_overwrite", "autoresume", "load_path", "save_hf", "hf_save_dir", "local_save_folder", "model.hf_save_dtype",
    "model.init_device", "model.activation_checkpointing", "loggers", "progress_bar", "speed_monitor_window",
    "dist_timeout", "python_log_level", "dry_run", "plan", "data.num_workers", "data.eval_subset_num_batches",
    "data.download_timeout", "data.download_retry",
    "device_eval_batch_size", "device_train_microbatch_size",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are values."""
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def _may_change(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def compare(saved: Mapping, current: Mapping, allowed: Iterable[str] = MAY_CHANGE
            ) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(refused, changed): ``(key, saved value, current value)`` for every key that differs, split
    into those that define the run and those that may change. A key absent on one side counts
    as None there."""
    a, b = flatten(dict(saved)), flatten(dict(current))
    refused, changed = [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key), b.get(key)
        if old == new or (isinstance(old, (int, float)) and isinstance(new, (int, float)) and float(old) == float(new)):
            continue
        (changed if _may_change(key, allowed) else refused).append((key, old, new))
    return refused, changed


def refusals(refused: Iterable[tuple[str, Any, Any]], where: str) -> list[tuple[str, str]]:
    """ConfigError problems, one per key `compare` refused; `where` names the saved config."""
    return [(key, f"{new!r}, but the run being resumed has {old!r} ({where}); a resume cannot change what "
                  "defines the run: set it back, or start a new run in another save_folder")
            for key, old, new in refused]


def read_run_config(folder: str | os.PathLike) -> dict | None:
    import yaml

    path = Path(folder) / RUN_CONFIG
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text()) or {}


def write_run_config(tree: Mapping, folder: str | os.PathLike) -> Path:
    """``<folder>/run_config.yaml`` written whole (temp file, then rename)."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_CONFIG
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_CONFIG}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(dict(tree), f, sort_keys=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
