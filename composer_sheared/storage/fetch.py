"""Copy an object-store prefix to a local directory, and a local directory to an object store.

    composer-sheared fetch s3://bucket/models/Llama-2-7b-hf /tmp/models/Llama-2-7b-hf

Any store Composer reaches by URI works (s3://, gs://, oci://, azure://; `S3_ENDPOINT_URL` points
s3:// at another S3-compatible server). The local directory appears only when it is complete: files
are downloaded into `.<name>.fetch-partial/` beside it, which is renamed at the end. A rerun skips a
complete directory without listing the store again, and after an interruption keeps the files that
the partial directory already holds in full, so a killed multi-GB download resumes.

Every transfer is bounded, as the data downloads are (`composer_sheared.data.remote`; the same
defaults, from `composer_sheared.defaults`): for s3:// each request gets at most `attempts` tries of at most `timeout` seconds
per connect or read, and so does each part of a download whose body stops arriving (boto3's own
retries are adaptive and unbounded in time: a stalled server would hang a launch for many minutes
with no message). Running out is a FetchError naming the object and the bound. Other stores keep
their SDK's defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional

from composer_sheared.defaults import DOWNLOAD_RETRY, DOWNLOAD_TIMEOUT

__all__ = ["FetchError", "download_prefix", "list_names", "upload_directory", "upload_file", "is_uri", "uri_scheme",
           "store_schemes", "can_delete", "delete_names", "MANIFEST"]

# Written last into a downloaded directory: which URI it holds and each file's size.
MANIFEST = ".fetch-manifest.json"
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class FetchError(RuntimeError):
    """A transfer that cannot be done; str() is `<uri or path>: <what went wrong>`."""

    def __init__(self, where: str, message: str):
        self.where, self.message = str(where), message
        super().__init__(f"{where}: {message}")


def is_uri(path: Optional[str]) -> bool:
    """Whether `path` names an object store (`scheme://...`) rather than a local path."""
    return bool(path) and bool(_URI.match(str(path)))


def uri_scheme(path: str) -> Optional[str]:
    m = _URI.match(str(path))
    return m.group(1) if m else None


def store_schemes() -> list[str]:
    """The URI schemes Composer has an object store for."""
    from composer.utils.file_helpers import BACKEND_TO_OBJECT_STORE_FACTORY

    return sorted(BACKEND_TO_OBJECT_STORE_FACTORY)


class _Bounds:
    """The bound on every request of one transfer, and how it reads in an error message."""

    def __init__(self, timeout: Optional[float] = None, attempts: Optional[int] = None):
        self.timeout = float(DOWNLOAD_TIMEOUT if timeout is None else timeout)
        self.attempts = int(DOWNLOAD_RETRY + 1 if attempts is None else attempts)
        if not self.timeout > 0:
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout}")
        if self.attempts < 1:
            raise ValueError(f"attempts: expected an integer >= 1, got {attempts}")

    def s3_store(self, bucket: str):
        from composer.utils import S3ObjectStore

        # standard mode: a fixed number of tries with a short backoff (adaptive mode also waits
        # on a client-side rate limiter); total_max_attempts counts the first try, max_attempts
        # would not. num_download_attempts: s3transfer's retries of a body read that timed out.
        return S3ObjectStore(bucket=bucket, client_config={
            "connect_timeout": self.timeout, "read_timeout": self.timeout,
            "retries": {"mode": "standard", "total_max_attempts": self.attempts}},
            transfer_config={"num_download_attempts": self.attempts})

    def failed(self, store, what: str, err: BaseException) -> str:
        """`<what>: <why>`, where a timeout or lost connection on a bounded store names the bound."""
        cause = getattr(err, "last_exception", None) or err  # boto3's RetriesExceededError wraps it
        detail = f"{type(cause).__name__}: {cause}"
        if _bounded(store) and _is_transport_error(err):
            return (f"{what}: no complete answer in {self.attempts} attempt(s) of at most {self.timeout:g}s per "
                    f"connect or read ({detail})")
        return f"{what} ({detail})"


def _bounded(store) -> bool:
    from composer.utils import S3ObjectStore

    return isinstance(store, S3ObjectStore)


def _is_transport_error(err: BaseException) -> bool:
    """A connect or read that timed out or broke off, as botocore and s3transfer raise it."""
    from boto3.exceptions import RetriesExceededError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

    return isinstance(err, (BotoConnectionError, HTTPClientError, IncompleteReadError, RetriesExceededError,
                            TransferRetriesExceededError, TimeoutError, ConnectionError))


def _store(uri: str, bounds: Optional[_Bounds] = None):
    """(Composer ObjectStore, object-name prefix without slashes) for `uri`."""
    from composer.utils import maybe_create_object_store_from_uri, parse_uri

    bounds = bounds or _Bounds()
    try:
        backend, bucket, _ = parse_uri(uri)
        store = bounds.s3_store(bucket) if backend == "s3" else maybe_create_object_store_from_uri(uri)
    except NotImplementedError:
        raise FetchError(uri, "unsupported object store; expected " + ", ".join(f"{s}://" for s in store_schemes())
                         ) from None
    except Exception as err:  # noqa: BLE001 - the store's client cannot be created (credentials, SDK)
        raise FetchError(uri, f"cannot open the object store ({type(err).__name__}: {err})") from None
    if store is None:
        raise FetchError(uri, "expected an object-store URI such as s3://bucket/prefix")
    return store, parse_uri(uri)[2].strip("/")


def _object_size(store, name: str) -> int:
    try:
        return int(store.get_object_size(name))
    except NotImplementedError:
        return -1  # this store cannot tell; the file is taken as complete when present


def list_names(uri: str, timeout: Optional[float] = None, attempts: Optional[int] = None) -> list[str]:
    """The relative names of the objects under `uri` ([] for an empty prefix); FetchError when
    the store cannot be listed."""
    bounds = _Bounds(timeout, attempts)
    store, prefix = _store(uri, bounds)
    return sorted(_list(uri, store, prefix, bounds))


def can_delete(uri: str) -> bool:
    """Whether delete_names can remove objects under `uri`: Composer's ObjectStore has no delete,
    so only s3:// can, through the boto3 client of its S3ObjectStore."""
    return uri_scheme(uri) == "s3"


def delete_names(uri: str, names, timeout: Optional[float] = None, attempts: Optional[int] = None) -> list[str]:
    """Delete the objects `<uri>/<name>` for the relative `names` (as list_names gives them), each
    request bounded as in download_prefix; returns their URIs. FetchError for a store other than
    s3:// (see can_delete) or a failed delete."""
    uri = uri.rstrip("/")
    if not can_delete(uri):
        raise FetchError(uri, f"cannot delete objects from a {uri_scheme(uri)}:// store (only from s3://)")
    bounds = _Bounds(timeout, attempts)
    store, prefix = _store(uri, bounds)
    deleted = []
    for rel in names:
        try:
            store.client.delete_object(Bucket=store.bucket, Key=store.get_key(f"{prefix}/{rel}" if prefix else rel))
        except Exception as err:  # noqa: BLE001
            raise FetchError(f"{uri}/{rel}", bounds.failed(store, "delete failed", err) + "; rerun to try again"
                             ) from None
        deleted.append(f"{uri}/{rel}")
    return deleted


def _list(uri: str, store, prefix: str, bounds: _Bounds) -> dict[str, str]:
    """{relative path: object name} of every object under the prefix."""
    listed = f"{prefix}/" if prefix else ""  # the slash keeps models/a from matching models/a-chat
    try:
        names = store.list_objects(listed)
    except Exception as err:  # noqa: BLE001 - boto/oci/gcs raise their own types for a missing bucket
        raise FetchError(uri, bounds.failed(store, "cannot list the objects", err) + "; rerun to try again"
                         ) from None
    out = {}
    for name in names:
        rel = name[len(listed):]
        if not rel or rel.endswith("/"):  # "folder" marker objects
            continue
        parts = PurePosixPath(rel).parts
        if rel.startswith("/") or ".." in parts:
            raise FetchError(uri, f"object {name!r} would be written outside the local directory")
        if parts[-1] == MANIFEST:
            continue
        out[rel] = name
    return out


def _complete(local_dir: Path, uri: str) -> bool:
    try:
        manifest = json.loads((local_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("uri") != uri.rstrip("/"):
        return False
    return all((local_dir / rel).is_file() and (size < 0 or (local_dir / rel).stat().st_size == size)
               for rel, size in manifest.get("files", {}).items())


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on `directory` itself (no lock file is left behind), so two processes
    fetching into it take turns."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _reuse_partial(partial: Path, uri: str, objects: dict) -> None:
    """Keep what an interrupted download of the same URI left in `partial`, minus files the prefix
    no longer has; anything else there (another URI's download) is removed."""
    try:
        same = json.loads((partial / MANIFEST).read_text()).get("uri") == uri
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        (partial / MANIFEST).write_text(json.dumps({"uri": uri, "files": None}))
        return
    for p in sorted(partial.rglob("*"), reverse=True):
        rel = p.relative_to(partial).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in objects:
            p.unlink()


def download_prefix(uri: str, local_dir: str | os.PathLike, progress: bool = True, timeout: Optional[float] = None,
                    attempts: Optional[int] = None) -> Path:
    """Copy every object under `uri` to `local_dir` (its relative paths kept); returns `local_dir`.

    Skips when `local_dir` already holds a complete download of `uri`. Raises FetchError when the
    prefix is empty or unreachable, when a request gets no answer in `attempts` tries of at most
    `timeout` seconds per connect or read (s3://; defaults: composer_sheared.defaults), or
    when `local_dir` exists but holds something else. The files complete before a failure stay
    in the partial directory, for a rerun to keep."""
    from tqdm import tqdm

    bounds = _Bounds(timeout, attempts)
    uri, local_dir = uri.rstrip("/"), Path(local_dir)
    if _complete(local_dir, uri):
        return local_dir
    partial = local_dir.parent / f".{local_dir.name}.fetch-partial"
    with _locked(local_dir.parent):
        if _complete(local_dir, uri):  # another process finished it while we waited
            return local_dir
        if local_dir.exists():
            raise FetchError(str(local_dir), f"exists but is not a complete download of {uri}; remove it or "
                                             "choose another directory")
        store, prefix = _store(uri, bounds)
        objects = _list(uri, store, prefix, bounds)
        if not objects:
            raise FetchError(uri, "no objects under this prefix (check the bucket and path)")
        sizes = {}
        for rel, name in objects.items():
            try:
                sizes[rel] = _object_size(store, name)
            except Exception as err:  # noqa: BLE001
                raise FetchError(f"{uri}/{rel}", bounds.failed(store, "cannot read the size", err) +
                                 "; rerun to try again") from None
        _reuse_partial(partial, uri, objects)
        total = sum(s for s in sizes.values() if s > 0)
        done = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetch {uri}", disable=not progress) as bar:
            for rel in sorted(objects):
                dest = partial / rel
                size = sizes[rel]
                if dest.is_file() and (size < 0 or dest.stat().st_size == size):
                    pass  # finished before an interruption: download_object renames only complete files
                else:
                    # boto3 reports the bytes of each chunk; other stores are counted per file
                    cb = (lambda n, _total: bar.update(n)) if _bounded(store) else None
                    try:
                        store.download_object(objects[rel], dest, overwrite=True, callback=cb)
                    except Exception as err:  # noqa: BLE001
                        raise FetchError(f"{uri}/{rel}", bounds.failed(store, "download failed", err) +
                                         "; rerun to resume") from None
                done += max(size, 0)
                bar.n = done
                bar.refresh()
        (partial / MANIFEST).write_text(json.dumps({"uri": uri, "files": sizes}, indent=1))
        os.rename(partial, local_dir)
    return local_dir


def upload_file(local_file: str | os.PathLike, uri: str, timeout: Optional[float] = None,
                attempts: Optional[int] = None) -> str:
    """Upload one file to the object name `uri`; returns `uri`."""
    bounds = _Bounds(timeout, attempts)
    store, name = _store(uri, bounds)
    try:
        store.upload_object(name, str(local_file))
    except Exception as err:  # noqa: BLE001
        raise FetchError(uri, bounds.failed(store, f"upload of {local_file} failed", err)) from None
    return uri


def upload_directory(local_dir: str | os.PathLike, uri: str, progress: bool = True, timeout: Optional[float] = None,
                     attempts: Optional[int] = None, delete_stale: bool = False) -> str:
    """Upload every file under `local_dir` to `<uri>/<relative path>`; returns `uri`. Each request is
    bounded as in download_prefix.

    config.json goes last: a prefix that has it also has the weights (object stores have no
    atomic rename, and readers of a HF directory look for config.json first). `delete_stale`:
    the prefix ends up holding exactly `local_dir`'s files; objects there that the upload does
    not write (an earlier upload's shards) are deleted before config.json goes up, and where the
    store cannot delete (see can_delete) it is a FetchError before anything is uploaded."""
    from tqdm import tqdm

    local_dir, uri = Path(local_dir), uri.rstrip("/")
    files = sorted((p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST),
                   key=lambda p: (p.name == "config.json", str(p)))
    if not files:
        raise FetchError(str(local_dir), "no files to upload")
    bounds = _Bounds(timeout, attempts)
    store, prefix = _store(uri, bounds)
    stale = []
    if delete_stale:
        stale = sorted(set(_list(uri, store, prefix, bounds)) - {p.relative_to(local_dir).as_posix() for p in files})
        if stale and not can_delete(uri):
            raise FetchError(uri, f"holds {len(stale)} object(s) this upload would not replace (e.g. {stale[0]}) "
                                  f"and a {uri_scheme(uri)}:// store cannot delete them; remove them or choose "
                                  "another folder")
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc=f"upload {uri}",
              disable=not progress) as bar:
        for p in files:
            if stale and p.name == "config.json":  # gone before the new config.json marks the prefix complete
                delete_names(uri, stale, timeout, attempts)
                stale = []
            rel = p.relative_to(local_dir).as_posix()
            try:
                store.upload_object(f"{prefix}/{rel}" if prefix else rel, str(p))
            except Exception as err:  # noqa: BLE001
                raise FetchError(f"{uri}/{rel}", bounds.failed(store, "upload failed", err)) from None
            bar.update(p.stat().st_size)
    if stale:  # no config.json in local_dir
        delete_names(uri, stale, timeout, attempts)
    return uri


def _positive(kind, expected: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" fallback
    return parse


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="composer-sheared fetch",
                                 description="Copy an object-store prefix (s3://, gs://, oci://, azure://) to a "
                                             "local directory; a complete directory is left as it is.")
    ap.add_argument("uri", help="e.g. s3://bucket/models/Llama-2-7b-hf")
    ap.add_argument("local_dir", help="created when the download is complete")
    ap.add_argument("--timeout", type=_positive(float, "a positive number of seconds"), default=DOWNLOAD_TIMEOUT,
                    metavar="SECONDS", help="per connect or read of one try (s3://; default %(default)g)")
    ap.add_argument("--attempts", type=_positive(int, "an integer >= 1"), default=DOWNLOAD_RETRY + 1, metavar="N",
                    help="tries of each request before the fetch fails (s3://; default %(default)d)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = download_prefix(args.uri, args.local_dir, progress=not args.no_progress, timeout=args.timeout,
                              attempts=args.attempts)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"[fetch] {args.uri} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
