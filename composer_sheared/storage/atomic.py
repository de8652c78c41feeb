"""Write a directory all at once: nothing half-written is ever visible at its final path."""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

__all__ = ["atomic_directory", "host_tag", "pid_alive", "remove_stale_temps", "NoSpaceError", "find_no_space"]


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine, in this PID namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def host_tag() -> str:
    """This machine's name, safe inside a file name: pids only mean something on their host."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64]


def _owner_tag() -> str:
    # The pid says who owns a temp dir; the host keeps a shared filesystem's other machines out.
    return f"{os.getpid()}@{host_tag()}"


def remove_stale_temps(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temp/trash siblings of `out_dir` left by a killed process of this host; returns them."""
    out_dir = Path(out_dir)
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(?:partial|old)-(\d+)@(.+)-[a-z0-9_]+$")
    host = host_tag()
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for entry in out_dir.parent.iterdir():
        m = pattern.match(entry.name)
        if m and m.group(2) == host and not pid_alive(int(m.group(1))) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out_dir` (same filesystem, so the final rename
    is atomic). When the block succeeds it becomes `out_dir`, replacing an existing one if
    `overwrite`; when the block raises, it is removed and `out_dir` is left as it was.
    Temp directories are named after their owner process; those of dead owners (a SIGKILL leaves
    them behind) are removed first."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists")
    remove_stale_temps(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{_owner_tag()}-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{_owner_tag()}-", dir=out_dir.parent))
            os.rename(out_dir, trash / "old")
            os.rename(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class NoSpaceError(OSError):
    """The disk filled while writing `path`."""

    def __init__(self, path):
        self.path = path
        super().__init__(errno.ENOSPC, f"no space left writing {path}")

    def __str__(self) -> str:
        return f"no space left writing {self.path}"


_NO_SPACE = re.compile(r"No space left on device|\[Errno 28\]|code: 28\b|StorageFull")


def find_no_space(exc: Optional[BaseException]) -> Optional[BaseException]:
    """The exception in `exc`'s cause/context chain that says the disk is full, if any. Writers
    wrap ENOSPC in their own errors (torch's "unexpected pos", safetensors' SafetensorError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or _NO_SPACE.search(str(exc)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
