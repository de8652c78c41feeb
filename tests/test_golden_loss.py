"""Golden-loss regression: a few pruning steps on the tiny model with fixed seeds, pinned to the
numbers the code gave when this test was written. A refactor that changes any result (importance
scores, mask init, schedule, gates, slicing) fails here; a deliberate change of the method must
update the pinned values and say why.

Computed on CPU in fp32 with one intra-op thread, so reductions run in a fixed order."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import TARGET, TokenDataset, tiny_model

STEPS, BATCH, CALIBRATION = 6, 4, 3
TOL = dict(atol=1e-5, rtol=1e-5)

# position-weighted checksums of the importance scores of the tiny model (seed 3) on 3 batches
GOLDEN_SCORES = {"layer": 0.48477176328500116, "kv_group": 0.9292716935276986, "q_head": 0.9286591532009263,
                 "intermediate": 0.17285990131221135, "hidden": 344.9544401630279}
GOLDEN_SKIP_LOSS = [-0.005222320556640625, 0.0018587112426757812, -0.0018930435180664062, -0.0009865760803222656]
# per schedule: (LM loss, Lagrangian term, expected parameter count) after each step, and the
# sliced model's logits on a fixed batch (position-weighted checksum, sum of absolute values)
GOLDEN_RUNS = {
    "projection": (
        [(4.8660054206848145, 0.0, 49496.0), (4.836231708526611, 0.0, 42171.5546875),
         (4.836635112762451, 0.0, 35615.98828125), (4.811755180358887, 0.0, 29786.66015625),
         (4.742025375366211, 0.0, 24640.888671875), (4.7587571144104, 0.0, 20136.00390625)],
        (16.592584748339082, 670.7979125976562)),
    "lagrangian": (
        [(4.8565449714660645, 0.0, 13458.2666015625), (4.83845329284668, 1.650951862335205, 16033.4423828125),
         (4.8434271812438965, 2.022908926010132, 20358.056640625), (4.834342956542969, 1.127518653869629, 27100.25),
         (4.772992134094238, -0.6902824640274048, 36050.71484375),
         (4.768125534057617, -2.565913438796997, 45000.03125)],
        (-41.472482128572324, 637.36962890625)),
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def checksum(t: torch.Tensor) -> float:
    """Position-weighted sum: it changes when values move between units, which a plain sum misses."""
    flat = t.detach().double().flatten()
    return float((flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)).sum())


def _batch(data: TokenDataset, step: int) -> torch.Tensor:
    return torch.stack([data[step * BATCH + i]["input_ids"] for i in range(BATCH)])


def _calibration(data: TokenDataset) -> list[torch.Tensor]:
    return [_batch(data, 1000 + i) for i in range(CALIBRATION)]


def _run(schedule: str):
    """Importance-initialised masks trained for STEPS steps in a plain loop, then sliced."""
    from composer_sheared.pruning import apply_shearing, compute_importance, prune_to_target, scores_to_log_alpha
    from composer_sheared.pruning.apply import check_supported
    from composer_sheared.shapes import resolve_target

    torch.manual_seed(0)
    hf, data = tiny_model(seed=3), TokenDataset()
    source = check_supported(hf)
    init = scores_to_log_alpha(compute_importance(hf, _calibration(data)), source, resolve_target(source, TARGET))
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.0)
    masks = apply_shearing(hf, TARGET, opt, init_log_alpha=init, schedule=schedule)
    steps = []
    for step in range(STEPS):
        masks.constrain_()
        masks.warmup_progress.fill_(min(1.0, (step + 1) / STEPS))
        batch = _batch(data, step)
        lm = hf(batch, labels=batch).loss
        lag = masks.last_lagrangian
        opt.zero_grad()
        (lm + lag).backward()
        opt.step()
        steps.append((float(lm), float(lag), float(masks.expected_num_params())))
    with torch.no_grad():
        logits = prune_to_target(hf.eval())(_batch(data, 2000)).logits
    return steps, (checksum(logits), float(logits.abs().sum()))


def test_importance_scores_match_the_pinned_values():
    from composer_sheared.pruning import compute_importance

    hf = tiny_model(seed=3)
    batches = _calibration(TokenDataset())
    scores = compute_importance(hf, batches)
    torch.testing.assert_close({k: checksum(v) for k, v in scores.items()}, GOLDEN_SCORES, **TOL)
    skip = compute_importance(hf, batches, structures=["layer"], layer_metric="skip_loss")["layer"]
    torch.testing.assert_close(skip, torch.tensor(GOLDEN_SKIP_LOSS), **TOL)


@pytest.mark.parametrize("schedule", sorted(GOLDEN_RUNS))
def test_pruning_steps_match_the_pinned_losses(schedule):
    steps, logits = _run(schedule)
    golden_steps, golden_logits = GOLDEN_RUNS[schedule]
    torch.testing.assert_close(torch.tensor(steps, dtype=torch.float64),
                               torch.tensor(golden_steps, dtype=torch.float64), **TOL)
    # the logit checksum sums ~4000 values, so its absolute error is larger than one loss's
    torch.testing.assert_close(logits, golden_logits, atol=1e-3, rtol=1e-5)
