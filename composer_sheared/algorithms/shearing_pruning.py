"""ShearingPruning: the Composer adapter around the pruning core.

INIT          attach masks to the HF model, add their param groups to the optimizer
BATCH_START   clamp log_alpha, set the target warm-up progress from the batch count, and key the
              gate noise by (seed, batch, rank)
AFTER_LOSS    add the Lagrangian (computed inside the forward pass) to the loss
BATCH_END     log expected shape, parameters, multipliers and the Lagrangian term

Everything it needs to resume lives in the model (masks, multipliers), the optimizer (their
moments) and the timestamp (warm-up progress, gate noise), all of which Composer checkpoints.
The gate noise must not come from the global RNG: Composer does not restore that RNG when a
dataset with its own state_dict (ours) resumes mid-epoch.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from transformers import PreTrainedModel

from composer_sheared.data.calibration import calibration_batches
from composer_sheared.defaults import (CALIBRATION_BATCH_SIZE, CALIBRATION_BATCHES, CALIBRATION_KEYS, EVAL_SHAPE,
                                       INIT_MEAN, INIT_SPREAD, LAGRANGIAN_WARMUP, LAMBDA_LR, MASK_INIT, MASK_INITS,
                                       MASK_LR, SCHEDULE, TEMPERATURE)
from composer_sheared.pruning import ShearingMasks, apply_shearing, get_masks
from composer_sheared.shapes import ModelShape

__all__ = ["ShearingPruning", "find_hf_model", "LAGRANGIAN_WARMUP"]



def find_hf_model(model: torch.nn.Module) -> PreTrainedModel:
    """The HF causal LM inside a Composer model (HuggingFaceModel.model) or the model itself."""
    given, seen = type(model).__name__, set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, PreTrainedModel):
            return model
        inner = getattr(model, "model", None)
        if isinstance(inner, PreTrainedModel):
            return inner
        # DDP / FSDP keep the wrapped module in .module, torch.compile in ._orig_mod
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    raise ValueError(
        "ShearingPruning needs a HF PreTrainedModel or a Composer HuggingFaceModel wrapping one "
        f"(possibly inside DDP/FSDP/torch.compile), got {given}"
    )


class ShearingPruning(Algorithm):
    """Targeted structured pruning (Sheared-LLaMA) as a Composer algorithm.

    Args:
        target: a ModelShape, a mapping of ModelShape fields (missing ones are the source's), or
            a name from ``composer_sheared.shapes.NAMED_SHAPES``.
        lagrangian_warmup: how long the target moves linearly from the source shape to
            `target`: batches (``"640ba"``) or a fraction of ``max_duration`` (``"0.2dur"``, the
            default, which needs ``max_duration`` in batches).
        mask_lr, lambda_lr: learning rates of the mask logits and the Lagrange multipliers.
        eval_shape: ``"target"`` (eval-mode masks keep exactly the target counts, so evaluation
            shows what the sliced model will do) or ``"expected"`` (the rounded expected counts,
            what the reference code evaluated during pruning and fed to dynamic batch loading).
        mask_betas: Adam betas for the mask and multiplier param groups (default: the
            optimizer's). The mask and multiplier lrs follow the trainer's LR schedule, as in the
            reference code.
        schedule: ``"projection"`` (default: every forward shifts each row's mask logits so the
            expected size equals the warm-up target exactly; the LM gradient only orders units) or
            ``"lagrangian"`` (the paper's multipliers).
        mask_init: ``"importance"`` (default: logits from one calibration pass over
            `calibration`, spread linearly by rank over +-`init_spread` within each row) or
            ``"uniform"`` (the paper: N(init_mean, 0.01) for every unit).
        calibration: what the importance pass reads (``mask_init="importance"``), the same on every
            rank: batches (dicts with ``input_ids``); or a mapping ``{local, domains, remote, split,
            num_batches, batch_size}`` naming per-domain MDS data (what a YAML can say), read at
            INIT; or None (default): `calibration_batches` batches of the train dataloader's
            ``DynamicStreamingDataset`` read at FIT_START by index, so the training stream is not
            touched (not under FSDP: the model is sharded by then, give the mapping instead). A
            resumed run skips it: the masks come from the checkpoint.
        calibration_batches: how many batches to draw when `calibration` does not list them.
        train_gates: ``"smooth"`` (the projected schedule's default: noise-free gates that fade
            units out in rank order during the warm-up, then the exact target top-k for the rest of
            the stage) or ``"sampled"`` (hard-concrete noise, as the paper; the Lagrangian's only choice).
        paper: shorthand for the paper's method: Lagrangian schedule, uniform init, clamped
            logits, soft gate values folded at slicing.
    """

    def __init__(
        self,
        target: ModelShape | Mapping[str, Any] | str,
        lagrangian_warmup: str | int = LAGRANGIAN_WARMUP,
        mask_lr: float = MASK_LR,
        lambda_lr: float = LAMBDA_LR,
        eval_shape: str = EVAL_SHAPE,
        temperature: float = TEMPERATURE,
        init_mean: float = INIT_MEAN,
        mask_betas: Optional[tuple[float, float]] = None,
        schedule: str = SCHEDULE,
        mask_init: str = MASK_INIT,
        calibration: Optional[Iterable[Any] | Mapping[str, Any]] = None,
        init_spread: float = INIT_SPREAD,
        train_gates: Optional[str] = None,
        paper: bool = False,
        calibration_batches: int = CALIBRATION_BATCHES,
    ):
        if paper:
            schedule, mask_init, train_gates = "lagrangian", "uniform", "sampled"
        if mask_init not in MASK_INITS:
            raise ValueError(f"mask_init={mask_init!r}: expected one of {MASK_INITS}")
        if isinstance(calibration, Mapping):
            calibration = dict(calibration)
            unknown = sorted(set(calibration) - set(CALIBRATION_KEYS))
            if unknown or not {"local", "domains"} <= set(calibration):
                raise ValueError(f"calibration: expected a mapping with keys local, domains (and optionally "
                                 f"{', '.join(CALIBRATION_KEYS[2:])}); got {sorted(calibration)}")
        if int(calibration_batches) <= 0:
            raise ValueError(f"calibration_batches={calibration_batches}: expected a positive number of batches")
        self.schedule, self.mask_init, self.calibration = schedule, mask_init, calibration
        self.calibration_batches = int(calibration_batches)
        self._pending_importance = False
        self.init_spread = float(init_spread)
        self.train_gates = train_gates
        self.target = dict(target) if isinstance(target, Mapping) else target
        self.lagrangian_warmup = Time.from_input(lagrangian_warmup, TimeUnit.BATCH)
        if self.lagrangian_warmup.unit not in (TimeUnit.BATCH, TimeUnit.DURATION):
            raise ValueError(f"lagrangian_warmup={lagrangian_warmup!r}: use batches ('640ba') or a fraction ('0.2dur')")
        self.mask_lr, self.lambda_lr = float(mask_lr), float(lambda_lr)
        self.eval_shape, self.temperature, self.init_mean = eval_shape, float(temperature), float(init_mean)
        self.mask_betas = None if mask_betas is None else tuple(float(b) for b in mask_betas)
        self._masks: Optional[ShearingMasks] = None
        self._warmup_batches: Optional[int] = None

    @property
    def masks(self) -> ShearingMasks:
        if self._masks is None:
            raise RuntimeError("ShearingPruning has not been applied yet (Event.INIT)")
        return self._masks

    def card_settings(self) -> dict:
        """The settings an exported model card states (plain values: it is written as YAML and JSON)."""
        return {"target": self.target, "schedule": self.schedule, "mask_init": self.mask_init,
                "lagrangian_warmup": str(self.lagrangian_warmup), "temperature": self.temperature,
                "mask_lr": self.mask_lr, "lambda_lr": self.lambda_lr, "eval_shape": self.eval_shape,
                "train_gates": self.train_gates, "calibration_batches": self.calibration_batches}

    def match(self, event: Event, state: State) -> bool:
        if event == Event.FIT_START:
            return self._pending_importance
        return event in (Event.INIT, Event.BATCH_START, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            hf_model = find_hf_model(state.model)
            self._masks = apply_shearing(
                hf_model, self.target, state.optimizers or None, mask_lr=self.mask_lr, lambda_lr=self.lambda_lr,
                eval_shape=self.eval_shape, temperature=self.temperature, init_mean=self.init_mean,
                mask_betas=self.mask_betas, schedule=self.schedule, init_log_alpha=self._init_logits(hf_model),
                train_gates=self.train_gates,
            )
            if self.mask_init == "importance" and self.calibration is None and not _on_meta(hf_model):
                self._pending_importance = True  # FIT_START: the train dataloader is known then
            for cb in state.callbacks:
                if type(cb).__name__ == "HuggingFaceCheckpointer" and type(cb).__module__.startswith("llmfoundry"):
                    from composer_sheared.foundry.hf_export import export_sliced

                    export_sliced(cb, self.card_settings())
            logger.log_hyperparameters({
                "shearing/source_params": self._masks.source.num_params(),
                "shearing/target_params": self._masks.target.num_params(),
                **{f"shearing/target/{k}": v for k, v in self._masks.target.as_dict().items()},
            })
        elif event == Event.FIT_START:
            self._pending_importance = False
            if int(state.timestamp.batch) == 0:  # a resumed run has its masks from the checkpoint
                self._importance_from_train_data(state)
        elif event == Event.BATCH_START:
            masks = self.masks
            masks.constrain_()
            masks.warmup_progress.fill_(self._progress(state))
            masks.set_noise_key(state.rank_zero_seed, int(state.timestamp.batch), dist.get_global_rank())
        elif event == Event.AFTER_LOSS:
            lag = self.masks.last_lagrangian
            if lag is None:
                raise RuntimeError("no Lagrangian was computed: did the model forward run in train mode?")
            if isinstance(state.loss, dict):
                key = "total" if "total" in state.loss else "shearing_lagrangian"
                state.loss[key] = state.loss.get(key, 0) + lag
            else:
                state.loss = state.loss + lag
            self.masks.last_lagrangian = None  # one Lagrangian per forward (per microbatch)
        elif event == Event.BATCH_END:
            stats = self.masks.last_stats
            if stats:
                values = torch.stack([v.float() for v in stats.values()]).tolist()  # one device sync
                logger.log_metrics({f"shearing/{k}": v for k, v in zip(stats, values)})
                logger.log_metrics({"shearing/target_params": self.masks.target.num_params()})

    def _init_logits(self, hf_model: PreTrainedModel) -> Optional[dict]:
        if self.mask_init != "importance" or self.calibration is None:
            return None
        if _on_meta(hf_model):
            # init_device=mixed: only rank 0 holds weights; FSDP's sync_module_states copies its
            # mask logits (a submodule of the model) to the other ranks.
            return None
        batches = self.calibration
        if isinstance(batches, Mapping):
            c = batches
            batches = calibration_batches(c["local"], list(c["domains"]), int(c.get("num_batches", self.calibration_batches)),
                                          int(c.get("batch_size", CALIBRATION_BATCH_SIZE)), split=c.get("split", "train"),
                                          remote=c.get("remote"))
        return self._logits_from(hf_model, batches)

    def _logits_from(self, hf_model: PreTrainedModel, batches) -> dict:
        from composer_sheared.pruning.apply import check_supported
        from composer_sheared.pruning.importance import compute_importance
        from composer_sheared.pruning.oneshot import scores_to_log_alpha
        from composer_sheared.shapes import resolve_target

        source = check_supported(hf_model)
        target = resolve_target(source, self.target)
        scores = compute_importance(hf_model, batches)
        return scores_to_log_alpha(scores, source, target, spread=self.init_spread)

    def _importance_from_train_data(self, state: State) -> None:
        """Importance init from the train dataloader's data, read by index (the stream the run
        trains on is untouched, so its order and an exact resume are the same as without this)."""
        from composer_sheared.pruning.apply import unmasked

        dataset = getattr(state.train_dataloader, "dataset", None)
        if not all(hasattr(dataset, a) for a in ("local", "domains", "split", "remote", "batch_size")):
            raise ValueError(
                "ShearingPruning(mask_init='importance') without `calibration` reads its calibration batches from "
                f"the train dataloader's DynamicStreamingDataset, got {type(dataset).__name__}; give "
                "calibration: {local: <MDS root>, domains: [...]} or use mask_init: uniform")
        if state.fsdp_enabled:
            raise ValueError(
                "ShearingPruning(mask_init='importance') under FSDP needs `calibration: {local: <MDS root>, domains: "
                "[...]}` in its config: it must read the data before the model is sharded")
        batches = calibration_batches(dataset.local, list(dataset.domains), self.calibration_batches,
                                      dataset.batch_size, split=dataset.split, remote=dataset.remote)
        hf_model = find_hf_model(state.model)
        device = next(hf_model.parameters()).device
        batches = [{"input_ids": b["input_ids"].to(device)} for b in batches]
        with unmasked(hf_model) as masks:
            logits = self._logits_from(hf_model, batches)
        with torch.no_grad():
            for name, value in logits.items():
                param = masks.log_alpha[name]
                param.copy_(torch.as_tensor(value, dtype=param.dtype, device=param.device))
                # ranks read the same samples, but kernels need not agree to the last bit
                dist.broadcast(param.data, src=0)

    def _progress(self, state: State) -> float:
        if self._warmup_batches is None:
            if self.lagrangian_warmup.unit == TimeUnit.BATCH:
                self._warmup_batches = int(self.lagrangian_warmup.value)
            else:
                max_dur = state.max_duration
                if max_dur is None or max_dur.unit != TimeUnit.BATCH:
                    raise ValueError(
                        f"lagrangian_warmup={self.lagrangian_warmup} is a fraction of the run; "
                        f"that needs max_duration in batches ('3200ba'), got {max_dur}"
                    )
                self._warmup_batches = int(self.lagrangian_warmup.value * max_dur.value)
        if self._warmup_batches <= 0:
            return 1.0
        return min(1.0, int(state.timestamp.batch) / self._warmup_batches)


def _on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def masks_of(model: torch.nn.Module) -> ShearingMasks:
    """The masks attached to a Composer or HF model."""
    return get_masks(find_hf_model(model))
