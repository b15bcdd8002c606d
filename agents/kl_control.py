"""Controllers of the per-token KL coefficient: hold the KL to the reference at a setpoint.

The penalty `coef * (log pi - log p_ref)` is a Lagrange multiplier on the constraint KL <= target. Ziegler et al.
2019's controller (`ProportionalKL`) moves log(coef) in proportion to the error, which makes the coefficient the
*integral* of the error: with a rollout's delay between a change and its effect, integral-only control lags and
overshoots (Stooke et al. 2020, "Responsive Safety in Reinforcement Learning by PID Lagrangian Methods",
https://arxiv.org/abs/2007.03964). It also winds down during warm-up: KL starts at 0, far below the target, so the
coefficient falls while the KL is still climbing, and rises too late once it overshoots. `PIDKL` adds the
proportional and derivative terms that react within one iteration, moves the coefficient by factors (the
coefficient a setpoint needs differs by an order of magnitude across models), and keeps its integral from winding
down while the KL is still far below the target (anti-windup). How well each holds its setpoint:
benchmarks/README.md, "KL control".

Both are plain state machines: `update(kl, n_episodes) -> coef` once per iteration, `state_dict()` /
`load_state_dict()` for checkpoints. `KL` values are nats per episode (response), the unit of `kl_target`.
"""

from __future__ import annotations

import math
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
    """PID-Lagrangian coefficient (Stooke et al. 2020) that moves by *factors* of the initial coefficient `coef0`:

        e = clip(kl / target - 1, -1, 1);  D = max(kl - kl_prev, 0) / target;  I += e once armed, unless saturated
        coef = coef0 * exp(clip(kp * e + ki * I + kd * D, ln floor, ln ceiling))

    The proportional term answers an overshoot in the same iteration instead of after a slow integral; the
    derivative term (on rises only) brakes a KL that is climbing fast before it crosses the target; the
    integral removes the steady-state error.

    Why a log scale: the coefficient a setpoint needs spans more than an order of magnitude across models and
    setpoints (a fraction of `coef0` for a large setpoint on a small model, many times it for a small setpoint on
    a large one). A linear `coef0 * (1 + ki * I)` needs many iterations of overshoot to climb that far, longer
    than a short run; in log space the same integral multiplies the coefficient by exp(ki * e) each iteration
    whatever its scale.

    Anti-windup, twice. (1) The integral is *armed* only once the KL first reaches `arm` x target. Before that
    (the start of every run) the penalty `coef * KL` has nothing to act on, so lowering the coefficient further
    does nothing and an integral would only wind down, to be unwound once the KL arrives. (2) Conditional
    integration: while the output sits at the floor or the ceiling, the integral does not grow further in that
    direction. The error is clipped to +-1 so one noisy batch cannot swing the coefficient by more than
    exp(kp).

    The price of (1): until armed, the coefficient stays at or above exp(-kp) x `coef0`. A setpoint that the
    learning rate cannot carry the KL to at that penalty arms late or never; lower the setpoint or `coef0` there."""

    coef0: float
    target: float
    kp: float = 0.5
    """proportional gain (log scale): the coefficient x exp(0.5) ~ 1.65 at KL >= 2 x target"""
    ki: float = 0.5
    """integral gain per iteration (log scale): x exp(0.5 e) per iteration of error e"""
    kd: float = 0.5
    """derivative gain on KL rises, per target per iteration (log scale)"""
    floor: float = 0.05
    """the coefficient never falls below floor x coef0"""
    ceiling: float = 50.0
    """nor rises above ceiling x coef0"""
    arm: float = 0.75
    """the integral starts once the KL first reaches arm x target"""
    integral: float = 0.0
    prev_kl: float = 0.0
    armed: bool = False
    coef: float = 0.0

    def __post_init__(self) -> None:
        self.coef = self.coef or self.coef0

    def _clip(self, x: float) -> float:
        return min(max(x, math.log(self.floor)), math.log(self.ceiling))

    def update(self, kl: float, n_episodes: int) -> float:
        e = min(max(kl / self.target - 1.0, -1.0), 1.0)
        rise = max(kl - self.prev_kl, 0.0) / self.target
        self.prev_kl = kl
        self.armed = self.armed or kl >= self.arm * self.target
        x = self.kp * e + self.ki * (self.integral + e) + self.kd * rise
        if self.armed and (self._clip(x) == x or (x > 0) != (e > 0)):  # unsaturated, or moving off the bound
            self.integral += e
        self.coef = self.coef0 * math.exp(self._clip(self.kp * e + self.ki * self.integral + self.kd * rise))
        return self.coef

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])
        if "armed" in state:
            self.integral, self.prev_kl = float(state["integral"]), float(state["prev_kl"])
            self.armed = bool(state["armed"])
        else:  # another controller's checkpoint (or the linear PID's, whose integral is in other units): go on from
            # its coefficient, as if the integral alone had put it there and the last KL had been on target
            self.integral = math.log(max(self.coef, 1e-12) / self.coef0) / self.ki
            self.prev_kl, self.armed = self.target, True


def make_kl_controller(kind: str, coef: float, target: float | None, horizon: int):
    """`FixedKL` when `target` is None, else `PIDKL` (kind "pid") or Ziegler's `ProportionalKL` ("proportional")."""
    if target is None:
        return FixedKL(coef)
    if kind == "pid":
        return PIDKL(coef, target)
    if kind == "proportional":
        return ProportionalKL(coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; use 'pid' or 'proportional'")
