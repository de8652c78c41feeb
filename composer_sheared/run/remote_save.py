"""An object-store save_folder (`save_folder=s3://bucket/runs/{run_name}`) for train.py.

Composer's Trainer uploads the checkpoints to it and autoresumes from it. What train.py writes
itself, metrics.jsonl and the final HF directory, goes to a local staging folder
(`config.output_folder`: `local_save_folder`, default `runs/<run_name>`) and is uploaded here at
the end, to `<save_folder>/metrics.jsonl` and `<save_folder>/<pruned_hf or hf>/`. A resumed run
in a fresh container first takes the earlier metrics back, so the uploaded file keeps the whole run.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from composer_sheared.config import ConfigError, TrainConfig, metrics_path
from composer_sheared.storage.fetch import FetchError, is_uri, list_names, upload_directory, upload_file

__all__ = ["remote_folder", "check_fresh", "restore_metrics", "upload_outputs"]

_CHECKPOINT = re.compile(r"^(ep\d+-ba\d+-rank\d+\.pt|latest-rank\d+\.pt\.symlink)$")


def remote_folder(cfg: TrainConfig) -> Optional[str]:
    """The save_folder URI with `{run_name}` filled in as Composer fills it; None when it is local."""
    from composer.utils import format_name_with_dist

    if not is_uri(cfg.save_folder):
        return None
    return format_name_with_dist(cfg.save_folder, cfg.run_name or "").rstrip("/")


def check_fresh(cfg: TrainConfig) -> None:
    """A fresh run (no autoresume, load_path or save_overwrite) into an object-store folder that
    holds an earlier run's checkpoints: a ConfigError now, rather than Composer's refusal to
    overwrite at the first checkpoint upload, hours in. Every rank lists, so every rank stops."""
    remote = remote_folder(cfg)
    if remote is None or cfg.autoresume or cfg.load_path or cfg.save_overwrite or not cfg.checkpoint:
        return
    try:
        old = sorted(n for n in list_names(remote) if _CHECKPOINT.match(n))
    except FetchError as err:
        raise ConfigError("save_folder", err.message if err.where == remote else str(err)) from None
    if old:
        raise ConfigError("save_folder", f"{remote} holds checkpoints of an earlier run ({old[-1]}); set "
                                         "autoresume=true to continue it, save_overwrite=true to replace it, or "
                                         "choose another folder")


def restore_metrics(cfg: TrainConfig) -> Optional[Path]:
    """Before an autoresume (rank 0): download `<save_folder>/metrics.jsonl` when the staging
    folder has none, so the resumed run appends to the earlier records; returns the path or None."""
    from composer.utils import get_file

    remote, local = remote_folder(cfg), metrics_path(cfg)
    if remote is None or local is None or not cfg.autoresume or local.exists():
        return None
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        get_file(f"{remote}/{local.name}", str(local), overwrite=False)
    except FileNotFoundError:
        return None  # the first attempt of this run
    except Exception as err:  # noqa: BLE001 - the store's own error types
        raise FetchError(f"{remote}/{local.name}", f"cannot download the earlier metrics ({type(err).__name__}: "
                                                   f"{err})") from None
    return local


def upload_outputs(cfg: TrainConfig, hf_dir: Optional[Path]) -> list[str]:
    """After the run (rank 0): upload metrics.jsonl and the HF directory; returns their URIs."""
    remote = remote_folder(cfg)
    if remote is None:
        return []
    done = []
    metrics = metrics_path(cfg)
    if metrics is not None and metrics.is_file():
        done.append(upload_file(metrics, f"{remote}/{metrics.name}"))
    if hf_dir is not None:
        if not Path(hf_dir).is_dir():
            raise FetchError(str(hf_dir), "the HF directory to upload does not exist")
        done.append(upload_directory(hf_dir, f"{remote}/{Path(hf_dir).name}"))
    for uri in done:
        print(f"[train] uploaded {uri}", flush=True)
    return done
