"""Mask behaviour in training: sampling, gradients, the Lagrangian's direction, checkpointing, compile."""
import math

import pytest
import torch

from composer_sheared import apply_shearing
from composer_sheared.pruning import get_masks, remove_shearing
from composer_sheared.pruning.hard_concrete import prob_nonzero, sample_gates, topk_gates
from tests.conftest import TARGET, randomize_masks, tiny_model


def test_prob_nonzero_matches_sampling():
    la = torch.tensor([-3.0, -0.5, 0.0, 1.0, 4.0]).repeat(40000, 1)
    z = sample_gates(la)
    assert z.min() >= 0 and z.max() <= 1
    assert torch.allclose((z > 0).float().mean(0), prob_nonzero(la[0]), atol=0.01)
    # Exactly 0 and exactly 1 both occur: the stretch-and-clamp of the hard concrete.
    assert (z == 0).any() and (z == 1).any()


def test_topk_keeps_exact_count_per_row():
    la = torch.randn(5, 7, 9)
    z = topk_gates(la, 4)
    assert ((z > 0).sum(-1) == 4).all()
    kept_scores = torch.where(z > 0, la, torch.full_like(la, math.inf)).amin(-1)
    dropped_scores = torch.where(z > 0, torch.full_like(la, -math.inf), la).amax(-1)
    assert (kept_scores > dropped_scores).all()


def test_only_needed_structures():
    model = tiny_model()
    masks = apply_shearing(model, {"intermediate_size": 20})
    assert set(masks.structures) == {"intermediate"}
    remove_shearing(model)
    masks = apply_shearing(model, {"num_attention_heads": 4, "num_key_value_heads": 4})
    assert set(masks.structures) == {"q_head"}


def test_train_mode_samples_each_forward_eval_is_deterministic():
    """Sampled gates (the paper's; the smooth default has no noise, see test_schedules.py)."""
    model = tiny_model()
    masks = apply_shearing(model, TARGET, train_gates="sampled")
    masks.warmup_progress.fill_(0.5)  # at progress 0 the projected schedule keeps every gate at 1
    ids = torch.randint(0, 96, (2, 7))
    model.train()
    model(ids)
    first = masks.current["head"].clone()
    model(ids)
    assert not torch.equal(first, masks.current["head"])
    model.eval()
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids).logits
    assert torch.equal(a, b)
    assert ((masks.current["intermediate"] > 0).sum(-1) == TARGET["intermediate_size"]).all()


def test_eval_shape_expected_uses_rounded_expected_counts():
    model = tiny_model()
    masks = apply_shearing(model, TARGET, eval_shape="expected", schedule="lagrangian")
    with torch.no_grad():
        masks.log_alpha["intermediate"].fill_(5.0)
        masks.log_alpha["intermediate"][:, :10] = -10.0  # 10 of 64 units expected off
    model.eval()
    model(torch.randint(0, 96, (1, 4)))
    assert ((masks.current["intermediate"] > 0).sum(-1) == 54).all()


def test_expected_params_exact_at_deterministic_gates():
    model = tiny_model()
    masks = apply_shearing(model, TARGET)
    randomize_masks(masks)
    probs = {n: (g > 0).float() for n, g in masks.deterministic_gates().items()}
    assert masks.expected_num_params(probs).item() == masks.target.num_params()
    all_kept = {n: torch.ones_like(p) for n, p in probs.items()}
    assert masks.expected_num_params(all_kept).item() == masks.source.num_params()


def test_gradients_and_lagrangian_ascent():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    masks = apply_shearing(model, TARGET, opt, mask_lr=0.5, lambda_lr=1.0, schedule="lagrangian")
    masks.warmup_progress.fill_(1.0)
    randomize_masks(masks, scale=1.0)  # gates strictly inside (0, 1) pass gradients
    with torch.no_grad():
        masks.log_alpha["hidden"].add_(2.0)  # more kept than the target: a positive gap
        masks.lambda_1["hidden"].fill_(0.25)
    model.train()
    ids = torch.randint(0, 96, (2, 7))
    loss = model(ids, labels=ids).loss + masks.last_lagrangian
    gap = masks.last_stats["expected/hidden"] / 32 - 24 / 32  # kept fraction minus target fraction
    opt.zero_grad()
    loss.backward()
    for p in masks.mask_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    before = masks.lambda_1["hidden"].item()
    opt.step()
    # Gradient *ascent* on the multiplier: it moves by +lr * gap (gap > 0 at the start).
    assert gap > 0.05
    assert masks.lambda_1["hidden"].item() == pytest.approx(before + gap.item(), rel=1e-5)
    # Warm-up at 0: the target is the source shape.
    masks.warmup_progress.fill_(0.0)
    assert masks.target_fractions()["hidden"].item() == 1.0


def test_activation_checkpointing_gives_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=4)
        masks = apply_shearing(model, TARGET)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(11)
        ids = torch.randint(0, 96, (2, 7))
        loss = model(ids, labels=ids).loss + masks.last_lagrangian
        loss.backward()
        grads.append([p.grad.clone() for p in masks.mask_parameters()] + [model.model.layers[0].mlp.up_proj.weight.grad.clone()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_weight_folding_and_activation_gating_train_alike():
    grads, losses = [], []
    for fold in (False, True):
        model = tiny_model(seed=5)
        masks = apply_shearing(model, TARGET, fold_into_weights=fold)
        randomize_masks(masks, scale=1.0)
        model.train()
        torch.manual_seed(12)
        ids = torch.randint(0, 96, (2, 7))
        loss = model(ids, labels=ids).loss + masks.last_lagrangian
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad for p in masks.mask_parameters()] + [model.model.layers[1].self_attn.o_proj.weight.grad])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("schedule", ["projection", "lagrangian"])
def test_torch_compile_does_not_recompile_each_step(schedule):
    import torch._dynamo as dynamo

    dynamo.reset()
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    masks = apply_shearing(model, TARGET, opt, schedule=schedule)
    compiled = torch.compile(model, backend="aot_eager")
    model.train()
    frames = []
    for step in range(4):
        masks.warmup_progress.fill_(step / 4)
        ids = torch.randint(0, 96, (2, 7))
        loss = compiled(input_ids=ids, labels=ids).loss + masks.last_lagrangian
        opt.zero_grad()
        loss.backward()
        opt.step()
        masks.constrain_()
        frames.append(dynamo.utils.counters["stats"]["unique_graphs"])
    assert frames[0] > 0
    assert frames[-1] == frames[1], f"recompiled during training: graphs per step {frames}"


def test_unsupported_model_class():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        apply_shearing(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)), {"num_layers": 1})


def test_invalid_target_through_apply():
    with pytest.raises(ValueError, match="hidden_size=64 is larger"):
        apply_shearing(tiny_model(), {"hidden_size": 64})


def test_double_apply_and_remove():
    model = tiny_model()
    apply_shearing(model, TARGET)
    with pytest.raises(ValueError, match="already has pruning masks"):
        apply_shearing(model, TARGET)
    ids = torch.randint(0, 96, (1, 5))
    remove_shearing(model)
    with pytest.raises(ValueError, match="no pruning masks"):
        get_masks(model)
    model.eval()
    ref = tiny_model().eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_mask_betas_only_for_mask_groups():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    apply_shearing(model, TARGET, opt, mask_lr=0.5, lambda_lr=0.25, mask_betas=(0.7, 0.999))
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.95), (0.7, 0.999), (0.7, 0.999)]
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.5, 0.25]
    assert [g["weight_decay"] for g in opt.param_groups][1:] == [0.0, 0.0]
    with pytest.raises(ValueError, match="SGD has no betas"):
        apply_shearing(tiny_model(), TARGET, torch.optim.SGD(model.parameters(), lr=0.1), mask_betas=(0.7, 0.999))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_lifted_masks_give_the_dense_source_then_the_masks_again(mode):
    """What reference losses "source" are measured with inside a pruning run: the dense model."""
    from tests.helpers import assert_differs, assert_same_function

    model = tiny_model()
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        dense = model(ids).logits
    masks = apply_shearing(model, TARGET)
    randomize_masks(masks)
    masks.warmup_progress.fill_(1.0)  # the target shape in train mode too
    model.train(mode == "train")
    with torch.no_grad():
        masked = model(ids).logits
        with masks.lifted():
            lifted = model(ids).logits
        again = model(ids).logits
    assert_differs(masked, dense, more_than=1e-2)
    assert_same_function(lifted, dense, atol=1e-5)
    assert_same_function(again, masked, atol=0.0)
    assert get_masks(model) is masks and not masks._lifted
