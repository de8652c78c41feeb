"""Provenance of every HF directory the project writes: a model card and `provenance.json`.

`finish_hf_dir(tmp, ...)` runs inside a writer's atomic temp directory, after `save_pretrained`:

- `README.md`: a model card whose front matter `huggingface_hub.ModelCard` parses (`base_model`,
  `library_name: transformers`, tags, the source's license where it states one) and whose body
  states the method and its settings, the source and target shapes, parameters, the tokens seen
  per stage (this directory's lineage) and the eval tables the caller measured;
- `provenance.json`: the same, machine-readable, with the package version and a timestamp, and
  the source's own provenance when the source was written by this project;
- the source's chat template is set aside under `source_chat_template/` unless the output was
  instruction-tuned: a pruned or continued base model answers a chat prompt poorly (the demo's
  continued model returns `''`), so `apply_chat_template` must not pretend it is a chat model;
- `config.json`'s `_name_or_path`, when a transformers version writes it, names this directory.

`add_evals(dir, tables)` adds an eval table measured after the directory was written (the demo).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["CARD", "PROVENANCE", "SOURCE_TEMPLATES", "TAGS", "finish_hf_dir", "add_evals", "describe_source",
           "read_provenance"]

CARD = "README.md"
PROVENANCE = "provenance.json"
SOURCE_TEMPLATES = "source_chat_template"
TAGS = ("composer-sheared", "sheared-llama")
PRUNED_TAG = "pruned"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHAPE_COLUMNS = (("layers", "num_layers"), ("hidden", "hidden_size"), ("heads", "num_attention_heads"),
                  ("kv heads", "num_key_value_heads"), ("head dim", "head_dim"), ("ffn", "intermediate_size"),
                  ("vocab", "vocab_size"))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("composer-sheared")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        from composer_sheared import __version__

        return __version__


def read_provenance(hf_dir: str | os.PathLike) -> Optional[dict]:
    """The directory's provenance.json, or None when this project did not write it."""
    p = Path(hf_dir) / PROVENANCE
    return json.loads(p.read_text()) if p.is_file() else None


def _shape_of(hf_dir: Path):
    from transformers import AutoConfig

    from composer_sheared.shapes import ModelShape

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(hf_dir))


def _shape_entry(shape) -> Optional[dict]:
    if shape is None:
        return None
    return {**shape.as_dict(), "params": shape.num_params(), "non_embedding_params": shape.num_non_embedding_params()}


def describe_source(source: str | os.PathLike | None) -> dict:
    """What is known of a source model: path, base model, license, shape, and its own provenance.

    The base model is the lineage's root: a source this project wrote passes its own base model on;
    otherwise a hub id from the source's config, else the path itself."""
    out: dict[str, Any] = {"path": None if source is None else str(source), "base_model": None, "license": None,
                           "shape": None, "provenance": None}
    if source is None:
        return out
    path = Path(source)
    out["base_model"] = str(source)
    if not path.is_dir():
        return out
    prov = read_provenance(path)
    card = None
    if (path / CARD).is_file():
        from huggingface_hub import ModelCard

        card = ModelCard.load(path / CARD, ignore_metadata_errors=True).data
    if (path / "config.json").is_file():
        try:
            out["shape"] = _shape_entry(_shape_of(path))
        except ValueError:  # an architecture ModelShape does not describe: no shape to report
            pass
        name = json.loads((path / "config.json").read_text()).get("_name_or_path") or ""
        if _HUB_ID.match(name) and not Path(name).exists():
            out["base_model"] = name
    if prov is not None:
        out["provenance"] = prov
        out["base_model"] = prov.get("base_model") or out["base_model"]
    out["license"] = (card.license if card is not None else None) or (prov or {}).get("license")
    return out


def _set_aside_chat_templates(tmp: Path) -> bool:
    """Move every chat template transformers would load as the tokenizer's default out of its way."""
    aside = tmp / SOURCE_TEMPLATES
    moved = False
    cfg_file = tmp / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        template = cfg.pop("chat_template", None)
        if template is not None:
            aside.mkdir(exist_ok=True)
            named = template if isinstance(template, list) else [{"name": "chat_template", "template": template}]
            for t in named:
                (aside / f"{t['name']}.jinja").write_text(t["template"])
            cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            moved = True
    for name in ("chat_template.jinja", "chat_template.json", "additional_chat_templates"):
        if (tmp / name).exists():
            aside.mkdir(exist_ok=True)
            os.rename(tmp / name, aside / name)
            moved = True
    return moved


def _name_config(tmp: Path, name: str) -> None:
    cfg_file = tmp / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if "_name_or_path" in cfg:
        cfg["_name_or_path"] = name
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "-" if v is None else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows)]


def _eval_lines(evals: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    lines = []
    for title, rows in evals.items():
        columns = list(dict.fromkeys(c for r in rows.values() for c in r))
        lines += [f"### {title}", "", *_table(["", *columns], [[name, *(r.get(c) for c in columns)]
                                                                for name, r in rows.items()]), ""]
    return lines


def _body(name: str, prov: dict) -> str:
    src, tgt = prov["source"], prov["target"]
    lines = [f"# {name}", "",
             f"{prov['method']} of `{prov['base_model'] or 'a randomly initialised model'}`"
             + (f" (source: `{src['path']}`)" if src["path"] and src["path"] != prov["base_model"] else "")
             + f", written by composer-sheared {prov['package_version']} on {prov['timestamp']}."
             + ("" if prov["instruction_tuned"] else " This is a base model: it was not instruction-tuned after pruning."),
             "",
             "## Shapes", ""]
    rows = [[label, *(s.get(k) for _, k in _SHAPE_COLUMNS), s["params"], s["non_embedding_params"]]
            for label, s in (("source", src["shape"]), ("this model", tgt)) if s]
    lines += [*_table(["", *(c for c, _ in _SHAPE_COLUMNS), "params", "non-embedding"], rows), ""]
    if src["shape"] and tgt:
        lines += [f"Parameters: {tgt['params'] / src['shape']['params']:.1%} of the source "
                  f"({tgt['non_embedding_params'] / src['shape']['non_embedding_params']:.1%} of its non-embedding "
                  "parameters).", ""]
    if prov["stages"]:
        lines += ["## Tokens seen per stage", "",
                  *_table(["stage", "tokens", "steps"], [[s["stage"], s.get("tokens"), s.get("steps")]
                                                         for s in prov["stages"]]), ""]
    lines += ["## Method settings", "", "```json", json.dumps(prov["settings"], indent=2, default=str), "```", ""]
    if prov["evals"]:
        lines += ["## Evaluation", "", *_eval_lines(prov["evals"])]
    if prov["chat_template_set_aside"]:
        lines += ["## Chat template", "",
                  f"The source's chat template is not this tokenizer's default: the model was not "
                  f"instruction-tuned after pruning. It is kept in `{SOURCE_TEMPLATES}/` for reference.", ""]
    lines += ["## Provenance", "", f"`{PROVENANCE}` holds all of the above, machine-readable, with the source's own "
              "provenance when composer-sheared wrote the source.", ""]
    return "\n".join(lines)


def _write_card(hf_dir: Path, name: str, prov: dict) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=prov["base_model"], library_name="transformers", license=prov["license"],
                         tags=list(prov["tags"]), pipeline_tag="text-generation")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(name, prov)}").save(hf_dir / CARD)
    (hf_dir / PROVENANCE).write_text(json.dumps(prov, indent=2, default=str) + "\n")


def finish_hf_dir(tmp: str | os.PathLike, name: str, method: str, source: str | os.PathLike | None,
                  settings: Mapping[str, Any], stage: Optional[Mapping[str, Any]], evals: Optional[Mapping] = None,
                  source_shape=None, instruction_tuned: bool = False, pruned: bool = True,
                  base_model: Optional[str] = None, license: Optional[str] = None,
                  tags: Optional[Sequence[str]] = None) -> dict:
    """Write the card and provenance into `tmp` (a saved HF directory about to be renamed to `name`).

    `stage` is this step of the lineage ({"stage", "tokens", "steps"}; None for a conversion that
    trains nothing); `evals` maps a table
    title to {row: {column: value}}; `source_shape` (a ModelShape) overrides the shape read from
    the source's config (a random-init or GGUF source has none to read). The `pruned` tag is set
    when this step pruned or the source's lineage did. `base_model`, `license` and `tags` override
    what the source tells (a conversion names the hub model it came from)."""
    tmp = Path(tmp)
    src = describe_source(source)
    if source_shape is not None:
        src["shape"] = _shape_entry(source_shape)
    lineage = list((src["provenance"] or {}).get("stages", []))
    tags = list(tags) if tags is not None else [*TAGS, *([PRUNED_TAG] if pruned or PRUNED_TAG in (src["provenance"] or {}).get("tags", []) else [])]
    prov = {
        "method": method, "base_model": base_model or src["base_model"], "license": license or src["license"],
        "tags": tags,
        "source": {k: src[k] for k in ("path", "shape")}, "target": _shape_entry(_shape_of(tmp)),
        "settings": dict(settings), "stages": [*lineage, *([dict(stage)] if stage else [])],
        "evals": dict(evals or {}), "instruction_tuned": instruction_tuned,
        "chat_template_set_aside": False if instruction_tuned else _set_aside_chat_templates(tmp),
        "package_version": _version(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_provenance": src["provenance"],
    }
    _name_config(tmp, name)
    _write_card(tmp, name, prov)
    return prov


def add_evals(hf_dir: str | os.PathLike, evals: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict:
    """Add eval tables to a finished directory's card and provenance (each file replaced atomically)."""
    hf_dir = Path(hf_dir)
    prov = read_provenance(hf_dir)
    if prov is None:
        raise FileNotFoundError(f"{hf_dir / PROVENANCE}: expected the provenance that finish_hf_dir writes")
    prov["evals"] = {**prov.get("evals", {}), **evals}
    staging = Path(tempfile.mkdtemp(prefix=f".{hf_dir.name}.card-", dir=hf_dir.parent))
    try:
        _write_card(staging, hf_dir.name, prov)
        for f in (PROVENANCE, CARD):
            os.replace(staging / f, hf_dir / f)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return prov


# ----------------------------------------------------------------------------------------------
# The writers' provenance: what each one knows, turned into finish_hf_dir's arguments.
def _plain(x: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    from omegaconf import OmegaConf

    if is_dataclass(x):
        return _plain(asdict(x))
    if OmegaConf.is_config(x):
        return OmegaConf.to_container(x, resolve=True)
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def last_evals(metrics_jsonl: str | os.PathLike | None) -> dict:
    """The last logged value of every eval metric (`metrics/<label>/<name>`) of a run's JSONL file,
    as one table {label: {metric: value}} titled with its step; {} when nothing was evaluated."""
    from composer_sheared.demo.plots import read_jsonl

    table: dict[str, dict[str, float]] = {}
    step = None
    for rec in read_jsonl(metrics_jsonl) if metrics_jsonl else []:
        for key, value in (rec.get("metrics") or {}).items():
            parts = key.split("/")
            # metrics/train/* are Composer's training-batch metrics, not an evaluation
            if len(parts) == 3 and parts[0] == "metrics" and parts[1] != "train" and isinstance(value, (int, float)):
                table.setdefault(parts[1], {})[parts[2]] = float(value)
                step = rec.get("step")
    return {f"last evaluation of the run (step {step})": table} if table else {}


def finish_train_output(tmp: str | os.PathLike, name: str, cfg, state, hf) -> dict:
    """The card of train.py's final HF directory (`builders.save_hf_result`): `cfg` the run's
    TrainConfig, `state` Composer's State (its timestamp counts the tokens), `hf` the trained
    (for a pruning run still masked, unsliced) HF model."""
    from composer_sheared.config import EMBEDDED, metrics_path
    from composer_sheared.shapes import ModelShape

    if cfg.pruning is not None:
        from composer_sheared.pruning import get_masks

        source_shape = get_masks(hf).source
        method, stage = "Sheared-LLaMA targeted structured pruning (L0 masks to the target shape), sliced", "pruning"
    else:
        source_shape = ModelShape.from_hf_config(hf.config)
        method, stage = "Continued pretraining", "continued pretraining"
    if cfg.model.source in EMBEDDED:
        from composer_sheared.demo.embedded import default_cache_dir

        source = default_cache_dir()
    else:
        source = cfg.model.source
    keys = ("pruning", "distillation", "dynamic_loading", "data", "optimizer", "scheduler", "max_duration",
            "global_train_batch_size", "max_seq_len", "seed", "precision", "run_name")
    settings = {k: _plain(getattr(cfg, k)) for k in keys if getattr(cfg, k) is not None}
    ts = getattr(state, "timestamp", None)  # None: a bare state outside a Trainer counted nothing
    return finish_hf_dir(tmp, name, method, source, settings,
                         {"stage": stage, "tokens": int(ts.token) if ts else None, "steps": int(ts.batch) if ts else None},
                         evals=last_evals(metrics_path(cfg)), source_shape=source_shape,
                         pruned=cfg.pruning is not None)


def finish_oneshot_output(tmp: str | os.PathLike, name: str, info: Mapping[str, Any], batches=None) -> dict:
    """The card of the one-shot CLI's directory: `info` its oneshot_pruning.json record, `batches`
    the calibration batches it scored with (None for the data-free methods)."""
    settings = {k: v for k, v in info.items() if k not in ("source", "target")}
    stage = None
    if batches:
        stage = {"stage": "calibration (forward passes only, no training)", "steps": len(batches),
                 "tokens": sum(int(b["input_ids"].numel()) for b in batches)}
    return finish_hf_dir(tmp, name, f"One-shot structured pruning ({info['method']} scores) to the target shape",
                         info["source"], settings, stage)


def finish_export_output(tmp: str | os.PathLike, name: str, checkpoint: str | os.PathLike,
                         source: str | os.PathLike | None, masks, timestamp: Optional[Mapping] = None) -> dict:
    """The card of a pruning checkpoint exported to a sliced HF directory: `masks` the checkpoint's
    ShearingMasks, `timestamp` its Composer timestamp state (batches and tokens trained)."""
    ts = timestamp or {}
    stage = {"stage": "pruning", "tokens": ts.get("token"), "steps": ts.get("batch")}
    settings = {"checkpoint": str(checkpoint), "temperature": getattr(masks, "temperature", None)}
    return finish_hf_dir(tmp, name, "Sheared-LLaMA targeted structured pruning (L0 masks to the target shape), "
                         "exported from a Composer checkpoint and sliced", source, settings, stage,
                         source_shape=masks.source)


def finish_foundry_output(tmp: str | os.PathLike, name: str, state, settings: Mapping[str, Any]) -> dict:
    """The card of a directory that llm-foundry's `hf_checkpointer` writes in a pruning run (see
    composer_sheared.foundry.hf_export): `state` the run's Composer State (its still-masked model
    names the source; its timestamp counts the tokens), `settings` the ShearingPruning settings."""
    from composer_sheared.export.gather import composer_model_of
    from composer_sheared.pruning import get_masks

    hf = composer_model_of(state).model
    hf = getattr(hf, "module", hf)
    ts = state.timestamp
    return finish_hf_dir(tmp, name, "Sheared-LLaMA targeted structured pruning (L0 masks to the target shape), "
                         "sliced and saved by llm-foundry's hf_checkpointer",
                         getattr(hf.config, "_name_or_path", None) or None, settings,
                         {"stage": "pruning", "tokens": int(ts.token), "steps": int(ts.batch)},
                         source_shape=get_masks(hf).source)

