"""Distillation: the Composer adapter around composer_sheared.distill.

INIT        build the frozen teacher: a copy of the student as it is now (before any checkpoint
            is loaded, so on resume too it is the starting model), a HF directory, or a model
FIT_START   move it to the student's device (and dtype), or shard it with the student's FSDP config
AFTER_LOSS  run the teacher on the microbatch (no grad, same autocast as the student) and
            replace alpha * CE by alpha * KD in the loss; other terms (the Lagrangian) stay as they are
BATCH_END   log distill/kd_loss, distill/ce_loss, distill/teacher_ce_loss (the frozen teacher's own
            LM loss on the same batch) and distill/excess_loss (student CE minus teacher CE), each
            a token-weighted mean over the microbatches

alpha 0 trains on the LM loss alone and keeps the teacher as a monitor: the excess loss is how far
pruning has pushed the student from the source on the very batch it trains on, which the raw
training loss cannot say (it moves by a nat with the domains a small batch draws, and dynamic
batch loading shifts the mix towards the harder domains as it goes).

The teacher is an attribute of this object, not a submodule of the model: the optimizer never
sees it and Composer's checkpoints (model, optimizer, algorithm state_dict) do not hold it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from torch import nn

from composer_sheared.algorithms.shearing_pruning import find_hf_model
from composer_sheared.defaults import KD_ALPHA, KD_TEACHER, KD_TEMPERATURE
from composer_sheared.distill import (CHUNK_TOKENS, apply_distillation, frozen_copy, kd_token_mask, load_teacher,
                                      teacher_ce, teacher_logits)

__all__ = ["Distillation", "apply_distillation"]


class _TeacherHolder(nn.Module):
    """Composer's FSDP helper shards the children of the module it is given."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class Distillation(Algorithm):
    """Logit distillation from a frozen teacher: loss = (1 - alpha) CE + alpha KD (+ other terms).

    Args:
        teacher: ``"copy"`` (the student at Event.INIT without pruning masks: in a pruning run,
            the source model), a HF model directory, or a model (frozen in place).
        alpha: weight of the KD term; 1 - alpha weights the LM cross-entropy. 0: the teacher only
            monitors (the excess loss is logged, the loss is untouched).
        temperature: softmax temperature of both distributions; the KD term is scaled by T^2.
        teacher_dtype: e.g. ``"bfloat16"`` to halve the teacher's memory (default: the student's).
        chunk_tokens: tokens per fp32 chunk of the KL computation.
    """

    def __init__(self, teacher: str | Path | nn.Module = KD_TEACHER, alpha: float = KD_ALPHA, temperature: float = KD_TEMPERATURE,
                 teacher_dtype: Optional[str | torch.dtype] = None, chunk_tokens: int = CHUNK_TOKENS):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"Distillation alpha={alpha!r}: expected a value in [0, 1]")
        if not float(temperature) > 0:
            raise ValueError(f"Distillation temperature={temperature!r}: expected > 0")
        if not isinstance(teacher, (str, Path, nn.Module)):
            raise TypeError(f"Distillation teacher: expected 'copy', a HF model directory or a model, got "
                            f"{type(teacher).__name__}")
        self.teacher_spec = teacher
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.teacher_dtype, self.chunk_tokens = teacher_dtype, int(chunk_tokens)
        self.teacher: Optional[nn.Module] = None
        self._placed = False
        self._sums: Optional[torch.Tensor] = None  # kd, ce, teacher ce (each x tokens), tokens: microbatch sums

    def __repr__(self) -> str:  # goes into the checkpoint's algorithm state: no weights, no model repr
        spec = self.teacher_spec if isinstance(self.teacher_spec, (str, Path)) else type(self.teacher_spec).__name__
        return f"Distillation(teacher={str(spec)!r}, alpha={self.alpha}, temperature={self.temperature})"

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.AFTER_LOSS, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            student = find_hf_model(state.model)
            if self.teacher_spec is student:
                raise ValueError("Distillation teacher is the student model itself; use teacher='copy'")
            if isinstance(self.teacher_spec, str) and self.teacher_spec == "copy":
                self.teacher = frozen_copy(student)
            else:
                self.teacher = load_teacher(self.teacher_spec)
            s_vocab, t_vocab = student.config.vocab_size, getattr(self.teacher.config, "vocab_size", None)
            if t_vocab != s_vocab:
                raise ValueError(f"Distillation teacher vocab_size={t_vocab} differs from the student's {s_vocab}")
            logger.log_hyperparameters({"distill/alpha": self.alpha, "distill/temperature": self.temperature})
        elif event == Event.FIT_START:
            self._place(state)
        elif event == Event.AFTER_LOSS:
            self._after_loss(state)
        elif event == Event.BATCH_END:
            if self._sums is not None:
                kd, ce, t_ce, n = self._sums.tolist()  # one device sync per batch
                if n > 0:
                    logger.log_metrics({"distill/kd_loss": kd / n, "distill/ce_loss": ce / n,
                                        "distill/teacher_ce_loss": t_ce / n, "distill/excess_loss": (ce - t_ce) / n})
            self._sums = None

    def _place(self, state: State) -> None:
        """Teacher onto the student's device/dtype, sharded like the student under FSDP."""
        if self._placed:
            return
        student_param = next(find_hf_model(state.model).parameters())
        dtype = self.teacher_dtype or student_param.dtype
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if state.fsdp_enabled:
            if state.fsdp_config_version != 1:
                raise NotImplementedError("Distillation shards the teacher with FSDP1 (parallelism_config "
                                          "{'fsdp': ...}); FSDP2 is not supported yet")
            self.teacher = self._shard(state, self.teacher.to(dtype=dtype))
        else:
            self.teacher.to(device=student_param.device, dtype=dtype)
        self._placed = True

    def _shard(self, state: State, teacher: nn.Module) -> nn.Module:
        # Same config as the student (a copy keeps its device mesh), minus activation checkpointing
        # (the teacher runs without grad); decoder layers are the FSDP units.
        from composer.distributed.dist_strategy import prepare_fsdp_module

        if getattr(teacher, "fsdp_wrap_fn", None) is None:
            layer_type = type(teacher.model.layers[0])
            teacher.fsdp_wrap_fn = lambda module: isinstance(module, layer_type)
        cfg = copy.copy(state.fsdp_config)
        cfg.activation_checkpointing = cfg.activation_cpu_offload = False
        holder = _TeacherHolder(teacher)
        prepare_fsdp_module(holder, None, cfg, state.precision, state.device)
        return holder.model  # the FSDP-wrapped teacher; forward all-gathers one layer at a time

    def _after_loss(self, state: State) -> None:
        if self.teacher is None:
            raise RuntimeError("Distillation has not been applied yet (Event.INIT)")
        self._place(state)  # a Trainer whose fit() starts without FIT_START events (defensive)
        outputs, batch = state.outputs, state.batch
        ce = outputs.get("loss") if hasattr(outputs, "get") else None
        if ce is None:
            raise ValueError("Distillation needs the model outputs to carry the LM loss ('loss', i.e. a batch "
                             "with labels) and the logits ('logits', HuggingFaceModel(use_logits=True))")
        with get_precision_context(state.precision, state.precision_config):
            t_logits = teacher_logits(self.teacher, batch)
        loss = state.loss["total"] if isinstance(state.loss, dict) else state.loss
        total, kd = apply_distillation(loss, ce, outputs["logits"], t_logits, batch, self.alpha, self.temperature,
                                       self.chunk_tokens)
        if isinstance(state.loss, dict):
            if "total" in state.loss:
                state.loss["total"] = total
            else:
                state.loss["distillation"] = self.alpha * (kd - ce)
        else:
            state.loss = total
        mask = kd_token_mask(batch)
        n = mask.sum().to(kd) if mask is not None else kd.new_tensor(float(outputs["logits"].shape[:-1].numel()))
        t_ce, _ = teacher_ce(t_logits, batch["labels"], self.chunk_tokens)  # labels: ce exists, checked above
        sums = torch.stack([kd.detach() * n, ce.detach().float() * n, t_ce, n])
        self._sums = sums if self._sums is None else self._sums + sums
