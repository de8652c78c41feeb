"""Shard integrity: file sizes and hashes against ``index.json``, tokens against the vocabulary.

Streaming only checks that a local shard file exists. A truncated shard then fails deep inside a
run ("Relative sample index ... is not present"), bytes overwritten with 0xFF become token ids
past the embedding, and zeroed bytes train silently. So a dataset checks, when it opens:

- every local shard file's size against the ``bytes`` recorded in ``index.json`` (a stat call);
- every shard's hash (``HASH``, written by ``data_prep.tokenize_domains``) when the shard is first
  read, or for all shards at open (``verify="open"``): this is what catches same-size damage;

and, for shards that had no hash to check, on every read that token ids are below the vocabulary
size (one ``max`` per sample, ~3 us for 2048 tokens): data written by other tools, or
``verify="size"``. A shard whose hash matched needs no per-sample check.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["HASH", "VERIFY_MODES", "DataIntegrityError", "ShardChecker", "check_vocab", "data_vocab_size",
           "check_tokens", "file_hash"]

log = logging.getLogger(__name__)

# xxh3_64 hashes at memory speed; it is what data_prep writes into index.json.
HASH = "xxh3_64"
VERIFY_MODES = ("open", "lazy", "size")


class DataIntegrityError(ValueError):
    """A shard does not match its index, or a sample holds a token outside the vocabulary."""


def _files(shard) -> list[tuple[str, Any, Optional[Any]]]:
    """[(local raw path, raw FileInfo, zip FileInfo or None)] of one shard reader."""
    return [(os.path.join(shard.dirname, shard.split, raw.basename), raw, zinfo) for raw, zinfo in shard.file_pairs]


def _size(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


class ShardChecker:
    """Size checks at construction, hash checks per shard (at open or on first read).

    ``where`` names the data in messages ("domain 'cc' split 'train'"). ``verify``: ``"open"``
    hashes every local shard now; ``"lazy"`` hashes a shard when a process first reads it;
    ``"size"`` checks sizes only. A shard with no recorded hash (data written by other tools)
    is checked by size only. ``remote``: shards may be absent locally (fetched later).
    """

    def __init__(self, shards: Sequence[Any], where: str, verify: str = "open", remote: bool = False):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.shards, self.where, self.verify = list(shards), where, verify
        self.verified: set[int] = set()  # checked in this process (by hash where there is one)
        self.hashed: set[int] = set()  # of which every file matched a recorded hash
        for shard in self.shards:
            for path, raw, zinfo in _files(shard):
                size = _size(path)
                if size is None and zinfo is not None:
                    path, raw, size = os.path.join(shard.dirname, shard.split, zinfo.basename), zinfo, _size(
                        os.path.join(shard.dirname, shard.split, zinfo.basename))
                if size is None:
                    if not remote:
                        raise DataIntegrityError(f"{where}: shard file {path} is missing (listed in index.json)")
                elif size != raw.bytes:
                    raise DataIntegrityError(f"{where}: shard file {path} has {size} bytes, index.json says "
                                             f"{raw.bytes}: the file is truncated or was replaced; "
                                             f"re-create the data (data_prep/tokenize_domains.py)")
        if verify == "open":
            for i in range(len(self.shards)):
                self.check(i, missing_ok=remote)

    def present(self, shard_id: int) -> bool:
        """Whether every file of the shard is local (raw, or compressed)."""
        return all(_size(path) is not None or (zinfo is not None and _size(
            os.path.join(os.path.dirname(path), zinfo.basename)) is not None)
            for path, _, zinfo in _files(self.shards[shard_id]))

    def check(self, shard_id: int, missing_ok: bool = False, sample: Optional[int] = None) -> None:
        """Hash-check one shard's local files (once per process); raises DataIntegrityError."""
        if shard_id in self.verified:
            return
        shard = self.shards[shard_id]
        if self.verify == "size":
            self.verified.add(shard_id)
            return
        hashed = True
        for path, raw, zinfo in _files(shard):
            info = raw
            if _size(path) is None and zinfo is not None:
                path, info = os.path.join(shard.dirname, shard.split, zinfo.basename), zinfo
            algo = HASH if HASH in info.hashes else next(iter(sorted(info.hashes)), None)
            if algo is None:
                hashed = False
                continue
            try:
                size, digest = _size(path), file_hash(path, algo)
            except FileNotFoundError:
                if missing_ok:
                    return  # not fetched yet: checked when it is first read
                raise DataIntegrityError(f"{self.where}: shard file {path} is missing") from None
            if size != info.bytes or digest != info.hashes[algo]:
                at = "" if sample is None else f" (reading sample {sample} of this shard)"
                raise DataIntegrityError(f"{self.where}: shard file {path}{at} does not match its {algo} hash in "
                                         f"index.json: its bytes are corrupted; re-create the data "
                                         f"(data_prep/tokenize_domains.py)")
        self.verified.add(shard_id)
        if hashed:
            self.hashed.add(shard_id)


_HASHES: dict[tuple, str] = {}
RACY_S = 2.0  # a file changed this recently may change again within one mtime tick: not cached


def file_hash(path: str, algo: str = HASH) -> str:
    """Hex digest of a file, remembered per process by (path, inode, size, mtime).

    Config validation hashes the shards, then the datasets check them again when they open:
    the second time is a lookup. A file modified less than ``RACY_S`` ago is never remembered,
    as a change within the same mtime tick would go unseen (git's "racy" rule).
    """
    from streaming.base.hashing import get_hash

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, algo)
    if key in _HASHES:
        return _HASHES[key]
    with open(path, "rb") as f:
        digest = get_hash(algo, f.read())
    if time.time() - st.st_mtime > RACY_S:
        _HASHES[key] = digest
    return digest


def check_tokens(tokens: np.ndarray, vocab_size: Optional[int], where: str) -> None:
    """Raise DataIntegrityError naming ``where`` if a token id is >= ``vocab_size``."""
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(tokens.max())
        pos = int(np.argmax(tokens))
        raise DataIntegrityError(f"{where}: token id {bad} at position {pos} is outside the vocabulary of "
                                 f"{vocab_size} (corrupted shard bytes, or data tokenized with another "
                                 f"tokenizer)")


def data_vocab_size(local: str) -> Optional[int]:
    """``vocab_size`` from ``<local>/stats.json`` (written by tokenize_domains), or None without the file."""
    path = os.path.join(local, "stats.json")
    try:
        with open(path) as f:
            stats = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not readable as JSON ({err})") from None
    v = stats.get("vocab_size") if isinstance(stats, dict) else None
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{path}: 'vocab_size' should be a positive integer, got {v!r}")
    return v


def check_vocab(local: str, vocab_size: int) -> Optional[int]:
    """Check the data under ``local`` fits a model with ``vocab_size`` embeddings, before training.

    Reads ``<local>/stats.json``; raises ValueError if the data's vocabulary is larger than the
    model's (token ids would index past the embedding). Returns the data's vocabulary size, or
    None (with a warning) when ``stats.json`` is absent and nothing can be said.
    """
    data_vocab = data_vocab_size(local)
    if data_vocab is None:
        log.warning("no stats.json under %s: cannot check the data's vocabulary against the model's (%d)",
                    local, vocab_size)
        return None
    if data_vocab > int(vocab_size):
        raise ValueError(f"{os.path.join(local, 'stats.json')}: the data was tokenized with a vocabulary of "
                         f"{data_vocab} tokens, larger than the model's vocab_size {vocab_size}; tokenize "
                         f"with the model's tokenizer")
    return data_vocab
