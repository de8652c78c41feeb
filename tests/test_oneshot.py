"""One-shot pruning: exact target shape, parity with the masked path at the same binary gates,
rank-based log_alpha init, and the CLI."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from composer_sheared import ModelShape, apply_shearing
from composer_sheared.cli.oneshot import main
from composer_sheared.pruning.importance import compute_importance, random_scores
from composer_sheared.pruning.oneshot import oneshot_prune, scores_to_gates, scores_to_log_alpha
from composer_sheared.pruning.slicing import prune_with_gates
from tests.conftest import TINY as TINY_MODEL, TARGET as TINY_TARGET, make_data
from tests.test_parity import CASES
from tests.conftest import tiny_model, tiny_tokenizer
from tests.helpers import assert_differs, assert_same_function

PARITY = ["gqa_both", "gqa_remove_q_per_group", "all_untied", "all_tied", "qwen2_bias", "mistral", "layers"]


def _ids(vocab=96, seed=3):
    return torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["importance", "random"])
@pytest.mark.parametrize("case", PARITY)
def test_oneshot_equals_masked_with_same_binary_gates(case, method):
    family, overrides, target = CASES[case]
    model = tiny_model(family, **overrides).eval()
    ids = _ids()
    scores = compute_importance(model, [_ids(seed=s) for s in range(2)]) if method == "importance" \
        else random_scores(model, seed=7)
    pruned = oneshot_prune(model, target, scores)
    with torch.no_grad():
        dense = model(ids).logits
        sliced = pruned(ids).logits

    masks = apply_shearing(model, target)
    gates = scores_to_gates(scores, masks.source, masks.target)
    with torch.no_grad():  # saturated log_alpha: top-k picks the gates' units, soft value exactly 1
        for name, z in gates.items():
            masks.log_alpha[name].copy_(torch.where(z > 0, 100.0, -100.0))
    model.eval()
    assert all(torch.equal(masks.deterministic_gates()[n], gates[n]) for n in gates)
    with torch.no_grad():
        masked = model(ids).logits
    assert_same_function(masked, sliced, atol=1e-4)
    assert_differs(masked, dense, 1e-2)  # pruning changed the function
    assert ModelShape.from_hf_config(pruned.config) == masks.target
    assert sum(p.numel() for p in pruned.parameters()) == masks.target.num_params()


def test_gates_keep_top_scores_per_row():
    model = tiny_model("llama", num_key_value_heads=2)
    src = ModelShape.from_hf_config(model.config)
    scores = random_scores(model, seed=0)
    target = {"num_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 30}
    gates = scores_to_gates(scores, src, target)
    assert sorted(gates) == ["intermediate", "kv_group", "layer", "q_head"]  # hidden is not pruned
    for name, z in gates.items():
        k = int(z.sum(-1).flatten()[0])
        kept_min = torch.where(z > 0, scores[name], torch.inf).amin(-1)
        dropped_max = torch.where(z > 0, -torch.inf, scores[name]).amax(-1)
        assert bool((kept_min > dropped_max).all()), name
        assert bool((z.sum(-1) == k).all()), name
    assert gates["q_head"].sum(-1).eq(2).all() and gates["kv_group"].sum(-1).eq(1).all()
    with pytest.raises(ValueError, match="no scores for 'layer'"):
        scores_to_gates({k: v for k, v in scores.items() if k != "layer"}, src, target)
    with pytest.raises(ValueError, match=r"scores\['hidden'\] has shape"):
        scores_to_gates({**scores, "hidden": torch.zeros(3)}, src, {"hidden_size": 16})


def test_explicit_gates_are_checked():
    model = tiny_model("llama")
    src = ModelShape.from_hf_config(model.config)
    gates = scores_to_gates(random_scores(model, 0), src, {"intermediate_size": 30})
    bad = gates["intermediate"].clone()
    bad[0, bad[0].argmin()] = 1.0
    with pytest.raises(ValueError, match=r"gates\['intermediate'\] keeps \[30, 31\]"):
        prune_with_gates(model, {"intermediate_size": 30}, {"intermediate": bad})
    with pytest.raises(ValueError, match="prunes exactly"):
        prune_with_gates(model, {"intermediate_size": 30}, {**gates, "hidden": torch.ones(32)})
    with pytest.raises(ValueError, match="binary"):
        prune_with_gates(model, {"intermediate_size": 30}, {"intermediate": gates["intermediate"] * 0.5})


def test_log_alpha_from_ranks_initialises_masks_to_the_same_choice():
    model = tiny_model("llama", num_key_value_heads=2)
    target = {"num_layers": 2, "hidden_size": 24, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 30}
    scores = compute_importance(model, [_ids()])
    masks = apply_shearing(model, target)
    init = scores_to_log_alpha(scores, masks.source, masks.target, spread=4.0)
    assert sorted(init) == sorted(masks.structures)
    for name, la in init.items():
        assert torch.allclose(la.amax(-1), torch.tensor(4.0)) and torch.allclose(la.amin(-1), torch.tensor(-4.0))
        # linear in rank: the sorted row is evenly spaced
        diffs = la.sort(-1, descending=True).values.diff(dim=-1)
        assert torch.allclose(diffs, diffs.flatten()[0].expand_as(diffs))
        # higher score -> higher log_alpha
        order = scores[name].argsort(-1)
        assert bool((la.gather(-1, order).diff(dim=-1) > 0).all()), name
    with torch.no_grad():
        for name, la in init.items():
            masks.log_alpha[name].copy_(la)
    gates = scores_to_gates(scores, masks.source, masks.target)
    det = masks.deterministic_gates()
    assert all(torch.equal(det[n] > 0, gates[n] > 0) for n in gates)


def test_random_pruning_is_deterministic_for_a_seed():
    model = tiny_model("llama", num_key_value_heads=2)
    target = {"num_layers": 2, "hidden_size": 24, "intermediate_size": 30}
    a = oneshot_prune(model, target, random_scores(model, 5)).state_dict()
    b = oneshot_prune(model, target, random_scores(model, 5)).state_dict()
    c = oneshot_prune(model, target, random_scores(model, 6)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---- CLI ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("oneshot")
    src = root / "src"
    tiny_model("llama", **TINY_MODEL).save_pretrained(src)
    tiny_tokenizer(TINY_MODEL["vocab_size"]).save_pretrained(src)
    make_data(root / "mds", n_train=16, n_eval=4)
    return src


@pytest.mark.parametrize("method", ["importance", "random", "magnitude"])
def test_cli_writes_hf_dir_of_the_target(source_dir, tmp_path, method):
    out = tmp_path / "out"
    target = ",".join(f"{k}={v}" for k, v in TINY_TARGET.items())
    main([str(source_dir), str(out), "--target", target, "--method", method, "--data", str(source_dir.parent / "mds"),
          "--domains", "alpha,beta", "--calib-batches", "3", "--batch-size", "2", "--seed", "1"])
    model = AutoModelForCausalLM.from_pretrained(out)
    source = ModelShape.from_hf_config(AutoModelForCausalLM.from_pretrained(source_dir).config)
    assert ModelShape.from_hf_config(model.config) == source.replace(**TINY_TARGET)
    assert sum(p.numel() for p in model.parameters()) == source.replace(**TINY_TARGET).num_params()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(source_dir).get_vocab()
    info = json.loads((out / "oneshot_pruning.json").read_text())
    assert info["method"] == method and info["target"]["hidden_size"] == TINY_TARGET["hidden_size"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_cli_random_same_seed_same_model(source_dir, tmp_path):
    outs = []
    for i, seed in enumerate(("3", "3", "4")):
        out = tmp_path / f"out{i}"
        main([str(source_dir), str(out), "--target", "hidden_size=24,intermediate_size=40", "--method", "random",
              "--seed", seed])
        outs.append(AutoModelForCausalLM.from_pretrained(out).state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not all(torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


@pytest.mark.parametrize("args,message", [
    (["--target", "num_layers=2", "--method", "pruneit"], "--method 'pruneit' is unknown"),
    (["--target", "num_layerz=2", "--method", "random"], "unknown target field(s) ['num_layerz']"),
    (["--target", "hidden_size=1000", "--method", "random"], "target.hidden_size=1000 is larger"),
    (["--target", "hidden_size=big", "--method", "random"], "hidden_size='big' is not an integer"),
    (["--target", "tiny-9b", "--method", "random"], "'tiny-9b' is neither a known shape name"),
    (["--target", "num_layers=2", "--method", "importance"], "needs calibration data"),
    (["--target", "num_layers=2", "--data", "/nonexistent/mds"], "no 'train' split directory at /nonexistent/mds/train"),
    (["--target", "num_layers=2", "--data", "MDS", "--domains", "alpha,gamma"], "domain 'gamma' has no MDS index"),
])
def test_cli_errors_name_the_problem(source_dir, tmp_path, args, message):
    args = [a.replace("MDS", str(source_dir.parent / "mds")) if a == "MDS" else a for a in args]
    with pytest.raises(SystemExit) as e:
        main([str(source_dir), str(tmp_path / "out"), *args])
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()
