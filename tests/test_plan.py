"""Dry-run plans: paper parameter counts, token and FLOP arithmetic."""
import io
import subprocess
import sys

import pytest

from composer_sheared.config import load_config
from composer_sheared.run.plan import PAPER_PARAMS, flops_per_token, make_plan, params_without_norms
from composer_sheared.shapes import NAMED_SHAPES
from tests.conftest import REPO

sys.path.insert(0, str(REPO))  # train.py is a script at the repository root


@pytest.mark.parametrize("yaml, name", [("prune_2.7b", "sheared-2.7b"), ("prune_1.3b", "sheared-1.3b")])
def test_dry_run_matches_paper(yaml, name, capsys):
    import train

    cfg, resolved = load_config(str(REPO / "yamls" / f"{yaml}.yaml"), ["dry_run=true"])
    plan = train.main(cfg, resolved)["plan"]
    out = capsys.readouterr().out
    paper = PAPER_PARAMS[name]
    assert abs(plan["target_params"] / paper - 1) < 0.005
    assert plan["target_params_no_norm"] == paper
    assert plan["source_params"] == 6_738_415_616
    assert plan["tokens_per_step"] == 32 * 4096 and plan["steps"] == 3200
    assert f"{paper:,}" in out and "GPU-hours" in out and "A100" in out and "H100" in out


@pytest.mark.slow
def test_dry_run_cli_needs_no_data_or_weights():
    r = subprocess.run([sys.executable, "train.py", "yamls/prune_2.7b.yaml", "dry_run=true",
                        "data.local=/does/not/exist", "model.source=/no/such/model"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2,701,393,920" in r.stdout


@pytest.mark.parametrize("yaml, shape", [("continue_2.7b", "sheared-2.7b"), ("continue_1.3b", "sheared-1.3b"),
                                         ("llama3/prune_4b", None), ("demo/prune_smollm2", None),
                                         ("demo/continue_smollm2", None)])
def test_other_recipes_validate_and_plan(yaml, shape):
    """Absent sources: a dry run plans from model.shape; without one, the only error is model.source."""
    import train

    from composer_sheared.config import ConfigError

    overrides = ["dry_run=true", "model.source=/absent"] + ([f"model.shape={shape}"] if shape else [])
    try:
        cfg, resolved = load_config(str(REPO / "yamls" / f"{yaml}.yaml"), overrides)
    except ConfigError as err:
        assert shape is None and [k for k, _ in err.problems] == ["model.source"], str(err)
        return
    assert train.dry_run(cfg, resolved, out=io.StringIO())["total_flops"] > 0


def test_flops_and_hours():
    s7, t27 = NAMED_SHAPES["llama2-7b"], NAMED_SHAPES["sheared-2.7b"]
    assert params_without_norms(t27) == PAPER_PARAMS["sheared-2.7b"]
    fpt = flops_per_token(s7, 4096)
    # 6N (N = matmul weights, incl. LM head, excl. input embedding) + 12 L H hd T
    n = s7.num_params() - s7.vocab_size * s7.hidden_size - (2 * 32 + 1) * 4096
    assert fpt == 6 * n + 12 * 32 * 32 * 128 * 4096
    p = make_plan(s7, t27, 32, 4096, 3200, mfu=0.5, num_gpus=8)
    assert p.total_tokens == 419_430_400
    assert p.total_flops == pytest.approx(fpt * 419_430_400)
    assert p.gpu_hours["A100"] == pytest.approx(p.total_flops / (312e12 * 0.5) / 3600)
    assert p.wall_hours["H100"] == pytest.approx(p.gpu_hours["H100"] / 8)
    # pruning costs the source's FLOPs, continued training the target's
    assert make_plan(t27, None, 32, 4096, 3200).total_flops < p.total_flops
    with pytest.raises(ValueError):
        make_plan(s7, None, 0, 4096, 1)
