"""Shared test helpers and fixtures: one tiny model shape, its pruning target, tiny MDS data.

Plain functions (importable as `from tests.conftest import ...`) for tests that build models at
module level or in parametrize; fixtures for what a test only receives:

    tiny_config / tiny_model      the tiny HF config / random model (llama, mistral, qwen2)
    tiny_tokenizer                a word-level fast tokenizer over the tiny vocabulary
    randomize_masks               spread log_alpha so gate choices differ across units
    TokenDataset, make_trainer    a tiny Composer pruning run (also used by two_rank_prune.py)
    make_data, prune_yaml         synthetic per-domain MDS data and a train.py config for it
    subprocess_env                environment for running train.py / composer in a subprocess
    fixtures: mds (module-scoped data), run_train (train.py in a subprocess), tokenizer
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SEQ, VOCAB = 32, 128
DOMAINS = ("alpha", "beta")

# The one tiny shape (GQA: 8 query heads over 4 KV heads) and a target that prunes every structure.
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
TARGET = dict(num_layers=3, hidden_size=24, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32)


def _families():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    return {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_config(family: str = "llama", **overrides):
    return _families()[family][0](**{**TINY, "attn_implementation": "eager", **overrides})


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    import torch

    torch.manual_seed(seed)
    return _families()[family][1](tiny_config(family, **overrides))


def tiny_tokenizer(vocab_size: int = VOCAB):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def randomize_masks(masks, seed: int = 1, scale: float = 3.0) -> None:
    """Spread log_alpha so top-k choices and soft values differ across units."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


class TokenDataset:
    """Deterministic sequences with a learnable pattern (next token = token + 1 mod vocab)."""

    def __init__(self, n=100_000, seq_len=16, vocab=VOCAB):
        self.n, self.seq_len, self.vocab = n, seq_len, vocab

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import torch

        start = int(torch.randint(0, self.vocab, (1,), generator=torch.Generator().manual_seed(i)))
        ids = (torch.arange(self.seq_len) + start) % self.vocab
        return {"input_ids": ids, "labels": ids.clone()}


def make_trainer(max_duration="40ba", warmup="20ba", seed=7, batch_size=4, tokenizer=None, dist_sampler=False,
                 mask_betas=None, algo_kw=None, **trainer_kw):
    """(Composer Trainer pruning the tiny model to TARGET on TokenDataset, its ShearingPruning)."""
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from composer.optim import DecoupledAdamW
    from composer.utils import dist
    from torch.utils.data import DataLoader

    from composer_sheared import ShearingPruning

    model = HuggingFaceModel(tiny_model(seed=seed), tokenizer=tokenizer, use_logits=True)
    opt = DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    ds = TokenDataset()
    sampler = dist.get_sampler(ds, shuffle=False) if dist_sampler else None
    # the paper's schedule unless a test asks for another (algo_kw)
    algo_kw = {"schedule": "lagrangian", "mask_init": "uniform"} if algo_kw is None else algo_kw
    algo = ShearingPruning(TARGET, lagrangian_warmup=warmup, mask_betas=mask_betas, **algo_kw)
    trainer = Trainer(model=model, train_dataloader=DataLoader(ds, batch_size=batch_size, sampler=sampler),
                      optimizers=opt, max_duration=max_duration, algorithms=[algo], device="cpu",
                      progress_bar=False, log_to_console=False, seed=seed, **trainer_kw)
    return trainer, algo


def make_data(root: Path, domains=DOMAINS, n_train: int = 48, n_eval: int = 8, seq: int = SEQ) -> Path:
    """Per-domain MDS shards: each domain a different periodic pattern + noise, so losses differ."""
    from data_prep.synthetic import write_periodic_domains

    return write_periodic_domains(root, domains, VOCAB, seq, n_train, n_eval, noise=lambda i: 0.2 * (i + 1))


def prune_yaml(data: Path, out: Path, steps: int = 4) -> dict:
    """A train.py config pruning the tiny random model on `data` with dynamic batch loading."""
    return {
        "run_name": "tiny-prune",
        "model": {"config": dict(TINY)},
        "data": {"local": str(data), "domains": list(DOMAINS), "proportions": [0.5, 0.5],
                 "eval_subset_num_batches": 1},
        "max_seq_len": SEQ,
        "global_train_batch_size": 4,
        "device_eval_batch_size": 4,
        "max_duration": f"{steps}ba",
        "eval_interval": "2ba",
        "precision": "fp32",
        "optimizer": {"lr": 1.0e-3},
        "scheduler": {"t_warmup": "1ba"},
        "pruning": {"target": dict(TARGET), "lagrangian_warmup": "2ba"},
        "dynamic_loading": {"rule": "doremi", "reference_losses": [4.0, 4.5]},
        "save_folder": str(out),
        "save_interval": f"{steps}ba",
        "progress_bar": False,
    }


def subprocess_env() -> dict:
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "PYTHONPATH": str(REPO) + os.pathsep + e.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"})
    return e


@pytest.fixture(scope="module")
def mds(tmp_path_factory) -> Path:
    """Tiny two-domain MDS data (alpha, beta), shared by a module's tests."""
    return make_data(tmp_path_factory.mktemp("mds"))


@pytest.fixture
def run_train():
    """run_train(*args, timeout=240): `python train.py *args` in the repo root; CompletedProcess."""
    def run(*args, timeout: int = 240, launcher=None):
        cmd = [*(launcher or [sys.executable]), "train.py", *map(str, args)]
        return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()
