"""Copy an object-store prefix to a local directory, and a local directory to an object store.

    composer-sheared fetch s3://bucket/models/Llama-2-7b-hf /tmp/models/Llama-2-7b-hf

Any store Composer reaches by URI works (s3://, gs://, oci://, azure://; `S3_ENDPOINT_URL` points
s3:// at another S3-compatible server). The local directory appears only when it is complete: files
are downloaded into `.<name>.fetch-partial/` beside it, which is renamed at the end. A rerun skips a
complete directory without listing the store again, and after an interruption keeps the files that
the partial directory already holds in full, so a killed multi-GB download resumes.
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

__all__ = ["FetchError", "download_prefix", "list_names", "upload_directory", "upload_file", "is_uri", "uri_scheme",
           "store_schemes", "MANIFEST"]

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


def _store(uri: str):
    """(Composer ObjectStore, object-name prefix without slashes) for `uri`."""
    from composer.utils import maybe_create_object_store_from_uri, parse_uri

    try:
        store = maybe_create_object_store_from_uri(uri)
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


def list_names(uri: str) -> list[str]:
    """The relative names of the objects under `uri` ([] for an empty prefix); FetchError when
    the store cannot be listed."""
    store, prefix = _store(uri)
    return sorted(_list(uri, store, prefix))


def _list(uri: str, store, prefix: str) -> dict[str, str]:
    """{relative path: object name} of every object under the prefix."""
    listed = f"{prefix}/" if prefix else ""  # the slash keeps models/a from matching models/a-chat
    try:
        names = store.list_objects(listed)
    except Exception as err:  # noqa: BLE001 - boto/oci/gcs raise their own types for a missing bucket
        raise FetchError(uri, f"cannot list the objects ({type(err).__name__}: {err})") from None
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


def download_prefix(uri: str, local_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Copy every object under `uri` to `local_dir` (its relative paths kept); returns `local_dir`.

    Skips when `local_dir` already holds a complete download of `uri`. Raises FetchError when the
    prefix is empty or unreachable, or when `local_dir` exists but holds something else."""
    from composer.utils import S3ObjectStore
    from tqdm import tqdm

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
        store, prefix = _store(uri)
        objects = _list(uri, store, prefix)
        if not objects:
            raise FetchError(uri, "no objects under this prefix (check the bucket and path)")
        try:
            sizes = {rel: _object_size(store, name) for rel, name in objects.items()}
        except Exception as err:  # noqa: BLE001
            raise FetchError(uri, f"cannot read the object sizes ({type(err).__name__}: {err})") from None
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
                    cb = (lambda n, _total: bar.update(n)) if isinstance(store, S3ObjectStore) else None
                    try:
                        store.download_object(objects[rel], dest, overwrite=True, callback=cb)
                    except Exception as err:  # noqa: BLE001
                        raise FetchError(f"{uri}/{rel}", f"download failed ({type(err).__name__}: {err}); "
                                                         "rerun to resume") from None
                done += max(size, 0)
                bar.n = done
                bar.refresh()
        (partial / MANIFEST).write_text(json.dumps({"uri": uri, "files": sizes}, indent=1))
        os.rename(partial, local_dir)
    return local_dir


def upload_file(local_file: str | os.PathLike, uri: str) -> str:
    """Upload one file to the object name `uri`; returns `uri`."""
    store, name = _store(uri)
    try:
        store.upload_object(name, str(local_file))
    except Exception as err:  # noqa: BLE001
        raise FetchError(uri, f"upload of {local_file} failed ({type(err).__name__}: {err})") from None
    return uri


def upload_directory(local_dir: str | os.PathLike, uri: str, progress: bool = True) -> str:
    """Upload every file under `local_dir` to `<uri>/<relative path>`; returns `uri`.

    config.json goes last: a prefix that has it also has the weights (object stores have no
    atomic rename, and readers of a HF directory look for config.json first)."""
    from tqdm import tqdm

    local_dir, uri = Path(local_dir), uri.rstrip("/")
    files = sorted((p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST),
                   key=lambda p: (p.name == "config.json", str(p)))
    if not files:
        raise FetchError(str(local_dir), "no files to upload")
    store, prefix = _store(uri)
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc=f"upload {uri}",
              disable=not progress) as bar:
        for p in files:
            rel = p.relative_to(local_dir).as_posix()
            try:
                store.upload_object(f"{prefix}/{rel}" if prefix else rel, str(p))
            except Exception as err:  # noqa: BLE001
                raise FetchError(f"{uri}/{rel}", f"upload failed ({type(err).__name__}: {err})") from None
            bar.update(p.stat().st_size)
    return uri


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="composer-sheared fetch",
                                 description="Copy an object-store prefix (s3://, gs://, oci://, azure://) to a "
                                             "local directory; a complete directory is left as it is.")
    ap.add_argument("uri", help="e.g. s3://bucket/models/Llama-2-7b-hf")
    ap.add_argument("local_dir", help="created when the download is complete")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = download_prefix(args.uri, args.local_dir, progress=not args.no_progress)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"[fetch] {args.uri} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
