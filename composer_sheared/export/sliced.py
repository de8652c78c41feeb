"""Finalize a pruning run: Composer checkpoint -> sliced HF model directory.

Command line: `composer-sheared export CHECKPOINT OUT_DIR` (composer_sheared.cli.export).

The checkpoint is a (full, not sharded) Composer checkpoint of a HuggingFaceModel trained with
ShearingPruning. The HF config and tokenizer come from the checkpoint's HF metadata (Composer
stores both) unless --source / --tokenizer are given; the target shape comes from the masks'
own state. The output, with its model card and provenance.json (composer_sheared.export.model_card), is
written to a temporary directory and renamed when complete.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NoReturn

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_utils import no_init_weights

from composer_sheared.storage.atomic import atomic_directory
from composer_sheared.export.model_card import finish_export_output
from composer_sheared.pruning import apply_shearing, get_masks, prune_to_target
from composer_sheared.shapes import ModelShape

__all__ = ["MASK_STATE_KEY", "load_checkpoint_state", "masked_model_from_checkpoint", "finalize"]

MASK_STATE_KEY = "shearing_masks._extra_state"


def _fail(msg: str) -> NoReturn:
    raise SystemExit(f"error: {msg}")


def load_checkpoint_state(checkpoint: str | Path) -> tuple[dict, dict, dict]:
    """(HF model state dict with the masks, Composer's HuggingFace metadata, its timestamp state) of a
    pruning checkpoint; SystemExit("error: ...") when the file is missing, unreadable or holds no masks."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        _fail(f"{checkpoint} is a directory; expected a full (monolithic) Composer checkpoint file "
              "(save with fsdp_config.state_dict_type=full)")
    if not checkpoint.is_file():
        _fail(f"checkpoint {checkpoint} does not exist")
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        state = ckpt["state"]
        model_sd = state["model"]
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        _fail(f"{checkpoint} is not a Composer checkpoint ({type(e).__name__}: {e})")
    hf_state = state.get("integrations", {}).get("huggingface", {})
    # HuggingFaceModel prefixes the HF model's keys with "model."
    prefix = "model." if any(k.startswith("model.model.") for k in model_sd) else ""
    model_sd = {k[len(prefix):]: v for k, v in model_sd.items() if k.startswith(prefix)}
    if MASK_STATE_KEY not in model_sd:
        _fail(f"{checkpoint} holds no pruning masks (no '{prefix}{MASK_STATE_KEY}'); was it trained with ShearingPruning?")
    ts = state.get("timestamp") or {}
    ts = ts.get("Timestamp", ts)  # Composer stores State.timestamp under its class name
    return model_sd, hf_state, {k: int(ts[k]) for k in ("batch", "token") if k in ts}


def masked_model_from_checkpoint(checkpoint: str | Path, source: str | None = None, loaded=None):
    """(the masked source model with the checkpoint's weights and masks, Composer's HF metadata).

    The config comes from `source` (a HF directory) or from the checkpoint's metadata; `loaded` is
    `load_checkpoint_state(checkpoint)` when the caller has read it already."""
    model_sd, hf_state, _ = loaded or load_checkpoint_state(checkpoint)
    extra = model_sd[MASK_STATE_KEY]
    if source is not None:
        if not (Path(source) / "config.json").is_file():
            _fail(f"--source {source} is not a HF model directory (no config.json)")
        config = AutoConfig.from_pretrained(source)
        try:
            given = ModelShape.from_hf_config(config)
        except ValueError as err:
            _fail(f"--source {source}: {err}")
        trained = ModelShape(**extra["source"])
        if given != trained:
            diff = ", ".join(f"{k} {getattr(given, k)} vs {getattr(trained, k)}" for k in trained.as_dict()
                             if getattr(given, k) != getattr(trained, k))
            _fail(f"--source {source} is not the model this checkpoint was pruned from ({diff}; --source vs "
                  f"checkpoint); pass the source the run started from, or leave --source out")
    elif "model" in hf_state:
        content = dict(hf_state["model"]["config"]["content"])
        config = AutoConfig.for_model(content.pop("model_type"), **content)
    else:
        _fail(f"{checkpoint} carries no HF config; pass --source HF_DIR")
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    apply_shearing(model, ModelShape(**extra["target"]), temperature=extra.get("temperature", 2 / 3))
    missing, unexpected = model.load_state_dict(model_sd, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        _fail(f"checkpoint does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, hf_state


def _hf_name(hf_state: dict) -> str | None:
    """The source's name as Composer recorded its config (a hub id or the path it was loaded from)."""
    return (hf_state.get("model", {}).get("config", {}).get("content", {}) or {}).get("_name_or_path") or None


def finalize(checkpoint: str | Path, out_dir: str | Path, source: str | None = None, tokenizer: str | None = None) -> Path:
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists():
        _fail(f"output directory {out_dir} already exists")
    loaded = load_checkpoint_state(checkpoint)
    model, hf_state = masked_model_from_checkpoint(checkpoint, source, loaded)
    tok = None
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    elif hf_state.get("tokenizer"):
        from composer.models import HuggingFaceModel

        # Composer otherwise unpacks the tokenizer files into the current directory.
        with tempfile.TemporaryDirectory() as tok_dir:
            tok = HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_state, tokenizer_save_dir=tok_dir)

    masks = get_masks(model)
    pruned = prune_to_target(model.eval())

    with atomic_directory(out_dir, overwrite=False) as tmp:
        pruned.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        finish_export_output(tmp, out_dir.name, checkpoint, source or _hf_name(hf_state), masks, loaded[2])
    return out_dir
