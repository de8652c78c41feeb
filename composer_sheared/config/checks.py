"""The one validation pass over a loaded TrainConfig, before anything loads: types, durations,
domains and proportions, reference losses, paths and outputs, resumes, the data directory, and the
pruning target resolved against the source's config. Every problem is one `(key, message)`."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from composer_sheared.config.schema import (EMBEDDED, ConfigError, ModelConfig, Resolved, TrainConfig, _local,
                                            hf_output_dir, metrics_path, plain, resume_folder)


def _duration(errors: list, key: str, value: str, units: tuple[str, ...], positive: bool = False) -> None:
    from composer.core import Time

    try:
        t = Time.from_timestring(str(value))
    except ValueError:
        t = None
    if t is not None and positive and t.unit.value in units and t.value == 0:
        errors.append((key, f"expected a positive duration, got {value!r} (the run would not train)"))
        return
    if t is None or t.unit.value not in units or t.value < 0:
        examples = {"ba": "'3200ba'", "tok": "'50000000000tok'", "dur": "'0.2dur'", "ep": "'1ep'", "sp": "'1000sp'"}
        errors.append((key, f"expected a duration such as {' or '.join(examples[u] for u in units)}, got {value!r}"))


def _check_model(errors: list, cfg: TrainConfig) -> None:
    m = cfg.model
    if (m.source is None) == (m.config is None) and not (cfg.dry_run and m.shape):
        errors.append(("model", "give exactly one of model.source (HF dir, .gguf, 'embedded') and model.config"))
    if m.init_device not in ("cpu", "mixed", "meta"):
        errors.append(("model.init_device", f"expected cpu, mixed or meta, got {m.init_device!r}"))
    if m.init_device == "meta" and m.config is None and not cfg.dry_run:
        errors.append(("model.init_device", "meta only works with a random-init model.config (weights would be lost)"))
    for key in ("dtype", "hf_save_dtype"):
        if getattr(m, key) not in ("float32", "bfloat16", "float16"):
            errors.append((f"model.{key}", f"expected float32, bfloat16 or float16, got {getattr(m, key)!r}"))
    if m.source is not None and m.source not in EMBEDDED and not cfg.dry_run:
        p = Path(m.source)
        if not p.exists():
            errors.append(("model.source", f"{p} does not exist (expected a HF directory, a .gguf file or 'embedded')"))
        elif p.is_dir() and not (p / "config.json").exists():
            errors.append(("model.source", f"{p} has no config.json"))
    tok = m.tokenizer
    # a hub id ("org/name") may be fetched when online; anything else must be a local path
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", tok or "") and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "")
    if tok is not None and not cfg.dry_run and not Path(tok).exists() and not hub_id:
        errors.append(("model.tokenizer", f"{tok} does not exist (expected a tokenizer directory or file)"))


def _check_data_config(errors: list, cfg: TrainConfig) -> None:
    from composer_sheared.data.mixing import validate_proportions

    d = cfg.data
    if not d.domains:
        errors.append(("data.domains", "expected at least one domain"))
    dupes = sorted({x for x in d.domains if list(d.domains).count(x) > 1})
    if dupes:
        errors.append(("data.domains", f"expected unique names, {dupes} repeat"))
    try:
        validate_proportions(list(d.proportions), len(d.domains), what="proportions")
    except ValueError as err:
        errors.append(("data.proportions", str(err)))
    if not d.download_timeout > 0:
        errors.append(("data.download_timeout", f"{d.download_timeout}: expected a positive number of seconds"))
    if d.download_retry < 0:
        errors.append(("data.download_retry", f"{d.download_retry}: expected 0 or more re-tries"))


def _time(value):
    from composer.core import Time

    try:
        return Time.from_timestring(str(value))
    except ValueError:
        return None


def _in_batches(cfg: TrainConfig, value) -> Optional[float]:
    """A duration in batches of this run (None for epochs or an invalid value)."""
    t = _time(value)
    if t is None or cfg.global_train_batch_size <= 0:
        return None
    unit = t.unit.value
    if unit == "ba":
        return float(t.value)
    if unit == "tok":
        return t.value / (cfg.global_train_batch_size * cfg.max_seq_len) if cfg.max_seq_len > 0 else None
    if unit == "sp":
        return t.value / cfg.global_train_batch_size
    run = _time(cfg.max_duration)
    if unit == "dur" and run is not None and run.unit.value != "dur":
        base = _in_batches(cfg, cfg.max_duration)
        return None if base is None else t.value * base
    return None


def _check_schedules(errors: list, cfg: TrainConfig) -> None:
    """Schedules that cannot do their job within max_duration."""
    total = _in_batches(cfg, cfg.max_duration)
    run, warm = _time(cfg.max_duration), _time(cfg.scheduler.t_warmup)
    if run is not None and warm is not None and warm.unit.value != "dur" and warm.unit != run.unit:
        errors.append(("scheduler.t_warmup", f"{cfg.scheduler.t_warmup!r} and max_duration={cfg.max_duration!r} are "
                                             "in different units; Composer's scheduler needs the same unit, or a "
                                             "fraction of the run such as '0.1dur'"))
    warmups = [("scheduler.t_warmup", cfg.scheduler.t_warmup)]
    if cfg.pruning is not None:
        warmups.append(("pruning.lagrangian_warmup", cfg.pruning.lagrangian_warmup))
    for key, value in warmups:
        n = _in_batches(cfg, value)
        if total is not None and n is not None and n > total:
            what = " (the masks would never reach the target, so the sliced model would differ from the " \
                   "one trained)" if key.startswith("pruning") else ""
            errors.append((key, f"{value!r} is longer than the run (max_duration={cfg.max_duration!r}){what}; "
                                "expected at most the run's length"))
    if cfg.dynamic_loading is None:
        return
    every = _time(cfg.eval_interval)
    if every is None:
        return
    never = None
    if every.unit.value == "ep":
        never = "the train stream of dynamic loading is endless, so an epoch never ends"
    elif every.value == 0:
        never = "an interval of 0 never fires"
    elif total is not None and (_in_batches(cfg, cfg.eval_interval) or 0) > total:
        never = f"it is longer than the run (max_duration={cfg.max_duration!r})"
    if never:
        errors.append(("eval_interval", f"{cfg.eval_interval!r} never fires: {never}, and dynamic loading updates "
                                        "the domain weights at each eval; expected an interval in batches within "
                                        "the run, such as '50ba'"))


def _check_training(errors: list, cfg: TrainConfig) -> None:
    from composer_sheared.callbacks.dynamic_batch_loading import check_references
    from composer_sheared.data.mixing import RULES

    _duration(errors, "max_duration", cfg.max_duration, ("ba", "tok"), positive=True)
    for key, value in (("eval_interval", cfg.eval_interval), ("save_interval", cfg.save_interval),
                       ("loggers.console_log_interval", cfg.loggers.console_log_interval)):
        _duration(errors, key, value, ("ba", "ep", "dur"))
    _duration(errors, "scheduler.t_warmup", cfg.scheduler.t_warmup, ("ba", "dur", "tok"))
    for key, value in (("global_train_batch_size", cfg.global_train_batch_size),
                       ("device_eval_batch_size", cfg.device_eval_batch_size),
                       ("device_train_microbatch_size", cfg.device_train_microbatch_size)):
        if value is not None and value <= 0:
            errors.append((key, f"expected a positive integer, got {value}"))
    if cfg.seed < 0:
        errors.append(("seed", f"expected a non-negative integer, got {cfg.seed}"))
    if not (math.isfinite(cfg.optimizer.lr) and cfg.optimizer.lr >= 0):
        errors.append(("optimizer.lr", f"expected a finite non-negative number, got {cfg.optimizer.lr}"))
    _check_schedules(errors, cfg)
    if cfg.precision not in ("fp32", "amp_bf16", "amp_fp16", "amp_fp8"):
        errors.append(("precision", f"expected fp32, amp_bf16, amp_fp16 or amp_fp8, got {cfg.precision!r}"))
    p = cfg.pruning
    if p is not None:
        _duration(errors, "pruning.lagrangian_warmup", p.lagrangian_warmup, ("ba", "dur"))
        if str(p.lagrangian_warmup).endswith("dur") and not str(cfg.max_duration).endswith("ba"):
            errors.append(("pruning.lagrangian_warmup", f"a fraction of the run needs max_duration in batches, "
                                                        f"got max_duration={cfg.max_duration!r}"))
        if p.eval_shape not in ("target", "expected"):
            errors.append(("pruning.eval_shape", f"expected 'target' or 'expected', got {p.eval_shape!r}"))
        if p.schedule not in ("projection", "lagrangian"):
            errors.append(("pruning.schedule", f"expected 'projection' or 'lagrangian', got {p.schedule!r}"))
        if p.mask_init not in ("importance", "uniform"):
            errors.append(("pruning.mask_init", f"expected 'importance' or 'uniform', got {p.mask_init!r}"))
        if p.mask_init == "importance" and p.calibration_batches <= 0:
            errors.append(("pruning.calibration_batches", f"expected a positive integer, got {p.calibration_batches}"))
        if p.train_gates not in (None, "sampled", "smooth"):
            errors.append(("pruning.train_gates", f"expected 'sampled' or 'smooth', got {p.train_gates!r}"))
        elif p.train_gates == "smooth" and p.schedule != "projection":
            errors.append(("pruning.train_gates", "'smooth' needs pruning.schedule: projection"))
        if not (p.init_spread > 0 and math.isfinite(p.init_spread)):
            errors.append(("pruning.init_spread", f"expected a positive number, got {p.init_spread}"))
    kd = cfg.distillation
    if kd is not None:
        if not 0.0 <= kd.alpha <= 1.0:
            errors.append(("distillation.alpha", f"expected a number in [0, 1], got {kd.alpha}"))
        if not (kd.temperature > 0 and math.isfinite(kd.temperature)):
            errors.append(("distillation.temperature", f"expected a positive number, got {kd.temperature}"))
        if kd.teacher != "copy" and not cfg.dry_run and not (Path(kd.teacher) / "config.json").is_file():
            errors.append(("distillation.teacher", f"expected 'copy' or a HF model directory; {kd.teacher} has no "
                                                   "config.json"))
        if kd.teacher_dtype not in (None, "float32", "bfloat16", "float16"):
            errors.append(("distillation.teacher_dtype", f"expected float32, bfloat16 or float16, got "
                                                         f"{kd.teacher_dtype!r}"))
    ds = cfg.downstream
    if ds is not None:
        if not Path(ds.task_dir).is_dir() or not list(Path(ds.task_dir).glob("*.jsonl")):
            errors.append(("downstream.task_dir", f"expected a folder of next-line task JSONL files "
                                                  f"(data_prep/next_line_task.py), got {ds.task_dir}"))
        if ds.batch_size <= 0:
            errors.append(("downstream.batch_size", f"expected a positive integer, got {ds.batch_size}"))
    dl = cfg.dynamic_loading
    if dl is not None:
        if dl.rule not in RULES:
            errors.append(("dynamic_loading.rule", f"expected one of {list(RULES)}, got {dl.rule!r}"))
        if not (math.isfinite(dl.eta) and dl.eta > 0):
            errors.append(("dynamic_loading.eta", f"expected a finite positive number, got {dl.eta}"))
        if not (math.isfinite(dl.c) and dl.c >= 0):
            errors.append(("dynamic_loading.c", f"expected a finite non-negative number, got {dl.c}"))
        try:
            check_references(plain(dl.reference_losses), list(cfg.data.domains))
        except ValueError as err:
            errors.append(("dynamic_loading.reference_losses", str(err)))
    if cfg.autoresume and not (cfg.run_name and cfg.save_folder and cfg.checkpoint):
        errors.append(("autoresume", "needs run_name, save_folder and checkpoint=true"))


def _check_remote_save_folder(errors: list, cfg: TrainConfig) -> None:
    """An object-store save_folder (checked in dry runs too: it needs no I/O)."""
    from composer_sheared.storage.fetch import is_uri, store_schemes, uri_scheme

    if not is_uri(cfg.save_folder):
        if cfg.local_save_folder is not None:
            errors.append(("local_save_folder", "only used with an object-store save_folder (s3://...); "
                                                f"save_folder={cfg.save_folder!r} is local"))
        return
    scheme = uri_scheme(cfg.save_folder)
    if scheme not in store_schemes():
        errors.append(("save_folder", f"{cfg.save_folder}: unknown object store {scheme}://; expected a local "
                                      f"folder or one of {', '.join(s + '://' for s in store_schemes())}"))
    if not cfg.run_name:
        errors.append(("save_folder", f"{cfg.save_folder} is an object store: set run_name (Composer's autoresume "
                                      "finds the run's checkpoints there by it)"))
    for key, value in (("hf_save_dir", cfg.hf_save_dir), ("loggers.jsonl", cfg.loggers.jsonl),
                       ("local_save_folder", cfg.local_save_folder)):
        if is_uri(value):
            errors.append((key, f"expected a local path, got {value}; with an object-store save_folder it is "
                                "uploaded to <save_folder>/ at the end"))


def _check_save_folder(errors: list, cfg: TrainConfig) -> None:
    folder = Path(cfg.save_folder) if cfg.save_folder else None
    if folder is None or cfg.autoresume or cfg.load_path or cfg.save_overwrite or not folder.is_dir():
        return
    old = sorted(p.name for p in folder.glob("ep*-ba*-rank*.pt"))
    if old:
        errors.append(("save_folder", f"{folder} holds checkpoints of an earlier run ({old[-1]}); set "
                                      "autoresume=true to continue it, save_overwrite=true to replace it, "
                                      "or choose another folder"))


def _same_or_inside(a: Path, b: Path) -> Optional[str]:
    a, b = a.resolve(), b.resolve()
    return "the same as" if a == b else ("inside" if b in a.parents else None)


def _check_outputs_apart(errors: list, cfg: TrainConfig) -> None:
    """No output may overwrite an input: the HF directory is replaced as a whole, so it may be
    neither inside an input nor hold one; save_folder may not be (inside) an input."""
    kd = cfg.distillation
    inputs = [("model.source", None if cfg.model.source in EMBEDDED else cfg.model.source),
              ("model.tokenizer", cfg.model.tokenizer), ("data.local", cfg.data.local), ("data.remote", cfg.data.remote),
              ("distillation.teacher", kd.teacher if kd is not None and kd.teacher != "copy" else None),
              ("downstream.task_dir", cfg.downstream.task_dir if cfg.downstream is not None else None)]
    inputs = [(k, _local(v)) for k, v in inputs if _local(v) is not None]
    outputs = []
    if cfg.save_hf:
        outputs.append(("hf_save_dir" if cfg.hf_save_dir else "save_folder", hf_output_dir(cfg), True))
    if _local(cfg.save_folder) is not None:
        outputs.append(("save_folder", Path(cfg.save_folder), False))
    for out_key, out, whole in outputs:
        if "://" in str(out):
            continue
        for in_key, inp in inputs:
            how = _same_or_inside(out, inp)
            clash = f"which is {how} {in_key}={inp}" if how else None
            if clash is None and whole and _same_or_inside(inp, out):
                clash = f"which holds {in_key}={inp}"
            if clash:
                errors.append((out_key, f"the run would write {out}, {clash}; expected an output folder apart "
                                        "from the run's inputs"))


def _check_earlier_outputs(errors: list, cfg: TrainConfig) -> None:
    """A fresh run never replaces an earlier run's HF directory or metrics (with checkpoint=false
    too), unless save_overwrite=true."""
    if cfg.autoresume or cfg.load_path or cfg.save_overwrite or \
            any(k in ("save_folder", "hf_save_dir", "loggers.jsonl") for k, _ in errors):
        return
    hf = _local(hf_output_dir(cfg)) if cfg.save_hf else None
    if hf is not None and hf.exists() and (not hf.is_dir() or any(hf.iterdir())):
        errors.append(("hf_save_dir" if cfg.hf_save_dir else "save_folder",
                       f"{hf} holds an earlier run's HF model; set save_overwrite=true to replace it, or choose "
                       "another folder"))
    metrics = _local(metrics_path(cfg))
    if metrics is not None and metrics.is_file() and metrics.stat().st_size > 0:
        errors.append(("loggers.jsonl" if cfg.loggers.jsonl else "save_folder",
                       f"{metrics} holds an earlier run's metrics; set autoresume=true to continue that run, "
                       "save_overwrite=true to replace it, or choose another folder"))


def _check_load_path(errors: list, cfg: TrainConfig) -> None:
    p = _local(cfg.load_path)
    if p is not None and not p.is_file():
        errors.append(("load_path", f"{p} does not exist (expected a Composer checkpoint file)"))


def _check_resume(errors: list, cfg: TrainConfig) -> list:
    """A resume may not change what defines the run; returns the changes it may make."""
    from composer_sheared.run.resume import RUN_CONFIG, compare, read_run_config, refusals

    folder = resume_folder(cfg)  # local; an object-store folder is compared at the start of the run
    saved = read_run_config(folder) if folder is not None else None
    if saved is None:
        return []
    refused, changed = compare(saved, plain(OmegaConf.structured(cfg)))
    errors.extend(refusals(refused, str(folder / RUN_CONFIG)))
    return changed


def _check_field_type(key: str, default, value) -> None:
    # omegaconf cannot type these (model.config is a free dict): an int field given "abc" would
    # surface much later as a comparison error under another key
    if value is None or default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        return
    if not ok:
        raise ConfigError(key, f"expected {type(default).__name__} (like the default {default!r}), got {value!r}")


def source_hf_config(m: ModelConfig):
    """The source's HF config, without loading weights; ConfigError names the model key."""
    from transformers import AutoConfig, LlamaConfig

    from composer_sheared.shapes import NAMED_SHAPES

    def named(key: str, name: str):
        if name not in NAMED_SHAPES:
            raise ConfigError(key, f"unknown shape {name!r}; expected one of {sorted(NAMED_SHAPES)}")
        return NAMED_SHAPES[name]

    if m.config is not None:
        kw = dict(m.config)
        shape = kw.pop("shape", None)
        model_type = kw.pop("model_type", "llama")
        try:
            base = AutoConfig.for_model(model_type) if model_type != "llama" else LlamaConfig()
        except ValueError:
            raise ConfigError("model.config.model_type", f"unknown model type {model_type!r}") from None
        if shape is not None:
            base = named("model.config.shape", shape).to_hf_config(base)
        for k, v in kw.items():
            if not hasattr(base, k) and k != "head_dim":
                raise ConfigError(f"model.config.{k}", f"not a field of {type(base).__name__}")
            _check_field_type(f"model.config.{k}", getattr(base, k, None) if k != "head_dim" else 0, v)
            setattr(base, k, v)
        return base
    if m.source in EMBEDDED:
        from composer_sheared.demo.embedded import default_cache_dir

        cache = default_cache_dir()
        if (cache / "config.json").exists():
            return AutoConfig.from_pretrained(cache)
        return NAMED_SHAPES["smollm2-135m"].to_hf_config(LlamaConfig(rms_norm_eps=1e-5, rope_theta=1e5))
    p = Path(m.source)
    try:
        if p.suffix == ".gguf" and p.is_file():
            return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        if (p / "config.json").exists():
            return AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError) as err:
        raise ConfigError("model.source", f"cannot read the config of {p}: {err}") from None
    if m.shape:
        return named("model.shape", m.shape).to_hf_config(LlamaConfig())
    raise ConfigError("model.source", f"{p} is neither a HF directory with config.json nor a .gguf file")


def _resolve_shapes(errors: list, cfg: TrainConfig) -> Resolved:
    from composer_sheared.shapes import NAMED_SHAPES, ModelShape, resolve_target

    try:
        hf_config = source_hf_config(cfg.model)
        source = ModelShape.from_hf_config(hf_config)
    except ConfigError as err:
        errors.extend(err.problems)
        return Resolved()
    except ValueError as err:  # an unsupported architecture
        errors.append(("model", str(err)))
        return Resolved()
    src = _local(cfg.model.source) if cfg.model.source not in EMBEDDED else None
    if src is not None and src.is_dir() and not cfg.dry_run:
        from composer_sheared.storage.weights_check import check_source_weights

        errors.extend(check_source_weights(src, hf_config))
    shape = cfg.model.shape
    if shape is not None and shape in NAMED_SHAPES and NAMED_SHAPES[shape] != source:
        errors.append(("model.shape", f"{shape!r} is {NAMED_SHAPES[shape]} but the source's config is {source}"))
    target = None
    if cfg.pruning is not None:
        try:
            target = resolve_target(source, plain(cfg.pruning.target))
        except (ValueError, TypeError) as err:
            errors.append(("pruning.target", str(err)))
    return Resolved(hf_config, source, target)


def check_data(cfg: TrainConfig, resolved_vocab: Optional[int] = None) -> dict:
    """Fail fast on what the data's index files say: a missing directory, domain or split, an empty
    or unreadable index, a domain without samples, shards of the wrong size or hash or length, a
    vocabulary larger than the model's (`data/checks.py`; for `data.remote` on the index files
    fetched from it). Returns the data's stats.json ({} without one)."""
    from composer_sheared.data.checks import DataCheckError, check_data_root

    d = cfg.data
    try:
        return check_data_root(d.local, list(d.domains), (d.train_split, d.eval_split), remote=d.remote,
                               vocab_size=resolved_vocab, seq_len=cfg.max_seq_len)
    except DataCheckError as err:
        raise ConfigError(err.problems) from None


def validate(cfg: TrainConfig, check_paths: bool = True) -> Resolved:
    """The whole config at once (no weights, nothing written); raises ConfigError listing every problem."""
    errors: list[tuple[str, str]] = []
    _check_model(errors, cfg)
    _check_data_config(errors, cfg)
    _check_training(errors, cfg)
    _check_remote_save_folder(errors, cfg)
    changes = []
    if not cfg.dry_run:
        _check_save_folder(errors, cfg)
        _check_load_path(errors, cfg)
        _check_outputs_apart(errors, cfg)
        _check_earlier_outputs(errors, cfg)
        changes = _check_resume(errors, cfg)
    resolved = Resolved()
    if not any(k in ("model", "model.source") for k, _ in errors):  # the source's config is readable
        resolved = _resolve_shapes(errors, cfg)
    resolved.resume_changes = changes
    if check_paths and not cfg.dry_run and not any(k.startswith("data") for k, _ in errors):
        try:
            check_data(cfg, resolved.source.vocab_size if resolved.source is not None else None)
        except ConfigError as err:
            errors.extend(err.problems)
    if errors:
        raise ConfigError(errors)
    return resolved
