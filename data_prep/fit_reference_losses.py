"""Reference losses for dynamic batch loading from a scaling law fitted to a model family.

Per domain, fit ``L(N) = a / N^b + c`` to the losses of a family of models trained on the same
data (Sheared-LLaMA: LLaMA2 7B/13B/70B on the RedPajama validation sets) and evaluate it at the
target's total parameter count. With three models and three parameters the fit is exact.

    python -m data_prep.fit_reference_losses --target 2.7b            # default family: LLaMA2
    python -m data_prep.fit_reference_losses --family fam.yaml --params 1.3e9 --out refs.yaml

A family file (YAML or JSON)::

    domains: [cc, github, book, stackexchange, wiki, arxiv, c4]
    models:
      llama2-7b:  {params: 6738415616,  losses: [...]}   # one loss per domain
      llama2-13b: {params: 13015864320, losses: [...]}
      llama2-70b: {params: 68976648192, losses: [...]}
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

__all__ = ["PowerLaw", "fit_power_law", "reference_losses", "load_family", "LLAMA2_REDPAJAMA", "TARGETS", "main"]

# Total parameter counts of the Sheared-LLaMA targets (LLaMA2-7B pruned to 2.7B / 1.3B shapes),
# without RMSNorm weights, as the reference notebook counts them.
TARGETS = {"2.7b": 2_701_393_920, "1.3b": 1_345_323_008}

REDPAJAMA_DOMAINS = ["cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4"]

# The default family: per-domain validation losses of LLaMA2 7B / 13B / 70B on the RedPajama
# validation sets. Source: the Sheared-LLaMA paper (Xia et al., ICLR 2024, arXiv 2310.06694) and
# its reference implementation, princeton-nlp/LLM-Shearing, notebook
# scaling_law/reference_loss_estimation.ipynb, which fits these three points per domain and
# evaluates the law at the targets' parameter counts (RMSNorm weights not counted). The fit of
# this module reproduces the paper's 2.7B and 1.3B reference vectors to within 1e-4
# (tests/test_reference_losses.py). Domain order: REDPAJAMA_DOMAINS.
LLAMA2_PARAMS = {"llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320, "llama2-70b": 68_976_648_192}
LLAMA2_LOSSES = {
    #              cc      github  book    stackex wiki    arxiv   c4
    "llama2-7b": [1.7520, 0.6216, 1.9063, 1.4482, 1.4844, 1.2637, 1.9219],
    "llama2-13b": [1.6680, 0.5791, 1.8242, 1.3936, 1.3945, 1.2109, 1.8486],
    "llama2-70b": [1.4621, 0.4890, 1.6450, 1.2805, 1.2118, 1.1148, 1.6848],
}
LLAMA2_REDPAJAMA = {
    "domains": REDPAJAMA_DOMAINS,
    "models": {name: {"params": LLAMA2_PARAMS[name], "losses": LLAMA2_LOSSES[name]} for name in LLAMA2_PARAMS},
}


@dataclass(frozen=True)
class PowerLaw:
    """``L(N) = a / N^b + c``."""

    a: float
    b: float
    c: float
    rss: float = 0.0  # residual sum of squares of the fit

    def __call__(self, n: float) -> float:
        return self.a / float(n) ** self.b + self.c


def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares y = a x + c; returns (a, c, rss)."""
    A = np.stack([x, np.ones_like(x)], axis=1)
    (a, c), *_ = np.linalg.lstsq(A, y, rcond=None)
    r = A @ np.array([a, c]) - y
    return float(a), float(c), float(r @ r)


def fit_power_law(params: Sequence[float], losses: Sequence[float], b_range: tuple[float, float] = (1e-3, 4.0)
                  ) -> PowerLaw:
    """Least-squares fit of ``a / N^b + c`` (exact for three points).

    For a fixed exponent ``b`` the model is linear in (a, c), so only ``b`` is searched: a log
    grid, then golden-section refinement. N is scaled by its smallest value to keep ``N^-b``
    well conditioned; ``a`` is rescaled back at the end.
    """
    n = np.asarray(params, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if n.shape != y.shape or n.ndim != 1:
        raise ValueError(f"params {n.shape} and losses {y.shape} must be flat and of equal length")
    if len(n) < 3:
        raise ValueError(f"need at least 3 models to fit a, b and c; got {len(n)}")
    if len(set(n.tolist())) != len(n) or np.any(n <= 0):
        raise ValueError(f"parameter counts must be positive and distinct: {n.tolist()}")
    order = np.argsort(n)
    n, y = n[order], y[order]
    if not np.all(np.diff(y) < 0):
        raise ValueError(f"losses must decrease with model size for a / N^b + c with a, b > 0: "
                         f"{dict(zip(n.tolist(), y.tolist()))}")
    n0 = n[0]
    s = n / n0

    def rss(b: float) -> float:
        return _linear_fit(s ** -b, y)[2]

    grid = np.exp(np.linspace(math.log(b_range[0]), math.log(b_range[1]), 801))
    vals = np.array([rss(b) for b in grid])
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = rss(x1), rss(x2)
    for _ in range(200):
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - g * (hi - lo)
            f1 = rss(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + g * (hi - lo)
            f2 = rss(x2)
        if hi - lo < 1e-14 * max(1.0, hi):
            break
    b = (lo + hi) / 2
    if b <= b_range[0] * 1.0001 or b >= b_range[1] * 0.9999:
        raise ValueError(f"the exponent b hit the search bound {b_range} (b={b:.4g}); the losses "
                         f"{y.tolist()} are not well described by a / N^b + c")
    a_s, c, r = _linear_fit(s ** -b, y)
    return PowerLaw(a=float(a_s * n0 ** b), b=float(b), c=float(c), rss=float(r))


def load_family(path: Optional[str] = None) -> dict:
    """A family dict (see module doc); ``None`` is the shipped LLaMA2 family."""
    if path is None:
        return LLAMA2_REDPAJAMA
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            fam = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}:{err.colno}: not JSON ({err.msg})") from None
    else:
        import yaml

        try:
            fam = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            raise ValueError(f"{path}{at}: not YAML ({getattr(err, 'problem', None) or err})") from None
    _check_family(fam, path)
    return fam


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_family(fam: Any, where: str) -> None:
    if not isinstance(fam, Mapping) or "domains" not in fam or "models" not in fam:
        raise ValueError(f"{where}: a family needs 'domains' and 'models' keys")
    if not isinstance(fam["domains"], list) or not isinstance(fam["models"], Mapping):
        raise ValueError(f"{where}: 'domains' should be a list and 'models' a mapping of name -> "
                         f"{{params, losses}}")
    k = len(fam["domains"])
    for name, m in fam["models"].items():
        if not isinstance(m, Mapping) or "params" not in m or "losses" not in m:
            raise ValueError(f"{where}: model {name!r} needs 'params' and 'losses'")
        if not _number(m["params"]) or m["params"] <= 0:
            raise ValueError(f"{where}: model {name!r}: 'params' should be a positive number, got {m['params']!r}")
        if not isinstance(m["losses"], list) or not all(_number(x) for x in m["losses"]):
            raise ValueError(f"{where}: model {name!r}: 'losses' should be a list of numbers, got {m['losses']!r}")
        if len(m["losses"]) != k:
            raise ValueError(f"{where}: model {name!r} has {len(m['losses'])} losses for {k} domains")


def reference_losses(target_params: float, family: Optional[Mapping] = None) -> dict[str, Any]:
    """``{"references": {domain: loss}, "fits": {domain: {a, b, c, rss}}, ...}`` at ``target_params``."""
    if not _number(target_params) or target_params <= 0:
        raise ValueError(f"target: expected a positive parameter count, got {target_params!r}")
    fam = load_family() if family is None else family
    _check_family(fam, "family")
    models = list(fam["models"].values())
    params = [float(m["params"]) for m in models]
    refs, fits = {}, {}
    for i, domain in enumerate(fam["domains"]):
        try:
            law = fit_power_law(params, [float(m["losses"][i]) for m in models])
        except ValueError as err:
            raise ValueError(f"domain {domain!r}: {err}") from None
        refs[domain] = float(law(target_params))
        fits[domain] = {"a": float(law.a), "b": float(law.b), "c": float(law.c), "rss": float(law.rss)}
    return {"target_params": int(target_params), "domains": list(fam["domains"]), "references": refs,
            "reference_list": [refs[d] for d in fam["domains"]], "fits": fits,
            "family": {name: int(m["params"]) for name, m in fam["models"].items()}}


def _parse_params(text: str) -> int:
    key = text.strip().lower()
    if key in TARGETS:
        return TARGETS[key]
    try:
        n = float(text)
    except ValueError:
        raise ValueError(f"--target: expected a parameter count (e.g. 2.7e9) or one of {sorted(TARGETS)}, "
                         f"got {text!r}") from None
    if not math.isfinite(n) or n < 1:
        raise ValueError(f"--target: expected a positive parameter count, got {text!r}")
    return int(n)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Fit L(N) = a/N^b + c per domain and print reference losses.")
    ap.add_argument("--target", "--params", dest="params", required=True,
                    help=f"total parameter count of the target, or one of {sorted(TARGETS)}")
    ap.add_argument("--family", default=None, help="family YAML/JSON (default: LLaMA2 7B/13B/70B)")
    ap.add_argument("--out", default=None, help="write YAML here instead of printing it")
    ap.add_argument("--digits", type=int, default=4)
    args = ap.parse_args(argv)
    try:
        result = reference_losses(_parse_params(args.params), load_family(args.family))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import yaml

    result["reference_list"] = [round(float(x), args.digits) for x in result["reference_list"]]
    result["references"] = {d: round(float(x), args.digits) for d, x in result["references"].items()}
    text = yaml.safe_dump(result, sort_keys=False)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
