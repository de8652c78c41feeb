"""Evaluation: per-domain held-out loss (domain_loss), the local next-line task as a Composer
evaluator (next_line), and lm-evaluation-harness runs over HF directories (harness).
"""
