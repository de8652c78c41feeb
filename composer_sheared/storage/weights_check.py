"""Check a HF source directory's safetensors against its config.json, reading only the headers.

A truncated ``model.safetensors`` fails deep inside ``from_pretrained`` (SafetensorError), and a
``config.json`` of another shape as ``Error(s) in loading state_dict for Linear``, or not at all
(missing layers are random-initialised with a warning). Both can be known from the file sizes
and the headers (names, shapes, offsets), before any weight is read.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

__all__ = ["safetensors_files", "read_header", "check_source_weights"]


def safetensors_files(src: Path) -> list[Path]:
    """The weight files of a HF directory: the sharded index's files, or ``*.safetensors``."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: expected a JSON object with a 'weight_map'") from None
        return [src / n for n in names]
    return sorted(src.glob("*.safetensors"))


def read_header(path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors header; ValueError saying how the file is broken."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes; expected a safetensors file)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ValueError(f"{path} is truncated or not a safetensors file (its header needs {8 + n} bytes, "
                             f"the file has {size})")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"{path}: the safetensors header is not JSON (expected a safetensors file)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if size != 8 + n + end:
        raise ValueError(f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes, the file has "
                         f"{size} (expected a complete copy; copy or convert the model again)")
    return tensors


def check_source_weights(src: Path, hf_config) -> list[tuple[str, str]]:
    """Problems as ``("model.source", message)``: unreadable files, or tensors whose names or shapes
    are not what ``config.json`` describes."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        files = safetensors_files(src)
    except ValueError as err:
        return [("model.source", str(err))]
    if not files:
        return []  # .bin weights: left to from_pretrained
    stored: dict[str, tuple[list[int], Path]] = {}
    for path in files:
        try:
            for name, entry in read_header(path).items():
                stored[name] = (list(entry["shape"]), path)
        except ValueError as err:
            return [("model.source", str(err))]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    if getattr(hf_config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    if not set(expected) & set(stored):  # saved from the base model: names without the "model." prefix
        expected = {k.removeprefix("model."): v for k, v in expected.items()}
    where = src / "config.json"
    wrong = [f"{k} is {stored[k][0]} in {stored[k][1].name} but {v} by the config"
             for k, v in expected.items() if k in stored and stored[k][0] != v]
    missing = [k for k in expected if k not in stored]
    problems = []
    if wrong:
        problems.append(("model.source", f"{where} does not describe the weights: {len(wrong)} tensors differ, e.g. "
                                         + "; ".join(wrong[:3])))
    if missing:
        problems.append(("model.source", f"{where} does not describe the weights: the files lack {len(missing)} "
                                         f"tensors the config needs, e.g. {missing[:3]}"))
    return problems
