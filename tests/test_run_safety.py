"""No run destroys what it did not write: outputs apart from inputs, earlier runs' outputs kept
unless save_overwrite=true, metrics kept by a run that dies while loading, one run per folder,
and a full disk named as such."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from composer_sheared.config import ConfigError, load_config
from composer_sheared.loggers import JSONLLogger
from composer_sheared.run.lock import LOCK_NAME, FolderInUseError, RunLock
from tests.conftest import prune_yaml, tiny_model, tiny_tokenizer


def _yaml(cfg: dict, tmp_path):
    y = tmp_path / "c.yaml"
    OmegaConf.save(OmegaConf.create(cfg), y)
    return y


def _problems(cfg: dict, tmp_path, *overrides) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        load_config(str(_yaml(cfg, tmp_path)), list(overrides))
    return dict(err.value.problems)


def _snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# ---- outputs apart from inputs -------------------------------------------------------------------
@pytest.fixture
def source(tmp_path):
    d = tmp_path / "src"
    tiny_model().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _from_source(mds, tmp_path, source) -> dict:
    cfg = prune_yaml(mds, tmp_path / "out")
    cfg["model"] = {"source": str(source)}
    return cfg


def test_hf_save_dir_equal_to_or_inside_the_source_is_refused(mds, tmp_path, source):
    cfg = _from_source(mds, tmp_path, source)
    for hf in (source, source / "sub"):
        problems = _problems(cfg, tmp_path, f"hf_save_dir={hf}")
        assert "hf_save_dir" in problems and f"model.source={source}" in problems["hf_save_dir"], problems
    # the whole HF directory is replaced: one that holds an input is refused too
    problems = _problems(cfg, tmp_path, f"hf_save_dir={tmp_path}")
    assert "holds model.source" in problems["hf_save_dir"] or "holds data.local" in problems["hf_save_dir"]
    # the default <save_folder>/pruned_hf inside the source, and a tokenizer / data directory as output
    assert "save_folder" in _problems(cfg, tmp_path, f"save_folder={source}")
    tok = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok)
    assert "model.tokenizer" in _problems(cfg, tmp_path, f"model.tokenizer={tok}", f"hf_save_dir={tok}")["hf_save_dir"]
    assert "data.local" in _problems(cfg, tmp_path, f"save_folder={mds}")["save_folder"]
    load_config(str(_yaml(cfg, tmp_path)), [f"hf_save_dir={tmp_path / 'apart'}"])  # apart: fine


def test_fresh_run_without_checkpoints_keeps_an_earlier_runs_outputs(mds, tmp_path):
    out = tmp_path / "out"
    (out / "pruned_hf").mkdir(parents=True)
    (out / "pruned_hf" / "config.json").write_text("{}")
    cfg = prune_yaml(mds, out)
    problems = _problems(cfg, tmp_path, "checkpoint=false")
    assert "save_overwrite=true" in problems["save_folder"] and "pruned_hf" in problems["save_folder"]
    (out / "pruned_hf" / "config.json").unlink()
    (out / "metrics.jsonl").write_text('{"run": {"start_batch": 0}}\n')
    assert "metrics" in _problems(cfg, tmp_path, "checkpoint=false")["save_folder"]
    elsewhere = tmp_path / "m.jsonl"
    elsewhere.write_text("{}\n")
    assert "loggers.jsonl" in _problems(cfg, tmp_path, "save_folder=null", f"loggers.jsonl={elsewhere}",
                                        f"hf_save_dir={tmp_path / 'hf'}")
    load_config(str(_yaml(cfg, tmp_path)), ["checkpoint=false", "save_overwrite=true"])


# ---- metrics of a run that dies while loading ----------------------------------------------------
def test_logger_closed_before_after_load_keeps_the_earlier_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    history = "".join(json.dumps(r) + "\n" for r in [{"run": {"start_batch": 0}}, {"step": 1, "metrics": {"x": 1}}])
    path.write_text(history)
    logger = JSONLLogger(path)
    logger.log_hyperparameters({"lr": 1.0})  # what algorithms log at INIT, before the load fails
    logger.close(SimpleNamespace(run_name="r"), None)
    assert path.read_text() == history
    # without a Trainer (no AFTER_LOAD) into a new file, the records are still written
    fresh = JSONLLogger(tmp_path / "new.jsonl")
    fresh.log_hyperparameters({"lr": 1.0})
    fresh.close(SimpleNamespace(run_name="r"), None)
    assert [next(iter(json.loads(line))) for line in (tmp_path / "new.jsonl").read_text().splitlines()] == \
        ["run", "hparams"]


# ---- one run per save folder ---------------------------------------------------------------------
def test_second_run_into_a_locked_folder_is_refused_by_name(mds, tmp_path, capsys):
    import train

    out = tmp_path / "out"
    with RunLock(out):
        with pytest.raises(FolderInUseError, match=f"in use by pid {os.getpid()}"):
            RunLock(out).acquire()
        assert train.cli([str(_yaml(prune_yaml(mds, out), tmp_path))]) == 2
        err = capsys.readouterr().err
        assert f"error: save_folder: {out} is in use by pid {os.getpid()}" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run created nothing
    assert not out.exists()  # the lock made the folder, and nothing else was written there


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    from composer_sheared.storage.atomic import host_tag

    tmp_path.joinpath(LOCK_NAME).write_text(f"{pid}@{host_tag()}\n")
    with pytest.warns(UserWarning, match=f"lock .* of pid {pid}, which is no longer running"):
        lock = RunLock(tmp_path).acquire()
    assert tmp_path.joinpath(LOCK_NAME).read_text().startswith(f"{os.getpid()}@")
    lock.release()
    assert not tmp_path.joinpath(LOCK_NAME).exists() and tmp_path.is_dir()  # not made by the lock: kept


def test_lock_held_by_another_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from composer_sheared.run.lock import RunLock;"
                               f"RunLock({str(tmp_path)!r}).acquire(); print('ok', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(FolderInUseError, match=f"in use by pid {holder.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire().release()  # the kernel dropped the dead holder's lock


# ---- a full disk ---------------------------------------------------------------------------------
def test_full_disk_during_a_checkpoint_is_named(mds, tmp_path, capsys, monkeypatch):
    import composer.utils.checkpoint as ckpt

    import train

    def full_disk(state_dict, filename):  # a torch.save that ran out of space half-way
        with open(filename, "wb") as f:
            f.write(b"PK\x03\x04" + b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_checkpoint_file", full_disk)
    out = tmp_path / "out"
    cfg = prune_yaml(mds, out, steps=2)
    cfg.update(save_interval="2ba", run_name="full")
    assert train.cli([str(_yaml(cfg, tmp_path))]) == 1
    err = capsys.readouterr().err
    assert f"error: no space left writing {out / 'ep0-ba2-rank0.pt'}" in err, err[-2000:]
    # the truncated file is not left beside a good `latest`, nor the lock behind
    assert not (out / "ep0-ba2-rank0.pt").exists() and (out / "incomplete" / "ep0-ba2-rank0.pt").exists()
    assert not (out / LOCK_NAME).exists() and not (out / "pruned_hf").exists()


def test_full_disk_is_found_inside_writers_errors():
    from composer_sheared.storage.atomic import find_no_space

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    except RuntimeError as err:
        assert find_no_space(err).errno == errno.ENOSPC
    safetensors_like = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                 'message: "No space left on device" })')
    assert find_no_space(safetensors_like) is safetensors_like
    assert find_no_space(RuntimeError("shape mismatch")) is None
