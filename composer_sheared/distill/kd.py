"""Knowledge distillation from a frozen teacher: logit KL at a temperature (trainer-agnostic).

kd_loss is the token mean of T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the
positions that also carry the LM loss. The T^2 keeps the gradient's scale independent of T
(the softened gradient is (q - p) / T per logit). It is computed in fp32 in chunks of tokens,
and its gradient is formed in the same pass, so the extra memory is one logits-sized tensor in
the student's dtype (the gradient itself) plus three fp32 buffers of `chunk_tokens` x vocab.

The loss combination used by the Composer algorithm and by `apply_distillation`:

    total = (1 - alpha) * CE + alpha * KD + (whatever else is already in the loss)

obtained as ``loss - alpha * CE + alpha * KD`` from the loss as it stands, so any other term
(the pruning Lagrangian) is left unscaled whichever order the terms were added in.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from composer_sheared.defaults import KD_ALPHA, KD_TEMPERATURE
from composer_sheared.distill.teacher import teacher_logits

__all__ = ["CHUNK_TOKENS", "apply_distillation", "kd_loss", "kd_token_mask", "teacher_ce"]

CHUNK_TOKENS = 1024  # fp32 buffers of CHUNK_TOKENS x vocab: 1024 x 128k x 4 B = 0.5 GiB each


class _ChunkedKD(torch.autograd.Function):
    """sum_rows weight * T^2 * KL(p_t || q_s) over [N, vocab] logits, in fp32 chunks of rows.

    Per row, KL = sum p (t - s) / T - lse(t / T) + lse(s / T) (p sums to 1), so no log-prob
    tensors are formed. The gradient w.r.t. the student row is weight * T * (q - p); it is
    written in the forward pass, so the fp32 softmaxes are not kept for backward. Logits must be
    finite. Rows are contiguous slices (no gather): a masked row costs compute, not memory."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, temperature: float,
                chunk: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        t_inv = 1.0 / temperature
        for a in range(0, student.shape[0], chunk):
            s = student[a:a + chunk].float() * t_inv
            t = teacher[a:a + chunk].float() * t_inv
            w = weight[a:a + chunk]
            lse_s, lse_t = torch.logsumexp(s, -1, keepdim=True), torch.logsumexp(t, -1, keepdim=True)
            diff = t - s
            p = t.sub_(lse_t).exp_()  # in place: t is not needed any more
            kl = diff.mul_(p).sum(-1) - lse_t.squeeze(-1) + lse_s.squeeze(-1)
            total += (kl * w).sum()
            if want_grad:
                q = s.sub_(lse_s).exp_()
                grad[a:a + chunk] = q.sub_(p).mul_((w * temperature).unsqueeze(-1))
        if want_grad:
            ctx.save_for_backward(grad)
        return total * (temperature * temperature)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = KD_TEMPERATURE,
            mask: Optional[torch.Tensor] = None, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Token-mean T^2 * KL(teacher || student) of logits [..., vocab]; fp32 scalar.

    `mask` (bool, the logits' leading shape) selects the tokens that count; no selected token
    gives 0. Only the student receives a gradient (the teacher's logits are detached)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (do the two models share the vocabulary?)")
    if not temperature > 0:
        raise ValueError(f"kd_loss: temperature={temperature!r}, expected > 0")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    if mask is None:
        weight = torch.full((student.shape[0],), 1.0 / max(student.shape[0], 1), device=student.device)
    else:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"kd_loss: mask shape {tuple(mask.shape)}, expected {tuple(student_logits.shape[:-1])}")
        weight = mask.reshape(-1).to(device=student.device, dtype=torch.float32)
        weight = weight / weight.sum().clamp_min(1.0)
    return _ChunkedKD.apply(student, teacher, weight, float(temperature), int(chunk_tokens))


def kd_token_mask(batch: Mapping[str, Any], seq_len: Optional[int] = None) -> Optional[torch.Tensor]:
    """The positions whose logits the causal LM loss uses: position t counts when labels[t+1] is
    not -100 (HF shifts the labels inside the model), else where the attention mask is set.
    None means every position."""
    labels = batch.get("labels")
    if labels is not None:
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[..., :-1] = labels[..., 1:] != -100
        return mask
    att = batch.get("attention_mask")
    return None if att is None else att.to(torch.bool)


@torch.no_grad()
def teacher_ce(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the causal LM cross-entropy, number of tokens) of `logits` [batch, seq, vocab]
    against HF-style `labels` (position t predicts labels[t + 1]; -100 is ignored), in fp32 chunks
    of rows. Used to score the frozen source on the student's batch: the student's loss minus this
    is the damage pruning has done, free of which domains the batch happened to draw."""
    vocab = logits.shape[-1]
    logits, labels = logits.reshape(-1, logits.shape[-2], vocab), labels.reshape(-1, labels.shape[-1])
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for row in range(logits.shape[0]):  # views of one sequence at a time: no copy of the whole logits
        target, lg = labels[row, 1:].to(logits.device), logits[row, :-1]
        for a in range(0, target.shape[0], chunk_tokens):
            total += torch.nn.functional.cross_entropy(lg[a:a + chunk_tokens].float(),
                                                       target[a:a + chunk_tokens], ignore_index=-100, reduction="sum")
    return total, (labels[:, 1:] != -100).sum().to(total)


def apply_distillation(loss: torch.Tensor, ce_loss: torch.Tensor, student_logits: torch.Tensor,
                       teacher: nn.Module | torch.Tensor, batch: Mapping[str, Any], alpha: float = KD_ALPHA,
                       temperature: float = KD_TEMPERATURE, chunk_tokens: int = CHUNK_TOKENS):
    """Functional form: returns ``(loss - alpha * ce_loss + alpha * kd, kd)``.

    `loss` is the training loss as it stands (the LM cross-entropy `ce_loss`, plus e.g. the
    pruning Lagrangian), `teacher` a frozen model run on `batch` here or its logits. alpha 0
    returns `loss` itself and a KD value without a gradient (the teacher only watches)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha={alpha!r}: expected a value in [0, 1]")
    t_logits = teacher if isinstance(teacher, torch.Tensor) else teacher_logits(teacher, batch)
    if alpha == 0.0:
        student_logits = student_logits.detach()
    kd = kd_loss(student_logits, t_logits, temperature, kd_token_mask(batch), chunk_tokens)
    return (loss if alpha == 0.0 else loss - alpha * ce_loss + alpha * kd), kd
