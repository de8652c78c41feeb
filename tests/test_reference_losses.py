"""Scaling-law reference losses: L(N) = a / N^b + c per domain."""
import os
import sys

import numpy as np
import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import fit_reference_losses as frl  # noqa: E402

FAMILY_N = [6_738_415_616, 13_015_864_320, 68_976_648_192]

# The Sheared-LLaMA paper's reference losses, domain order cc, github, book, stackexchange, wiki, arxiv, c4.
PAPER_2_7B = [1.8712, 0.6883, 2.0325, 1.5353, 1.6297, 1.3560, 2.0328]
PAPER_1_3B = [1.9643, 0.7459, 2.1393, 1.6117, 1.7590, 1.4449, 2.1251]


def law(a, b, c):
    return lambda n: a / n ** b + c


@pytest.mark.parametrize("a,b,c", [(250.0, 0.3, 1.6), (12.0, 0.12, 0.4), (3e4, 0.55, 2.0)])
def test_three_points_fit_exactly(a, b, c):
    f = law(a, b, c)
    fit = frl.fit_power_law(FAMILY_N, [f(n) for n in FAMILY_N])
    assert fit.b == pytest.approx(b, rel=1e-6)
    assert fit.a == pytest.approx(a, rel=1e-4)
    assert fit.c == pytest.approx(c, abs=1e-6)
    for target in frl.TARGETS.values():
        assert fit(target) == pytest.approx(f(target), abs=1e-7)


def test_more_points_least_squares():
    f = law(80.0, 0.25, 1.1)
    n = [1e8, 4e8, 1.4e9, 6.9e9, 1.3e10]
    fit = frl.fit_power_law(n, [f(x) for x in n])
    assert fit.rss < 1e-16 and fit(2.7e9) == pytest.approx(f(2.7e9), abs=1e-8)
    noisy = [f(x) + e for x, e in zip(n, [1e-3, -1e-3, 5e-4, 0, -5e-4])]
    assert frl.fit_power_law(n, noisy)(2.7e9) == pytest.approx(f(2.7e9), abs=5e-3)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least 3"):
        frl.fit_power_law(FAMILY_N[:2], [2.0, 1.9])
    with pytest.raises(ValueError, match="decrease with model size"):
        frl.fit_power_law(FAMILY_N, [1.9, 2.0, 1.8])


def test_cli_writes_yaml_for_a_family_file(tmp_path):
    laws = {"x": law(250.0, 0.3, 1.6), "y": law(40.0, 0.2, 0.5)}
    fam = {"domains": ["x", "y"],
           "models": {f"m{i}": {"params": n, "losses": [laws["x"](n), laws["y"](n)]} for i, n in enumerate(FAMILY_N)}}
    (tmp_path / "fam.yaml").write_text(yaml.safe_dump(fam))
    out = tmp_path / "refs.yaml"
    assert frl.main(["--family", str(tmp_path / "fam.yaml"), "--target", "2.7b", "--out", str(out), "--digits", "6"]) == 0
    got = yaml.safe_load(out.read_text())
    assert got["target_params"] == 2_701_393_920
    for d in ("x", "y"):
        assert got["references"][d] == pytest.approx(laws[d](2_701_393_920), abs=1e-6)
    assert got["reference_list"] == [got["references"]["x"], got["references"]["y"]]


def test_llama2_family_reproduces_the_paper_references():
    for target, paper in (("2.7b", PAPER_2_7B), ("1.3b", PAPER_1_3B)):
        got = frl.reference_losses(frl.TARGETS[target])["reference_list"]
        np.testing.assert_allclose(got, paper, atol=1e-3, err_msg=target)


def test_cli_default_family_prints_the_paper_references(capsys):
    assert frl.main(["--target", "1.3b"]) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    assert got["domains"] == ["cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4"]
    np.testing.assert_allclose(got["reference_list"], PAPER_1_3B, atol=1e-3)
