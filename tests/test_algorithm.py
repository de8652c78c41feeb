"""ShearingPruning inside a real Composer Trainer on CPU."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer.core import Callback
from composer.loggers import InMemoryLogger
from transformers import AutoModelForCausalLM

from composer_sheared import ModelShape, prune_to_target
from composer_sheared.algorithms import find_hf_model
from tests.conftest import TARGET, make_trainer, tiny_tokenizer
from tests.helpers import assert_same_function

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_drives_expected_params_to_target():
    logger = InMemoryLogger()
    trainer, algo = make_trainer(max_duration="60ba", warmup="20ba", loggers=[logger], mask_betas=(0.7, 0.999))
    trainer.fit()
    masks = algo.masks
    target = masks.target.num_params()
    expected = masks.expected_num_params().item()
    assert abs(expected - target) / target < 0.05, (expected, target)
    # It really moved: the source is more than 2x the target.
    assert masks.source.num_params() > 2 * target
    losses = [v for _, v in logger.data["loss/train/total"]]
    assert all(math.isfinite(float(v)) for v in losses)
    logged = logger.data["shearing/expected_params"]
    assert len(logged) == 60 and abs(float(logged[-1][1]) - target) / target < 0.06
    for key in ("shearing/lambda1/hidden", "shearing/expected/kv_group", "shearing/lagrangian"):
        assert key in logger.data
    # The warmed-up target: the source's size at step 0, the final target from step 20 on.
    warm = [float(v) for _, v in logger.data["shearing/warmup_target_params"]]
    assert warm[0] == pytest.approx(masks.source.num_params(), rel=1e-6)
    assert warm[-1] == pytest.approx(target, rel=1e-6)
    sliced = prune_to_target(find_hf_model(trainer.state.model).eval())
    assert ModelShape.from_hf_config(sliced.config) == masks.target
    assert sliced.config.num_hidden_layers == TARGET["num_layers"]
    assert sliced.config.num_key_value_heads == TARGET["num_key_value_heads"]


def test_default_hyperparameters_converge_in_a_plain_loop():
    """The reference defaults (Adam's own betas, lr 1.0) settle too, only more slowly."""
    from composer.optim import DecoupledAdamW

    from composer_sheared import apply_shearing
    from tests.conftest import TokenDataset, tiny_model

    torch.manual_seed(0)
    hf = tiny_model(seed=3)
    opt = DecoupledAdamW(hf.parameters(), lr=1e-3, weight_decay=0.0)
    masks = apply_shearing(hf, TARGET, opt, schedule="lagrangian")
    data = TokenDataset()
    for step in range(150):
        masks.constrain_()
        masks.warmup_progress.fill_(min(1.0, step / 20))
        batch = torch.stack([data[step * 4 + i]["input_ids"] for i in range(4)])
        loss = hf(batch, labels=batch).loss + masks.last_lagrangian
        opt.zero_grad()
        loss.backward()
        opt.step()
    target = masks.target.num_params()
    assert abs(masks.expected_num_params().item() - target) / target < 0.05


@pytest.mark.slow
def test_finalize_cli_from_composer_checkpoint(tmp_path):
    tok = tiny_tokenizer()
    trainer, algo = make_trainer(max_duration="6ba", warmup="3ba", tokenizer=tok,
                                 save_folder=str(tmp_path / "ckpt"), save_interval="6ba")
    trainer.fit()
    ckpt = tmp_path / "ckpt" / "ep0-ba6-rank0.pt"
    assert ckpt.exists()
    out = tmp_path / "pruned"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "composer_sheared.prune", str(ckpt), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert ModelShape.from_hf_config(loaded.config) == algo.masks.target
    hf = find_hf_model(trainer.state.model).eval()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert_same_function(hf(ids).logits, loaded(ids).logits, atol=1e-4)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("w5 w7").input_ids == tok("w5 w7").input_ids
    # A second run into the same directory refuses rather than overwriting.
    again = subprocess.run([sys.executable, "-m", "composer_sheared.prune", str(ckpt), str(out)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr
    assert not list(Path.cwd().glob("tokenizer-save-dir-*"))
    bad = subprocess.run([sys.executable, "-m", "composer_sheared.prune", str(tmp_path / "nope.pt"), str(tmp_path / "o2")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "nope.pt does not exist" in bad.stderr
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    bad = subprocess.run([sys.executable, "-m", "composer_sheared.prune", str(tmp_path / "garbage.pt"), str(tmp_path / "o2")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "garbage.pt is not a Composer checkpoint" in bad.stderr
    # A Composer checkpoint of a run without ShearingPruning is refused by name.
    state = torch.load(ckpt, weights_only=False)
    state["state"]["model"] = {k: v for k, v in state["state"]["model"].items() if "shearing_masks" not in k}
    torch.save(state, tmp_path / "dense.pt")
    bad = subprocess.run([sys.executable, "-m", "composer_sheared.prune", str(tmp_path / "dense.pt"), str(tmp_path / "o2")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "holds no pruning masks" in bad.stderr
    assert not (tmp_path / "o2").exists()
    assert not list(tmp_path.glob(".o2*"))  # nothing half-written beside it either


def test_composer_compile_config_compiles_once():
    import torch._dynamo as dynamo

    graphs = []

    class Count(Callback):
        def batch_end(self, state, logger):
            graphs.append(dynamo.utils.counters["stats"]["unique_graphs"])

    dynamo.reset()
    dynamo.utils.counters.clear()
    trainer, _ = make_trainer(max_duration="5ba", warmup="3ba", compile_config={"backend": "aot_eager"},
                              callbacks=[Count()])
    trainer.fit()
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs
    assert math.isfinite(float(trainer.state.loss))


@pytest.mark.slow
@pytest.mark.serial
def test_two_ranks_keep_identical_masks(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", "29611",
         str(ROOT / "tests" / "two_rank_prune.py"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "masks-rank0.pt")
    r1 = torch.load(tmp_path / "masks-rank1.pt")
    assert r0.keys() == r1.keys() and len(r0) > 1
    for k in (k for k in r0 if k != "_last_gates"):
        assert torch.equal(r0[k], r1[k]), k
    # The masks trained (they left their initial value), so equality is not trivial.
    assert (r0["log_alpha.hidden"] - 5.0).abs().max() > 0.5
    # Each rank drew its own gates (different random streams), yet the parameters agree.
    assert not torch.equal(r0["_last_gates"], r1["_last_gates"])


def test_find_hf_model_unwraps_wrappers():
    from composer.models import HuggingFaceModel

    from tests.conftest import tiny_model

    hf = tiny_model()

    class Wrapper(torch.nn.Module):  # the shape of DDP / FSDP: the wrapped model in .module
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert find_hf_model(Wrapper(HuggingFaceModel(hf))) is hf
    assert find_hf_model(hf) is hf
    with pytest.raises(ValueError, match="got Linear"):
        find_hf_model(torch.nn.Linear(2, 2))
