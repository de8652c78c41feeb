"""Hard-concrete (L0) gates, Louizos et al. 2018, with the stretch limits and temperature of the Sheared-LLaMA reference code."""
from __future__ import annotations

import hashlib
import math

import torch

LIMIT_LEFT = -0.1  # l: the stretched interval is (l, r)
LIMIT_RIGHT = 1.1  # r
from composer_sheared.defaults import TEMPERATURE  # noqa: E402  (beta of the reference code)
EPS = 1e-6
LOG_ALPHA_MIN = math.log(1e-2)
LOG_ALPHA_MAX = math.log(1e2)
# The reference code (CoFi / LLM-Shearing) scores a deterministic gate as sigmoid(log_alpha / beta * 0.8).
DETERMINISTIC_SCALE = 0.8


def sample_gates(log_alpha: torch.Tensor, temperature: float = TEMPERATURE,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """One stochastic gate per entry: a stretched, clamped binary-concrete sample in [0, 1].
    `noise`: uniform draws in [0, 1) shaped like log_alpha; from the global RNG when None."""
    u = torch.rand_like(log_alpha) if noise is None else noise.to(log_alpha.dtype)
    u = u.clamp(EPS, 1 - EPS)
    return _stretch(torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature))


def smooth_gates(log_alpha: torch.Tensor, temperature: float | torch.Tensor = TEMPERATURE) -> torch.Tensor:
    """Noise-free gates: the hard-concrete gate at its median draw (u = 1/2), so 0 below
    log_alpha = -temperature * ln 11, 1 above +temperature * ln 11 and fractional in between."""
    return _stretch(torch.sigmoid(log_alpha / temperature))


def _stretch(s: torch.Tensor) -> torch.Tensor:
    """A concrete sample in (0, 1) stretched to (l, r) and clamped back: exact 0s and 1s."""
    return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)


def noise_generator(key: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by a hash of `key` (e.g. seed, step, rank, microbatch): the same key gives
    the same noise in any process, whatever else used the global RNG before."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))


def prob_nonzero(log_alpha: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """P(z > 0); the expected number of kept units of a mask is the sum of these."""
    return torch.sigmoid(log_alpha - temperature * math.log(-LIMIT_LEFT / LIMIT_RIGHT))


def soft_values(log_alpha: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The value a kept unit's gate takes once the masks are deterministic."""
    return torch.sigmoid(log_alpha / temperature * DETERMINISTIC_SCALE)


def topk_gates(log_alpha: torch.Tensor, k: int, temperature: float = TEMPERATURE, binary: bool = False) -> torch.Tensor:
    """Deterministic gates: per row (last dim), exactly k units with the largest score keep their
    soft value (or 1 when `binary`), all others are 0."""
    if not 0 < k <= log_alpha.shape[-1]:
        raise ValueError(f"cannot keep {k} of {log_alpha.shape[-1]} units per row")
    idx = log_alpha.topk(k, dim=-1).indices
    keep = torch.zeros_like(log_alpha, dtype=torch.bool).scatter_(-1, idx, True)
    values = torch.ones_like(log_alpha) if binary else soft_values(log_alpha, temperature)
    return torch.where(keep, values, torch.zeros_like(values))
