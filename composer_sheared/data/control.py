"""A small file-backed block shared by a dataset object and its DataLoader workers.

DataLoader workers get a copy of the dataset when an iterator is created, so a plain attribute
set later (``set_proportions``) never reaches them. This block is a file mapped MAP_SHARED by
every process: the main process appends proportion changes, workers re-read the log whenever
its version counter moves. It works with fork (the mapping is inherited) and spawn (the copy
re-opens the file by path); a file rather than POSIX shm keeps Python's resource tracker out
of it (it unlinks segments a child merely attached to).

Layout: int64 header | int64 claims[MAX_WORKERS] | int64 starts[capacity] | float64 props[capacity, D]
Writers append the entry first and bump ``n`` then ``version`` last, so a reader that sees a
version also sees the entries it covers.

The file is named ``composer_sheared_dbl_<pid>_<host>_<id>``; a killed run cannot unlink it, so
every new block first removes those of this host whose owner process is gone.
"""
from __future__ import annotations

import os
import re
import tempfile
import uuid
import weakref

import numpy as np

from composer_sheared.storage.atomic import host_tag, pid_alive

__all__ = ["ControlBlock", "remove_stale_blocks"]

_HEADER = 8
VERSION, N_CHANGES, START_BATCH, NUM_WORKERS, RANK, WORLD_SIZE = range(6)
MAX_WORKERS = 512


def _shm_dir() -> str:
    # /dev/shm keeps the block in RAM on Linux; fall back to the temp dir elsewhere.
    d = "/dev/shm"
    return d if os.path.isdir(d) and os.access(d, os.W_OK) else tempfile.gettempdir()


_PREFIX = "composer_sheared_dbl_"


def remove_stale_blocks(directory: str) -> list[str]:
    """Unlink blocks of this host whose owner pid is dead (left by SIGKILLed runs); returns them.

    The host is in the name because /dev/shm can be shared by containers of several machines.
    Names without a host are from older versions, which wrote them on this machine."""
    pattern = re.compile(rf"^{_PREFIX}(\d+)_(?:{re.escape(host_tag())}_)?[0-9a-f]{{12}}$")
    removed = []
    for name in os.listdir(directory):
        m = pattern.match(name)
        if m and not pid_alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:
                pass  # another process cleaned it first
    return removed


def _unlink_if_owner(path: str, owner_pid: int) -> None:
    # A forked worker that garbage-collects its copy must not delete the parent's block.
    if os.getpid() == owner_pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class ControlBlock:
    def __init__(self, num_domains: int, capacity: int = 8192):
        self.num_domains, self.capacity = num_domains, capacity
        remove_stale_blocks(_shm_dir())
        self.path = os.path.join(_shm_dir(), f"{_PREFIX}{os.getpid()}_{host_tag()}_{uuid.uuid4().hex[:12]}")
        with open(self.path, "wb") as f:
            f.truncate(self._nbytes())
        self._finalizer = weakref.finalize(self, _unlink_if_owner, self.path, os.getpid())
        self._map()
        self.claims[:] = -1

    def _nbytes(self) -> int:
        return 8 * (_HEADER + MAX_WORKERS + self.capacity + self.capacity * self.num_domains)

    def _map(self) -> None:
        mm = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(self._nbytes(),))
        ints = mm[: 8 * (_HEADER + MAX_WORKERS + self.capacity)].view(np.int64)
        self.header = ints[:_HEADER]
        self.claims = ints[_HEADER:_HEADER + MAX_WORKERS]
        self.starts = ints[_HEADER + MAX_WORKERS:]
        self.props = mm[8 * (_HEADER + MAX_WORKERS + self.capacity):].view(np.float64).reshape(
            self.capacity, self.num_domains)
        self._mm = mm

    def __getstate__(self):
        # np.memmap would pickle as a private copy; ship the path and re-map on arrival.
        return {"num_domains": self.num_domains, "capacity": self.capacity, "path": self.path}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._map()

    # -- change log -----------------------------------------------------------------------
    def read_changes(self) -> tuple[int, list]:
        """(version, [(start_batch, proportions), ...]) as of now."""
        version = int(self.header[VERSION])
        n = int(self.header[N_CHANGES])
        changes = [(int(self.starts[i]), np.array(self.props[i])) for i in range(n)]
        return version, changes

    def version(self) -> int:
        return int(self.header[VERSION])

    def write_changes(self, changes: list) -> None:
        if len(changes) > self.capacity:
            raise RuntimeError(f"more than {self.capacity} proportion changes; raise max_changes")
        for i, (start, p) in enumerate(changes):
            self.starts[i] = start
            self.props[i] = p
        self.header[N_CHANGES] = len(changes)
        self.header[VERSION] += 1

    def append_change(self, start: int, p: np.ndarray) -> None:
        n = int(self.header[N_CHANGES])
        if n and int(self.starts[n - 1]) == start:
            # Same start batch: the newer proportions win.
            self.props[n - 1] = p
        else:
            if n >= self.capacity:
                raise RuntimeError(f"more than {self.capacity} proportion changes; raise max_changes")
            self.starts[n] = start
            self.props[n] = p
            self.header[N_CHANGES] = n + 1
        self.header[VERSION] += 1

    # -- worker bookkeeping ---------------------------------------------------------------
    def max_claim(self) -> int:
        return int(self.claims.max())

    def reset_claims(self) -> None:
        self.claims[:] = -1
