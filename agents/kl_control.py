"""Controllers of the per-token KL coefficient: hold the KL to the reference at a setpoint.

The penalty `coef * (log pi - log p_ref)` is a Lagrange multiplier on the constraint KL <= target. Ziegler et al.
2019's controller (`ProportionalKL`) moves log(coef) in proportion to the error, which makes the coefficient the
*integral* of the error: with a rollout's delay between a change and its effect, integral-only control lags and
overshoots (Stooke et al. 2020, "Responsive Safety in Reinforcement Learning by PID Lagrangian Methods",
https://arxiv.org/abs/2007.03964). On our runs it also winds down during warm-up: KL starts at 0, far below the
target, so the coefficient falls while the KL is still climbing (0.20 -> 0.14 on the embedded preset), and rises too
late once it overshoots. `PIDKL` adds the proportional and derivative terms that react within one iteration, and
keeps its integral from winding below what a zero coefficient needs (anti-windup).

Both are plain state machines: `update(kl, n_episodes) -> coef` once per iteration, `state_dict()` /
`load_state_dict()` for checkpoints. `KL` values are nats per episode (response), the unit of `kl_target`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


class _Coefficient:
    """State of a controller whose only state is `coef` (PIDKL adds its integral and last KL)."""

    coef: float

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])


@dataclass
class FixedKL(_Coefficient):
    """A constant coefficient (no target)."""

    coef: float

    def update(self, kl: float, n_episodes: int) -> float:
        return self.coef


@dataclass
class ProportionalKL(_Coefficient):
    """Ziegler et al. 2019: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_episodes / horizon."""

    coef: float
    target: float
    horizon: int

    def update(self, kl: float, n_episodes: int) -> float:
        error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
        self.coef *= 1.0 + error * n_episodes / self.horizon
        return self.coef


@dataclass
class PIDKL(_Coefficient):
    """PID-Lagrangian coefficient (Stooke et al. 2020) in units of the initial coefficient `coef0`:

        e = kl / target - 1;  D = max(kl - kl_prev, 0) / target;  I += e unless that would push u below floor
        coef = coef0 * max(u, floor),  u = 1 + kp * e + ki * I + kd * D

    The proportional term answers an overshoot in the same iteration instead of after a slow integral; the
    derivative term (on rises only) brakes a KL that is climbing fast before it crosses the target; the
    integral removes the steady-state error. Anti-windup by conditional integration: while the coefficient sits
    at its floor (the KL far below target, as at the start of every run) the integral does not keep winding down,
    so it has nothing to unwind when the KL arrives."""

    coef0: float
    target: float
    kp: float = 1.0
    """proportional gain: coef doubles at KL = 2 x target"""
    ki: float = 0.3
    """integral gain per iteration"""
    kd: float = 1.0
    """derivative gain on KL rises (per target per iteration)"""
    floor: float = 0.05
    """the coefficient never falls below floor x coef0"""
    integral: float = 0.0
    prev_kl: float = 0.0
    coef: float = 0.0

    def __post_init__(self) -> None:
        self.coef = self.coef or self.coef0

    def update(self, kl: float, n_episodes: int) -> float:
        e = kl / self.target - 1.0
        rise = max(kl - self.prev_kl, 0.0) / self.target
        self.prev_kl = kl
        u = 1.0 + self.kp * e + self.ki * (self.integral + e) + self.kd * rise
        if u > self.floor or e > 0:  # conditional integration: no winding down while pinned at the floor
            self.integral += e
        u = 1.0 + self.kp * e + self.ki * self.integral + self.kd * rise
        self.coef = self.coef0 * max(u, self.floor)
        return self.coef

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])  # a checkpoint of another controller holds only the coefficient
        self.integral, self.prev_kl = float(state.get("integral", 0.0)), float(state.get("prev_kl", 0.0))


def make_kl_controller(kind: str, coef: float, target: float | None, horizon: int):
    """`FixedKL` when `target` is None, else `PIDKL` (kind "pid") or Ziegler's `ProportionalKL` ("proportional")."""
    if target is None:
        return FixedKL(coef)
    if kind == "pid":
        return PIDKL(coef, target)
    if kind == "proportional":
        return ProportionalKL(coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; use 'pid' or 'proportional'")
