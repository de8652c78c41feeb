"""Importance scores rank a planted important unit first, for every structure (MHA and GQA)."""
import pytest
import torch

from composer_sheared.pruning.importance import (
    STRUCTURES,
    compute_importance,
    magnitude_scores,
    random_scores,
    structure_shapes,
)
from composer_sheared.shapes import ModelShape
from tests.conftest import tiny_model

# MHA (8 KV heads of 1 query head) and GQA (2 KV heads of 4 query heads)
FAMILIES = {"llama_gqa": ("llama", {"num_key_value_heads": 2}), "llama_mha": ("llama", {"num_key_value_heads": 8}),
            "qwen2_gqa": ("qwen2", {"num_key_value_heads": 4})}


def _batches(n=3, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 12), generator=g) for _ in range(n)]


def _model(case, **extra):
    family, overrides = FAMILIES[case]
    return tiny_model(family, **{"num_hidden_layers": 3, "vocab_size": 96, "intermediate_size": 48, **overrides, **extra}).eval()


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_layouts_and_hooks_removed(case):
    model = _model(case)
    ids = _batches(1)[0]
    with torch.no_grad():
        before = model(ids).logits
    scores = compute_importance(model, _batches())
    src = ModelShape.from_hf_config(model.config)
    assert list(scores) == list(STRUCTURES)
    assert {n: tuple(s.shape) for n, s in scores.items()} == structure_shapes(src)
    # No hook is left behind: the model computes what it computed before.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    only = compute_importance(model, _batches(), structures=["hidden"])
    assert list(only) == ["hidden"] and torch.allclose(only["hidden"], scores["hidden"])


def test_head_and_channel_scores_are_the_documented_statistics():
    """q_head = mean over tokens of ||W_o[:, h] x_h||; intermediate = mean |x_j| * ||W_down[:, j]||."""
    model = _model("llama_gqa")
    src = ModelShape.from_hf_config(model.config)
    H, hd = src.num_attention_heads, src.head_dim
    seen = {}
    layer = model.model.layers[1]
    h1 = layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o", a[0]))
    h2 = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("down", a[0]))
    ids = _batches(1)[0]
    with torch.no_grad():
        model(ids)
    h1.remove(), h2.remove()
    w = layer.self_attn.o_proj.weight
    expected = torch.stack([(seen["o"][..., h * hd:(h + 1) * hd] @ w[:, h * hd:(h + 1) * hd].T).norm(dim=-1).mean()
                            for h in range(H)]).reshape(src.num_key_value_heads, src.group_size)
    scores = compute_importance(model, [ids])
    assert torch.allclose(scores["q_head"][1], expected, rtol=1e-4)
    assert torch.allclose(scores["kv_group"][1], expected.sum(-1), rtol=1e-4)
    inter = seen["down"].abs().mean((0, 1)) * layer.mlp.down_proj.weight.norm(dim=0)
    assert torch.allclose(scores["intermediate"][1], inter, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_planted_heads_rank_first(case):
    model = _model(case)
    src = ModelShape.from_hf_config(model.config)
    G, g, hd = src.num_key_value_heads, src.group_size, src.head_dim
    planted = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            grp, pos = (i + 1) % G, (i + 2) % g
            head = grp * g + pos
            layer.self_attn.o_proj.weight[:, head * hd:(head + 1) * hd] *= 30.0
            planted[i] = (grp, pos)
    scores = compute_importance(model, _batches(), structures=["kv_group", "q_head"])
    for i, (grp, pos) in planted.items():
        assert scores["kv_group"][i].argmax().item() == grp
        if g > 1:
            assert scores["q_head"][i, grp].argmax().item() == pos
    # max-reduction agrees on the planted group
    by_max = compute_importance(model, _batches(), structures=["kv_group"], kv_reduce="max")
    assert [by_max["kv_group"][i].argmax().item() for i in planted] == [grp for grp, _ in planted.values()]


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_planted_channels_rank_first(case):
    model = _model(case)
    base = model.model
    chans = [5, 17, 40]
    with torch.no_grad():
        for i, layer in enumerate(base.layers):
            layer.mlp.up_proj.weight[chans[i]] *= 20.0
    assert compute_importance(model, _batches(), structures=["intermediate"])["intermediate"].argmax(-1).tolist() == chans
    model = _model(case)
    with torch.no_grad():  # separately: a hidden channel every RMSNorm amplifies
        for norm in [model.model.norm] + [n for lyr in model.model.layers
                                          for n in (lyr.input_layernorm, lyr.post_attention_layernorm)]:
            norm.weight[11] *= 20.0
    assert compute_importance(model, _batches(), structures=["hidden"])["hidden"].argmax().item() == 11


def _one_layer_model():
    """Layer 1 alone makes the model predict token 5 (its MLP writes a large, non-negative
    multiple of token 5's LM-head row); layer 0 writes nothing (the identity), layer 2 almost nothing."""
    model = tiny_model("llama", num_key_value_heads=2, num_hidden_layers=3, vocab_size=96, intermediate_size=48).eval()
    layers = model.model.layers
    with torch.no_grad():
        for i in (0, 2):
            layers[i].self_attn.o_proj.weight.zero_()
            layers[i].mlp.down_proj.weight.zero_()
        layers[2].self_attn.o_proj.weight.normal_(0, 1e-4)
        layers[2].mlp.down_proj.weight.normal_(0, 1e-4)
        model.lm_head.weight[5] *= 20.0
        mlp = layers[1].mlp
        mlp.up_proj.weight.copy_(mlp.gate_proj.weight)  # silu(z) * z >= 0: one sign for every token
        mlp.down_proj.weight.copy_(model.lm_head.weight[5][:, None].expand_as(mlp.down_proj.weight) * 10.0)
    return model


def test_planted_layer_ranks_first_for_every_metric():
    model = _one_layer_model()
    batches = []
    for b in _batches(3):
        b = b.clone()
        b[:, 1:] = 5  # the next token is always the one layer 1 predicts
        batches.append(b)
    scores = {m: compute_importance(model, batches, structures=["layer"], layer_metric=m)["layer"]
              for m in ("block_influence", "skip_loss")}
    for metric, layer in scores.items():
        assert layer.argmax().item() == 1, (metric, layer)
        assert layer[1] > 100 * layer[[0, 2]].abs().max(), (metric, layer)
        assert layer[0].abs() < 1e-6  # layer 0 is exactly the identity
    assert scores["skip_loss"][1] > 1.0  # skipping the planted layer costs loss


def test_bad_arguments():
    model = _model("llama_gqa")
    with pytest.raises(ValueError, match="layer_metric"):
        compute_importance(model, _batches(), layer_metric="nope")
    with pytest.raises(ValueError, match="unknown structure"):
        compute_importance(model, _batches(), structures=["heads"])
    with pytest.raises(ValueError, match="empty"):
        compute_importance(model, [])
    with pytest.raises(ValueError, match="input_ids"):
        compute_importance(model, [{"ids": torch.zeros(1, 3, dtype=torch.long)}])


def test_padding_is_ignored():
    """Tokens with attention_mask 0 do not count: padded and unpadded batches give the same scores."""
    model = _model("llama_gqa")
    ids = _batches(1)[0]
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=torch.long)], dim=1)
    a = compute_importance(model, [ids])
    b = compute_importance(model, [{"input_ids": padded, "attention_mask": mask}])
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6), n


def test_random_scores_are_seeded():
    model = _model("llama_gqa")
    a, b, c = random_scores(model, 3), random_scores(model, 3), random_scores(model, 4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)
    assert {n: tuple(s.shape) for n, s in a.items()} == structure_shapes(ModelShape.from_hf_config(model.config))


def test_magnitude_scores_planted():
    model = _model("llama_gqa")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 7] *= 50.0
        model.model.layers[2].self_attn.o_proj.weight[:, 8:16] *= 50.0  # head 1 = group 0, position 1
    s = magnitude_scores(model)
    assert s["intermediate"][1].argmax().item() == 7
    assert s["q_head"][2, 0].argmax().item() == 1
    assert s["kv_group"][2].argmax().item() == 0
    assert s["layer"].argmax().item() in (1, 2)
