"""The backbone: the eval-mode masked source computes exactly what the sliced model computes."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from composer_sheared import ModelShape, apply_shearing, prune_to_target
from tests.conftest import randomize_masks, tiny_model
from tests.helpers import assert_differs, assert_same_function

# (family, source overrides, target) — each row exercises one structure or combination.
CASES = {
    "mha_heads": ("llama", {"num_key_value_heads": 8}, {"num_attention_heads": 5, "num_key_value_heads": 5}),
    "gqa_remove_kv_groups": ("llama", {}, {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "gqa_remove_q_per_group": ("llama", {}, {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "gqa_both": ("llama", {"num_key_value_heads": 2}, {"num_attention_heads": 2, "num_key_value_heads": 1}),
    "layers": ("llama", {}, {"num_layers": 1}),
    "hidden": ("llama", {}, {"hidden_size": 20}),
    "intermediate": ("llama", {}, {"intermediate_size": 17}),
    "all_untied": ("llama", {}, {"num_layers": 2, "hidden_size": 24, "num_attention_heads": 2,
                                 "num_key_value_heads": 2, "intermediate_size": 30}),
    "all_tied": ("llama", {"tie_word_embeddings": True}, {"num_layers": 2, "hidden_size": 24,
                 "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 30}),
    "qwen2_bias": ("qwen2", {}, {"num_layers": 2, "hidden_size": 24, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "intermediate_size": 30}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}, {"hidden_size": 16, "num_attention_heads": 4,
                   "num_key_value_heads": 4}),
    "mistral": ("mistral", {"num_key_value_heads": 2}, {"num_layers": 2, "hidden_size": 24, "num_attention_heads": 6,
                               "num_key_value_heads": 2, "intermediate_size": 30}),
}


def _masked_and_sliced(family, overrides, target, attn="eager", seed=0, probe=None, fold=None, schedule="lagrangian"):
    """Masked source, its masks and the sliced model; with `probe` ids, also the dense logits."""
    model = tiny_model(family, seed=seed, **{"attn_implementation": attn, **overrides}).eval()
    dense = None
    if probe is not None:
        with torch.no_grad():
            dense = model(probe).logits
    masks = apply_shearing(model, target, fold_into_weights=fold, schedule=schedule)
    randomize_masks(masks, seed=seed + 1)
    masks.warmup_progress.fill_(1.0)
    return model, masks, prune_to_target(model), dense


@pytest.mark.parametrize("schedule", ["lagrangian", "projection"])
@pytest.mark.parametrize("attn,fold", [("eager", False), ("sdpa", True)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_equals_sliced(case, attn, fold, schedule):
    """Both ways of gating o_proj/down_proj (activations or folded weights), both attentions, both
    mask schedules (soft gate values folded for the paper's, binary for the projected one)."""
    family, overrides, target = CASES[case]
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(3))
    model, masks, sliced, dense_logits = _masked_and_sliced(family, overrides, target, attn, probe=ids, fold=fold,
                                                            schedule=schedule)
    with torch.no_grad():
        masked_logits = model(ids).logits
        sliced_logits = sliced(ids).logits
    assert_same_function(masked_logits, sliced_logits, atol=1e-4)
    # The comparison is not vacuous: masking changed the function.
    assert_differs(masked_logits, dense_logits, 1e-2)
    # The sliced model has exactly the target shape and parameter count.
    shape = ModelShape.from_hf_config(sliced.config)
    assert shape == masks.target
    assert sum(p.numel() for p in sliced.parameters()) == masks.target.num_params()
    assert sliced.config.head_dim == masks.source.head_dim
    assert sliced.config.num_attention_heads % sliced.config.num_key_value_heads == 0


@pytest.fixture(params=["all_untied", "all_tied", "qwen2_bias", "gqa_both"])
def roundtrip_case(request):
    return request.param


def test_save_pretrained_roundtrip(tmp_path, roundtrip_case):
    family, overrides, target = CASES[roundtrip_case]
    model, masks, sliced, _ = _masked_and_sliced(family, overrides, target)
    sliced.save_pretrained(tmp_path / "out", safe_serialization=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(loaded) is type(model)
    assert (tmp_path / "out" / "model.safetensors").exists()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert_same_function(model(ids).logits, loaded(ids).logits, atol=1e-4)
    assert loaded.config.head_dim == masks.source.head_dim
    assert loaded.config.tie_word_embeddings == masks.source.tie_word_embeddings


def test_bf16_masked_close_to_sliced():
    family, overrides, target = CASES["all_untied"]
    model = tiny_model(family, **overrides).to(torch.bfloat16).eval()
    masks = apply_shearing(model, target)
    randomize_masks(masks)
    sliced = prune_to_target(model)
    assert next(sliced.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        a, b = model(ids).logits.float(), sliced(ids).logits.float()
    assert_same_function(a, b, atol=0.05 * a.abs().max().item())
