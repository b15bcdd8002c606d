"""KL controllers on synthetic KL sequences: direction and rate in closed form."""

import pytest

from agents.kl_control import PIDKL, FixedKL, ProportionalKL, make_kl_controller


def test_proportional_moves_at_zieglers_rate():
    c = ProportionalKL(0.2, target=6.0, horizon=1000)
    assert c.update(12.0, 100) == pytest.approx(0.2 * 1.02)  # error clipped to +0.2, x 100 / 1000
    c = ProportionalKL(0.2, target=6.0, horizon=1000)
    assert c.update(5.7, 100) == pytest.approx(0.2 * (1 - 0.05 * 0.1))
    assert c.update(6.0, 100) == pytest.approx(0.2 * (1 - 0.05 * 0.1))  # on target: unchanged


def test_pid_closed_form():
    c = PIDKL(0.2, target=6.0, kp=1.0, ki=0.1, kd=1.0)
    assert c.update(12.0, 50) == pytest.approx(0.2 * (1 + 1.0 + 0.1 * 1.0 + 12 / 6))  # P, I, D all at work
    assert c.update(12.0, 50) == pytest.approx(0.2 * (1 + 1.0 + 0.1 * 2.0))  # no rise: D is 0, I grows
    assert c.update(6.0, 50) == pytest.approx(0.2 * (1 + 0.0 + 0.1 * 2.0))  # on target: the integral remains


def test_pid_reacts_within_one_iteration_and_proportional_lags():
    """An overshoot to 2x the target: PID raises the coefficient at once; Ziegler's moves it by 2.5%."""
    pid, prop = PIDKL(0.2, 6.0), ProportionalKL(0.2, 6.0, 1000)
    for kl in (2.0, 4.0, 6.0, 9.0, 12.0):
        a, b = pid.update(kl, 128), prop.update(kl, 128)
    assert a > 2 * 0.2 and b < 1.05 * 0.2


def test_pid_below_target_lowers_the_coefficient_without_winding_up():
    c = PIDKL(0.2, target=6.0, ki=0.3, floor=0.05)
    coefs = [c.update(0.5, 128) for _ in range(200)]  # KL far below target, as at the start of every run
    assert coefs[1] < coefs[0] < 0.2 and min(coefs) >= 0.2 * 0.05
    # integrating would push u below the floor from the first step: conditional integration keeps the integral at
    # 0, and the proportional term alone holds the coefficient: coef0 * (1 + e), e = 0.5 / 6 - 1
    assert c.integral == 0.0 and coefs[-1] == pytest.approx(0.2 * 0.5 / 6)
    # so the moment the KL overshoots, the coefficient jumps above its start (no wound-down integral to undo)
    assert c.update(12.0, 128) > 0.2
    plain = PIDKL(0.2, target=6.0, ki=0.3, floor=-1e9)  # without a floor the integral winds down without bound
    for _ in range(200):
        plain.update(0.5, 128)
    assert plain.integral < -150


def test_pid_integral_removes_a_steady_error():
    c = PIDKL(0.2, target=6.0)
    coefs = [c.update(7.2, 128) for _ in range(10)]  # 20% over target, steady
    assert all(b > a for a, b in zip(coefs[1:], coefs[2:], strict=False))  # keeps rising while the error stays
    assert coefs[-1] == pytest.approx(0.2 * (1 + 0.2 + c.ki * 10 * 0.2))


def test_state_round_trip_and_factory():
    c = PIDKL(0.2, 6.0)
    c.update(9.0, 64)
    d = make_kl_controller("pid", 0.2, 6.0, 1000)
    d.load_state_dict(c.state_dict())
    assert d.update(7.0, 64) == pytest.approx(c.update(7.0, 64))
    assert isinstance(make_kl_controller("pid", 0.2, None, 1000), FixedKL)
    assert make_kl_controller("pid", 0.3, None, 1000).update(100.0, 64) == 0.3
    assert isinstance(make_kl_controller("proportional", 0.2, 6.0, 1000), ProportionalKL)
    with pytest.raises(ValueError, match="unknown KL controller"):
        make_kl_controller("bang-bang", 0.2, 6.0, 1000)
