"""The wheel is the tool: data_prep, the recipes and the console script ship in it and work from
a directory that is not a checkout; the sdist holds what its tests need."""
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from composer_sheared.cli import COMMANDS, main
from composer_sheared.recipes import recipe_names, recipe_path
from tests.conftest import REPO

SDIST_NEEDS = ("tests/conftest.py", "data_prep/tokenize_domains.py", "yamls/prune_2.7b.yaml", "train.py",
               "constraints.txt", "bench/fidelity.py", "LICENSE", "Makefile")


def test_every_recipe_resolves_by_name_to_the_checkouts_yaml():
    files = sorted((REPO / "yamls").rglob("*.yaml"))
    names = [f.relative_to(REPO / "yamls").with_suffix("").as_posix() for f in files]
    assert recipe_names() == sorted(names) and "demo/prune_smollm2" in names
    for name, f in zip(names, files):
        assert recipe_path(name).resolve() == f.resolve()
        assert recipe_path(f"{name}.yaml").resolve() == f.resolve()
        assert recipe_path(f"yamls/{name}.yaml").resolve() == f.resolve()
    outside = REPO / "train.py"
    assert recipe_path(outside) == outside  # an existing path is taken as given
    with pytest.raises(FileNotFoundError, match=r"no_such_recipe: expected an existing YAML file or a recipe "
                                                r"name, one of \[.*'prune_2.7b'"):
        recipe_path("no_such_recipe")


def test_pyproject_ships_every_package_of_the_checkout():
    from setuptools import find_packages

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(REPO), include=["composer_sheared*", "data_prep*"]))
    assert found <= listed, f"pyproject.toml [tool.setuptools] packages: add {sorted(found - listed)}"


def test_help_lists_every_subcommand_and_each_tool_gets_its_arguments(capsys):
    assert set(COMMANDS) == {"train", "export", "oneshot", "evaluate", "fetch", "demo", "plan"}
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {name}" in out for name in COMMANDS), out
    with pytest.raises(SystemExit) as exit_info:
        main(["oneshot", "--help"])
    assert exit_info.value.code == 0 and "--target" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2 and "invalid choice: 'no-such-command'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The built artefacts (slow: builds an sdist and, from it, a wheel, then runs the installed tool)
def _setuptools_new_enough() -> bool:
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("setuptools")) >= Version("77")


def _run(cmd, cwd, env, timeout=300):
    r = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist path, wheel path, site dir the wheel is installed in, an empty work dir, env without the checkout)."""
    if not _setuptools_new_enough():
        pytest.skip("the build backend needs setuptools>=77 in this environment (the dev extra installs it)")
    tmp = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    src = tmp / "checkout"
    for rel in files:  # a copy, so the build leaves nothing in the shared checkout
        if (REPO / rel).is_file() and not rel.startswith("runs/"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((REPO / rel).read_bytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    dist = tmp / "dist"
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"], src, env)
    sdist = next(dist.glob("*.tar.gz"))
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp / "unpacked", filter="data")
    unpacked = next((tmp / "unpacked").iterdir())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, unpacked], tmp, env)
    wheel = next(dist.glob("*.whl"))
    site = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", site, wheel], tmp, env)
    work = tmp / "work"
    work.mkdir()
    # only the installed wheel on the path: no checkout (cwd is empty, PYTHONPATH is the target dir)
    return sdist, wheel, site, work, {**env, "PYTHONPATH": str(site)}


@pytest.mark.slow
def test_sdist_holds_what_its_tests_need(built):
    sdist = built[0]
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert not [f for f in SDIST_NEEDS if f not in names], sorted(names)


@pytest.mark.slow
def test_wheel_holds_data_prep_recipes_license_and_metadata(built):
    with zipfile.ZipFile(built[1]) as zf:
        names = set(zf.namelist())
        meta = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "data_prep/tokenize_domains.py" in names and "composer_sheared/recipes/yamls/demo/prune_smollm2.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta and "Project-URL: Paper" in meta and "Classifier:" in meta
    assert "composer-sheared = composer_sheared.cli:main" in entry_points


@pytest.mark.slow
def test_installed_wheel_works_outside_the_checkout(built):
    _, _, site, work, env = built
    out = _run([sys.executable, "-c", "import composer_sheared, data_prep; "
                "from composer_sheared.recipes import recipe_path; "
                "print(composer_sheared.__file__, data_prep.__file__, recipe_path('demo/prune_smollm2'))"], work, env)
    paths = out.split()
    assert len(paths) == 3 and all(Path(p).is_relative_to(site) for p in paths), out
    help_text = _run([site / "bin" / "composer-sheared", "--help"], work, env)
    assert all(f"    {name}" in help_text for name in COMMANDS), help_text
    assert "--out" in _run([sys.executable, "-m", "composer_sheared.demo", "--help"], work, env)
    # the older `python -m` forms run the same tools as the subcommands
    for module, command, flag in (("prune", "export", "--tokenizer"), ("oneshot", "oneshot", "--target"),
                                  ("evaluate", "evaluate", "--tasks"), ("fetch", "fetch", "--no-progress")):
        old = _run([sys.executable, "-m", f"composer_sheared.{module}", "--help"], work, env)
        new = _run([site / "bin" / "composer-sheared", command, "--help"], work, env)
        assert flag in old and flag in new, (module, old)
    assert "--seq-len" in _run([sys.executable, "-m", "data_prep.tokenize_domains", "--help"], work, env)
    assert list(work.iterdir()) == []  # nothing written into the working directory by --help


@pytest.mark.slow
def test_installed_wheel_trains_and_exports_outside_the_checkout(built, mds, tmp_path):
    """`composer-sheared train` of the installed wheel prunes, slices and writes the card, from a
    directory that is not a checkout; everything it writes is under that directory."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    from composer_sheared.shapes import ModelShape
    from tests.conftest import TARGET, prune_yaml

    _, _, site, _, env = built
    work = tmp_path / "work"
    work.mkdir()
    assert "dry_run=true" in _run([site / "bin" / "composer-sheared", "train", "--help"], work, env)
    OmegaConf.save(OmegaConf.create(prune_yaml(mds, Path("runs") / "tiny")), work / "prune.yaml")
    _run([site / "bin" / "composer-sheared", "train", "prune.yaml"], work, {**env, "OMP_NUM_THREADS": "1"})
    hf = work / "runs" / "tiny" / "pruned_hf"
    got = ModelShape.from_hf_config(AutoConfig.from_pretrained(hf)).as_dict()
    assert {k: got[k] for k in TARGET} == TARGET
    assert (hf / "README.md").is_file() and (hf / "provenance.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["prune.yaml", "runs"]
