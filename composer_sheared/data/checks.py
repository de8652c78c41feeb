"""What the index files say about a data directory, checked before anything reads a sample.

``index.json`` (one per domain and split) and ``stats.json`` are small and say everything a run
needs to know up front: that each domain has both splits and samples, the samples' length (the
``tokens`` column encoding ``ndarray:<dtype>:<length>``), each shard's size and hash, and the
vocabulary. ``read_index`` / ``read_stats`` turn a bad file into a ValueError naming it;
``check_data_root`` runs every check over a whole data root (for remote data, on the index
files fetched into the local cache; see ``remote.fetch``) and reports each problem as
``(config key, message)``, which config validation prints as ``error: <key>: <message>``.

Core layer: no Composer.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from composer_sheared.data.integrity import HASH, file_hash
from composer_sheared.data.remote import DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT, fetch, remote_join

__all__ = ["DataCheckError", "IndexInfo", "read_index", "read_stats", "check_data_root"]


class DataCheckError(ValueError):
    """Problems with a data directory, each ``(config key, message)``."""

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.problems = list(problems)
        super().__init__("\n".join(f"{k}: {m}" for k, m in self.problems))


@dataclass
class IndexInfo:
    path: str
    samples: int
    seq_len: Optional[int]  # None: the tokens column has no fixed length
    shards: list = field(default_factory=list)  # the index's shard entries


def _load_json(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ValueError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not raw.strip():
        raise ValueError(f"{path}: the file is empty (expected {what}); re-create the data "
                         f"(data_prep/tokenize_domains.py)")
    try:
        return json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: not JSON ({err}); expected {what}") from None


def _tokens_length(shard: dict, path: str, i: int) -> Optional[int]:
    names, encs = shard.get("column_names"), shard.get("column_encodings")
    if not isinstance(names, list) or not isinstance(encs, list) or len(names) != len(encs):
        raise ValueError(f"{path}: shard {i} has no column_names / column_encodings lists")
    if "tokens" not in names:
        raise ValueError(f"{path}: shard {i} has columns {names}, expected a 'tokens' column "
                         f"(as data_prep/tokenize_domains.py writes)")
    parts = str(encs[names.index("tokens")]).split(":")
    if len(parts) == 3 and parts[0] == "ndarray" and parts[2].isdigit():
        return int(parts[2])
    return None


def read_index(path: str) -> IndexInfo:
    """An MDS ``index.json`` checked for what the readers rely on; ValueError naming ``path``."""
    obj = _load_json(path, "an MDS index (a JSON object with 'version': 2 and a 'shards' list)")
    if not isinstance(obj, dict) or not isinstance(obj.get("shards"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'shards' list (an MDS index)")
    if obj.get("version") != 2:
        raise ValueError(f"{path}: MDS index version {obj.get('version')!r}, expected 2")
    total, lengths = 0, set()
    for i, shard in enumerate(obj["shards"]):
        if not isinstance(shard, dict):
            raise ValueError(f"{path}: shard {i} is {type(shard).__name__}, expected an object")
        n = shard.get("samples")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{path}: shard {i} has 'samples' {n!r}, expected a count")
        raw = shard.get("raw_data")
        if not isinstance(raw, dict) or not isinstance(raw.get("basename"), str) or \
                not isinstance(raw.get("bytes"), int):
            raise ValueError(f"{path}: shard {i} has no raw_data with 'basename' and 'bytes'")
        total += n
        lengths.add(_tokens_length(shard, path, i))
    if len(lengths) > 1:
        raise ValueError(f"{path}: shards hold samples of different lengths {sorted(lengths, key=str)}; "
                         f"expected one sequence length")
    return IndexInfo(path, total, next(iter(lengths), None), obj["shards"])


def read_stats(path: str) -> Optional[dict]:
    """``stats.json`` as a dict (None when absent); ValueError naming ``path`` when it is bad."""
    if not os.path.exists(path):
        return None
    stats = _load_json(path, "a JSON object (written by data_prep/tokenize_domains.py)")
    if not isinstance(stats, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(stats).__name__}")
    for key in ("vocab_size", "seq_len"):
        v = stats.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"{path}: {key!r} should be a positive integer, got {v!r}")
    return stats


def _shard_problems(info: IndexInfo, hashes: bool) -> list[str]:
    """Local shard files of different size or hash than ``info`` records (absent ones are skipped)."""
    out = []
    root = os.path.dirname(info.path)
    for shard in info.shards:
        raw = shard["raw_data"]
        path = os.path.join(root, raw["basename"])
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            continue  # compressed, or remote data not fetched yet: the readers check it when fetched
        if size != raw["bytes"]:
            out.append(f"{path} has {size} bytes, {info.path} says {raw['bytes']}: the file is truncated or "
                       f"was replaced; re-create the data (data_prep/tokenize_domains.py)")
        elif hashes and HASH in (raw.get("hashes") or {}) and file_hash(path, HASH) != raw["hashes"][HASH]:
            out.append(f"{path} does not match its {HASH} hash in {info.path}: its bytes are corrupted; "
                       f"re-create the data (data_prep/tokenize_domains.py)")
    return out


class _Root:
    """Where a data root's index files are: read in place, or fetched from `remote` into `local` first."""

    def __init__(self, local: str, remote: Optional[str], timeout: float, attempts: int):
        self.local, self.remote, self.timeout, self.attempts = local, remote, timeout, attempts
        self.key = "data.remote" if remote else "data.local"

    def where(self, *parts: str) -> str:
        return remote_join(self.remote, *parts) if self.remote else os.path.join(self.local, *parts)

    def fetch(self, *parts: str) -> str:
        """The local path of `parts`, fetched from the remote first when there is one."""
        path = os.path.join(self.local, *parts)
        if self.remote:
            fetch(self.where(*parts), path, self.timeout, self.attempts)
        return path


def _root_stats(root: _Root, problems: list) -> Optional[dict]:
    """stats.json of the root (None when it has none or it is unreadable, the latter a problem)."""
    try:
        try:
            path = root.fetch("stats.json")
        except FileNotFoundError:  # on the remote: as for local data, nothing to check it against
            path = os.path.join(root.local, "stats.json")
        return read_stats(path)
    except (ValueError, OSError) as err:
        problems.append((root.key, str(err)))
        return None


def _domain_index(root: _Root, split: str, dom: str, key: str, has: str, problems: list) -> Optional[str]:
    """The local path of `<split>/<dom>/index.json`, or None with the reason in `problems`."""
    index_path = os.path.join(root.local, split, dom, "index.json")
    if root.remote:
        try:
            return root.fetch(split, dom, "index.json")
        except FileNotFoundError:
            problems.append((key, f"{dom!r} has no split {split!r}: {root.where(split, dom, 'index.json')} "
                                  f"is not on the remote{has}"))
        except OSError as err:
            problems.append((root.key, str(err)))
        return None
    if not os.path.isdir(os.path.join(root.local, split, dom)):
        problems.append((key, f"{dom!r} has no directory {os.path.join(root.local, split, dom)}{has}"))
    elif not os.path.isfile(index_path):
        problems.append((key, f"{dom!r} has no split {split!r}: {index_path} does not exist "
                              f"(run data_prep/tokenize_domains.py)"))
    else:
        return index_path
    return None


def _split_problems(root: _Root, split: str, domains: Sequence[str], known: Optional[list], hashes: bool,
                    by_len: dict, problems: list) -> None:
    """Each domain's index of one split: present, readable, non-empty, its shards as it says; the
    sequence length of each index is collected in `by_len`."""
    if not root.remote:
        split_dir = os.path.join(root.local, split)
        if not os.path.isdir(split_dir):
            problems.append(("data.local", f"{split_dir} does not exist (expected <local>/{split}/<domain>/)"))
            return
        known = sorted(p for p in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, p)))
    has = f"; the data has domains {known}" if known is not None else ""
    for i, dom in enumerate(domains):
        key = f"data.domains[{i}]"
        index_path = _domain_index(root, split, dom, key, has, problems)
        if index_path is None:
            continue
        try:
            info = read_index(index_path)
        except ValueError as err:
            problems.append((root.key, str(err)))
            continue
        if info.samples == 0:
            problems.append((key, f"{index_path}: domain {dom!r} split {split!r} has no samples"))
        if info.seq_len is not None:
            by_len.setdefault(info.seq_len, []).append(index_path)
        problems += [(root.key, p) for p in _shard_problems(info, hashes and not root.remote)]


def _shape_problems(root: _Root, stats: Optional[dict], by_len: dict, vocab_size: Optional[int],
                    seq_len: Optional[int], problems: list) -> None:
    """The vocabulary and the sequence lengths against the model's and the run's."""
    stats_path = os.path.join(root.local, "stats.json")
    vocab, seq = (stats or {}).get("vocab_size"), (stats or {}).get("seq_len")
    if vocab is not None and vocab_size is not None and vocab > int(vocab_size):
        problems.append((root.key, f"{stats_path} says the data was tokenized with a {vocab}-token "
                                   f"vocabulary, but the model has {vocab_size} embeddings"))
    if seq is not None and seq_len is not None and seq != int(seq_len):
        problems.append(("max_seq_len", f"{seq_len}, but {stats_path} says the samples have {seq} tokens"))
    # Every domain and split must have the run's length: max_seq_len, else stats.json's, else the
    # most common one (a domain of another length would fail as unequal tensors in a batch).
    ref = int(seq_len) if seq_len is not None else seq if seq is not None else \
        max(by_len, key=lambda n: len(by_len[n]), default=None)
    for n, paths in sorted(by_len.items()):
        if n == ref or (n == seq and seq_len is not None):  # equal to stats.json's: reported above
            continue
        more = f" (and {len(paths) - 1} more index files)" if len(paths) > 1 else ""
        if seq_len is not None:
            problems.append(("max_seq_len", f"{seq_len}, but {paths[0]}{more} holds samples of {n} tokens"))
        else:
            problems.append((root.key, f"{paths[0]}{more} holds samples of {n} tokens, the other domains "
                                       f"{ref}: every domain and split needs one sequence length"))


def check_data_root(local: str, domains: Sequence[str], splits: Sequence[str] = ("train", "eval"), *,
                    remote: Optional[str] = None, vocab_size: Optional[int] = None,
                    seq_len: Optional[int] = None, hashes: bool = True, timeout: float = DEFAULT_TIMEOUT,
                    attempts: int = DEFAULT_ATTEMPTS) -> dict:
    """Every check the index files allow, over ``<local>/<split>/<domain>/``; returns stats.json's dict.

    With ``remote``, each ``index.json`` and ``stats.json`` is first fetched into ``local`` (the
    cache the readers use; bounded, see ``remote.fetch``). ``vocab_size``: the model's;
    ``seq_len``: the run's ``max_seq_len``. ``hashes``: hash-check local shards too (the result
    is cached per process, so a dataset opened next does not read them again). Raises
    DataCheckError listing every problem as ``(config key, message)``.
    """
    if not remote and not os.path.isdir(local):
        raise DataCheckError([("data.local", f"data directory {local} does not exist "
                                             f"(run data_prep/tokenize_domains.py, or fix data.local)")])
    root, problems = _Root(local, remote, timeout, attempts), []
    stats = _root_stats(root, problems)
    known = sorted(stats["domains"]) if stats and isinstance(stats.get("domains"), dict) else None
    by_len: dict[int, list[str]] = {}  # sequence length -> index files
    for split in splits:
        _split_problems(root, split, domains, known, hashes, by_len, problems)
    _shape_problems(root, stats, by_len, vocab_size, seq_len, problems)
    if problems:
        raise DataCheckError(list(dict.fromkeys(problems)))  # one line per problem, in order
    return stats or {}
