import pytest

from composer_sheared import ModelShape, validate_target
from composer_sheared.shapes import NAMED_SHAPES, resolve_target
from tests.conftest import tiny_config, tiny_model


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"num_key_value_heads": 8}),
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": True}),
    ],
)
def test_num_params_matches_hf(family, overrides):
    model = tiny_model(family, **overrides)
    shape = ModelShape.from_hf_config(model.config)
    assert shape.num_params() == sum(p.numel() for p in model.parameters())
    assert shape.qkv_bias == (family == "qwen2")


def test_from_hf_config_fields():
    s = ModelShape.from_hf_config(tiny_config(num_key_value_heads=2, tie_word_embeddings=True))
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.num_key_value_heads) == (4, 32, 8, 2)
    assert (s.head_dim, s.intermediate_size, s.vocab_size, s.tie_word_embeddings) == (8, 64, 128, True)


def test_llama2_7b_shape_counts():
    assert NAMED_SHAPES["llama2-7b"].num_params() == 6_738_415_616
    # The paper's counts leave out the RMSNorm weights (2 per layer + the final norm).
    for name, paper in (("sheared-2.7b", 2_701_393_920), ("sheared-1.3b", 1_345_323_008)):
        s = NAMED_SHAPES[name]
        assert s.num_params() - (2 * s.num_layers + 1) * s.hidden_size == paper


SRC = ModelShape(4, 64, 8, 4, 8, 128, 100, False)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"hidden_size": 65}, ["hidden_size=65", "64"]),
        ({"num_layers": 0}, ["num_layers=0", "positive"]),
        ({"intermediate_size": 200}, ["intermediate_size=200", "128"]),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, ["num_attention_heads=6", "num_key_value_heads=4"]),
        ({"num_attention_heads": 8, "num_key_value_heads": 2}, ["query heads per KV head", "8/2=4", "8/4=2"]),
        ({"head_dim": 16}, ["head_dim=16", "head_dim=8"]),
        ({"vocab_size": 50}, ["vocab_size=50", "100"]),
        ({"num_key_value_heads": 5}, ["num_key_value_heads=5", "4"]),
        ({"tie_word_embeddings": True}, ["tie_word_embeddings"]),
    ],
)
def test_invalid_targets_name_field_and_values(change, words):
    with pytest.raises(ValueError) as e:
        validate_target(SRC, SRC.replace(**change))
    for w in words:
        assert w in str(e.value)


def test_resolve_target_partial_and_unknown():
    t = resolve_target(SRC, {"hidden_size": 48, "num_layers": 3})
    assert t == SRC.replace(hidden_size=48, num_layers=3)
    with pytest.raises(ValueError, match="hiden_size"):
        resolve_target(SRC, {"hiden_size": 48})
    with pytest.raises(ValueError, match="unknown target shape"):
        resolve_target(SRC, "llama9")


def test_unsupported_model_type():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="gpt2"):
        ModelShape.from_hf_config(GPT2Config(n_layer=1, n_embd=8, n_head=2))
