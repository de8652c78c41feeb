"""JSONL (plain, .gz, .zst) -> tokenized per-domain MDS shards for dynamic batch loading.

Output (written to a temporary sibling directory, renamed to OUT only when complete)::

    OUT/train/<domain>/   MDS shards, column ``tokens`` (ndarray:uint16|uint32, exactly seq_len)
    OUT/eval/<domain>/    the first ``--eval-sequences`` sequences of each domain
    OUT/stats.json        documents / tokens / sequences per domain and split

Documents are tokenized with a local HF tokenizer (batch encoding, no special tokens), each is
followed by EOS, the stream of a domain is concatenated in input order (files sorted, lines in
order) and cut into sequences of exactly ``seq_len`` tokens; the incomplete tail is dropped and
counted. The result does not depend on the number of worker processes.

    python -m data_prep.tokenize_domains --input data/ --out mds/ --tokenizer path/to/tok \\
        --seq-len 4096 --eval-sequences 500 --domain-key meta.redpajama_set_name
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from composer_sheared.storage.atomic import atomic_directory

__all__ = ["tokenize_domains", "write_mds_sequences", "token_dtype", "REDPAJAMA_SHORT_NAMES",
           "BadLineError", "main"]

# RedPajama-1T `meta.redpajama_set_name` -> the short names METHOD.md uses.
REDPAJAMA_SHORT_NAMES = {
    "RedPajamaCommonCrawl": "cc",
    "RedPajamaGithub": "github",
    "RedPajamaBook": "book",
    "RedPajamaStackExchange": "stackexchange",
    "RedPajamaWikipedia": "wiki",
    "RedPajamaArXiv": "arxiv",
    "RedPajamaC4": "c4",
}

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


class BadLineError(ValueError):
    """A malformed input line; the message starts with ``file:line:``."""


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def write_mds_sequences(out_dir: str, sequences: Iterable[np.ndarray], seq_len: int, vocab_size: int,
                        compression: Optional[str] = None, size_limit: Union[int, str] = 1 << 26) -> int:
    """Write fixed-length token sequences as MDS (column ``tokens``); returns how many.

    Each shard's hash goes into ``index.json``; the datasets check it on read.
    """
    from streaming import MDSWriter

    from composer_sheared.data.integrity import HASH

    dtype = token_dtype(vocab_size)
    n = 0
    with MDSWriter(out=out_dir, columns={"tokens": f"ndarray:{dtype}:{seq_len}"},
                   compression=compression, size_limit=size_limit, hashes=[HASH]) as writer:
        for seq in sequences:
            seq = np.asarray(seq)
            if seq.shape != (seq_len,):
                raise ValueError(f"sequence {n} has shape {seq.shape}, expected ({seq_len},)")
            writer.write({"tokens": seq.astype(dtype)})
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Reading JSONL


def _open_lines(path: str) -> io.BufferedIOBase:
    """The file's (decompressed) bytes: lines are decoded one by one, so a line that is not UTF-8
    is one bad line (named, or skipped with --skip-bad-lines), not the end of the file."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _compressed_error(err: BaseException) -> bool:
    """A read error meaning the file is not (or not wholly) the compressed format its name says."""
    import zlib

    return isinstance(err, (gzip.BadGzipFile, EOFError, zlib.error)) or type(err).__name__ == "ZstdError"


def _get_dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            raise KeyError(key)
        obj = obj[part]
    return obj


def _domain_name(raw: str, domain_map: Mapping[str, str], where: str) -> str:
    name = domain_map.get(raw, raw)
    if not name or "/" in name or name in (".", ".."):
        raise BadLineError(f"{where}: domain {raw!r} maps to {name!r}, not usable as a directory name")
    return name


def find_inputs(inputs: Sequence[str], by_directory: bool = True) -> list[tuple[str, str]]:
    """[(file, directory-derived domain)] for files and (recursively) directories, sorted.

    An input directory without JSONL files is an error, and so is (when the domain is the
    directory name) an empty leaf directory under one: it would be a domain silently missing.
    """
    found = []
    for inp in inputs:
        if os.path.isdir(inp):
            before = len(found)
            for root, dirs, files in os.walk(inp):
                dirs.sort()
                jsonl = [f for f in sorted(files) if f.endswith(JSONL_SUFFIXES)]
                if by_directory and not dirs and not jsonl and os.path.abspath(root) != os.path.abspath(inp):
                    raise ValueError(f"domain {os.path.basename(root)!r}: input directory {root} has no JSONL "
                                     f"files ({', '.join(JSONL_SUFFIXES)})")
                found += [os.path.join(root, f) for f in jsonl]
            if len(found) == before:
                raise ValueError(f"input directory {inp} has no JSONL files ({', '.join(JSONL_SUFFIXES)})")
        elif os.path.isfile(inp):
            found.append(inp)
        else:
            raise FileNotFoundError(f"input {inp!r} does not exist")
    files = sorted(set(os.path.abspath(f) for f in found))
    return [(f, os.path.basename(os.path.dirname(f))) for f in files]


# ---------------------------------------------------------------------------------------------
# Per-file work (runs in worker processes)


@dataclass
class _Job:
    path: str
    dir_domain: str
    work_dir: str
    file_index: int
    text_key: str
    domain_key: Optional[str]
    domain_map: dict
    skip_bad_lines: bool
    batch_docs: int


@dataclass
class _FileResult:
    file_index: int
    # domain -> (path of the .npy token stream, number of docs, doc start offsets path)
    domains: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # reason -> count
    lines: int = 0


_TOKENIZER = None


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when the parent dies, even by SIGKILL (no orphans left tokenizing).

    Linux signals on the death of the *thread* that forked us: the pool forks its workers from
    the thread calling tokenize_domains, which outlives the pool."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        import threading
        import time

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _init_worker(tokenizer, parent_pid: Optional[int] = None) -> None:
    global _TOKENIZER
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _TOKENIZER = _load_tokenizer(tokenizer)


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        if not os.path.isdir(tokenizer):
            raise FileNotFoundError(f"tokenizer {tokenizer!r} is not a local directory (nothing is downloaded)")
        return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    return tokenizer


def _eos_id(tok) -> int:
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; documents are joined with EOS")
    return int(eos)


def _parse_doc(line: str, job: _Job, where: str) -> tuple[str, str]:
    """(domain, text) of one JSON line; raises json.JSONDecodeError or BadLineError (``where: reason``)."""
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise BadLineError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if job.text_key not in obj:
        raise BadLineError(f"{where}: no {job.text_key!r} key")
    text = obj[job.text_key]
    if not isinstance(text, str):
        raise BadLineError(f"{where}: {job.text_key!r} is {type(text).__name__}, not a string")
    if not job.domain_key:
        return _domain_name(job.dir_domain, job.domain_map, where), text
    try:
        raw = _get_dotted(obj, job.domain_key)
    except KeyError:
        raise BadLineError(f"{where}: no domain key {job.domain_key!r}") from None
    return _domain_name(str(raw), job.domain_map, where), text


def _iter_docs(job: _Job, result: _FileResult) -> Iterator[tuple[str, str]]:
    """(domain, text) per good line; bad lines raise or are counted."""
    kind = "gzip" if job.path.endswith(".gz") else "zstd" if job.path.endswith(".zst") else None
    with _open_lines(job.path) as f:
        lineno = 0
        while True:
            where = f"{job.path}:{lineno + 1}"
            try:
                raw = f.readline()
            except Exception as err:  # noqa: BLE001 - only decompression errors are the input's fault
                if kind is None or not _compressed_error(err):
                    raise
                raise BadLineError(f"{where}: not a valid {kind} file ({type(err).__name__}: {err}); "
                                   f"the name ends in {os.path.splitext(job.path)[1]}") from None
            if not raw:
                break
            lineno += 1
            result.lines = lineno
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = BadLineError(f"{where}: not UTF-8 ({err.reason} at byte {err.start} of the line)")
                if not job.skip_bad_lines:
                    raise bad from None
                result.skipped["not UTF-8"] = result.skipped.get("not UTF-8", 0) + 1
                continue
            if not line.strip():
                continue
            try:
                domain, text = _parse_doc(line, job, where)
            except json.JSONDecodeError as err:
                bad = BadLineError(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
                if not job.skip_bad_lines:
                    raise bad from None
                result.skipped["invalid JSON"] = result.skipped.get("invalid JSON", 0) + 1
                continue
            except BadLineError as err:
                if not job.skip_bad_lines:
                    raise
                reason = str(err).split(": ", 1)[1]
                result.skipped[reason] = result.skipped.get(reason, 0) + 1
                continue
            yield domain, text


def _tokenize_file(job: _Job) -> _FileResult:
    tok = _TOKENIZER
    eos = _eos_id(tok)
    result = _FileResult(job.file_index)
    parts: dict[str, list[np.ndarray]] = {}
    docs: dict[str, int] = {}
    doc_lens: dict[str, list[int]] = {}

    def flush(batch: list[tuple[str, str]]) -> None:
        # verbose=False: documents longer than model_max_length are fine, they get cut later
        enc = tok([t for _, t in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (domain, _), ids in zip(batch, enc):
            arr = np.empty(len(ids) + 1, dtype=np.int64)
            arr[:-1] = ids
            arr[-1] = eos
            parts.setdefault(domain, []).append(arr)
            docs[domain] = docs.get(domain, 0) + 1
            doc_lens.setdefault(domain, []).append(len(arr))

    batch: list[tuple[str, str]] = []
    for item in _iter_docs(job, result):
        batch.append(item)
        if len(batch) >= job.batch_docs:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    for domain, arrs in parts.items():
        path = os.path.join(job.work_dir, f"{job.file_index:06d}.{domain}.npy")
        np.save(path, np.concatenate(arrs))
        lens_path = path[:-4] + ".lens.npy"
        np.save(lens_path, np.asarray(doc_lens[domain], dtype=np.int64))
        result.domains[domain] = (path, docs[domain], lens_path)
    return result


# ---------------------------------------------------------------------------------------------
# Merge: per domain, concatenate the file streams in file order and cut into sequences


def _domain_sequences(paths: list[str], seq_len: int) -> Iterator[np.ndarray]:
    carry = np.empty(0, dtype=np.int64)
    for p in paths:
        stream = np.concatenate([carry, np.load(p)])
        n = len(stream) // seq_len
        for i in range(n):
            yield stream[i * seq_len:(i + 1) * seq_len]
        carry = stream[n * seq_len:]


def _write_domain(out_tmp: str, domain: str, paths: list[str], lens_paths: list[str], seq_len: int,
                  eval_sequences: int, vocab_size: int, compression: Optional[str]) -> dict:
    total_tokens = sum(int(np.load(p, mmap_mode="r").shape[0]) for p in paths)
    n_seq = total_tokens // seq_len
    if n_seq <= eval_sequences:
        raise ValueError(f"domain {domain!r} has {total_tokens} tokens = {n_seq} sequences of {seq_len}; "
                         f"need more than --eval-sequences={eval_sequences} to leave a train split")
    # A document belongs to the split holding its first token.
    starts = np.concatenate([[0], np.cumsum(np.concatenate([np.load(p) for p in lens_paths]))[:-1]])
    eval_tokens = eval_sequences * seq_len
    seqs = _domain_sequences(paths, seq_len)

    def take(k: int) -> Iterator[np.ndarray]:
        for _ in range(k):
            yield next(seqs)

    n_eval = write_mds_sequences(os.path.join(out_tmp, "eval", domain), take(eval_sequences), seq_len,
                                 vocab_size, compression) if eval_sequences else 0
    n_train = write_mds_sequences(os.path.join(out_tmp, "train", domain), take(n_seq - eval_sequences),
                                  seq_len, vocab_size, compression)
    eval_docs = int(np.sum(starts < eval_tokens))
    train_docs = int(np.sum(starts < n_seq * seq_len)) - eval_docs
    return {
        "train": {"docs": train_docs, "tokens": n_train * seq_len, "sequences": n_train},
        "eval": {"docs": eval_docs, "tokens": n_eval * seq_len, "sequences": n_eval},
        "input_docs": int(len(starts)),
        "input_tokens": int(total_tokens),
        "dropped_tokens": int(total_tokens - n_seq * seq_len),
    }


# ---------------------------------------------------------------------------------------------


def _check_arguments(inputs: Union[str, Sequence[str]], out: str, seq_len: int, eval_sequences: int,
                     overwrite: bool) -> tuple[list[str], str]:
    """(inputs as a list, OUT as an absolute path), or the argument's error before any file is read."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if eval_sequences < 0:
        raise ValueError(f"eval_sequences must be >= 0, got {eval_sequences}")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    return list(inputs), out


def _tokenize_files(jobs: list[_Job], tokenizer, tok, workers: int, progress: bool) -> list[_FileResult]:
    """Every file's token streams (in work_dir), in file order: in this process for one worker,
    else in a pool whose workers die with this process."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="tokenize", unit="file", disable=not progress)
    results = []
    if workers == 1:
        _init_worker(tok)
        for j in jobs:
            results.append(_tokenize_file(j))
            bar.update(1)
    else:
        import multiprocessing as mp

        # fork is seconds faster per worker than spawn (no re-import of transformers); the
        # parent has only loaded the tokenizer, not run it, so its Rust thread pool is unused.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(tokenizer if isinstance(tokenizer, (str, os.PathLike)) else tok,
                                           os.getpid())) as ex:
            for r in ex.map(_tokenize_file, jobs):
                results.append(r)
                bar.update(1)
    bar.close()
    results.sort(key=lambda r: r.file_index)
    return results


def _group_by_domain(results: list[_FileResult], files: list[tuple[str, str]], domain_key: Optional[str],
                     domain_map: Mapping[str, str]) -> tuple[dict[str, tuple[list[str], list[str]]], dict[str, int]]:
    """({domain: (token stream paths, doc length paths)} in file order, {skip reason: count}).

    An empty file, no documents at all, or (domains from directories) a domain whose every line
    was skipped is an error: a domain would be silently missing from the output."""
    per_domain: dict[str, tuple[list[str], list[str]]] = {}
    skipped: dict[str, int] = {}
    for r, (path, dir_domain) in zip(results, files):
        if not r.domains and not r.skipped:
            named = "" if domain_key else f" (domain {domain_map.get(dir_domain, dir_domain)!r})"
            raise ValueError(f"{path}: empty JSONL file{named}: no documents")
        for reason, n in r.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        for domain, (path, _, lens_path) in r.domains.items():
            per_domain.setdefault(domain, ([], []))
            per_domain[domain][0].append(path)
            per_domain[domain][1].append(lens_path)
    if not per_domain:
        raise ValueError(f"no documents found in {len(files)} input file(s)")
    if not domain_key:
        for d in sorted({domain_map.get(dd, dd) for _, dd in files} - set(per_domain)):
            raise ValueError(f"domain {d!r}: no documents in its input files (every line was skipped)")
    return per_domain, skipped


def _write_splits(tmp: str, per_domain: dict[str, tuple[list[str], list[str]]], seq_len: int, eval_sequences: int,
                  vocab_size: int, compression: Optional[str], progress: bool) -> dict[str, dict]:
    """Each domain's train/eval MDS under `tmp`, in name order; returns {domain: its stats}."""
    from tqdm import tqdm

    domains = {}
    for domain in tqdm(sorted(per_domain), desc="write MDS", unit="domain", disable=not progress):
        paths, lens_paths = per_domain[domain]
        domains[domain] = _write_domain(tmp, domain, paths, lens_paths, seq_len, eval_sequences, vocab_size,
                                        compression)
    return domains


def tokenize_domains(inputs: Union[str, Sequence[str]], out: str, tokenizer, seq_len: int, eval_sequences: int, *,
                     domain_key: Optional[str] = None, domain_map: Optional[Mapping[str, str]] = None,
                     text_key: str = "text", workers: Optional[int] = None, skip_bad_lines: bool = False,
                     overwrite: bool = False, compression: Optional[str] = None, batch_docs: int = 256,
                     progress: bool = True) -> dict:
    """Tokenize JSONL domains into ``out/{train,eval}/<domain>/`` MDS; returns the stats dict.

    ``tokenizer``: a local HF tokenizer directory (or a loaded tokenizer object).
    ``domain_key``: dotted JSON key holding the domain (mapped through ``domain_map``; for
    ``meta.redpajama_set_name`` the RedPajama short names are the default map); without it the
    domain is the name of each file's directory. Raises ``BadLineError`` (``file:line: reason``)
    on a malformed line unless ``skip_bad_lines``.
    """
    inputs, out = _check_arguments(inputs, out, seq_len, eval_sequences, overwrite)
    if domain_map is None:
        domain_map = REDPAJAMA_SHORT_NAMES if domain_key == "meta.redpajama_set_name" else {}
    files = find_inputs(inputs, by_directory=not domain_key)
    tok = _load_tokenizer(tokenizer)
    vocab_size = len(tok)
    workers = max(1, min(workers or (os.cpu_count() or 1), len(files)))

    # Checked above; an existing OUT is replaced only once the new one is complete.
    with atomic_directory(out, overwrite=True) as tmp_path:
        tmp = str(tmp_path)
        work = os.path.join(tmp, "_work")
        os.makedirs(work)
        jobs = [_Job(f, d, work, i, text_key, domain_key, dict(domain_map), skip_bad_lines, batch_docs)
                for i, (f, d) in enumerate(files)]
        results = _tokenize_files(jobs, tokenizer, tok, workers, progress)
        per_domain, skipped = _group_by_domain(results, files, domain_key, domain_map)
        stats: dict[str, Any] = {"seq_len": seq_len, "eval_sequences": eval_sequences, "vocab_size": vocab_size,
                                 "dtype": token_dtype(vocab_size), "input_files": len(files)}
        stats["domains"] = _write_splits(tmp, per_domain, seq_len, eval_sequences, vocab_size, compression, progress)
        stats["skipped_lines"] = {"total": sum(skipped.values()), "by_reason": dict(sorted(skipped.items()))}
        shutil.rmtree(work)
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump(stats, f, indent=2, sort_keys=True)
    return stats


def _parse_map(text: Optional[str]) -> Optional[dict]:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--domain-map entry {item!r} is not NAME=SHORT")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="JSONL files or directories (searched recursively)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="local HF tokenizer directory")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--eval-sequences", type=int, default=500, help="sequences per domain in the eval split")
    ap.add_argument("--domain-key", default=None,
                    help="dotted JSON key holding the domain, e.g. meta.redpajama_set_name; "
                         "default: the input file's directory name")
    ap.add_argument("--domain-map", default=None, help="NAME=SHORT,... (default for RedPajama: short names)")
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    ap.add_argument("--skip-bad-lines", action="store_true", help="count malformed lines instead of stopping")
    ap.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        stats = tokenize_domains(args.input, args.out, args.tokenizer, args.seq_len, args.eval_sequences,
                                 domain_key=args.domain_key, domain_map=_parse_map(args.domain_map),
                                 text_key=args.text_key, workers=args.workers, skip_bad_lines=args.skip_bad_lines,
                                 overwrite=args.overwrite, compression=args.compression,
                                 progress=not args.no_progress)
    except (BadLineError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for d, s in stats["domains"].items():
        print(f"{d:>16}: train {s['train']['sequences']} seq, eval {s['eval']['sequences']} seq, "
              f"{s['input_docs']} docs")
    if stats["skipped_lines"]["total"]:
        print(f"skipped {stats['skipped_lines']['total']} bad lines: {stats['skipped_lines']['by_reason']}")
    return 0


if __name__ == "__main__":
    # Run the importable module's main so worker processes pickle `data_prep.tokenize_domains.*`
    # rather than `__main__.*` (spawned children import __main__ under another name).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from data_prep.tokenize_domains import main as _main

    sys.exit(_main())
