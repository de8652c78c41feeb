"""Downloads of remote data files that cannot hang, fail by name, and happen once per node.

Streaming's S3 client waits up to 60 s per read with botocore's and s3transfer's own retries
on top of its ``download_retry``: a stalled server hangs a reader for many minutes, and every
DataLoader worker that needs a shard downloads it itself. ``fetch`` bounds the total:
``attempts`` tries of at most ``timeout`` seconds per connect or read (no retries hidden below
it), then ``RemoteDataError`` naming the remote file; a file missing on the remote is a
``FileNotFoundError`` at once. A file lock beside the local copy makes other processes on the
node wait for the first one's download (and reuse it), and the file appears under its name
only when complete (temp file, then rename).

Core layer: streaming, boto3 and filelock only, no Composer.
"""
from __future__ import annotations

import contextlib
import glob
import os
import time
import urllib.parse
from typing import Optional

from filelock import FileLock, Timeout

from composer_sheared.defaults import DOWNLOAD_RETRY, DOWNLOAD_TIMEOUT

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_ATTEMPTS", "RemoteDataError", "fetch", "remote_join"]

DEFAULT_TIMEOUT = DOWNLOAD_TIMEOUT  # seconds per connect or read of one attempt
DEFAULT_ATTEMPTS = DOWNLOAD_RETRY + 1
BACKOFF = 0.5  # seconds before the second attempt, doubled after each failure

_S3_MISSING = {"404", "NoSuchKey", "NotFound"}
_clients: dict = {}
# endpoint -> (time.monotonic(), message) of its last fetch that ran out of attempts. A reader
# stops at its first such error anyway; without this, each DataLoader worker would spend the full
# bound on every item it had prefetched before it sees the shutdown, and the process would wait
# for that at exit.
_DOWN: dict[str, tuple[float, str]] = {}
DOWN_S = 60.0


class RemoteDataError(OSError):
    """A remote data file could not be downloaded within the bound (the message names it)."""


def remote_join(remote: str, *parts: str) -> str:
    """``remote`` joined with ``parts`` using ``/`` (a URL, or a local directory standing in for one)."""
    parts = tuple(p for p in parts if p)
    if "://" in remote:
        return "/".join([remote.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(remote, *parts)


def _s3_client(timeout: float):
    """A boto3 client per (process, timeout): nothing retried below ``fetch``'s own attempts."""
    key = (os.getpid(), float(timeout), os.environ.get("S3_ENDPOINT_URL"))
    if key not in _clients:
        from boto3.session import Session
        from botocore.config import Config

        config = Config(connect_timeout=timeout, read_timeout=timeout,
                        retries={"mode": "standard", "total_max_attempts": 1})
        _clients[key] = Session().client("s3", config=config, endpoint_url=key[2])
    return _clients[key]


def _download_once(remote: str, tmp: str, timeout: float) -> None:
    """One attempt; FileNotFoundError when the remote has no such file."""
    scheme = urllib.parse.urlparse(remote).scheme
    if scheme == "s3":
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import ClientError

        url = urllib.parse.urlparse(remote)
        try:
            _s3_client(timeout).download_file(url.netloc, url.path.lstrip("/"), tmp,
                                              Config=TransferConfig(use_threads=False, num_download_attempts=1))
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in _S3_MISSING:
                raise FileNotFoundError(f"{remote}: no such file on the remote") from None
            raise
    elif scheme in ("", "file"):
        import shutil

        path = urllib.parse.urlparse(remote).path if scheme else remote
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{remote}: no such file on the remote")
        shutil.copyfile(path, tmp)
    else:  # gs, oci, azure, hf, ...: Streaming's downloader, under the same bound of attempts
        from streaming.base.storage.download import CloudDownloader

        CloudDownloader.direct_download(remote, tmp, timeout)


def fetch(remote: str, local: str, timeout: float = DEFAULT_TIMEOUT, attempts: int = DEFAULT_ATTEMPTS) -> str:
    """Download ``remote`` to ``local`` unless it is there already; returns ``local``.

    At most ``attempts`` tries of ``timeout`` seconds per connect or read each, with a short
    backoff between them; raises ``FileNotFoundError`` (the remote has no such file) or
    ``RemoteDataError`` (no complete answer within the bound), both naming ``remote``.
    """
    if attempts < 1:
        raise ValueError(f"download attempts must be >= 1, got {attempts}")
    if timeout <= 0:
        raise ValueError(f"download timeout must be positive, got {timeout}")
    if os.path.isfile(local):
        return local
    url = urllib.parse.urlparse(remote)
    endpoint = f"{url.scheme}://{url.netloc} at {os.environ.get('S3_ENDPOINT_URL') or 'its default endpoint'}"
    if endpoint in _DOWN and time.monotonic() - _DOWN[endpoint][0] < DOWN_S:
        raise RemoteDataError(f"{remote}: not tried: {endpoint} gave no answer "
                              f"{time.monotonic() - _DOWN[endpoint][0]:.0f}s ago ({_DOWN[endpoint][1]})")
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    with _node_lock(remote, local, attempts * (2 * timeout + BACKOFF * 2 ** attempts) + 5):
        if os.path.isfile(local):  # another process on this node downloaded it meanwhile
            return local
        tmp = f"{local}.{os.getpid()}.tmp"
        last: Optional[BaseException] = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(BACKOFF * 2 ** (attempt - 1))
            try:
                _download_once(remote, tmp, timeout)
                os.replace(tmp, local)
                _DOWN.pop(endpoint, None)
                return local
            except FileNotFoundError:
                raise
            except Exception as err:  # noqa: BLE001 - any transport error is retried, then named
                last = err
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        _DOWN[endpoint] = (time.monotonic(), f"{type(last).__name__}: {last}")
        raise RemoteDataError(f"{remote}: no complete download in {attempts} attempt(s) of at most "
                              f"{timeout:g}s per connect or read ({type(last).__name__}: {last})") from last


@contextlib.contextmanager
def _node_lock(remote: str, local: str, stall: float):
    """Hold ``<local>.lock``; while another process holds it, wait as long as its partial download
    (``<local>.*`` temp files) keeps growing, and give up after ``stall`` seconds without growth
    (a download of any size may take long; one that stopped moving is stuck)."""
    lock = FileLock(local + ".lock")
    seen, moved = None, time.monotonic()
    while True:
        try:
            lock.acquire(timeout=min(1.0, stall))
            break
        except Timeout:
            size = sum(os.path.getsize(p) for p in glob.glob(glob.escape(local) + ".*") if os.path.isfile(p))
            if size != seen:
                seen, moved = size, time.monotonic()
            elif time.monotonic() - moved > stall:
                raise RemoteDataError(f"{remote}: another process downloading it to {local} made no progress "
                                      f"for {stall:g}s") from None
    try:
        yield
    finally:
        lock.release()
