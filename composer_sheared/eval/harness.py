"""Downstream evaluation of HF checkpoints with lm-evaluation-harness, models side by side.

    composer-sheared evaluate MODEL_DIR [NAME=MODEL_DIR ...] --tasks sheared-llama \\
        [--include-path DIR] [--out DIR] [--limit N] [--device cpu] [--batch-size 16]

``--tasks`` takes the preset ``sheared-llama`` (the paper's suite with its shots and metrics) or
lm-eval task / group names, including those of custom task YAML under ``--include-path`` (such as
the local ``next_line`` task of data_prep/next_line_task.py). The harness does the work
(``lm_eval.simple_evaluate`` on an ``HFLM``); this module picks one metric per task, puts the
models side by side and writes the table to stdout, ``OUT/eval.md`` and ``OUT/eval.json``.

Needs the ``eval`` extra (``pip install -e .[eval]``). Where the task data comes from is the
harness's business: its usual dataset sources on a machine that has them (or their local cache),
or local files through custom task YAML; nothing here downloads a model.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["TaskSpec", "PRESETS", "PUBLISHED", "resolve_tasks", "evaluate_models", "format_table",
           "write_results", "downstream_accuracy", "model_names"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    shots: Optional[int] = None  # None: the task's own default
    metric: Optional[str] = None  # "acc", "acc_norm" or "metric,filter"; None: picked from the results


# The Sheared-LLaMA paper's suite (its evaluation section and appendix): shots and metrics.
PRESETS: dict[str, list[TaskSpec]] = {
    "sheared-llama": [
        TaskSpec("arc_easy", 0, "acc"),
        TaskSpec("lambada_openai", 0, "acc"),
        TaskSpec("logiqa", 0, "acc_norm"),
        TaskSpec("piqa", 0, "acc"),
        TaskSpec("sciq", 0, "acc"),
        TaskSpec("winogrande", 0, "acc"),
        TaskSpec("arc_challenge", 25, "acc_norm"),
        TaskSpec("hellaswag", 10, "acc_norm"),
        TaskSpec("mmlu", 5, "acc"),
        TaskSpec("boolq", 32, "acc"),
        TaskSpec("nq_open", 32, "exact_match,remove_whitespace"),
        TaskSpec("truthfulqa_mc2", 0, "acc"),  # lm-eval names the mc2 score "acc"
        TaskSpec("gsm8k", 8, "exact_match,strict-match"),
    ],
}

# Published numbers (percent) of the paper's released models, for the comparison row.
PUBLISHED = {
    "Sheared-LLaMA-2.7B (paper)": {"average_11": 56.7, "sciq": 90.8, "piqa": 75.8, "winogrande": 64.2,
                                   "arc_easy": 67.0, "arc_challenge": 41.2, "hellaswag": 70.8,
                                   "logiqa": 28.2},
    "Sheared-LLaMA-1.3B (paper)": {"average_11": 51.0},
}

# lm-eval's HFLM loads the tokenizer from the model directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")

_PREFERRED = ("acc", "exact_match", "mc2", "acc_norm", "f1", "bleu")


def resolve_tasks(names: Sequence[str], num_fewshot: Optional[int] = None) -> list[TaskSpec]:
    """Expand presets; plain task names get ``num_fewshot`` (None: the task's default)."""
    specs: list[TaskSpec] = []
    for name in names:
        for part in (p for p in name.split(",") if p):
            specs += PRESETS[part] if part in PRESETS else [TaskSpec(part, num_fewshot)]
    if not specs:
        raise ValueError("no tasks given")
    seen = [s.name for s in specs]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise ValueError(f"task(s) {dup} given twice")
    return specs


def _pick(metrics: Mapping[str, Any], spec: TaskSpec) -> tuple[str, float]:
    """(metric key, value) of a task's lm-eval result row."""
    keys = [k for k in metrics if "," in k and "_stderr" not in k and isinstance(metrics[k], (int, float))]
    if spec.metric:
        want = spec.metric if "," in spec.metric else f"{spec.metric},none"
        if want not in metrics:
            raise KeyError(f"task {spec.name!r}: lm-eval reported no {want!r}; it reported {sorted(keys)}")
        return want, float(metrics[want])
    for m in _PREFERRED:
        for k in keys:
            if k.split(",")[0] == m:
                return k, float(metrics[k])
    if not keys:
        raise KeyError(f"task {spec.name!r}: lm-eval reported no numeric metric ({sorted(metrics)})")
    return keys[0], float(metrics[keys[0]])


def model_names(models: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` or ``PATH`` (named by its shortest path suffix that no other model shares),
    in the order given."""
    pairs = [m.split("=", 1) if "=" in m and not os.path.exists(m) else [None, m] for m in models]
    parts = {p: Path(os.path.abspath(p)).parts for n, p in pairs if n is None}
    named: dict[str, str] = {}
    for name, path in pairs:
        if name is None:
            for k in range(1, len(parts[path]) + 1):
                if sum(q[-k:] == parts[path][-k:] for q in parts.values()) == 1:
                    name = "/".join(parts[path][-k:])
                    break
        if name is None or name in named:
            raise ValueError(f"model {path!r} is given twice (or under a name already used)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model {name!r}: {path!r} is not a HF model directory (no config.json)")
        if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"model {name!r}: {path} has no tokenizer (expected one of {list(TOKENIZER_FILES)}; "
                                    "save the tokenizer beside the model)")
        named[name] = path
    return named


def evaluate_models(models: Mapping[str, Any], tasks: Sequence[TaskSpec], include_path: Optional[str] = None,
                    device: Optional[str] = None, batch_size: int = 16, limit: Optional[float] = None,
                    dtype: Optional[str] = None, seed: int = 0) -> dict:
    """Run lm-eval for every model (an HF dir or a loaded ``PreTrainedModel``) on every task.

    Returns ``{"models", "tasks", "scores": {model: {task: value}}, "average": {model: value},
    "samples": {task: n}, "lm_eval_version", "limit"}``; values are fractions (0..1).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("lm-evaluation-harness is missing: pip install -e '.[eval]'") from err
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"--include-path {include_path!r} is not a directory")
    tm = TaskManager(include_path=include_path)
    unknown = [s.name for s in tasks if s.name not in tm.all_tasks]
    if unknown:
        hint = "" if include_path else " (custom task YAML needs --include-path)"
        raise ValueError(f"unknown lm-eval task(s) {unknown}{hint}")
    by_shots: dict[Optional[int], list[TaskSpec]] = {}
    for s in tasks:
        by_shots.setdefault(s.shots, []).append(s)

    scores: dict[str, dict[str, float]] = {}
    metric_keys: dict[str, str] = {}
    samples: dict[str, int] = {}
    for name, model in models.items():
        lm = HFLM(pretrained=str(model) if isinstance(model, (str, os.PathLike)) else model,
                  device=device, dtype=dtype, batch_size=batch_size)
        scores[name] = {}
        for shots, group in by_shots.items():
            res = lm_eval.simple_evaluate(model=lm, tasks=[s.name for s in group], num_fewshot=shots,
                                          task_manager=tm, limit=limit, log_samples=False,
                                          bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
            for s in group:
                key, value = _pick(res["results"][s.name], s)
                scores[name][s.name], metric_keys[s.name] = value, key
                n = res.get("n-samples", {}).get(s.name, {}).get("effective")
                if n is None:  # a group: its subtasks' samples
                    subs = res.get("group_subtasks", {}).get(s.name, [])
                    n = sum(res["n-samples"][t]["effective"] for t in subs if t in res.get("n-samples", {}))
                samples[s.name] = int(n)
        del lm
    average = {m: sum(v.values()) / len(v) for m, v in scores.items()}
    return {
        "models": {k: (str(v) if isinstance(v, (str, os.PathLike)) else type(v).__name__) for k, v in models.items()},
        "tasks": [dict(asdict(s), metric=metric_keys[s.name]) for s in tasks],
        "scores": scores, "average": average, "samples": samples,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"), "limit": limit, "device": device,
        "dtype": dtype,
    }


def format_table(result: Mapping[str, Any]) -> str:
    """Markdown: one row per model, one column per task (percent) and the average."""
    tasks = result["tasks"]

    def head(t):
        shots = "default" if t["shots"] is None else f"{t['shots']}-shot"
        return f"{t['name']}<br>{shots}, {t['metric'].replace(',none', '')}"

    lines = ["| model | " + " | ".join(head(t) for t in tasks) + " | average |",
             "| --- |" + " ---: |" * (len(tasks) + 1)]
    for m, row in result["scores"].items():
        cells = [f"{100 * row[t['name']]:.1f}" for t in tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {100 * result['average'][m]:.1f} |")
    n = ", ".join(f"{t['name']} {result['samples'].get(t['name'], '?')}" for t in tasks)
    lines.append(f"\nPercent; lm-eval {result['lm_eval_version']}, {result['device']} {result['dtype']}; "
                 f"samples per task: {n}" + (f" (limit {result['limit']})" if result.get("limit") else "") + ".")
    names = {t["name"] for t in tasks}
    if names & {n for p in PUBLISHED.values() for n in p}:
        for who, nums in PUBLISHED.items():
            known = ", ".join(f"{k} {v}" for k, v in nums.items() if k in names)
            lines.append(f"Published, {who}: average {nums['average_11']} over the paper's 11 tasks"
                         + (f"; {known}." if known else "."))
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_results(result: Mapping[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``out_dir/eval.md`` and ``out_dir/eval.json``, each written to a temp file and renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "eval.md", out / "eval.json"
    _atomic_write(md, "# Downstream evaluation\n\n" + format_table(result))
    _atomic_write(js, json.dumps(result, indent=2, default=str) + "\n")
    return md, js


def downstream_accuracy(model_dirs: Mapping[str, Any], task_dir: str | os.PathLike, task: str = "next_line",
                        device: str = "cpu", batch_size: int = 16, limit: Optional[float] = None) -> dict[str, float]:
    """Accuracy of each model on the local next-line task built in ``task_dir``: ``{name: acc}``."""
    res = evaluate_models(model_dirs, [TaskSpec(task, 0, "acc")], include_path=str(task_dir), device=device,
                          batch_size=batch_size, limit=limit)
    return {m: row[task] for m, row in res["scores"].items()}
