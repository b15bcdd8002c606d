"""KL controllers on synthetic KL sequences: direction and rate in closed form."""

import math

import pytest

from agents.kl_control import PIDKL, FixedKL, ProportionalKL, make_kl_controller


def test_proportional_moves_at_zieglers_rate():
    c = ProportionalKL(0.2, target=6.0, horizon=1000)
    assert c.update(12.0, 100) == pytest.approx(0.2 * 1.02)  # error clipped to +0.2, x 100 / 1000
    c = ProportionalKL(0.2, target=6.0, horizon=1000)
    assert c.update(5.7, 100) == pytest.approx(0.2 * (1 - 0.05 * 0.1))
    assert c.update(6.0, 100) == pytest.approx(0.2 * (1 - 0.05 * 0.1))  # on target: unchanged


def test_pid_closed_form():
    """Log scale: coef = coef0 * exp(kp e + ki I + kd D), e clipped to [-1, 1], D on rises only."""
    c = PIDKL(0.2, target=6.0, kp=0.5, ki=0.1, kd=1.0)
    assert c.update(9.0, 50) == pytest.approx(0.2 * math.exp(0.5 * 0.5 + 0.1 * 0.5 + 9 / 6))  # P, I, D all at work
    assert c.armed and c.integral == pytest.approx(0.5)
    assert c.update(9.0, 50) == pytest.approx(0.2 * math.exp(0.5 * 0.5 + 0.1 * 1.0))  # no rise: D is 0, I grows
    assert c.update(6.0, 50) == pytest.approx(0.2 * math.exp(0.1 * 1.0))  # on target: the integral remains
    assert c.update(12.0, 50) == pytest.approx(0.2 * math.exp(0.5 * 1.0 + 0.1 * 2.0 + 6 / 6))  # e clipped at 1
    assert c.update(300.0, 50) == pytest.approx(0.2 * 50.0)  # the output clipped at the ceiling (50 x coef0)
    assert c.integral == pytest.approx(2.0)  # and the integral did not grow past it


def test_pid_moves_by_the_same_factor_at_any_scale():
    """The rate of the integral is a factor per iteration, whatever the coefficient has reached: a steady 50%
    overshoot multiplies it by exp(ki * 0.5) each iteration (a linear integral would add a constant instead)."""
    c = PIDKL(0.2, target=1.0, kd=0.0)
    coefs = [c.update(1.5, 64) for _ in range(12)]
    ratios = [b / a for a, b in zip(coefs, coefs[1:], strict=False)]
    assert ratios == pytest.approx([math.exp(c.ki * 0.5)] * 11)
    assert coefs[-1] > 5 * 0.2  # 12 iterations of a 50% overshoot reach the 5x coef0 a low setpoint needs


def test_pid_reacts_within_one_iteration_and_proportional_lags():
    """An overshoot to 2x the target: PID raises the coefficient at once; Ziegler's moves it by 2.5%."""
    pid, prop = PIDKL(0.2, 6.0), ProportionalKL(0.2, 6.0, 1000)
    for kl in (2.0, 4.0, 6.0, 9.0, 12.0):
        a, b = pid.update(kl, 128), prop.update(kl, 128)
    assert a > 2 * 0.2 and b < 1.05 * 0.2


def test_pid_does_not_wind_down_before_the_kl_arrives():
    c = PIDKL(0.2, target=6.0)
    coefs = [c.update(0.5, 128) for _ in range(200)]  # KL far below target, as at the start of every run
    assert coefs[-1] < 0.2 and not c.armed and c.integral == 0.0  # the proportional term alone lowers it
    assert coefs[-1] == pytest.approx(0.2 * math.exp(c.kp * (0.5 / 6 - 1)))
    c.update(4.4, 128)
    assert not c.armed and c.integral == 0.0  # below arm x target (4.5): still not integrating
    assert c.update(12.0, 128) > 0.2 and c.armed  # an overshoot lifts it above its start at once
    early = PIDKL(0.2, target=6.0, arm=0.0)  # armed from the first step: the integral winds down to the floor
    for _ in range(200):
        early.update(0.5, 128)
    assert early.integral < -2 and early.update(6.0, 128) < 0.5 * c.update(6.0, 128)


def test_pid_stops_integrating_at_its_bounds():
    c, free = PIDKL(0.2, target=1.0, ceiling=10.0), PIDKL(0.2, target=1.0, ceiling=math.inf)
    for _ in range(100):  # far above target for a long time
        c.update(3.0, 64), free.update(3.0, 64)
    assert free.integral == 100.0 and c.coef <= 0.2 * 10.0
    assert c.kp + c.ki * c.integral <= math.log(10.0) < c.kp + c.ki * (c.integral + 1)  # stopped at the bound
    top = c.coef
    coefs = [c.update(0.9, 64) for _ in range(3)]  # back below target: it comes down at once, nothing to unwind
    assert coefs[0] == pytest.approx(top * math.exp(-c.kp * 1.1 - c.ki * 0.1)) and coefs[2] < coefs[1] < coefs[0]


def test_pid_integral_removes_a_steady_error():
    c = PIDKL(0.2, target=6.0)
    coefs = [c.update(7.2, 128) for _ in range(10)]  # 20% over target, steady
    assert all(b > a for a, b in zip(coefs[1:], coefs[2:], strict=False))  # keeps rising while the error stays
    assert coefs[-1] == pytest.approx(0.2 * math.exp(c.kp * 0.2 + c.ki * 10 * 0.2))


def test_state_round_trip_and_factory():
    c = PIDKL(0.2, 6.0)
    c.update(9.0, 64)
    assert c.state_dict()["armed"] is True
    d = make_kl_controller("pid", 0.2, 6.0, 1000)
    d.load_state_dict(c.state_dict())
    assert d.update(7.0, 64) == pytest.approx(c.update(7.0, 64))
    e = PIDKL(0.2, 6.0)  # from a checkpoint of a controller that kept only its coefficient: go on from it
    e.load_state_dict(ProportionalKL(0.8, 6.0, 1000).state_dict())
    assert e.update(6.0, 64) == pytest.approx(0.8)  # on target, no rise: the coefficient stays where it was
    assert isinstance(make_kl_controller("pid", 0.2, None, 1000), FixedKL)
    assert make_kl_controller("pid", 0.3, None, 1000).update(100.0, 64) == 0.3
    assert isinstance(make_kl_controller("proportional", 0.2, 6.0, 1000), ProportionalKL)
    with pytest.raises(ValueError, match="unknown KL controller"):
        make_kl_controller("bang-bang", 0.2, 6.0, 1000)
