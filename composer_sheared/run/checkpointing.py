"""Make Composer's autoresume survive a kill while a checkpoint is being written.

Composer writes ``ep{epoch}-ba{batch}-rank{rank}.pt`` in place and only then points
``latest-rank{rank}.pt`` at it. A SIGKILL in between leaves a partial (or unconfirmed) file
newer than ``latest``; autoresume then loads ``latest`` and refuses to start, because the newer
file "may conflict with a future checkpoint". ``set_aside_unfinished_checkpoints`` runs before the
Trainer is built: it moves such files into ``<save_folder>/incomplete/`` with a warning naming
them, so the run resumes from the last complete checkpoint and rewrites the later ones.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Optional

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import format_name_with_dist

__all__ = ["set_aside_unfinished_checkpoints", "ResumeLearningRate"]

log = logging.getLogger(__name__)

_TIME_UNITS = ("epoch", "batch", "sample", "token")
INCOMPLETE_DIR = "incomplete"


def _pattern(filename: str, run_name: str) -> re.Pattern:
    """A regex for the checkpoint names of this rank, with one group per time unit (the order of
    the units gives the chronological sort key)."""
    formatted = format_name_with_dist(filename, run_name)  # fills {rank}, {run_name}, ...; keeps {epoch}, ...
    parts = re.split(r"\{(\w+)\}", formatted)
    regex = ""
    for i, part in enumerate(parts):
        if i % 2 == 0:
            regex += re.escape(part)
        elif part in _TIME_UNITS:
            regex += rf"(?P<{part}>\d+)"
        else:
            raise ValueError(f"save_filename {filename!r}: cannot recover checkpoints named with {{{part}}}")
    return re.compile(f"^{regex}$")


def _readable(path: Path) -> bool:
    """Cheap completeness check: torch.save writes a zip whose central directory comes last, so a
    truncated file has none. Other formats (tarballs) are taken as complete."""
    if path.suffix != ".pt":
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            return bool(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def set_aside_unfinished_checkpoints(save_folder: Optional[str], run_name: str = "",
                                     filename: str = "ep{epoch}-ba{batch}-rank{rank}.pt",
                                     latest_filename: str = "latest-rank{rank}.pt") -> list[Path]:
    """Before an autoresume: keep the checkpoints up to the one autoresume will load and move every
    later or unreadable one into ``<save_folder>/incomplete/``; returns the moved paths.

    The resume point is what ``latest`` points to when that file is readable. When ``latest`` is
    missing, dangling or points to an unreadable file (a kill during the first save, or between
    Composer removing the old link and writing the new one), it is the newest readable checkpoint,
    and ``latest`` is re-pointed to it. Remote folders (``s3://...``) are left alone. Call it on
    every rank; each handles its own ``{rank}`` files.
    """
    if not save_folder or "://" in save_folder:
        return []
    folder = Path(format_name_with_dist(save_folder, run_name))
    if not folder.is_dir():
        return []
    pat = _pattern(filename, run_name)
    found = []
    for p in folder.iterdir():
        m = pat.match(p.name)
        if m and p.is_file() and not p.is_symlink():
            found.append((tuple(int(m.group(u)) for u in _TIME_UNITS if u in m.groupdict()), p))
    if not found:
        return []
    found.sort()
    files = [p for _, p in found]

    latest = folder / format_name_with_dist(latest_filename, run_name)
    target = latest.resolve() if latest.is_symlink() else None
    keep = next((p for p in files if p.resolve() == target), None)
    if keep is None or not _readable(keep):
        keep = next((p for p in reversed(files) if _readable(p)), None)
    later = files if keep is None else files[files.index(keep) + 1:]
    moved = []
    for p in later:
        dest_dir = folder / INCOMPLETE_DIR
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / p.name
        if dest.exists():  # an older interruption at the same step
            dest.unlink()
        shutil.move(str(p), dest)
        why = "unreadable" if not _readable(dest) else f"newer than the last complete checkpoint {keep}"
        warnings.warn(f"autoresume: set aside {p} ({why}; probably written while the run was killed) "
                      f"as {dest}; resuming from {keep or 'the start'}")
        moved.append(dest)
    if keep is not None and target != keep.resolve():
        # Composer's own order: remove the link, then create it (relative, as Composer does)
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        os.symlink(os.path.relpath(keep, latest.parent), latest)
        warnings.warn(f"autoresume: {latest} pointed to {target}; it now points to {keep}")
    elif keep is None and latest.is_symlink():
        latest.unlink()
    return moved


class ResumeLearningRate(Callback):
    """A resume with another ``optimizer.lr`` trains with it. Loading a checkpoint restores the old
    base learning rate (the optimizer's ``initial_lr``, the LR scheduler's ``base_lrs``), so the new
    value would be silently ignored; at AFTER_LOAD this puts the new one in its place, at the
    schedule's current factor. Only the first parameter group (the model's) changes: the mask and
    multiplier groups that ShearingPruning adds have their own rates."""

    def __init__(self, lr: float):
        self.lr = float(lr)

    def after_load(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == 0:
            return  # nothing was loaded: the optimizer already has the new rate
        group = state.optimizers[0].param_groups[0]
        old = group.get("initial_lr")
        if not old:
            return
        group["lr"] = self.lr * group["lr"] / old
        group["initial_lr"] = self.lr
        for scheduler in state.schedulers:
            if getattr(scheduler, "base_lrs", None):
                scheduler.base_lrs[0] = self.lr
        log.info("resume: optimizer.lr %s -> %s", old, self.lr)
