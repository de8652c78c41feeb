"""Mask schedules: the projected schedule holds the expected size on the warm-up target at every
step and ends at exactly the target shape; both schedules keep masked == sliced."""
import pytest
import torch

from composer_sheared import ModelShape, apply_shearing, prune_to_target
from tests.conftest import randomize_masks, tiny_model
from tests.helpers import assert_same_function

# for _model()'s 3-layer, 2-KV-head source (the conftest TARGET is for the 4-layer default)
TARGET_3L = {"num_layers": 2, "hidden_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1,
             "intermediate_size": 30}


def _model(**kw):
    return tiny_model("llama", num_key_value_heads=2, num_hidden_layers=3, **kw)


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.6, 1.0])
def test_projection_puts_every_row_on_the_warmup_target(progress):
    model = _model()
    masks = apply_shearing(model, TARGET_3L, schedule="projection")
    randomize_masks(masks, scale=8.0)
    masks.warmup_progress.fill_(progress)
    probs = masks.keep_probabilities()
    fracs = masks.target_fractions()
    for name, p in probs.items():
        per_row = p.mean(-1)
        assert torch.allclose(per_row, fracs[name].expand_as(per_row), atol=1e-4), name
    _, stats = masks.lagrangian()
    span = masks.source.num_params() - masks.target.num_params()
    assert abs(float(stats["expected_params"] - stats["warmup_target_params"])) <= 1e-4 * span
    assert abs(float(stats["stray"])) <= 1e-4


def test_lagrangian_schedule_does_not_project():
    """The paper's schedule leaves the logits alone: its expected size is whatever they say."""
    model = _model()
    masks = apply_shearing(model, TARGET_3L, schedule="lagrangian")
    masks.warmup_progress.fill_(1.0)
    _, stats = masks.lagrangian()
    assert float(stats["stray"]) > 0.9  # init keeps everything; the target wants the reduction


def test_projection_keeps_the_order_inside_rows():
    masks = apply_shearing(_model(), TARGET_3L, schedule="projection")
    randomize_masks(masks, scale=5.0)
    masks.warmup_progress.fill_(0.5)
    eff = masks.effective_log_alpha()
    for name, la in masks.log_alpha.items():
        assert torch.equal(la.argsort(-1), eff[name].argsort(-1))


def test_projection_training_ends_at_the_exact_target_and_slices_equal():
    torch.manual_seed(0)
    model = _model(attn_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    masks = apply_shearing(model, TARGET_3L, opt, schedule="projection", mask_lr=0.5, train_gates="sampled")
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    strays = []
    for step in range(12):
        masks.constrain_()
        masks.warmup_progress.fill_(min(1.0, step / 6))
        loss = model(input_ids=ids, labels=ids).loss + masks.last_lagrangian
        strays.append(float(masks.last_stats["stray"]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert max(abs(s) for s in strays) <= 1e-3
    assert masks.lambda_1["hidden"].grad is None or float(masks.lambda_1["hidden"].abs()) == 0.0
    model.eval()
    sliced = prune_to_target(model)
    assert ModelShape.from_hf_config(sliced.config) == masks.target
    with torch.no_grad():
        assert_same_function(model(ids).logits, sliced(ids).logits, atol=1e-4)
    # binary gates: kept units are not rescaled, so untouched weights are copied as they are
    assert masks.gate_values == "binary"


def test_init_log_alpha_is_used_and_checked():
    model = _model()
    L = model.config.num_hidden_layers
    init = {"layer": torch.tensor([9.0, -9.0, 3.0])}
    masks = apply_shearing(model, TARGET_3L, schedule="projection", init_log_alpha=init)
    assert torch.equal(masks.log_alpha["layer"].detach(), init["layer"])
    model.eval()
    masks.eval()
    gates = masks.deterministic_gates()
    assert gates["layer"].tolist() == [1.0, 0.0, 1.0]  # the two best layers of 3 survive
    with pytest.raises(ValueError, match="shape"):
        apply_shearing(_model(), TARGET_3L, init_log_alpha={"layer": torch.zeros(L + 1)})
    with pytest.raises(ValueError, match="kv_group|does not prune"):
        apply_shearing(_model(), {"num_layers": 2}, init_log_alpha={"hidden": torch.zeros(32)})


def test_projection_expected_eval_shape_counts_the_projected_logits():
    """eval_shape='expected' under the projected schedule keeps the warm-up target's count per row,
    not the count the raw (unshifted) logits would give."""
    masks = apply_shearing(_model(), TARGET_3L, schedule="projection", eval_shape="expected")
    randomize_masks(masks, scale=8.0)
    with torch.no_grad():
        masks.log_alpha["intermediate"].sub_(20.0)  # raw logits alone would keep almost nothing
    masks.warmup_progress.fill_(0.5)
    m = masks.structures["intermediate"].row_size
    want = round(m * float(masks.target_fractions()["intermediate"]))
    gates = masks.deterministic_gates("expected")
    assert ((gates["intermediate"] > 0).sum(-1) == want).all()


# ---- smooth (noise-free) training gates -------------------------------------------------------
@pytest.mark.parametrize("progress", [0.0, 0.3, 0.7])
def test_smooth_gates_hold_their_mass_on_the_warmup_target_without_noise(progress):
    """During the warm-up each row's gates sum to the warm-up target, and two training forwards see
    the same gates (no noise), fractional only at the cut."""
    masks = apply_shearing(_model(), TARGET_3L, schedule="projection", train_gates="smooth")
    randomize_masks(masks, scale=8.0)
    masks.train()
    masks.warmup_progress.fill_(progress)
    z1 = {k: v.detach().clone() for k, v in masks().items() if v is not None}
    z2 = {k: v.detach() for k, v in masks().items() if v is not None}
    assert all(torch.equal(z1[k], z2[k]) for k in z1)
    fracs = masks.target_fractions()
    keep = masks.keep_probabilities()
    for name, g in keep.items():
        per_row = g.mean(-1)
        assert torch.allclose(per_row, fracs[name].expand_as(per_row), atol=1e-4), name
        # the ordering decides: a unit with a higher logit never has a smaller gate
        order = masks.log_alpha[name].detach().argsort(-1)
        assert (g.detach().gather(-1, order).diff(dim=-1) >= -1e-6).all(), name


def test_smooth_gates_sharpen_over_the_warmup():
    masks = apply_shearing(_model(), TARGET_3L, schedule="projection", train_gates="smooth")
    randomize_masks(masks, scale=8.0)
    fractional = []
    for progress in (0.2, 0.6, 0.95):
        masks.warmup_progress.fill_(progress)
        g = masks.keep_probabilities()["intermediate"].detach()
        fractional.append(int(((g > 0.01) & (g < 0.99)).sum()))
    assert fractional[0] > fractional[1] > fractional[2]


def test_smooth_gates_train_the_exact_target_after_the_warmup():
    """After the warm-up the training gates are the sliced model's: train loss == sliced loss, and
    the logits still get a (zero) gradient so DDP sees every parameter used."""
    torch.manual_seed(0)
    model = _model(attn_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    masks = apply_shearing(model, TARGET_3L, opt, schedule="projection", train_gates="smooth", mask_lr=0.5)
    randomize_masks(masks, scale=6.0)
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    for step in range(8):
        masks.warmup_progress.fill_(min(1.0, step / 4))
        loss = model(input_ids=ids, labels=ids).loss + masks.last_lagrangian
        assert abs(float(masks.last_stats["stray"])) <= 1e-3
        loss.backward()
        if step >= 4:
            assert all(p.grad is not None and float(p.grad.abs().max()) == 0.0 for p in masks.log_alpha.values())
        opt.step()
        opt.zero_grad()
    train_loss = float(model(input_ids=ids, labels=ids).loss)  # still in train mode: top-k gates
    model.eval()
    sliced = prune_to_target(model)
    assert ModelShape.from_hf_config(sliced.config) == masks.target
    with torch.no_grad():
        assert abs(float(sliced(input_ids=ids, labels=ids).loss) - train_loss) <= 1e-4


def test_smooth_gates_need_the_projected_schedule():
    with pytest.raises(ValueError, match="smooth"):
        apply_shearing(_model(), TARGET_3L, schedule="lagrangian", train_gates="smooth")
