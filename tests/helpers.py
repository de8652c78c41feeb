"""Assertions over tensors, on torch.testing.assert_close so a failure names the worst element.

    assert_same_function(a, b, atol)   |a - b| <= atol everywhere (rtol 0: a plain absolute bound)
    assert_differs(a, b, more_than)    some |a - b| exceeds `more_than` (the comparison is not vacuous)
"""
from __future__ import annotations

import torch


def assert_same_function(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4, msg: str | None = None
                         ) -> None:
    """Outputs equal within an absolute tolerance (masked vs sliced, saved vs loaded logits)."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0, msg=msg)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def assert_differs(a: torch.Tensor, b: torch.Tensor, more_than: float) -> None:
    """The two differ somewhere by more than `more_than`: what makes an equality check meaningful."""
    diff = max_abs_diff(a, b)
    assert diff > more_than, f"tensors: expected a difference above {more_than}, the largest is {diff}"
