"""A tiny Composer pruning run used by several tests (and by the two-rank script)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

GQA = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=8, num_key_value_heads=4)
TARGET = dict(num_layers=3, hidden_size=24, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32)


class TokenDataset(Dataset):
    """Deterministic sequences with a learnable pattern (next token = token + 1 mod vocab)."""

    def __init__(self, n=100_000, seq_len=16, vocab=96):
        self.n, self.seq_len, self.vocab = n, seq_len, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        start = int(torch.randint(0, self.vocab, (1,), generator=torch.Generator().manual_seed(i)))
        ids = (torch.arange(self.seq_len) + start) % self.vocab
        return {"input_ids": ids, "labels": ids.clone()}


def make_trainer(max_duration="40ba", warmup="20ba", seed=7, batch_size=4, tokenizer=None, dist_sampler=False,
                 mask_betas=None, **trainer_kw):
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from composer.optim import DecoupledAdamW
    from composer.utils import dist

    from composer_sheared import ShearingPruning
    from tests.tiny import tiny_model

    hf = tiny_model(seed=seed, **GQA)
    model = HuggingFaceModel(hf, tokenizer=tokenizer, use_logits=True)
    opt = DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    ds = TokenDataset()
    sampler = dist.get_sampler(ds, shuffle=False) if dist_sampler else None
    algo = ShearingPruning(TARGET, lagrangian_warmup=warmup, mask_betas=mask_betas)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(ds, batch_size=batch_size, sampler=sampler),
        optimizers=opt,
        max_duration=max_duration,
        algorithms=[algo],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        seed=seed,
        **trainer_kw,
    )
    return trainer, algo
