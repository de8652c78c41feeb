"""Per-domain held-out loss of a HF causal LM: token-mean cross-entropy over the first batches of
each domain's eval split (the same unshuffled samples the training evaluators read). Core: no
Composer."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["domain_losses"]


@torch.no_grad()
def domain_losses(model, mds: str | Path, domains: Sequence[str], batches: int, batch_size: int,
                  split: str = "eval", desc: str = "eval") -> dict[str, float]:
    """{domain: token-mean CE} for a model or a HF directory (loaded in fp32 on CPU)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from composer_sheared.data import domain_eval_dataset

    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    was_training = model.training
    model.eval()
    out = {}
    with tqdm(total=len(domains) * batches, desc=desc, leave=False) as bar:
        for dom in domains:
            ds = domain_eval_dataset(str(mds), dom, split=split, batch_size=batch_size)
            total, count = 0.0, 0
            for i, b in enumerate(DataLoader(ds, batch_size=batch_size)):
                if i >= batches:
                    break
                dev = next(model.parameters()).device  # a model the caller put on a GPU stays there
                logits = model(input_ids=b["input_ids"].to(dev)).logits[:, :-1].float()
                labels = b["labels"][:, 1:].to(dev)
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100, reduction="sum"))
                count += int((labels != -100).sum())
                bar.update(1)
            if count == 0:
                raise ValueError(f"domain {dom!r}: no eval tokens in {Path(mds) / split / dom}")
            out[dom] = total / count
    model.train(was_training)
    return out
