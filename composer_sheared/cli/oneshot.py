"""One-shot structured pruning of a HF model directory to an exact target shape.

    composer-sheared oneshot SOURCE_DIR OUT_DIR --target sheared-1.3b \\
        --method importance --data MDS_DIR [--domains a,b] [--calib-batches 16] [--seed 0]
    composer-sheared oneshot SOURCE_DIR OUT_DIR \\
        --target num_layers=24,hidden_size=512 --method random --seed 0

Methods: ``importance`` (activation statistics over calibration batches drawn round-robin from
the per-domain MDS shards at DATA/<split>/<domain>, as written by data_prep/tokenize_domains.py),
``random`` (seeded) and ``magnitude`` (weight norms; both need no data). The output is a plain HF
directory of exactly the target config, with the source's tokenizer when it has one, written to
a temporary directory and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from composer_sheared.storage.atomic import atomic_directory
from composer_sheared.pruning.importance import LAYER_METRICS
from composer_sheared.pruning.oneshot import METHODS, method_scores, oneshot_prune
from composer_sheared.shapes import NAMED_SHAPES, ModelShape, resolve_target

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _fail(msg: str) -> "NoReturn":  # noqa: F821
    raise SystemExit(f"error: {msg}")


def parse_target(text: str) -> Any:
    """A shape name, or ``field=int,field=int,...`` (missing fields stay the source's)."""
    if "=" not in text:
        if text not in NAMED_SHAPES:
            _fail(f"--target {text!r} is neither a known shape name {sorted(NAMED_SHAPES)} nor field=value pairs")
        return text
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            _fail(f"--target: {part!r} is not field=value")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            _fail(f"--target: {key.strip()}={value!r} is not an integer")
    return out


def resolve_domains(data: str | Path, domains: Sequence[str] | None, split: str = "train") -> list[str]:
    """The calibration domains (default: every domain with an MDS index), checked to exist."""
    root = Path(data)
    if not (root / split).is_dir():
        _fail(f"--data {root}: no '{split}' split directory at {root / split} (run data_prep/tokenize_domains.py)")
    if not domains:
        domains = sorted(p.name for p in (root / split).iterdir() if (p / "index.json").is_file())
        if not domains:
            _fail(f"--data {root}: no domain with an MDS index.json under {root / split}")
    for dom in domains:
        if not (root / split / dom / "index.json").is_file():
            _fail(f"--domains: domain {dom!r} has no MDS index at {root / split / dom / 'index.json'}")
    return list(domains)


def _check_data_vocab(data: Path, vocab_size: int, source_dir: Path) -> None:
    """Token ids past the model's embeddings would end as an IndexError inside the first forward."""
    stats = data / "stats.json"
    try:
        vocab = json.loads(stats.read_text()).get("vocab_size") if stats.is_file() else None
    except (OSError, ValueError, AttributeError):
        _fail(f"--data {data}: {stats} is not a JSON object (expected the stats of data_prep/tokenize_domains.py)")
    if vocab is not None and int(vocab) > vocab_size:
        _fail(f"--data {data}: {stats} says the data was tokenized with a {vocab}-token vocabulary, but "
              f"{source_dir} has {vocab_size} embeddings")


def run(source_dir: str | Path, out_dir: str | Path, target: Any, method: str, data: str | None = None,
        domains: Sequence[str] | None = None, calib_batches: int = 16, batch_size: int = 8, split: str = "train",
        seed: int = 0, layer_metric: str = "block_influence", overwrite: bool = False) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if method not in METHODS:
        _fail(f"--method {method!r} is unknown; expected one of {METHODS}")
    if not (source_dir / "config.json").is_file():
        _fail(f"source {source_dir} is not a HF model directory (no config.json)")
    if out_dir.exists() and not overwrite:
        _fail(f"output directory {out_dir} already exists (pass --overwrite to replace it)")
    if method == "importance":
        if data is None:
            _fail("--method importance needs calibration data: --data MDS_DIR")
        domains = resolve_domains(data, domains, split)
    # everything config.json and the data's stats can tell, before the weights load
    try:
        source = ModelShape.from_hf_config(AutoConfig.from_pretrained(source_dir))
    except (OSError, ValueError) as e:
        _fail(f"source {source_dir}: {e}")
    try:
        shape = resolve_target(source, target)
    except (ValueError, TypeError) as e:
        _fail(f"--target: {e}")
    if method == "importance":
        _check_data_vocab(Path(data), source.vocab_size, source_dir)
    model = AutoModelForCausalLM.from_pretrained(source_dir, torch_dtype="auto").eval()
    batches, kwargs = None, {}
    if method == "importance":
        from composer_sheared.data.calibration import calibration_batches

        batches = calibration_batches(str(data), domains, calib_batches, batch_size, split)
        kwargs = {"layer_metric": layer_metric, "progress": True}
    scores = method_scores(model, method, batches, seed=seed, **kwargs)
    pruned = oneshot_prune(model, shape, scores)
    tok = AutoTokenizer.from_pretrained(source_dir) if any((source_dir / f).is_file() for f in TOKENIZER_FILES) else None
    info = {"source": str(source_dir), "method": method, "seed": seed, "target": shape.as_dict()}
    if method == "importance":
        info.update(data=str(data), domains=list(domains), split=split, calib_batches=calib_batches,
                    batch_size=batch_size, layer_metric=layer_metric)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        pruned.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        (tmp / "oneshot_pruning.json").write_text(json.dumps(info, indent=2) + "\n")
        from composer_sheared.export.model_card import finish_oneshot_output

        finish_oneshot_output(tmp, out_dir.name, info, batches)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="composer-sheared oneshot", description=__doc__.split("\n\n")[0])
    p.add_argument("source_dir", help="HF model directory to prune (Llama / Mistral / Qwen2)")
    p.add_argument("out_dir", help="directory to write the pruned HF model to")
    p.add_argument("--target", required=True, help=f"a shape name {sorted(NAMED_SHAPES)} or field=int,...")
    p.add_argument("--method", default="importance", help=f"one of {METHODS} (default: importance)")
    p.add_argument("--data", help="MDS root with <split>/<domain>/ shards (needed by --method importance)")
    p.add_argument("--domains", help="comma-separated domains (default: every domain under DATA/SPLIT)")
    p.add_argument("--split", default="train", help="calibration split (default: train)")
    p.add_argument("--calib-batches", type=int, default=16, help="calibration batches (default: 16)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per calibration batch (default: 8)")
    p.add_argument("--layer-metric", default="block_influence", choices=LAYER_METRICS,
                   help="layer importance (default: block_influence)")
    p.add_argument("--seed", type=int, default=0, help="seed of --method random (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    a = p.parse_args(argv)
    if a.calib_batches <= 0 or a.batch_size <= 0:
        _fail("--calib-batches and --batch-size must be positive")
    domains = [d.strip() for d in a.domains.split(",") if d.strip()] if a.domains else None
    out = run(a.source_dir, a.out_dir, parse_target(a.target), a.method, a.data, domains, a.calib_batches,
              a.batch_size, a.split, a.seed, a.layer_metric, a.overwrite)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
