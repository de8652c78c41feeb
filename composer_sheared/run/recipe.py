"""Sheared-LLaMA with Composer: targeted structured pruning and continued pretraining.

The recipe behind `train.py` (a shim at the repository root) and `composer-sheared train`:

    composer train.py yamls/prune_2.7b.yaml [key=value ...]     # any number of GPUs / CPU ranks
    python train.py yamls/demo/prune_smollm2.yaml max_duration=20ba
    python train.py yamls/prune_2.7b.yaml dry_run=true           # print the plan, exit

The YAML is checked as a whole against composer_sheared/config/ before anything loads: any
problem prints `error: <key>: <what was expected>` and exits with code 2. A `pruning:` block adds
`ShearingPruning`; a `dynamic_loading:` block adds `DynamicBatchLoading`. A NaN or infinite loss
stops the run (exit code 1) and nothing is saved from it. At the end the model is saved as a plain
HF directory (`hf_save_dir`, by default `<save_folder>/pruned_hf` after pruning,
`<save_folder>/hf` otherwise): a pruning run slices the masked model to the target first.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import List, Optional

from composer_sheared.config import ConfigError, Resolved, TrainConfig, hf_output_dir, load_config, metrics_path, plain

log = logging.getLogger("train")


def dry_run(cfg: TrainConfig, resolved: Resolved, out=None) -> dict:
    """Build the source (and target) on the meta device and print the plan; needs no data/weights."""
    import torch
    from composer.core import Time, TimeUnit
    from transformers import AutoModelForCausalLM

    from composer_sheared.run.plan import format_plan, make_plan

    source, target = resolved.source, resolved.target
    for shape in (source, target):
        if shape is None:
            continue
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(shape.to_hf_config(resolved.hf_config))
        counted = sum(p.numel() for p in model.parameters())
        if counted != shape.num_params():
            raise AssertionError(f"meta model has {counted} params but ModelShape counts {shape.num_params()}")
    tokens_per_batch = cfg.global_train_batch_size * cfg.max_seq_len
    t = Time.from_timestring(cfg.max_duration)  # validated: batches or tokens
    steps = int(t.value) if t.unit == TimeUnit.BATCH else -(-int(t.value) // tokens_per_batch)
    plan = make_plan(source, target, cfg.global_train_batch_size, cfg.max_seq_len, steps,
                     mfu=cfg.plan.mfu, num_gpus=cfg.plan.num_gpus)
    fsdp = (cfg.fsdp or {}).get("sharding_strategy", "FULL_SHARD") if cfg.fsdp is not None else "off"
    extras = [f"run    : {cfg.run_name or '-'}; precision {cfg.precision}; fsdp {fsdp}; activation checkpointing "
              f"{'on' if cfg.model.activation_checkpointing else 'off'}",
              f"data   : {cfg.data.local} domains {list(cfg.data.domains)} initial weights "
              f"{[round(p, 4) for p in cfg.data.proportions]}"]
    if cfg.pruning is not None:
        extras.append(f"pruning: lagrangian_warmup {cfg.pruning.lagrangian_warmup}, mask_lr {cfg.pruning.mask_lr}, "
                      f"lambda_lr {cfg.pruning.lambda_lr}")
    if cfg.dynamic_loading is not None:
        extras.append(f"loading: rule {cfg.dynamic_loading.rule}, update every {cfg.eval_interval}, reference "
                      f"losses {plain(cfg.dynamic_loading.reference_losses)}")
    print(format_plan(plan) + "\n" + "\n".join(extras), file=out or sys.stdout, flush=True)
    return plan.as_dict()


def build_loggers(cfg: TrainConfig) -> list:
    from composer.loggers import ConsoleLogger

    from composer_sheared.loggers import JSONLLogger

    loggers = []
    if metrics_path(cfg) is not None:
        loggers.append(JSONLLogger(metrics_path(cfg)))
    if cfg.loggers.console:
        loggers.append(ConsoleLogger(log_interval=cfg.loggers.console_log_interval))
    if cfg.loggers.wandb is not None:
        try:
            import wandb  # noqa: F401
            from composer.loggers import WandBLogger

            loggers.append(WandBLogger(**cfg.loggers.wandb))
        except ImportError:
            warnings.warn("loggers.wandb is set but wandb is not installed; skipping it")
    if cfg.loggers.mlflow is not None:
        try:
            import mlflow  # noqa: F401
            from composer.loggers import MLFlowLogger

            loggers.append(MLFlowLogger(**cfg.loggers.mlflow))
        except ImportError:
            warnings.warn("loggers.mlflow is set but mlflow is not installed; skipping it")
    return loggers


def _start_ranks(cfg: TrainConfig, has_gpu: bool) -> int:
    """Seed, join the process group and clear an overwritten run's outputs; returns the per-rank
    batch. Seeding comes first so every rank draws the same random init; the barrier keeps the
    other ranks from reading save_folder while rank 0 is still clearing it."""
    from composer.utils import dist, reproducibility

    from composer_sheared.run import builders as builders

    reproducibility.seed_all(cfg.seed)
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist("gpu" if has_gpu else "cpu", timeout=cfg.dist_timeout)
    world, rank = dist.get_world_size(), dist.get_global_rank()
    if cfg.global_train_batch_size % world:
        raise ConfigError("global_train_batch_size", f"{cfg.global_train_batch_size} is not divisible by the "
                                                     f"{world} ranks")
    if rank == 0:
        for p in builders.clear_previous_run(cfg, metrics_path(cfg), hf_output_dir(cfg)):
            log.warning("save_overwrite=true: removed %s of the earlier run", p)
        from composer_sheared.run.remote_save import clear_previous_remote_run, remote_folder

        deleted = clear_previous_remote_run(cfg)
        if deleted:
            log.warning("save_overwrite=true: deleted %d object(s) of the earlier run from %s", len(deleted),
                        remote_folder(cfg))
    dist.barrier()
    return cfg.global_train_batch_size // world


def _build_model(cfg: TrainConfig, resolved: Resolved, use_fsdp: bool):
    """The HF model wrapped for Composer, and its tokenizer. Under FSDP activation checkpointing is
    FSDP's to apply (see _parallelism), so the model only gets its wrap hooks. The FLOPs count is
    the source shape's: a masked model still computes at its full size."""
    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel
    from composer.utils import dist

    from composer_sheared.run import builders as builders
    from composer_sheared.run.plan import flops_per_token

    hf_model, src = builders.build_hf_model(cfg, resolved, dist.get_global_rank())
    tokenizer = builders.build_tokenizer(cfg, src)
    if use_fsdp:
        builders.configure_fsdp_hooks(hf_model)
    elif cfg.model.activation_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    eval_metrics = [LanguageCrossEntropy()]
    if cfg.downstream is not None:
        from composer_sheared.eval.next_line import NextLineAccuracy

        eval_metrics.append(NextLineAccuracy())
    model = HuggingFaceModel(hf_model, tokenizer=tokenizer, use_logits=True, shift_labels=True,
                             metrics=[LanguageCrossEntropy()], eval_metrics=eval_metrics)
    fpt = flops_per_token(resolved.source, cfg.max_seq_len)
    model.flops_per_batch = lambda batch: fpt * batch["input_ids"].numel()
    return model, tokenizer


def _build_data(cfg: TrainConfig, device_batch: int, tokenizer):
    """The train dataloader and the evaluators: one per domain (what dynamic loading reads), plus
    the downstream task, which is scored with the domain losses and ignored by dynamic loading."""
    from composer_sheared.run import builders as builders

    train_dl, evaluators = builders.build_dataloaders(cfg, device_batch)
    if cfg.downstream is not None:
        from composer_sheared.eval.next_line import build_next_line_evaluator

        if tokenizer is None:
            raise ConfigError("downstream", "the next-line task needs a tokenizer (model.tokenizer)")
        evaluators.append(build_next_line_evaluator(cfg.downstream.task_dir, tokenizer, cfg.downstream.batch_size,
                                                    subset_num_batches=cfg.downstream.subset_num_batches))
    return train_dl, evaluators


def _build_optimizer(cfg: TrainConfig, model):
    """The model's optimizer and schedule. Built before the Trainer so that ShearingPruning can add
    its mask and multiplier groups to it at Event.INIT."""
    from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW

    o = cfg.optimizer
    optimizer = DecoupledAdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                               weight_decay=o.weight_decay)
    return optimizer, CosineAnnealingWithWarmupScheduler(t_warmup=cfg.scheduler.t_warmup, alpha_f=cfg.scheduler.alpha_f)


def _build_algorithms(cfg: TrainConfig, resolved: Resolved, device_batch: int) -> list:
    """ShearingPruning (`pruning:`) and Distillation (`distillation:`). Importance init reads its
    calibration batches here, the same fixed train samples on every rank, so the masks start equal."""
    algorithms = []
    if cfg.pruning is not None:
        from composer_sheared.algorithms import ShearingPruning

        p = cfg.pruning
        calibration = None
        if p.mask_init == "importance":
            from composer_sheared.data.calibration import calibration_batches

            calibration = calibration_batches(cfg.data.local, list(cfg.data.domains), p.calibration_batches,
                                              device_batch, split=cfg.data.train_split, remote=cfg.data.remote)
        algorithms.append(ShearingPruning(resolved.target, lagrangian_warmup=p.lagrangian_warmup, mask_lr=p.mask_lr,
                                          lambda_lr=p.lambda_lr, eval_shape=p.eval_shape,
                                          mask_betas=None if p.mask_betas is None else tuple(p.mask_betas),
                                          schedule=p.schedule, mask_init=p.mask_init, calibration=calibration,
                                          init_spread=p.init_spread, train_gates=p.train_gates))
    if cfg.distillation is not None:
        from composer_sheared.algorithms import Distillation

        kd = cfg.distillation
        algorithms.append(Distillation(teacher=kd.teacher, alpha=kd.alpha, temperature=kd.temperature,
                                       teacher_dtype=kd.teacher_dtype))
    return algorithms


def _build_callbacks(cfg: TrainConfig, extra_callbacks=()) -> list:
    """The callbacks every run has (a non-finite loss stops it before anything is saved; LR and
    speed monitors), DynamicBatchLoading for `dynamic_loading:`, then the caller's."""
    from composer.callbacks import LRMonitor, SpeedMonitor

    from composer_sheared.callbacks import DynamicBatchLoading, StopOnNonFiniteLoss

    callbacks = [StopOnNonFiniteLoss(), LRMonitor(), SpeedMonitor(window_size=cfg.speed_monitor_window)]
    if cfg.dynamic_loading is not None:
        dl = cfg.dynamic_loading
        callbacks.append(DynamicBatchLoading(list(cfg.data.domains), plain(dl.reference_losses), rule=dl.rule,
                                             eta=dl.eta, c=dl.c))
    callbacks.extend(extra_callbacks)
    return callbacks


def _precision(cfg: TrainConfig, has_gpu: bool) -> str:
    """The configured precision on a GPU; fp32 on CPU, as the amp modes need one."""
    precision = cfg.precision if has_gpu else "fp32"
    if precision != cfg.precision:
        log.warning("precision=%s needs a GPU; using fp32 on CPU", cfg.precision)
    return precision


def _parallelism(cfg: TrainConfig, use_fsdp: bool) -> Optional[dict]:
    """Composer's FSDP config: activation checkpointing is FSDP's to apply (non-reentrant, as
    without FSDP), and a `mixed` init (real weights on rank 0 only) is broadcast to the others."""
    if not use_fsdp:
        return None
    fsdp = dict(cfg.fsdp)
    fsdp.setdefault("activation_checkpointing", cfg.model.activation_checkpointing)
    fsdp.setdefault("activation_checkpointing_reentrant", False)
    if cfg.model.init_device == "mixed":
        fsdp.setdefault("sync_module_states", True)
    return {"fsdp": fsdp}


def _checkpoint_kwargs(cfg: TrainConfig) -> dict:
    """The Trainer's saving and resuming arguments; `checkpoint: false` saves no checkpoints."""
    return dict(save_folder=cfg.save_folder if cfg.checkpoint else None, save_interval=cfg.save_interval,
                save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep, save_overwrite=cfg.save_overwrite,
                autoresume=cfg.autoresume, load_path=cfg.load_path)


def build_trainer(cfg: TrainConfig, resolved: Resolved, extra_loggers=(), extra_callbacks=()):
    """The Composer Trainer for one stage, and the tokenizer (saved with the HF result). The steps
    run in this order because it fixes what the seed draws (the model's init first)."""
    import torch
    from composer import Trainer

    has_gpu = torch.cuda.is_available()
    device_batch = _start_ranks(cfg, has_gpu)
    use_fsdp = cfg.fsdp is not None and has_gpu
    if cfg.fsdp is not None and not has_gpu:
        warnings.warn("fsdp is set but no GPU is present: FSDP is GPU-only in Composer; using DDP/single process")
    model, tokenizer = _build_model(cfg, resolved, use_fsdp)
    train_dl, evaluators = _build_data(cfg, device_batch, tokenizer)
    optimizer, scheduler = _build_optimizer(cfg, model)
    algorithms = _build_algorithms(cfg, resolved, device_batch)
    callbacks = _build_callbacks(cfg, extra_callbacks)
    precision = _precision(cfg, has_gpu)
    trainer = Trainer(
        model=model, run_name=cfg.run_name, train_dataloader=train_dl, eval_dataloader=evaluators,
        eval_interval=cfg.eval_interval, max_duration=cfg.max_duration, optimizers=optimizer, schedulers=scheduler,
        algorithms=algorithms, callbacks=callbacks, loggers=[*extra_loggers, *build_loggers(cfg)],
        precision=precision, device_train_microbatch_size=cfg.device_train_microbatch_size or device_batch,
        progress_bar=cfg.progress_bar, log_to_console=False, **_checkpoint_kwargs(cfg),
        parallelism_config=_parallelism(cfg, use_fsdp), seed=cfg.seed,
        dist_timeout=cfg.dist_timeout, python_log_level=cfg.python_log_level,
    )
    return trainer, tokenizer


def _prepare_save_folder(cfg: TrainConfig, resolved: Resolved, rank0: bool) -> list:
    """Ready save_folder for this run, under its lock; returns the resume's callbacks.

    A resume applies the changes validation allowed; a kill while a checkpoint was written must
    not block autoresume; an object-store save_folder holds no earlier run's checkpoints unless
    resuming, and a resume in a fresh container appends to the uploaded metrics."""
    from composer_sheared.run import safety as rs
    from composer_sheared.run.remote_save import check_fresh, restore_metrics

    callbacks = rs.start_resume(cfg, resolved)
    if cfg.autoresume and cfg.checkpoint:
        from composer_sheared.run.checkpointing import set_aside_unfinished_checkpoints

        set_aside_unfinished_checkpoints(cfg.save_folder, cfg.run_name or "")
    check_fresh(cfg)
    if rank0:
        restore_metrics(cfg)
    return callbacks


def _fit_and_export(cfg: TrainConfig, trainer, tokenizer):
    """Train (unless the checkpoint is at max_duration already: a kill during the export), then save
    the HF result; returns its directory. A full disk is named with the stage it stopped; the
    trainer is closed whatever happens."""
    from composer_sheared.run import safety as rs
    from composer_sheared.run.builders import save_hf_result

    stage = "fit"
    try:
        if rs.trained_to_the_end(trainer.state):
            print(f"[train] the checkpoint is at max_duration={cfg.max_duration} already: finishing the export",
                  flush=True)
        else:
            if cfg.eval_first:
                trainer.eval()
            trainer.fit()
        stage = "hf"
        return save_hf_result(trainer.state, cfg, tokenizer, hf_output_dir(cfg)) if cfg.save_hf else None
    except Exception as err:
        full = rs.no_space(cfg, err, stage)
        if full is None:
            raise
        raise full from err
    finally:
        trainer.close()


def main(cfg: TrainConfig, resolved: Resolved, extra_loggers=(), extra_callbacks=()) -> dict:
    """Run one stage; returns {"hf_dir", "wall_s", "metrics_jsonl"} (or {"plan"} for a dry run).

    Rank 0 holds save_folder's lock for the whole run; a resume applies the changes validation
    allowed; a checkpoint at max_duration already (killed during the export) only exports."""
    from composer_sheared.run import safety as rs

    if cfg.dry_run:
        return {"plan": dry_run(cfg, resolved)}
    from composer.utils import dist

    t0, rank0 = time.time(), dist.get_global_rank() == 0
    with rs.hold_save_folder(cfg):
        callbacks = [*extra_callbacks, *_prepare_save_folder(cfg, resolved, rank0)]
        trainer, tokenizer = build_trainer(cfg, resolved, extra_loggers, callbacks)
        rs.record_config(cfg)
        hf_dir = _fit_and_export(cfg, trainer, tokenizer)
    if hf_dir is not None:
        print(f"[train] saved HF model to {hf_dir}", flush=True)
    if rank0:  # an object-store save_folder: metrics.jsonl and the HF directory go up beside the checkpoints
        from composer_sheared.run.remote_save import upload_outputs

        upload_outputs(cfg, hf_dir)
    return {"hf_dir": str(hf_dir) if hf_dir else None, "wall_s": time.time() - t0,
            "metrics_jsonl": str(metrics_path(cfg)) if metrics_path(cfg) else None}


def close_distributed() -> None:
    """Tear the process group down while the interpreter is still whole. Left to interpreter exit,
    gloo's worker threads can die mid-teardown and abort a rank that finished its work ("terminate
    called without an active exception", SIGABRT; pytorch/pytorch#190489): seen once in
    tests/test_train_cli.py's two-rank run. Only on success: after a failure another rank may
    still be inside a collective, and tearing down would hang it."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()  # every rank is past its last collective
        tdist.destroy_process_group()


def cli(argv: Optional[List[str]] = None) -> int:
    from composer_sheared.storage.atomic import NoSpaceError
    from composer_sheared.run.builders import NonFiniteModelError
    from composer_sheared.callbacks import NonFiniteLossError
    from composer_sheared.storage.fetch import FetchError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    yaml_path, overrides = (argv[0], argv[1:]) if "=" not in argv[0] else (None, argv)
    try:
        cfg, resolved = load_config(yaml_path, overrides)
        main(cfg, resolved)
        close_distributed()
    except ConfigError as err:
        print("\n".join(f"error: {line}" for line in str(err).splitlines()), file=sys.stderr, flush=True)
        return 2
    except (NonFiniteLossError, NonFiniteModelError, NoSpaceError, FetchError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
