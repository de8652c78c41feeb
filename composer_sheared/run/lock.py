"""One run per save folder: an exclusive lock held for the whole run.

Two runs into one folder interleave their checkpoints and metrics (Composer's FileExistsError in
one, a corrupt metrics line in the other), so the second is refused by name. The lock is an
``fcntl.flock`` on ``<save_folder>/.run.lock``: the kernel drops it when its process dies, so a
lock file left by a killed run (a dead pid inside) is simply taken over. The pid and host written
into the file are only for the message. Remote folders (``s3://...``) are not locked.
"""
from __future__ import annotations

import fcntl
import os
import warnings
from pathlib import Path
from typing import Optional

from composer_sheared.storage.atomic import host_tag, pid_alive

__all__ = ["LOCK_NAME", "FolderInUseError", "RunLock"]

LOCK_NAME = ".run.lock"


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock."""

    def __init__(self, folder: Path, owner: str):
        self.folder, self.owner = folder, owner
        super().__init__(f"{folder} is in use by {owner}; wait for that run to end, or choose another folder")


def _read_owner(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    pid, _, host = text.partition("@")
    return f"pid {pid} on {host}" if pid.isdigit() and host else (f"pid {pid}" if pid.isdigit() else "another run")


class RunLock:
    """``with RunLock(folder):`` or ``acquire()`` / ``release()``. On release the lock file goes, and
    so does the folder when the lock created it and nothing else was written there."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None
        self._created_folder = False

    def acquire(self) -> "RunLock":
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._drop_folder()
                raise FolderInUseError(self.folder, _read_owner(self.path)) from None
            # the holder before us may have unlinked the file between our open and flock:
            # then we hold a lock on a file nobody else can see, so try again
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.read(fd, 256).decode(errors="replace").strip()
        pid, _, host = previous.partition("@")
        if pid.isdigit() and host == host_tag() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            warnings.warn(f"save_folder: took over the lock {self.path} of pid {pid}, which is no longer running")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}@{host_tag()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held, so nobody locks the old inode
        finally:
            os.close(self._fd)
            self._fd = None
        self._drop_folder()

    def _drop_folder(self) -> None:
        if self._created_folder:
            try:
                self.folder.rmdir()  # only when empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
