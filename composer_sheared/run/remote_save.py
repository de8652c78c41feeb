"""An object-store save_folder (`save_folder=s3://bucket/runs/{run_name}`) for train.py.

Composer's Trainer uploads the checkpoints to it and autoresumes from it. What train.py writes
itself, metrics.jsonl and the final HF directory, goes to a local staging folder
(`config.output_folder`: `local_save_folder`, default `runs/<run_name>`) and is uploaded here at
the end, to `<save_folder>/metrics.jsonl` and `<save_folder>/<pruned_hf or hf>/`. A resumed run
in a fresh container first takes the earlier metrics back, so the uploaded file keeps the whole run.
A fresh run with save_overwrite=true first deletes the earlier run's objects there (as
`builders.clear_previous_run` does for a local folder), so nothing of the two runs is mixed.
The run's config goes up as `<save_folder>/run_config.yaml` when it starts, and an autoresume
compares against that copy (`check_remote_resume`): a relaunch in a fresh container has no local
one, and a changed target or data mix must not continue the checkpointed run unnoticed.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Optional

from composer_sheared.config import ConfigError, TrainConfig, hf_output_dir, metrics_path, plain
from composer_sheared.run.resume import RUN_CONFIG, compare, read_run_config, refusals
from composer_sheared.storage.fetch import (FetchError, can_delete, delete_names, is_uri, list_names, upload_directory,
                                            upload_file, uri_scheme)

__all__ = ["remote_folder", "check_fresh", "clear_previous_remote_run", "check_remote_resume", "upload_run_config",
           "restore_metrics", "upload_outputs"]

_CHECKPOINT = re.compile(r"^(ep\d+-ba\d+-rank\d+\.pt|latest-rank\d+\.pt\.symlink)$")


def remote_folder(cfg: TrainConfig) -> Optional[str]:
    """The save_folder URI with `{run_name}` filled in as Composer fills it; None when it is local."""
    from composer.utils import format_name_with_dist

    if not is_uri(cfg.save_folder):
        return None
    return format_name_with_dist(cfg.save_folder, cfg.run_name or "").rstrip("/")


def _listed(remote: str) -> list[str]:
    try:
        return list_names(remote)
    except FetchError as err:
        raise ConfigError("save_folder", err.message if err.where == remote else str(err)) from None


def _earlier_run(cfg: TrainConfig, remote: str) -> list[str]:
    """The names under `remote` that this run writes too: checkpoints, `latest` links, the run's
    config, the metrics file and everything under the HF directory's prefix (named as
    upload_outputs names them)."""
    metrics, hf = metrics_path(cfg), hf_output_dir(cfg).name
    return [n for n in _listed(remote) if _CHECKPOINT.match(n) or n.startswith(f"{hf}/") or n == RUN_CONFIG
            or (metrics is not None and n == metrics.name)]


def _cannot_clear(remote: str, old: list[str]) -> str:
    return (f"{remote} holds an earlier run ({len(old)} object(s), e.g. {old[0]}) that save_overwrite=true must "
            f"delete, and a {uri_scheme(remote)}:// store cannot delete objects; empty the folder or choose "
            "another one")


def _overwrites(cfg: TrainConfig) -> bool:
    """A fresh run replacing an earlier one: the condition of builders.clear_previous_run."""
    return bool(cfg.save_overwrite and cfg.save_folder and not cfg.autoresume and not cfg.load_path)


def check_fresh(cfg: TrainConfig) -> None:
    """A fresh run (no autoresume, load_path or save_overwrite) into an object-store folder that
    holds an earlier run's checkpoints: a ConfigError now, rather than Composer's refusal to
    overwrite at the first checkpoint upload, hours in. So is a fresh save_overwrite run into a
    store that cannot delete the earlier run (see clear_previous_remote_run). Every rank lists,
    so every rank stops."""
    remote = remote_folder(cfg)
    if remote is not None and _overwrites(cfg) and not can_delete(remote):
        old = _earlier_run(cfg, remote)
        if old:
            raise ConfigError("save_folder", _cannot_clear(remote, old))
    if remote is None or cfg.autoresume or cfg.load_path or cfg.save_overwrite or not cfg.checkpoint:
        return
    old = sorted(n for n in _listed(remote) if _CHECKPOINT.match(n))
    if old:
        raise ConfigError("save_folder", f"{remote} holds checkpoints of an earlier run ({old[-1]}); set "
                                         "autoresume=true to continue it, save_overwrite=true to replace it, or "
                                         "choose another folder")


def clear_previous_remote_run(cfg: TrainConfig) -> list[str]:
    """save_overwrite=true on a fresh run into an object-store folder (rank 0, before the Trainer
    is built): delete the earlier run's checkpoints, `latest` links, metrics file and HF directory
    there; returns the deleted URIs. Otherwise the old `latest` link would resume the old run after
    a kill before the first checkpoint, and its later checkpoints and HF shards would stay beside
    the new run's. Other objects in the folder stay. ConfigError where the store cannot delete."""
    remote = remote_folder(cfg)
    if remote is None or not _overwrites(cfg):
        return []
    old = _earlier_run(cfg, remote)
    if not old:
        return []
    if not can_delete(remote):
        raise ConfigError("save_folder", _cannot_clear(remote, old))
    return delete_names(remote, old)


def check_remote_resume(cfg: TrainConfig) -> tuple[bool, list[tuple]]:
    """An autoresume from an object-store folder that holds checkpoints (every rank, before the
    model loads, so every rank stops): compare this config with `<save_folder>/run_config.yaml`.
    A key that defines the run and differs is a ConfigError naming it; returns (whether the
    folder had a config to compare with, the changes to keys that may change)."""
    from composer.utils import get_file
    from omegaconf import OmegaConf

    remote = remote_folder(cfg)
    if remote is None or not cfg.autoresume or cfg.load_path or not cfg.checkpoint:
        return True, []
    names = _listed(remote)
    if not any(_CHECKPOINT.match(n) for n in names):
        return True, []  # the run's first attempt: nothing to resume
    if RUN_CONFIG not in names:
        return False, []
    uri = f"{remote}/{RUN_CONFIG}"
    with tempfile.TemporaryDirectory(prefix="run-config-") as tmp:
        try:
            get_file(uri, str(Path(tmp) / RUN_CONFIG), overwrite=True)
        except Exception as err:  # noqa: BLE001 - the store's own error types
            raise FetchError(uri, f"cannot download the resumed run's config ({type(err).__name__}: {err})") from None
        saved = read_run_config(tmp)
    refused, changed = compare(saved or {}, plain(OmegaConf.structured(cfg)))
    if refused:
        raise ConfigError(refusals(refused, uri))
    return True, changed


def upload_run_config(cfg: TrainConfig, local: Path) -> Optional[str]:
    """`<save_folder>/run_config.yaml` from the staged copy (rank 0, when the run starts)."""
    remote = remote_folder(cfg)
    return None if remote is None else upload_file(local, f"{remote}/{RUN_CONFIG}")


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
        # an earlier upload's files that this one does not replace (other shards) would leave a broken mix
        done.append(upload_directory(hf_dir, f"{remote}/{Path(hf_dir).name}", delete_stale=True))
    for uri in done:
        print(f"[train] uploaded {uri}", flush=True)
    return done
