"""The pruning masks and their Lagrangian, as one module that lives inside the model.

Structures (created only where the target removes something):

    layer         [L]          attention and MLP output of a layer
    kv_group      [L, G]       a KV head together with all query heads that read it
    q_head        [L, G, g]    a query head inside its KV group (target keeps the same count per group)
    intermediate  [L, m]       the MLP's up * act(gate) product
    hidden        [d]          every write to and every RMSNorm read of the residual stream

Kept as nn.Parameters of a child module of the HF model so FSDP/DDP shard and sync them and
every checkpoint of the model carries them. No Composer here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from composer_sheared.pruning.hard_concrete import (
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    TEMPERATURE,
    noise_generator,
    prob_nonzero,
    sample_gates,
    smooth_gates,
    topk_gates,
)
from composer_sheared.shapes import ModelShape, validate_target

from composer_sheared.defaults import (EVAL_SHAPE, EVAL_SHAPES, GATE_VALUES, INIT_MEAN, INIT_STD, SCHEDULE, SCHEDULES,
                                       TRAIN_GATES, default_train_gates)
# smooth gates: the temperature falls linearly to this fraction of its start over the warm-up
SMOOTH_FLOOR = 0.05


@dataclass(frozen=True)
class Structure:
    name: str
    shape: tuple
    target: int  # units kept per row at the end

    @property
    def row_size(self) -> int:
        return self.shape[-1]


def structures_for(source: ModelShape, target: ModelShape) -> dict[str, Structure]:
    L, G, g = source.num_layers, source.num_key_value_heads, source.group_size
    wanted = [
        ("layer", (L,), target.num_layers),
        ("kv_group", (L, G), target.num_key_value_heads),
        ("q_head", (L, G, g), target.group_size),
        ("intermediate", (L, source.intermediate_size), target.intermediate_size),
        ("hidden", (source.hidden_size,), target.hidden_size),
    ]
    return {n: Structure(n, s, t) for n, s, t in wanted if t < s[-1]}


def _ascending(x: torch.Tensor) -> torch.Tensor:
    """Same value, negated gradient: plain gradient descent on the total loss then *maximises*
    the Lagrangian in the multipliers, with any optimizer and a positive lr (works under FSDP,
    where per-parameter hooks or negative learning rates are fragile)."""
    return 2 * x.detach() - x


class ShearingMasks(nn.Module):
    def __init__(
        self,
        source: ModelShape,
        target: ModelShape,
        temperature: float = TEMPERATURE,
        init_mean: float = INIT_MEAN,
        init_std: float = INIT_STD,
        eval_shape: str = EVAL_SHAPE,
        schedule: str = SCHEDULE,
        init_log_alpha: dict[str, torch.Tensor] | None = None,
        clamp: bool | None = None,
        gate_values: str | None = None,
        train_gates: str | None = None,
    ):
        super().__init__()
        validate_target(source, target)
        if eval_shape not in EVAL_SHAPES:
            raise ValueError(f"eval_shape={eval_shape!r}; expected one of {EVAL_SHAPES}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; expected one of {SCHEDULES}")
        projected = schedule == "projection"
        gate_values = gate_values or ("binary" if projected else "soft")
        if gate_values not in GATE_VALUES:
            raise ValueError(f"gate_values={gate_values!r}; expected one of {GATE_VALUES}")
        # smooth gates won at equal tokens (bench/fidelity.py); the Lagrangian needs sampled ones
        train_gates = train_gates or default_train_gates(schedule)
        if train_gates not in TRAIN_GATES:
            raise ValueError(f"train_gates={train_gates!r}; expected one of {TRAIN_GATES}")
        if train_gates == "smooth" and not projected:
            raise ValueError("train_gates='smooth' needs schedule='projection' (the Lagrangian needs sampled gates)")
        self.train_gates = train_gates
        self.source, self.target = source, target
        self.temperature, self.eval_shape = float(temperature), eval_shape
        self.schedule, self.gate_values = schedule, gate_values
        # The reference clamp keeps log_alpha in [ln 1e-2, ln 1e2]; a projected schedule needs the
        # wide spread of an importance init, so it does not clamp by default.
        self.clamp = (not projected) if clamp is None else bool(clamp)
        self.structures = structures_for(source, target)
        init_log_alpha = init_log_alpha or {}
        unknown = sorted(set(init_log_alpha) - set(self.structures))
        if unknown:
            raise ValueError(f"init_log_alpha has structures {unknown} that this target does not prune "
                             f"(pruned: {sorted(self.structures)})")
        params = {}
        for n, st in self.structures.items():
            if n in init_log_alpha:
                init = torch.as_tensor(init_log_alpha[n], dtype=torch.float32).detach().clone()
                if tuple(init.shape) != st.shape:
                    raise ValueError(f"init_log_alpha[{n!r}] has shape {tuple(init.shape)}, expected {st.shape}")
            else:
                init = torch.empty(st.shape).normal_(init_mean, init_std)
            params[n] = nn.Parameter(init)
        self.log_alpha = nn.ParameterDict(params)
        self.lambda_1 = nn.ParameterDict({n: nn.Parameter(torch.zeros(())) for n in self.structures})
        self.lambda_2 = nn.ParameterDict({n: nn.Parameter(torch.zeros(())) for n in self.structures})
        # Progress of the target warm-up in [0, 1]. A tensor, not a float, so a compiled model
        # does not recompile when it changes. Derived from the step, so not checkpointed.
        self.register_buffer("warmup_progress", torch.zeros(()), persistent=False)
        self.current: dict[str, torch.Tensor | None] = {}
        self._lifted = False  # see lifted()
        self.last_lagrangian: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}
        self.noise_key: tuple[int, ...] | None = None  # see set_noise_key
        self._draws = 0

    # ---- gates -----------------------------------------------------------------------------
    def set_noise_key(self, *key: int) -> None:
        """Seed the gate noise of the training forwards that follow from `key`, e.g. (seed, step,
        rank): the n-th forward after this call draws from a generator seeded by (*key, n), so each
        microbatch gets its own noise and a resumed run draws exactly what an uninterrupted one did,
        whatever else used the global RNG. Call it once per optimizer step (ShearingPruning does, at
        BATCH_START). Without a key the noise comes from the global torch RNG."""
        self.noise_key, self._draws = tuple(int(k) for k in key), 0

    # Outside any compiled graph: the key changes every step and would recompile it.
    @torch.compiler.disable
    def _noise(self) -> dict[str, torch.Tensor | None]:
        if self.noise_key is None:
            return dict.fromkeys(self.log_alpha)
        self._draws += 1
        la = list(self.log_alpha.values())
        gen = noise_generator((*self.noise_key, self._draws - 1), la[0].device) if la else None
        return {n: torch.rand(p.shape, generator=gen, device=p.device) for n, p in self.log_alpha.items()}

    def mask_parameters(self) -> list[nn.Parameter]:
        return list(self.log_alpha.values())

    def lambda_parameters(self) -> list[nn.Parameter]:
        return list(self.lambda_1.values()) + list(self.lambda_2.values())

    def _eval_k(self, name: str, logits: torch.Tensor) -> int:
        st = self.structures[name]
        if self.eval_shape == "target":
            return st.target
        expected = self._keep(logits).sum(-1).float().mean()
        return int(min(max(round(expected.item()), 1), st.row_size))

    def deterministic_gates(self, shape: str = "target") -> dict[str, torch.Tensor]:
        """Top-k gates per row: at the target counts, or at the rounded expected counts."""
        old, self.eval_shape = self.eval_shape, shape
        try:
            return self._deterministic_all()
        finally:
            self.eval_shape = old

    def _deterministic_all(self) -> dict[str, torch.Tensor]:
        # The logits the gates are drawn from (shifted by the projection, if any), computed once:
        # they give the expected counts, the top-k order (a per-row shift keeps it) and soft values.
        eff = self.effective_log_alpha()
        out = {}
        for name in self.structures:
            # With tied embeddings one matrix is both the embedding (which would need the hidden
            # gate folded in) and the LM head (which must not), so kept hidden dims get gate 1 there.
            binary = self.gate_values == "binary" or (name == "hidden" and self.source.tie_word_embeddings)
            la = eff[name].float()
            out[name] = topk_gates(la, self._eval_k(name, la), self.temperature, binary=binary)
        return out

    # ---- the projected schedule ---------------------------------------------------------------
    def _smooth_temperature(self) -> torch.Tensor:
        """Smooth gates sharpen as the warm-up advances, so the fractional units at its end are few
        and the switch to the exact top-k gates after it changes almost nothing."""
        frac = (1 - self.warmup_progress.clamp(0, 1)).clamp_min(SMOOTH_FLOOR)
        return self.temperature * frac

    def _keep(self, logits: torch.Tensor) -> torch.Tensor:
        """How much of each unit stays: P(z > 0) for sampled gates, the gate itself for smooth ones."""
        if self.train_gates == "smooth":
            return smooth_gates(logits, self._smooth_temperature().to(logits.dtype))
        return prob_nonzero(logits, self.temperature)

    @torch.no_grad()
    def row_shifts(self) -> dict[str, torch.Tensor]:
        """Per row, the shift c with mean(keep(log_alpha + c)) == the warm-up target fraction, where
        keep is P(z > 0) for sampled gates and the gate value for smooth ones (see _keep).

        This is the exact projection of the expected size onto the warm-up target: the LM gradient
        only orders the units of a row, the schedule alone decides how many are expected to stay.
        P(z>0) is monotone in c, so a fixed number of vectorised bisection steps finds it."""
        targets = self.target_fractions()
        out = {}
        for n, la in self.log_alpha.items():
            x = la.detach().float()
            t = targets[n].float()
            lo = -x.amax(-1) - 40.0
            hi = -x.amin(-1) + 40.0
            for _ in range(40):
                mid = (lo + hi) / 2
                frac = self._keep(x + mid[..., None]).mean(-1)
                below = frac < t
                lo = torch.where(below, mid, lo)
                hi = torch.where(below, hi, mid)
            out[n] = (lo + hi) / 2
        return out

    def effective_log_alpha(self) -> dict[str, torch.Tensor]:
        """The logits the gates are drawn from: log_alpha itself (Lagrangian schedule) or log_alpha
        plus the detached per-row projection shift (projected schedule)."""
        if self.schedule != "projection":
            return dict(self.log_alpha.items())
        shifts = self.row_shifts()
        return {n: la + shifts[n][..., None].to(la.dtype) for n, la in self.log_alpha.items()}

    @contextlib.contextmanager
    def lifted(self) -> Iterator["ShearingMasks"]:
        """Every gate 1 for the block: the model computes the dense source function. Nothing is
        detached or re-registered (unlike `apply.unmasked`), so it is safe inside a wrapped or
        sharded model; the source's own losses (reference losses "source") are measured this way."""
        was, self._lifted = self._lifted, True
        try:
            yield self
        finally:
            self._lifted = was

    def forward(self) -> dict[str, torch.Tensor | None]:
        """Draw this forward pass's gates (train) or the deterministic ones (eval) and derive the
        per-layer multipliers the model hooks read. In training also computes the Lagrangian."""
        if self._lifted:
            self.current = self._multipliers({n: torch.ones_like(la, dtype=torch.float32)
                                              for n, la in self.log_alpha.items()})
            return self.current
        if self.training:
            eff = self.effective_log_alpha()
            if self.train_gates == "smooth":
                # No noise: units fade out in rank order while the warm-up runs; once it is over the
                # gates are the exact final top-k, so the rest of the stage trains the sliced model.
                # (torch.where, not an `if`: the progress is a tensor, so a compiled model does not recompile)
                done = self.warmup_progress >= 1
                z = {n: torch.where(done, topk_gates(eff[n].detach().float(), st.target, binary=True),
                                    self._keep(eff[n].float())) for n, st in self.structures.items()}
            else:
                noise = self._noise()
                z = {n: sample_gates(la.float(), self.temperature, noise[n]) for n, la in eff.items()}
        else:
            z = self._deterministic_all()
        self.current = self._multipliers(z)
        if self.training and torch.is_grad_enabled():
            self.last_lagrangian, self.last_stats = self.lagrangian(eff)
        return self.current

    def _multipliers(self, z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        s = self.source
        L, G, g, hd = s.num_layers, s.num_key_value_heads, s.group_size, s.head_dim
        head = out = None
        if "kv_group" in z or "q_head" in z:
            ref = z.get("kv_group", z.get("q_head"))
            kv = z["kv_group"] if "kv_group" in z else ref.new_ones(L, G)
            q = z["q_head"] if "q_head" in z else ref.new_ones(L, G, g)
            head = (kv[..., None] * q).reshape(L, G * g).repeat_interleave(hd, dim=1)  # [L, H*hd]
        if "hidden" in z:
            layer = z["layer"] if "layer" in z else z["hidden"].new_ones(L)
            out = layer[:, None] * z["hidden"][None, :]  # [L, d]
        elif "layer" in z:
            out = z["layer"][:, None]  # [L, 1], broadcast over d
        hidden = z.get("hidden")
        return {
            "head": head,
            "intermediate": z.get("intermediate"),
            "out": out,
            "hidden": hidden,
            "hidden_kept": None if hidden is None else (hidden > 0).sum().to(hidden.dtype),
        }

    @torch.no_grad()
    def constrain_(self) -> None:
        """Clamp log_alpha into the reference code's range (call after each optimizer step); a no-op
        when clamping is off (the projected schedule's default)."""
        if not self.clamp:
            return
        for p in self.log_alpha.values():
            p.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    # ---- expectations and the Lagrangian ------------------------------------------------------
    def keep_probabilities(self, effective: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        eff = self.effective_log_alpha() if effective is None else effective
        return {n: self._keep(la.float()) for n, la in eff.items()}

    def expected_counts(self) -> dict[str, torch.Tensor]:
        """Expected kept units per row (mean over rows), differentiable."""
        return {n: p.sum(-1).mean() for n, p in self.keep_probabilities().items()}

    def expected_num_params(self, probs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Expected parameter count of the pruned model (differentiable); equals
        ModelShape.num_params() when every probability is 0 or 1."""
        p = self.keep_probabilities() if probs is None else probs
        s = self.source
        L, G, g, hd = s.num_layers, s.num_key_value_heads, s.group_size, s.head_dim
        ref = next(iter(p.values())) if p else torch.ones(())
        one = lambda *shape: ref.new_ones(shape)  # noqa: E731
        layer = p.get("layer", one(L))
        kv = p.get("kv_group", one(L, G))
        q = p.get("q_head", one(L, G, g))
        inter = p.get("intermediate", one(L, s.intermediate_size))
        d = p["hidden"].sum() if "hidden" in p else ref.new_tensor(float(s.hidden_size))
        heads = (kv[..., None] * q).sum((1, 2))  # [L]
        kvs = kv.sum(1)
        attn = d * hd * (2 * heads + 2 * kvs)
        if s.qkv_bias:
            attn = attn + hd * (heads + 2 * kvs)
        per_layer = attn + 3 * d * inter.sum(1) + 2 * d
        embed = s.vocab_size * d * (1 if s.tie_word_embeddings else 2)
        return (layer * per_layer).sum() + d + embed

    def target_fractions(self) -> dict[str, torch.Tensor]:
        """Per structure, the kept fraction the Lagrangian aims at now: linear from 1 (source)
        to the final target over the warm-up."""
        prog = self.warmup_progress.clamp(0, 1)
        return {n: 1 - (1 - st.target / st.row_size) * prog for n, st in self.structures.items()}

    def lagrangian(self, effective: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        probs = self.keep_probabilities(effective)
        targets = self.target_fractions()
        total = self.warmup_progress.new_zeros(())
        stats: dict[str, torch.Tensor] = {}
        for n, st in self.structures.items():
            frac = probs[n].sum(-1).mean() / st.row_size
            gap = frac - targets[n]
            l1, l2 = self.lambda_1[n], self.lambda_2[n]
            if self.schedule == "lagrangian":
                total = total + _ascending(l1) * gap + _ascending(l2) * gap * gap
            else:  # unused, but kept in the graph: DDP wants every parameter to get a gradient
                # (the logits too: exact top-k gates after a smooth warm-up carry no gradient)
                total = total + 0.0 * (l1 + l2 + self.log_alpha[n].sum())
            stats[f"expected/{n}"] = (frac * st.row_size).detach()
            stats[f"target/{n}"] = (targets[n] * st.row_size).detach()
            stats[f"lambda1/{n}"] = l1.detach()
            stats[f"lambda2/{n}"] = l2.detach()
        stats["expected_params"] = self.expected_num_params(probs).detach()
        # The parameter count of the shape the Lagrangian aims at now (source -> target over the warm-up).
        uniform = {n: probs[n].new_full(st.shape, 1.0) * targets[n] for n, st in self.structures.items()}
        stats["warmup_target_params"] = self.expected_num_params(uniform).detach()
        # How far the expected size strays from where the schedule wants it, as a fraction of the
        # whole reduction (source - target): negative = already smaller than the warm-up target.
        span = float(self.source.num_params() - self.target.num_params())
        stats["stray"] = (stats["expected_params"] - stats["warmup_target_params"]) / span
        stats["lagrangian"] = total.detach()
        return total, stats

    # ---- checkpoints carry what the masks were built for --------------------------------------
    def get_extra_state(self):
        return {
            "source": self.source.as_dict(),
            "target": self.target.as_dict(),
            "temperature": self.temperature,
            "eval_shape": self.eval_shape,
            "schedule": self.schedule,
            "gate_values": self.gate_values,
            "clamp": self.clamp,
            "train_gates": self.train_gates,
        }

    def set_extra_state(self, state) -> None:
        if not state:
            return
        for key in ("source", "target"):
            if ModelShape(**state[key]) != getattr(self, key):
                raise ValueError(
                    f"checkpoint masks were built for {key} {state[key]}, these masks for "
                    f"{getattr(self, key).as_dict()}"
                )
        self.temperature = float(state.get("temperature", self.temperature))
        # how the logits were trained decides how they are read (checkpoints before schedules
        # existed were trained with the Lagrangian)
        self.schedule = state.get("schedule", "lagrangian")
        projected = self.schedule == "projection"
        self.gate_values = state.get("gate_values", "binary" if projected else "soft")
        self.clamp = bool(state.get("clamp", not projected))
        self.train_gates = state.get("train_gates", "sampled")

    def extra_repr(self) -> str:
        return ", ".join(f"{n}{tuple(s.shape)}->{s.target}/row" for n, s in self.structures.items())
