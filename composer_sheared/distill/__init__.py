"""Knowledge distillation from a frozen teacher (trainer-agnostic): the chunked logit-KL loss and its
combination with the LM loss (kd), and the frozen teacher (teacher)."""
from composer_sheared.distill.kd import CHUNK_TOKENS, apply_distillation, kd_loss, kd_token_mask, teacher_ce
from composer_sheared.distill.teacher import frozen_copy, load_teacher, teacher_logits

__all__ = ["CHUNK_TOKENS", "apply_distillation", "frozen_copy", "kd_loss", "kd_token_mask", "load_teacher",
           "teacher_ce", "teacher_logits"]
