"""Run by test_two_ranks_keep_identical_masks under `composer -n 2` (DDP over gloo)."""
import sys
from pathlib import Path

import torch
from composer.utils import dist

from tests.conftest import make_trainer

if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer, algo = make_trainer(max_duration="8ba", warmup="4ba", dist_sampler=True)
    trainer.fit()
    masks = algo.masks
    state = {k: v.detach().clone() for k, v in masks.state_dict().items() if isinstance(v, torch.Tensor)}
    state["_last_gates"] = masks.current["out"].detach().clone()
    torch.save(state, out / f"masks-rank{dist.get_global_rank()}.pt")
