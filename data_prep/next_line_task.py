"""A local multiple-choice task for lm-evaluation-harness: which line comes next?

Each item takes a context (the lines before some line of a held-out document) and asks for the
true next line among 4: the true one and 3 distractor lines drawn from *other* documents of the
same domain, of a similar length (so that summing log-likelihoods does not simply favour the
shortest choice). A model that reads its context scores above chance (25%); one that does not,
at chance.

Inputs, per domain:
- a raw corpus: ``DIR/<domain>/*.jsonl`` (``{"text": ...}`` per line, as data_prep/local_corpus.py
  writes) or ``DIR/<domain>/*.txt`` (one document per file);
- or a tokenized MDS directory (data_prep/tokenize_domains.py): its ``eval`` split is decoded with
  the tokenizer and cut at EOS into documents. The last piece of each domain is dropped: it has
  no EOS because the rest of that document opens the train split.

``exclude`` (raw corpora or MDS directories, whose ``train`` split is read) is the training
data: documents found there are dropped, and so is every item whose last context line followed
by its answer occurs anywhere in it. Output (written to a temporary directory and renamed)::

    OUT/next_line_<domain>.jsonl   {"context", "choices", "label", "domain", "doc"} per item
    OUT/next_line_<domain>.yaml    lm-eval task over that file (multiple_choice; acc, acc_norm)
    OUT/next_line.yaml             lm-eval group "next_line" over all domains (acc weighted by size)
    OUT/task.json                  parameters and counts

Deterministic for a given seed and input. Use it with ``lm_eval --include_path OUT --tasks
next_line`` or ``python -m composer_sheared.evaluate MODEL --tasks next_line --include-path OUT``.

    python -m data_prep.next_line_task --source runs/demo/heldout --exclude runs/demo/corpus \\
        --out runs/demo/next_line --items 160
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from composer_sheared.storage.atomic import atomic_directory

__all__ = ["Doc", "read_raw_corpus", "read_mds_split", "read_documents", "make_items",
           "build_next_line_task", "GROUP", "main"]

GROUP = "next_line"
NUM_CHOICES = 4


@dataclass(frozen=True)
class Doc:
    id: str  # "file:line" (raw) or "mds:<split>/<domain>#k" (decoded)
    text: str


# ---------------------------------------------------------------------------------------------
# Reading documents


def read_raw_corpus(root: str) -> dict[str, list[Doc]]:
    """``{domain: [Doc]}`` from ``root/<domain>/*.jsonl`` and ``root/<domain>/*.txt``."""
    out: dict[str, list[Doc]] = {}
    if not os.path.isdir(root):
        raise FileNotFoundError(f"corpus {root!r} is not a directory")
    for domain in sorted(os.listdir(root)):
        ddir = os.path.join(root, domain)
        if not os.path.isdir(ddir) or domain.startswith("."):
            continue
        docs = []
        for path in sorted(glob.glob(os.path.join(ddir, "*.jsonl"))):
            with open(path, "rb") as f:  # decoded line by line, so a bad one is named by its number
                for n, raw in enumerate(f, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raise ValueError(f"{path}:{n}: not UTF-8 ({err.reason} at byte {err.start})") from None
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' string ({err})") from None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{n}: 'text' must be a string, got {type(text).__name__}")
                    docs.append(Doc(f"{path}:{n}", text))
        for path in sorted(glob.glob(os.path.join(ddir, "*.txt"))):
            with open(path, encoding="utf-8", errors="replace") as f:
                docs.append(Doc(path, f.read()))
        if docs:
            out[domain] = docs
    if not out:
        raise ValueError(f"corpus {root!r} has no <domain>/*.jsonl or <domain>/*.txt documents")
    return out


def read_mds_split(mds_dir: str, tokenizer: Any, split: str = "eval") -> dict[str, list[Doc]]:
    """``{domain: [Doc]}``: each domain's ``split`` decoded and cut at EOS into documents.

    The piece after the last EOS is dropped: tokenize_domains packs one token stream per domain,
    so for the eval split that piece is the head of a document that goes on in the train split.
    """
    from composer_sheared.data.reader import MDSDirectory
    from data_prep.tokenize_domains import _eos_id, _load_tokenizer

    tok = _load_tokenizer(tokenizer)
    eos = _eos_id(tok)
    base = os.path.join(mds_dir, split)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"MDS directory {mds_dir!r} has no {split!r} split ({base})")
    out: dict[str, list[Doc]] = {}
    for domain in sorted(os.listdir(base)):
        if not os.path.isfile(os.path.join(base, domain, "index.json")):
            continue
        mds = MDSDirectory(os.path.join(base, domain))
        ids = [int(t) for i in range(len(mds)) for t in mds[i]["tokens"]]
        pieces, cur = [], []
        for t in ids:
            if t == eos:
                pieces.append(cur)
                cur = []
            else:
                cur.append(t)
        # `cur` (no EOS after it) is the unfinished document: dropped.
        docs = [Doc(f"mds:{split}/{domain}#{k}", tok.decode(p)) for k, p in enumerate(pieces) if p]
        if docs:
            out[domain] = docs
    if not out:
        raise ValueError(f"no complete documents in {base} (need <domain>/index.json MDS shards)")
    return out


def read_documents(path: str, tokenizer: Any = None, split: str = "eval") -> dict[str, list[Doc]]:
    """A raw corpus directory or, when ``path/<split>`` holds MDS shards, a tokenized one."""
    if os.path.isdir(os.path.join(path, split)) and glob.glob(os.path.join(path, split, "*", "index.json")):
        if tokenizer is None:
            raise ValueError(f"{path!r} is a tokenized MDS directory: pass --tokenizer to decode it")
        return read_mds_split(path, tokenizer, split)
    return read_raw_corpus(path)


# ---------------------------------------------------------------------------------------------
# Items


@dataclass
class Params:
    items: int = 160
    seed: int = 0
    context_lines: int = 8
    max_context_chars: int = 600
    min_line_chars: int = 16
    max_line_chars: int = 160
    max_items_per_doc: int = 2


def _good(line: str, p: Params) -> bool:
    s = line.strip()
    # a line needs some letters or digits to be a meaningful answer ("----" or "}" are not)
    return p.min_line_chars <= len(s) and len(line) <= p.max_line_chars and sum(c.isalnum() for c in s) >= 4


def _context(lines: list[str], i: int, p: Params) -> str:
    ctx = lines[max(0, i - p.context_lines):i]
    while len(ctx) > 1 and len("\n".join(ctx)) > p.max_context_chars:
        ctx = ctx[1:]  # drop whole lines from the left
    text = "\n".join(ctx)
    return text[-p.max_context_chars:]


def make_items(domain: str, docs: Sequence[Doc], n: int, p: Params, train_text: str = "",
               train_docs: frozenset = frozenset()) -> list[dict]:
    """``n`` items for one domain (ValueError naming the domain when the documents allow fewer)."""
    rng = random.Random(f"{p.seed}:{domain}")  # str seeds hash with sha512: stable across runs
    docs = [d for d in docs if d.text.strip() not in train_docs]
    lines = [[ln.rstrip() for ln in d.text.replace("\r\n", "\n").split("\n")] for d in docs]
    # the distractor pool: every good line, with the documents it occurs in
    owners: dict[str, set[int]] = {}
    for k, ls in enumerate(lines):
        for ln in ls:
            if _good(ln, p):
                owners.setdefault(ln, set()).add(k)
    pool = sorted(owners, key=lambda s: (len(s), s))
    order = list(range(len(docs)))
    rng.shuffle(order)
    # spread the items over the documents; few documents each give more
    per_doc = max(p.max_items_per_doc, -(-n // max(len(docs), 1)))
    items: list[dict] = []
    for k in order:
        if len(items) >= n:
            break
        ls = lines[k]
        cands = [i for i in range(1, len(ls)) if _good(ls[i], p) and any(x.strip() for x in ls[max(0, i - p.context_lines):i])]
        rng.shuffle(cands)
        taken = 0
        for i in cands:
            if taken >= per_doc or len(items) >= n:
                break
            answer, context = ls[i], _context(ls, i, p)
            last = context.rsplit("\n", 1)[-1]
            if train_text and f"{last}\n{answer}" in train_text:
                continue  # this transition is in the training data: not held out
            own = set(ls)
            others = [s for s in pool if k not in owners[s] and s not in own]
            near = [s for s in others if abs(len(s) - len(answer)) <= max(8, len(answer) // 4)]
            if len(near) < NUM_CHOICES - 1:
                near = sorted(others, key=lambda s: (abs(len(s) - len(answer)), s))[:2 * (NUM_CHOICES - 1)]
            if len(near) < NUM_CHOICES - 1:
                continue
            choices = rng.sample(near, NUM_CHOICES - 1)
            label = rng.randrange(NUM_CHOICES)
            choices.insert(label, answer)
            items.append({"context": context, "choices": choices, "label": label, "domain": domain,
                          "doc": docs[k].id})
            taken += 1
    if len(items) < n:
        raise ValueError(f"domain {domain!r}: only {len(items)} next-line items could be built from "
                         f"{len(docs)} held-out documents, {n} were asked for; lower --items or give "
                         f"more documents")
    return items


# ---------------------------------------------------------------------------------------------
# Writing the task


def _task_yaml(task: str, data_file: str) -> str:
    # JSON strings are valid YAML scalars: safe quoting for paths and templates.
    q = json.dumps
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {q(data_file)}",
        "test_split: test",
        "output_type: multiple_choice",
        f"doc_to_text: {q('{{context}}')}",
        f"doc_to_choice: {q('{{choices}}')}",
        f"doc_to_target: {q('{{label}}')}",
        # the answer is the *next line*: it follows the context after a newline, not a space
        f"target_delimiter: {q(chr(10))}",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def _group_yaml(tasks: Sequence[str]) -> str:
    return "\n".join([
        f"group: {GROUP}",
        "task:", *[f"  - {t}" for t in tasks],
        "aggregate_metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    weight_by_size: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    weight_by_size: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def _train_corpus(exclude: Iterable[str], tokenizer: Any) -> tuple[str, frozenset]:
    texts = []
    for path in exclude:
        for docs in read_documents(path, tokenizer, split="train").values():
            texts += [d.text.replace("\r\n", "\n") for d in docs]
    # MDS train pieces are cut at sequence/EOS boundaries; the substring test on the joined text
    # catches transitions inside them as well as whole documents.
    return "\n".join(texts), frozenset(t.strip() for t in texts)


def build_next_line_task(out: str, documents: Mapping[str, Sequence[Doc]], items: int = 160, seed: int = 0,
                         exclude_text: str = "", exclude_docs: frozenset = frozenset(),
                         **params: Any) -> dict:
    """Write the task to ``out`` (see the module docstring); returns the task.json summary.

    ``items`` is the total, split evenly over the domains of ``documents``.
    """
    if items < len(documents) or not documents:
        raise ValueError(f"items={items} must be at least the number of domains ({len(documents)})")
    p = Params(items=items, seed=seed, **params)
    domains = sorted(documents)
    per = [items // len(domains) + (i < items % len(domains)) for i in range(len(domains))]
    tasks, counts = [], {}
    with atomic_directory(out) as tmp:
        for domain, n in zip(domains, per):
            its = make_items(domain, documents[domain], n, p, exclude_text, exclude_docs)
            task = f"{GROUP}_{domain}"
            data = os.path.join(os.path.abspath(out), f"{task}.jsonl")  # the final path, after the rename
            with open(os.path.join(tmp, f"{task}.jsonl"), "w", encoding="utf-8") as f:
                for it in its:
                    f.write(json.dumps(it, ensure_ascii=False) + "\n")
            with open(os.path.join(tmp, f"{task}.yaml"), "w", encoding="utf-8") as f:
                f.write(_task_yaml(task, data))
            tasks.append(task)
            counts[domain] = len(its)
        with open(os.path.join(tmp, f"{GROUP}.yaml"), "w", encoding="utf-8") as f:
            f.write(_group_yaml(tasks))
        summary = {"group": GROUP, "tasks": tasks, "items": counts, "params": asdict(p),
                   "excluded_training_docs": len(exclude_docs)}
        with open(os.path.join(tmp, "task.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def build_from_paths(out: str, sources: Sequence[str], exclude: Sequence[str] = (), tokenizer: Any = None,
                     items: int = 160, seed: int = 0, domains: Optional[Sequence[str]] = None,
                     **params: Any) -> dict:
    """``build_next_line_task`` over raw-corpus / MDS directories (MDS: the ``eval`` split)."""
    documents: dict[str, list[Doc]] = {}
    for src in sources:
        for dom, docs in read_documents(src, tokenizer, split="eval").items():
            documents.setdefault(dom, []).extend(docs)
    if domains:
        missing = sorted(set(domains) - set(documents))
        if missing:
            raise ValueError(f"domains {missing} not found in {list(sources)}; found {sorted(documents)}")
        documents = {d: documents[d] for d in domains}
    text, docs = _train_corpus(exclude, tokenizer) if exclude else ("", frozenset())
    return build_next_line_task(out, documents, items, seed, text, docs, **params)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Build the local next-line multiple-choice task for lm-eval.")
    ap.add_argument("--source", nargs="+", required=True,
                    help="raw corpus dir(s) (<domain>/*.jsonl|*.txt) or tokenized MDS dir(s) (eval split)")
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="the training data: raw corpus dir(s) or MDS dir(s) (train split)")
    ap.add_argument("--tokenizer", help="HF tokenizer dir, needed for MDS inputs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--items", type=int, default=160, help="total items, split evenly over the domains")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domains", nargs="*")
    ap.add_argument("--context-lines", type=int, default=Params.context_lines)
    ap.add_argument("--max-context-chars", type=int, default=Params.max_context_chars)
    args = ap.parse_args(argv)
    try:
        s = build_from_paths(args.out, args.source, args.exclude, args.tokenizer, args.items, args.seed,
                             args.domains, context_lines=args.context_lines,
                             max_context_chars=args.max_context_chars)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{sum(s['items'].values())} items ({', '.join(f'{d} {n}' for d, n in s['items'].items())}) -> "
          f"{args.out}; run with --include-path {args.out} --tasks {GROUP}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
