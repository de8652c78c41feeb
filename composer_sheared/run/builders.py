"""Library builders that the train.py recipe calls: model, tokenizer, FSDP hooks, data, HF save.

They take a validated `composer_sheared.config.TrainConfig` (and the `Resolved` source config
that validation read), so they do no config checking of their own.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Optional

import torch

from composer_sheared.storage.atomic import atomic_directory
from composer_sheared.config import EMBEDDED, Resolved, TrainConfig

__all__ = ["build_hf_model", "build_tokenizer", "configure_fsdp_hooks", "build_dataloaders", "save_hf_result",
           "clear_previous_run", "NonFiniteModelError", "check_finite"]


class NonFiniteModelError(RuntimeError):
    """The model holds NaN or infinite weights; it is not saved."""


def check_finite(model: torch.nn.Module) -> None:
    bad = [n for n, t in model.named_parameters() if not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteModelError(f"{len(bad)} tensors hold NaN/inf values (e.g. {bad[:3]}); not saving the model")


def _source_path(cfg: TrainConfig) -> Optional[Path]:
    if cfg.model.source is None:
        return None
    if cfg.model.source in EMBEDDED:
        from composer_sheared.demo.embedded import ensure_smollm2

        return ensure_smollm2()
    return Path(cfg.model.source)


def _init_non_persistent(model) -> None:
    """Recompute rotary inv_freq buffers (they are not in checkpoints and meta init loses them)."""
    for mod in model.modules():
        if hasattr(mod, "rope_init_fn") and hasattr(mod, "inv_freq"):
            inv_freq, scale = mod.rope_init_fn(mod.config, mod.inv_freq.device)
            with torch.no_grad():
                mod.inv_freq = inv_freq
                mod.original_inv_freq = inv_freq
                mod.attention_scaling = scale


def build_hf_model(cfg: TrainConfig, resolved: Resolved, rank: int = 0):
    """(HF causal LM, source path or None): random init from model.config, the source's weights,
    or (init_device meta/mixed on ranks > 0) an empty meta model for FSDP to fill."""
    from transformers import AutoModelForCausalLM

    m = cfg.model
    dtype = getattr(torch, m.dtype)
    on_meta = m.init_device == "meta" or (m.init_device == "mixed" and rank != 0)
    src = None if on_meta and m.config is not None else _source_path(cfg)
    if m.config is not None or on_meta:
        hf_cfg = resolved.hf_config
        hf_cfg._attn_implementation = m.attn_implementation
        torch.manual_seed(cfg.seed)
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=dtype)
    else:
        kw = {"gguf_file": src.name} if src.suffix == ".gguf" else {}
        model = AutoModelForCausalLM.from_pretrained(str(src.parent if kw else src), torch_dtype=dtype,
                                                     attn_implementation=m.attn_implementation, **kw)
    return model, src


def build_tokenizer(cfg: TrainConfig, src: Optional[Path]):
    """model.tokenizer, else the source directory's tokenizer (None for a tokenizer-less source)."""
    from transformers import AutoTokenizer

    if cfg.model.tokenizer is not None:
        return AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    if src is None:
        return None
    if src.suffix == ".gguf":
        from composer_sheared.demo.embedded import byte_level_tokenizer_from_gguf

        return byte_level_tokenizer_from_gguf(src)
    if any((src / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(src)
    return None  # a random-init / tokenizer-less source directory


def configure_fsdp_hooks(model) -> None:
    """Wrap and checkpoint decoder layers (Composer reads these attributes from the HF model)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = tuple({type(mod) for mod in model.modules() if type(mod).__name__ in names})
    model.fsdp_wrap_fn = lambda module: isinstance(module, layers)
    model.activation_checkpointing_fn = lambda module: isinstance(module, layers)

    def param_init_fn(module):
        model._init_weights(module)
        if hasattr(module, "rope_init_fn"):
            _init_non_persistent(module)

    model.param_init_fn = param_init_fn


def build_dataloaders(cfg: TrainConfig, device_batch: int):
    """(train DataLoader over a DynamicStreamingDataset, one Composer Evaluator per domain)."""
    from composer.core import Evaluator
    from torch.utils.data import DataLoader

    from composer_sheared.data import DynamicStreamingDataset, domain_eval_dataset

    d = cfg.data
    bounds = {"download_timeout": float(d.download_timeout), "download_retry": int(d.download_retry)}
    ds = DynamicStreamingDataset(local=d.local, domains=list(d.domains), proportions=list(d.proportions),
                                 batch_size=device_batch, split=d.train_split, remote=d.remote, shuffle=d.shuffle,
                                 seed=cfg.seed, reader_kwargs=bounds)
    train = DataLoader(ds, batch_size=device_batch, num_workers=d.num_workers,
                       persistent_workers=d.num_workers > 0, drop_last=True)
    evaluators = []
    for dom in d.domains:
        # a Streaming dataset partitions itself over ranks: no sampler
        eds = domain_eval_dataset(d.local, dom, split=d.eval_split, remote=d.remote,
                                  batch_size=cfg.device_eval_batch_size, **bounds)
        dl = DataLoader(eds, batch_size=cfg.device_eval_batch_size, num_workers=0)
        evaluators.append(Evaluator(label=dom, dataloader=dl, metric_names=["LanguageCrossEntropy"],
                                    subset_num_batches=d.eval_subset_num_batches))
    return train, evaluators


def clear_previous_run(cfg: TrainConfig, metrics: Optional[Path], hf_dir: Path) -> list[Path]:
    """save_overwrite=true on a fresh run: remove the earlier run's checkpoints, `latest` links,
    metrics file and HF directory from save_folder, so none of it is mixed with the new run."""
    if not (cfg.save_overwrite and cfg.save_folder and not cfg.autoresume and not cfg.load_path):
        return []
    folder = Path(cfg.save_folder)
    old = [*folder.glob("ep*-ba*-rank*.pt"), *folder.glob("latest-rank*.pt"),
           *([metrics] if metrics else []), hf_dir]
    removed = []
    for p in old:
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            continue
        removed.append(p)
    return removed


def save_hf_result(state, cfg: TrainConfig, tokenizer, out_dir: Path) -> Optional[Path]:
    """Slice (pruning runs) and save_pretrained the trained model on rank 0 (atomic rename).

    Raises NonFiniteModelError, saving nothing, when any weight is NaN or infinite."""
    from composer.utils import dist

    from composer_sheared.export.gather import gathered_hf_model

    result, error = None, None
    with gathered_hf_model(state) as hf:
        if hf is not None:
            try:
                check_finite(hf)
                if cfg.pruning is not None:
                    from composer_sheared.pruning import prune_to_target

                    out_model = prune_to_target(hf)
                else:
                    out_model = hf
                out_model = out_model.to(dtype=getattr(torch, cfg.model.hf_save_dtype))
                with atomic_directory(out_dir) as tmp:
                    # drop training-only attributes before saving
                    sd = {k: v for k, v in out_model.state_dict().items() if "shearing_masks" not in k}
                    out_model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
                    if tokenizer is not None:
                        tokenizer.save_pretrained(tmp)
                    from composer_sheared.export.model_card import finish_train_output

                    finish_train_output(tmp, out_dir.name, cfg, state, hf)
                result = out_dir
            except NonFiniteModelError as err:
                error = err  # raised after the barrier, so other ranks are not left waiting
    dist.barrier()
    if error is not None:
        raise error
    return result
