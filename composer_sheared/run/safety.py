"""What train.py does around a run so that it never loses or silently changes what it did not write.

- ``hold_save_folder``: rank 0 holds the save folder's lock (``runlock``) for the whole run; a
  second run into it is a ConfigError naming the holder.
- ``start_resume``: reports each change a resume may make (config validation refused the others;
  an object-store folder's saved config is compared here, by ``remote_save``), returns the
  callbacks that apply them, and after the Trainer is built ``record_config`` writes the config
  the next resume compares against (``resume``).
- ``trained_to_the_end``: a checkpoint at max_duration (killed during the final export) only needs
  the export.
- ``no_space``: a full disk as ``NoSpaceError`` naming the file, the truncated checkpoint set aside.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from composer_sheared.storage.atomic import NoSpaceError, find_no_space
from composer_sheared.config import (ConfigError, Resolved, TrainConfig, hf_output_dir, output_folder, plain,
                                     resume_folder)

__all__ = ["hold_save_folder", "start_resume", "record_config", "trained_to_the_end",
           "no_space"]


def _folder(cfg: TrainConfig) -> Optional[str]:
    """The local folder the run writes into: save_folder, or the staging folder of an object-store one
    (two runs of one run_name on a host would write the same staging files)."""
    folder = output_folder(cfg)
    return None if folder is None else str(folder)


def _rank() -> int:
    from composer.utils import dist

    return dist.get_global_rank()


@contextmanager
def hold_save_folder(cfg: TrainConfig) -> Iterator[None]:
    from composer_sheared.run.lock import FolderInUseError, RunLock

    lock = None
    if _folder(cfg) and _rank() == 0:
        try:
            lock = RunLock(_folder(cfg)).acquire()
        except FolderInUseError as err:
            raise ConfigError("save_folder", str(err)) from None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def start_resume(cfg: TrainConfig, resolved: Resolved) -> list:
    """Print each change a resume makes; returns the callbacks that apply them."""
    from composer_sheared.run.checkpointing import ResumeLearningRate
    from composer_sheared.run.remote_save import check_remote_resume, remote_folder
    from composer_sheared.run.resume import RUN_CONFIG, read_run_config

    remote_saved, remote_changes = check_remote_resume(cfg)  # every rank: a refusal stops them all
    changes = [*resolved.resume_changes, *remote_changes]
    if _rank() == 0:
        for key, old, new in changes:
            print(f"warning: resume: {key} changed from {old!r} to {new!r}; the resumed run uses the new value",
                  file=sys.stderr, flush=True)
        folder, unsaved = resume_folder(cfg), None
        if not remote_saved:
            unsaved = remote_folder(cfg)
        elif folder is not None and read_run_config(folder) is None:
            unsaved = folder
        if unsaved is not None:
            print(f"warning: resume: {unsaved} has no {RUN_CONFIG} (written by an older version); the config "
                  "cannot be compared with the checkpointed run's", file=sys.stderr, flush=True)
    if any(key == "optimizer.lr" for key, _, _ in changes):
        return [ResumeLearningRate(cfg.optimizer.lr)]
    return []


def record_config(cfg: TrainConfig) -> None:
    """The config the next resume of this run compares against (rank 0): in the save folder, or
    staged and uploaded beside an object-store folder's checkpoints."""
    from omegaconf import OmegaConf

    from composer_sheared.run.remote_save import upload_run_config
    from composer_sheared.run.resume import write_run_config

    if _rank() == 0 and _folder(cfg):
        upload_run_config(cfg, write_run_config(plain(OmegaConf.structured(cfg)), _folder(cfg)))


def trained_to_the_end(state) -> bool:
    """Whether the loaded checkpoint is at max_duration already (a run killed during its final export)."""
    return state.max_duration is not None and state.timestamp.get(state.max_duration.unit) >= state.max_duration


def no_space(cfg: TrainConfig, err: BaseException, stage: str) -> Optional[NoSpaceError]:
    """A NoSpaceError naming what was being written when `err` says the disk is full (else None):
    the HF directory (stage "hf"), else the error's own file or the checkpoint left truncated,
    which is set aside so it does not stay beside a good `latest`."""
    from composer_sheared.run.checkpointing import set_aside_unfinished_checkpoints

    full = find_no_space(err)
    if full is None:
        return None
    if stage == "hf":
        return NoSpaceError(hf_output_dir(cfg))
    moved = set_aside_unfinished_checkpoints(_folder(cfg), cfg.run_name or "") \
        if cfg.checkpoint and _rank() == 0 else []
    if getattr(full, "filename", None):
        return NoSpaceError(full.filename)
    if moved:
        return NoSpaceError(Path(moved[-1]).parent.parent / Path(moved[-1]).name)
    return NoSpaceError(_folder(cfg) or cfg.save_folder or ".")
