"""Build a few JSONL text domains from files every Debian + Python machine has.

Domains (each written to ``OUT/<domain>/<domain>.jsonl``, one ``{"text", "meta"}`` per file, so
``tokenize_domains`` can take the domain from the directory name):

- ``code``: the Python standard library's ``.py`` sources;
- ``legal``: license and copyright texts (``/usr/share/doc/*/copyright``,
  ``/usr/share/common-licenses``, ``LICENSE*``/``COPYING*`` in site-packages);
- ``docs``: Markdown / reST files (``/usr/share/doc``, site-packages);
- ``changelog``: package changelogs (``/usr/share/doc/*/changelog*``, gzip or plain).

Deterministic on a given machine: directories are walked in sorted order and every domain
stops at a byte cap. A domain that finds nothing is an error naming where it looked.

    python -m data_prep.local_corpus --out corpus/ --max-bytes 2000000
"""
from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import os
import site
import sys
import sysconfig
from typing import Callable, Iterator, Optional, Sequence

__all__ = ["DOMAINS", "default_roots", "build_local_corpus", "main"]

DOMAINS = ("code", "legal", "docs", "changelog")

_SKIP_DIRS = {"__pycache__", ".git", "node_modules"}


def _site_dirs() -> list[str]:
    dirs = []
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # old virtualenvs
        pass
    dirs.append(sysconfig.get_paths()["purelib"])
    return sorted({d for d in dirs if os.path.isdir(d)})


def default_roots() -> dict[str, list[str]]:
    stdlib = sysconfig.get_paths()["stdlib"]
    doc = "/usr/share/doc"
    return {
        "code": [stdlib],
        "legal": [doc, "/usr/share/common-licenses", *_site_dirs()],
        "docs": [doc, *_site_dirs()],
        "changelog": [doc],
    }


def _matcher(domain: str) -> Callable[[str, str], bool]:
    """(root, path) -> whether the file belongs to the domain."""
    def code(root: str, path: str) -> bool:
        # The stdlib root may contain site-packages (system Python): that is not the stdlib.
        rel = os.path.relpath(path, root).split(os.sep)
        return path.endswith(".py") and "site-packages" not in rel and "dist-packages" not in rel

    def legal(root: str, path: str) -> bool:
        name = os.path.basename(path)
        if root == "/usr/share/common-licenses":
            return True
        if name == "copyright":
            return True
        return any(fnmatch.fnmatch(name.upper(), pat) for pat in ("LICENSE*", "LICENCE*", "COPYING*"))

    def docs(root: str, path: str) -> bool:
        name = os.path.basename(path).lower()
        return name.endswith((".md", ".rst", ".md.gz", ".rst.gz"))

    def changelog(root: str, path: str) -> bool:
        return os.path.basename(path).lower().startswith("changelog")

    return {"code": code, "legal": legal, "docs": docs, "changelog": changelog}[domain]


def _walk(root: str) -> Iterator[str]:
    if os.path.isfile(root):
        yield root
        return
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for f in sorted(files):
            yield os.path.join(dirpath, f)


def _read_text(path: str, max_doc_bytes: int) -> Optional[str]:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read(max_doc_bytes + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(max_doc_bytes + 1)
    except (OSError, EOFError):
        return None  # unreadable, broken symlink, truncated gzip: not text we want
    if b"\0" in data:
        return None  # binary
    data = data[:max_doc_bytes]
    text = data.decode("utf-8", errors="ignore").strip()
    return text or None


def build_local_corpus(out: str, domains: Sequence[str] = DOMAINS, max_bytes_per_domain: int = 2_000_000,
                       max_doc_bytes: int = 64_000, roots: Optional[dict[str, list[str]]] = None) -> dict:
    """Write ``out/<domain>/<domain>.jsonl`` for each domain; returns ``{domain: {docs, bytes, path}}``.

    ``roots`` overrides where each domain looks (``{domain: [dir or file, ...]}``); a domain with
    no document raises ``ValueError`` naming the domain and its roots.
    """
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; known: {list(DOMAINS)}")
    if max_bytes_per_domain <= 0 or max_doc_bytes <= 0:
        raise ValueError("max_bytes_per_domain and max_doc_bytes must be positive")
    all_roots = default_roots()
    if roots:
        all_roots.update(roots)
    summary = {}
    for domain in domains:
        match = _matcher(domain)
        path = os.path.join(out, domain, f"{domain}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        docs = size = 0
        seen = set()
        with open(tmp, "w", encoding="utf-8") as f:
            for root in all_roots.get(domain, []):
                if not os.path.exists(root):
                    continue
                for file in _walk(root):
                    real = os.path.realpath(file)
                    if real in seen or not match(root, file) or not os.path.isfile(real):
                        continue
                    seen.add(real)
                    text = _read_text(file, max_doc_bytes)
                    if text is None:
                        continue
                    line = json.dumps({"text": text, "meta": {"domain": domain, "source": file}}, ensure_ascii=False)
                    n = len(text.encode("utf-8"))
                    if size + n > max_bytes_per_domain and docs:
                        break
                    f.write(line + "\n")
                    docs += 1
                    size += n
                    if size >= max_bytes_per_domain:
                        break
                if size >= max_bytes_per_domain:
                    break
        if docs == 0:
            os.unlink(tmp)
            raise ValueError(f"local corpus domain {domain!r} is empty: no readable text files under "
                             f"{all_roots.get(domain, [])}")
        os.replace(tmp, path)
        summary[domain] = {"docs": docs, "bytes": size, "path": path}
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Build JSONL text domains from files on this machine.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    ap.add_argument("--max-bytes", type=int, default=2_000_000, help="text bytes per domain (cap)")
    ap.add_argument("--max-doc-bytes", type=int, default=64_000, help="longer files are truncated")
    args = ap.parse_args(argv)
    try:
        summary = build_local_corpus(args.out, args.domains, args.max_bytes, args.max_doc_bytes)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for d, s in summary.items():
        print(f"{d:>10}: {s['docs']} docs, {s['bytes']} bytes -> {s['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
