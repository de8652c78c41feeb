"""yamls/mcli/*.yaml: mosaicml-cli's own RunConfig parses them; no `<...>` placeholder is left;
every variable the command uses is set; the fetch lines read object-store URIs into the local paths
the training line uses; each `composer train.py <recipe> ...` line dry-runs (with its overrides);
the continue run reads the pruned model from where the prune run saves it."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

YAMLS = sorted((REPO / "yamls" / "mcli").glob("*.yaml"))
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def _run_config(path: Path):
    from mcli import RunConfig

    return RunConfig.from_file(path)


def _commands(rc) -> list[list[str]]:
    """The command's lines (backslash continuations joined), each split like the shell would."""
    text = re.sub(r"\\\n\s*", " ", rc.command)
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _env(rc) -> dict:
    """The run's env_variables, object-store URIs moved to a test bucket (a dry run reads none)."""
    return {k: re.sub(r"^(\w+)://[^/]+", r"\1://test-bucket", str(v)) for k, v in rc.env_variables.items()}


def _expand(arg: str, env: dict) -> str:
    missing = [v for v in _VAR.findall(arg) if v not in env]
    assert not missing, f"the command uses {missing}, which env_variables does not set"
    return _VAR.sub(lambda m: env[m.group(1)], arg)


def _train_lines(rc) -> list[list[str]]:
    return [cmd[2:] for cmd in _commands(rc) if cmd[:2] == ["composer", "train.py"]]


def _fetch_lines(rc) -> list[list[str]]:
    return [cmd[3:] for cmd in _commands(rc) if cmd[:3] == ["python", "-m", "composer_sheared.fetch"]]


def test_there_are_platform_yamls():
    assert {p.name for p in YAMLS} >= {"prune_2.7b.yaml", "continue_2.7b.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_parses_with_mcli_and_nothing_is_left_unset(path):
    from composer_sheared.storage.fetch import is_uri, store_schemes, uri_scheme

    rc = _run_config(path)
    assert rc.name and rc.image and rc.compute.get("gpus")
    assert not re.search(r"<[^<>\n]+>", path.read_text()), "a <placeholder> is left"
    repo = [i for i in rc.integrations if i["integration_type"] == "git_repo"]
    assert len(repo) == 1 and repo[0]["pip_install"].split()[0] == ".", "the git_repo integration must install ."
    assert not [i for i in rc.integrations if i["integration_type"] == "wandb"] or "wandb" in repo[0]["pip_install"]
    env = _env(rc)
    trains = _train_lines(rc)
    assert len(trains) == 1, "expected one `composer train.py <recipe> ...` line"
    train = [_expand(a, env) for a in trains[0]]
    assert (REPO / train[0]).is_file(), f"the recipe {train[0]} does not exist"
    overrides = dict(a.split("=", 1) for a in train[1:])
    assert is_uri(overrides.get("save_folder")) and overrides.get("autoresume") == "true"
    assert is_uri(overrides.get("data.remote")) and not is_uri(overrides.get("data.local"))
    fetches = _fetch_lines(rc)
    assert fetches, "the weights must be fetched from object storage"
    local_inputs = {overrides.get("model.source"), overrides.get("distillation.teacher"), env.get("LLAMA2_7B_DIR")}
    for args in fetches:
        uri, dest = (_expand(a, env) for a in args)
        assert uri_scheme(uri) in store_schemes() and os.path.isabs(dest), args
        assert dest in local_inputs, f"{dest} is fetched but the training command does not read it"
    assert overrides.get("model.source") in {_expand(a[1], env) for a in fetches}


@pytest.mark.slow
@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_training_line_dry_runs(path):
    rc = _run_config(path)
    env = _env(rc)
    train = [_expand(a, env) for a in _train_lines(rc)[0]]
    r = subprocess.run([sys.executable, "train.py", *train, "dry_run=true"], cwd=REPO,
                       env={**subprocess_env(), **env}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "== plan:" in r.stdout


def test_continue_reads_what_prune_saves():
    from composer_sheared.config import hf_output_dir, load_config
    from composer_sheared.run.remote_save import remote_folder

    prune, cont = (_run_config(REPO / "yamls" / "mcli" / n) for n in ("prune_2.7b.yaml", "continue_2.7b.yaml"))
    assert prune.env_variables["RUNS_URI"] == cont.env_variables["RUNS_URI"]
    env = _env(prune)
    train = [_expand(a, env) for a in _train_lines(prune)[0]]
    cfg, _ = load_config(str(REPO / train[0]), [*train[1:], "dry_run=true"])
    saved = f"{remote_folder(cfg)}/{hf_output_dir(cfg).name}"
    cenv = _env(cont)
    fetched = [_expand(a[0], cenv) for a in _fetch_lines(cont)]
    assert saved in fetched, (saved, fetched)
    ctrain = dict(_expand(a, cenv).split("=", 1) for a in _train_lines(cont)[0][1:])
    assert ctrain["model.source"] == _expand(_fetch_lines(cont)[fetched.index(saved)][1], cenv)
