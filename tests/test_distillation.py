"""Knowledge distillation: the KL core, the frozen teacher, and the Composer algorithm."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from composer.loggers import InMemoryLogger

from composer_sheared.algorithms import Distillation, ShearingPruning, find_hf_model
from composer_sheared.distill import (apply_distillation, frozen_copy, kd_loss, kd_token_mask, load_teacher, teacher_ce,
                                      teacher_logits)
from composer_sheared.pruning import apply_shearing
from tests.conftest import TARGET, TokenDataset
from tests.conftest import randomize_masks, tiny_model
from tests.helpers import assert_differs


def test_kd_matches_a_hand_computation_with_temperature():
    s = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    T = 2.0

    def softmax(row):
        e = [math.exp(x / T) for x in row]
        return [x / sum(e) for x in e]

    kl = []
    for srow, trow in zip(s.tolist(), t.tolist()):
        p, q = softmax(trow), softmax(srow)
        kl.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    assert kd_loss(s, t, T).item() == pytest.approx(T * T * sum(kl) / 2, rel=1e-6)
    # The mask keeps only the second token.
    assert kd_loss(s, t, T, mask=torch.tensor([False, True])).item() == pytest.approx(T * T * kl[1], rel=1e-6)
    assert kd_loss(s, t, T, mask=torch.tensor([False, False])).item() == 0.0


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_kd_value_and_gradient_match_autograd_reference(chunk):
    torch.manual_seed(0)
    s = torch.randn(2, 5, 11, requires_grad=True)
    t = torch.randn(2, 5, 11)
    mask = torch.rand(2, 5) > 0.3
    for T in (1.0, 3.0):
        got = kd_loss(s, t, T, mask, chunk_tokens=chunk)
        (g_got,) = torch.autograd.grad(got * 0.7, s)
        ref = T * T * F.kl_div(F.log_softmax(s[mask] / T, -1), F.log_softmax(t[mask] / T, -1), log_target=True,
                               reduction="sum") / mask.sum()
        (g_ref,) = torch.autograd.grad(ref * 0.7, s)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(g_got, g_ref, atol=1e-7)
        assert g_got[~mask].abs().max() == 0  # unmasked positions get no gradient


def test_kd_is_zero_for_equal_logits_and_positive_otherwise():
    torch.manual_seed(1)
    s = torch.randn(3, 7, 13, dtype=torch.bfloat16)
    assert kd_loss(s, s.clone(), 1.5).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, s + torch.randn_like(s), 1.5).item() > 1e-3
    assert kd_loss(s, s.clone()).dtype == torch.float32  # computed in fp32 from bf16 logits
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, 0.0)
    with pytest.raises(ValueError, match="differ"):
        kd_loss(s, s[..., :5], 1.0)


def test_gradient_flows_only_to_the_student():
    student, teacher = tiny_model(seed=1), load_teacher(tiny_model(seed=2))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    ids = torch.randint(0, 96, (2, 9))
    batch = {"input_ids": ids, "labels": ids}
    out = student(**batch)
    total, kd = apply_distillation(out.loss, out.loss, out.logits, teacher, batch, alpha=1.0, temperature=2.0)
    assert kd.item() > 0
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_alpha_mixes_ce_and_kd_and_keeps_other_terms():
    student, teacher = tiny_model(seed=1), load_teacher(tiny_model(seed=2))
    ids = torch.randint(0, 96, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "labels": labels}
    out = student(**batch)
    other = torch.tensor(0.25)
    total, kd = apply_distillation(out.loss + other, out.loss, out.logits, teacher, batch, alpha=0.3)
    assert total.item() == pytest.approx(0.7 * out.loss.item() + 0.3 * kd.item() + 0.25, rel=1e-6)
    # KD counts the positions the shifted LM loss counts: t where labels[t + 1] != -100.
    mask = kd_token_mask(batch)
    assert mask[0].tolist() == [False] * 3 + [True] * 5 + [False]
    assert mask[1].tolist() == [True] * 8 + [False]
    with torch.no_grad():
        t_logits = teacher(ids).logits
    assert kd.item() == pytest.approx(kd_loss(out.logits, t_logits, 1.0, mask).item(), rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        apply_distillation(out.loss, out.loss, out.logits, teacher, batch, alpha=1.5)


def test_frozen_copy_strips_masks_and_leaves_the_student_masked():
    student = tiny_model(seed=3)
    dense = frozen_copy(student)
    masks = apply_shearing(student, TARGET)
    randomize_masks(masks)
    student.eval()
    teacher = frozen_copy(student)
    assert not hasattr(teacher, "shearing_masks") and hasattr(student, "shearing_masks")
    assert not teacher._forward_pre_hooks and not teacher.model.embed_tokens._forward_hooks
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        t, d, s = teacher(ids).logits, dense(ids).logits, student(ids).logits
    assert torch.equal(t, d)  # the dense model
    assert_differs(s, d, 1e-3)  # the student is still masked
    assert teacher.model.layers[0].self_attn.o_proj.weight.data_ptr() != \
        student.model.layers[0].self_attn.o_proj.weight.data_ptr()


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_teacher_ce_matches_transformers_loss(chunk):
    """The teacher's CE on a batch is the loss HF computes for it (shifted labels, -100 ignored)."""
    teacher = load_teacher(tiny_model(seed=3))
    ids = torch.randint(0, 96, (2, 9))
    labels = ids.clone()
    labels[0, 4:] = -100
    out = teacher(input_ids=ids, labels=labels)
    total, n = teacher_ce(teacher_logits(teacher, {"input_ids": ids}), labels, chunk_tokens=chunk)
    assert int(n) == 3 + 8 and total.item() / n.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_alpha_zero_only_watches():
    """alpha 0: the loss and the gradient are the LM loss's own, and the KD value comes without a
    gradient."""
    student, teacher = tiny_model(seed=1), load_teacher(tiny_model(seed=2))
    ids = torch.randint(0, 96, (2, 9))
    batch = {"input_ids": ids, "labels": ids}
    out = student(**batch)
    total, kd = apply_distillation(out.loss, out.loss, out.logits, teacher, batch, alpha=0.0)
    assert total is out.loss and kd.item() > 0 and not kd.requires_grad


def test_monitor_logs_the_excess_over_the_teacher_and_changes_no_step():
    """Distillation(alpha=0) with pruning: the run's losses and weights are those of the same run
    without it, and it logs the teacher's CE on each batch and the student's excess over it."""
    runs = {}
    for name, extra in (("plain", []), ("watched", [Distillation(teacher="copy", alpha=0.0)])):
        logger = InMemoryLogger()
        trainer, _ = make_trainer(max_duration="4ba", warmup="2ba", loggers=[logger], extra_algorithms=extra)
        trainer.fit()
        w = find_hf_model(trainer.state.model).model.layers[0].mlp.up_proj.weight.detach().clone()
        runs[name] = ([float(v) for _, v in logger.data["loss/train/total"]], w, logger.data)
    assert runs["watched"][0] == runs["plain"][0]
    assert torch.equal(runs["watched"][1], runs["plain"][1])
    data = runs["watched"][2]
    ce, t_ce, excess = ([float(v) for _, v in data[f"distill/{k}"]] for k in ("ce_loss", "teacher_ce_loss", "excess_loss"))
    assert len(excess) == 4
    for c, t, e in zip(ce, t_ce, excess):
        assert e == pytest.approx(c - t, abs=1e-5)
    assert excess[0] > 0.0  # the masked student is behind its own dense source from the first step
    assert len(set(t_ce)) == 4 and min(t_ce) > 1.0  # the frozen teacher scores each batch


def test_load_teacher_from_a_directory(tmp_path):
    tiny_model(seed=4).save_pretrained(tmp_path / "t")
    teacher = load_teacher(tmp_path / "t", dtype="bfloat16")
    assert teacher.dtype == torch.bfloat16 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_teacher(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype"):
        load_teacher(tmp_path / "t", dtype="float99")


def make_trainer(max_duration="4ba", warmup="2ba", extra_algorithms=(), extra_first=False, prune=True, seed=7,
                 **trainer_kw):
    """The tiny pruning run of tests/conftest.py with Distillation before or after ShearingPruning."""
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from composer.optim import DecoupledAdamW
    from torch.utils.data import DataLoader

    hf = tiny_model(seed=seed)
    model = HuggingFaceModel(hf, use_logits=True, shift_labels=True)
    opt = DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    prune_algo = ShearingPruning(TARGET, lagrangian_warmup=warmup, schedule="lagrangian", mask_init="uniform") if prune else None
    algos = [] if prune_algo is None else [prune_algo]
    algos = [*extra_algorithms, *algos] if extra_first else [*algos, *extra_algorithms]
    trainer = Trainer(model=model, train_dataloader=DataLoader(TokenDataset(), batch_size=4), optimizers=opt,
                      max_duration=max_duration, algorithms=algos, device="cpu", progress_bar=False,
                      log_to_console=False, seed=seed, **trainer_kw)
    return trainer, prune_algo


@pytest.mark.parametrize("distill_first", [True, False])
def test_trainer_with_pruning_logs_and_keeps_the_teacher(distill_first):
    logger = InMemoryLogger()
    kd = Distillation(teacher="copy", alpha=0.5, temperature=2.0)
    trainer, prune = make_trainer(max_duration="4ba", warmup="2ba", loggers=[logger], device_train_microbatch_size=2,
                                  extra_algorithms=[kd], extra_first=distill_first)
    teacher = kd.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not hasattr(teacher, "shearing_masks")
    student = find_hf_model(trainer.state.model)
    assert hasattr(student, "shearing_masks")
    opt_params = {id(p) for g in trainer.state.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in teacher.parameters()}
    assert not any(m is teacher for m in trainer.state.model.modules())
    trainer.fit()
    kd_vals = [float(v) for _, v in logger.data["distill/kd_loss"]]
    ce_vals = [float(v) for _, v in logger.data["distill/ce_loss"]]
    lag = [float(v) for _, v in logger.data["shearing/lagrangian"]]
    total = [float(v) for _, v in logger.data["loss/train/total"]]
    assert len(kd_vals) == len(ce_vals) == 4 and all(math.isfinite(v) for v in kd_vals + ce_vals)
    assert kd_vals[0] > 0  # the student is masked from step 0, the teacher is dense
    for k, c, g, t in zip(kd_vals, ce_vals, lag, total):  # total = 0.5 CE + 0.5 KD + Lagrangian, unscaled
        assert t == pytest.approx(0.5 * c + 0.5 * k + g, rel=1e-4, abs=1e-5)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


def test_copy_teacher_starts_at_zero_kd():
    """No pruning: at step 0 the student is its own teacher, so the first KD loss is 0. With
    alpha=1 the CE term has no gradient and KD's is zero, so nothing moves at all; with alpha=0.5
    CE moves the student and KD becomes positive."""
    logger = InMemoryLogger()
    trainer, _ = make_trainer(max_duration="3ba", loggers=[logger], prune=False,
                              extra_algorithms=[Distillation(teacher="copy", alpha=1.0, temperature=1.0)])
    w0 = find_hf_model(trainer.state.model).model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.fit()
    kd_vals = [float(v) for _, v in logger.data["distill/kd_loss"]]
    ce_vals = [float(v) for _, v in logger.data["distill/ce_loss"]]
    total = [float(v) for _, v in logger.data["loss/train/total"]]
    assert kd_vals == pytest.approx([0.0] * 3, abs=1e-6) and min(ce_vals) > 1.0
    assert total == pytest.approx(kd_vals, abs=1e-5)
    assert torch.equal(find_hf_model(trainer.state.model).model.layers[0].mlp.up_proj.weight, w0)

    logger = InMemoryLogger()
    trainer, _ = make_trainer(max_duration="3ba", loggers=[logger], prune=False,
                              extra_algorithms=[Distillation(teacher="copy", alpha=0.5, temperature=1.0)])
    trainer.fit()
    kd_vals = [float(v) for _, v in logger.data["distill/kd_loss"]]
    assert kd_vals[0] == pytest.approx(0.0, abs=1e-6) and kd_vals[1] > 1e-6


def test_checkpoint_holds_no_teacher_and_resume_keeps_the_source_teacher(tmp_path):
    logger = InMemoryLogger()
    kw = dict(max_duration="4ba", warmup="2ba", save_folder=str(tmp_path / "ckpt"), save_interval="2ba",
              run_name="kd-resume")
    full, _ = make_trainer(**kw, loggers=[logger], extra_algorithms=[Distillation(alpha=0.5, temperature=2.0)])
    full.fit()
    full.close()
    ckpt = torch.load(tmp_path / "ckpt" / "ep0-ba2-rank0.pt", weights_only=False)
    model_keys = list(ckpt["state"]["model"])
    student_keys = set(full.state.model.state_dict())
    assert set(model_keys) == student_keys and not any("teacher" in k for k in model_keys)
    algos = dict(ckpt["state"]["algorithms"])
    assert algos["Distillation"] == {"repr": "Distillation(teacher='copy', alpha=0.5, temperature=2.0)"}
    n_opt = sum(len(g["params"]) for g in full.state.optimizers[0].param_groups)
    assert len(ckpt["state"]["optimizers"]["DecoupledAdamW"]["state"]) == n_opt

    # Resume from step 2: 'copy' is taken at INIT, before the checkpoint loads, so the teacher is
    # the source again and the last two steps match the uninterrupted run.
    logger2 = InMemoryLogger()
    resumed, _ = make_trainer(max_duration="4ba", warmup="2ba", loggers=[logger2],
                              load_path=str(tmp_path / "ckpt" / "ep0-ba2-rank0.pt"),
                              extra_algorithms=[Distillation(alpha=0.5, temperature=2.0)])
    resumed.fit()
    ref = [float(v) for _, v in logger.data["distill/kd_loss"]][2:]
    got = [float(v) for _, v in logger2.data["distill/kd_loss"]]
    assert got == pytest.approx(ref, rel=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="alpha"):
        Distillation(alpha=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        Distillation(temperature=0)
    with pytest.raises(TypeError, match="teacher"):
        Distillation(teacher=3)
    logger = InMemoryLogger()
    other = tiny_model(seed=1, vocab_size=50)
    with pytest.raises(ValueError, match="vocab_size=50"):
        make_trainer(max_duration="1ba", loggers=[logger], extra_algorithms=[Distillation(teacher=other)])


_TWO_RANK_FSDP = r'''
import sys, types, torch, torch.distributed as tdist
from unittest import mock
from composer.core import Event
from composer.devices import DeviceCPU
from composer.models import HuggingFaceModel
from composer.utils.parallelism import FSDPConfig
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from composer_sheared.algorithms import Distillation
from composer_sheared.distill import teacher_logits
from tests.conftest import tiny_model

tdist.init_process_group("gloo")
algo = Distillation(teacher="copy")
student = HuggingFaceModel(tiny_model(seed=2))
algo.apply(Event.INIT, types.SimpleNamespace(model=student),
           types.SimpleNamespace(log_hyperparameters=lambda d: None))
state = types.SimpleNamespace(model=student, fsdp_enabled=True, fsdp_config_version=1,
                              fsdp_config=FSDPConfig(sharding_strategy="FULL_SHARD", activation_checkpointing=True),
                              precision="fp32", device=DeviceCPU())
with mock.patch("torch.cuda.current_device", lambda: torch.device("cpu")):  # Composer's helper assumes CUDA
    algo._place(state)
ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
got = teacher_logits(algo.teacher, {"input_ids": ids, "labels": ids})
with torch.no_grad():
    ref = tiny_model(seed=2)(ids).logits
local = sum(p.numel() for p in algo.teacher.parameters())
full = sum(p.numel() for p in tiny_model(seed=2).parameters())
units = sum(isinstance(m, FSDP) for m in algo.teacher.modules())
ok = isinstance(algo.teacher, FSDP) and units == tiny_model(seed=2).config.num_hidden_layers + 1 and local * 2 == full and (got - ref).abs().max() < 1e-5
ok = ok and not got.requires_grad and all(p.grad is None for p in student.parameters())
# one os.write per rank: a pipe write this small is atomic, so the two ranks' lines never interleave
import os
os.write(1, f"FSDP-TEACHER {units} {local} {full} {float((got - ref).abs().max())}\n".encode())
sys.exit(0 if ok else 1)
'''


@pytest.mark.slow
@pytest.mark.serial
def test_teacher_is_sharded_under_fsdp(tmp_path):
    """Two gloo ranks: the teacher wrapped with the student's FSDP config (Composer's helper, with
    its CUDA device lookup pointed at the CPU) holds half the weights per rank, one FSDP unit per
    decoder layer plus the root, and gives the unsharded teacher's logits."""
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "two_rank_fsdp_teacher.py"
    script.write_text(_TWO_RANK_FSDP)
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29741", str(script)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("FSDP-TEACHER ") == 2
