"""The local next-line task as a Composer evaluator, for evaluation during training.

Composer 0.32 no longer ships in-context-learning datasets or metrics (they moved to
llm-foundry), so this is a small equivalent for multiple-choice items written by
data_prep/next_line_task.py: every item becomes one sequence per choice (context, then the
target delimiter and the choice), and the metric picks the choice with the highest summed
log-likelihood of its tokens, as lm-evaluation-harness's ``acc`` does (tokenization included,
so both give the same accuracy on the same model).

    model = HuggingFaceModel(hf, tokenizer=tok, use_logits=True, shift_labels=True,
                             eval_metrics=[LanguageCrossEntropy(), NextLineAccuracy()])
    evaluators.append(build_next_line_evaluator("runs/demo/next_line", tok, batch_size=4))

The metric is logged as ``metrics/next_line/NextLineAccuracy``.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

__all__ = ["NextLineDataset", "NextLineAccuracy", "collate_choices", "build_next_line_evaluator"]


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM split: trailing context whitespace moves to the continuation, and the
    continuation's ids are those of context+continuation after the context's ids."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


class NextLineDataset(Dataset):
    """Items of ``task_dir/next_line_*.jsonl`` (or the given task files), tokenized up front."""

    def __init__(self, task_dir: str, tokenizer: Any, tasks: Optional[Sequence[str]] = None,
                 max_length: int = 2048, delimiter: str = "\n"):
        files = ([os.path.join(task_dir, f"{t}.jsonl") for t in tasks] if tasks
                 else sorted(glob.glob(os.path.join(task_dir, "next_line_*.jsonl"))))
        if not files:
            raise FileNotFoundError(f"no next_line_*.jsonl in {task_dir!r} (build it with data_prep/next_line_task.py)")
        self.items: list[tuple[list[list[int]], list[int], int]] = []
        for path in files:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        it = json.loads(line)
                        context, choices, label = it["context"], it["choices"], int(it["label"])
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                        raise ValueError(f"{path}:{n}: expected {{context, choices, label}} ({err})") from None
                    seqs, n_ctx = [], []
                    for c in choices:
                        ctx, cont = _encode_pair(tokenizer, context, delimiter + c)
                        # like lm-eval: keep the last max_length+1 tokens, the last one is only a label
                        ids = (ctx + cont)[-(max_length + 1):]
                        seqs.append(ids)
                        n_ctx.append(len(ids) - len(cont))
                    self.items.append((seqs, n_ctx, label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i] + (i,)


def collate_choices(items, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """One row per (item, choice), right-padded; ``labels`` are the choice's tokens, -100 elsewhere
    (HuggingFaceModel shifts them onto the positions that predict them)."""
    rows = [(ids, k, idx, c == label) for seqs, n_ctx, label, idx in items
            for c, (ids, k) in enumerate(zip(seqs, n_ctx))]
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, k, _, _) in enumerate(rows):
        t = torch.tensor(ids)
        input_ids[r, :len(ids)] = t
        mask[r, :len(ids)] = 1
        labels[r, k:len(ids)] = t[k:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "item_index": torch.tensor([r[2] for r in rows]), "is_gold": torch.tensor([r[3] for r in rows])}


class NextLineAccuracy(Metric):
    """Fraction of items whose true choice has the highest summed log-likelihood (lm-eval ``acc``)."""

    needs_batch = True  # HuggingFaceModel.update_metric then passes the batch (item ids, gold flags)
    full_state_update = False

    def __init__(self, dist_sync_on_step: bool = False):
        super().__init__(dist_sync_on_step=dist_sync_on_step)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, batch: dict, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        logp = torch.log_softmax(outputs.float(), dim=-1)
        keep = labels != -100
        tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = (tok * keep).sum(-1)
        ids, gold = batch["item_index"].to(scores.device), batch["is_gold"].to(scores.device)
        # rows of one item are adjacent (collate_choices); a split item would be scored wrongly
        _, counts = torch.unique_consecutive(ids, return_counts=True)
        if int(ids.unique().numel()) != len(counts):
            raise ValueError("NextLineAccuracy: an item's choices are not adjacent in the batch; "
                             "do not split next-line batches into microbatches")
        for s, g in zip(scores.split(counts.tolist()), gold.split(counts.tolist())):
            self.correct += float(int(s.argmax()) == int(g.int().argmax()))
            self.total += 1

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


def build_next_line_evaluator(task_dir: str, tokenizer: Any, batch_size: int = 4, label: str = "next_line",
                              tasks: Optional[Sequence[str]] = None, max_length: int = 2048,
                              subset_num_batches: Optional[int] = None):
    """A Composer ``Evaluator`` over the task; ``batch_size`` counts items (4 rows each). The model
    needs ``NextLineAccuracy()`` among its eval metrics."""
    from composer.core import Evaluator
    from composer.utils import dist

    ds = NextLineDataset(task_dir, tokenizer, tasks, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    dl = DataLoader(ds, batch_size=batch_size, sampler=dist.get_sampler(ds, shuffle=False, drop_last=False),
                    collate_fn=lambda items: collate_choices(items, pad))
    rows = batch_size * max(len(s) for s, _, _ in ds.items)
    # a whole batch per microbatch: the metric needs all choices of an item together
    return Evaluator(label=label, dataloader=dl, metric_names=["NextLineAccuracy"],
                     subset_num_batches=subset_num_batches, device_eval_microbatch_size=rows)
