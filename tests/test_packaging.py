"""Packaging: pyproject declares ranges (an existing torch 2.6 / 2.7 is kept); constraints.txt pins
a tested set inside them, and the environment running the tests is that set."""
import re
import tomllib
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO


def _requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


@pytest.mark.parametrize("name, accepted, rejected", [
    ("torch", ["2.6.0", "2.6.1", "2.7.0"], ["2.5.1", "2.7.1", "2.8.0"]),
    ("mosaicml", ["0.32.0", "0.32.1"], ["0.31.0", "0.33.0"]),
])
def test_declared_ranges(name, accepted, rejected):
    req = _requirements()[name]
    assert all(req.specifier.contains(v) for v in accepted), req
    assert not any(req.specifier.contains(v) for v in rejected), req


def test_no_exact_pins_in_pyproject():
    assert not [str(r) for r in _requirements().values() if re.search(r"==", str(r.specifier))]


def test_constraints_pin_inside_the_ranges_and_match_this_environment():
    pins, reqs = _pins(), _requirements()
    for name, req in reqs.items():
        if name in pins:
            assert req.specifier.contains(pins[name]), (name, pins[name], req)
    for name in ("torch", "mosaicml", "mosaicml-streaming", "transformers"):
        assert version(name) == pins[name], (name, version(name), pins[name])
