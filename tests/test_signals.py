"""Over-optimisation signals on hand-made batches, and the warning on scripted histories."""

import pytest

from agents.rlhf.signals import (
    Thresholds,
    batch_signals,
    distinct_n,
    identical_share,
    repeated_ngram_rate,
    saturation,
    warnings,
)


def test_distinct_n_by_hand():
    seqs = [[1, 2, 1, 2], [1, 2]]
    assert distinct_n(seqs, 1) == pytest.approx(2 / 6)
    assert distinct_n(seqs, 2) == pytest.approx(2 / 4)  # (1,2) (2,1) (1,2) | (1,2)
    assert distinct_n([[1]], 2) == 0.0


def test_all_identical_responses():
    texts = ["a much bigger audience."] * 8
    ids = [[5, 6, 7, 8]] * 8
    s = batch_signals(ids, texts, [4.2] * 8)
    assert s["identical_share"] == 1.0
    assert s["saturation"] == 1.0
    assert s["distinct_2"] == pytest.approx(3 / 24)
    assert s["repeated_3gram_rate"] == 0.0  # no phrase repeats inside one response


def test_one_repeated_phrase_inside_responses():
    # "x y z x y z": 3-grams xyz yzx zxy xyz -> one of four repeats
    assert repeated_ngram_rate([[1, 2, 3, 1, 2, 3]], 3) == pytest.approx(1 / 4)
    assert repeated_ngram_rate([[9, 9, 9, 9]], 3) == pytest.approx(1 / 2)
    assert identical_share(["a", "b", "a", "c"]) == pytest.approx(2 / 4)


def test_diverse_responses():
    texts = [f"response number {i}" for i in range(10)]
    ids = [[i, i + 100, i + 200] for i in range(10)]
    scores = [float(i) for i in range(10)]
    s = batch_signals(ids, texts, scores, judge_scores=[0.5] * 10)
    assert s["identical_share"] == 0.0
    assert s["distinct_2"] == 1.0 and s["repeated_3gram_rate"] == 0.0
    assert s["saturation"] == pytest.approx(0.1)  # only the maximum itself
    assert s["judge_mean"] == 0.5
    assert saturation([1.0, 3.0, 2.99, 2.9]) == pytest.approx(0.5)  # within 1% of the range 2 of the max


def _history(n, score, judge, **extra):
    return [{"iteration": i + 1, "score_mean": score(i), "judge_mean": judge(i), "distinct_2": 0.45,
             "identical_share": 0.0, "repeated_3gram_rate": 0.0, "saturation": 0.1, **extra} for i in range(n)]


def test_warning_fires_on_a_diverging_history():
    h = _history(20, score=lambda i: 0.2 * i, judge=lambda i: 0.9 - 0.03 * i)
    out = warnings(h)
    assert len(out) == 1 and "judge fell" in out[0] and "iteration 20" in out[0]


def test_collapse_warnings_fire_on_a_collapsed_last_iteration():
    h = _history(10, score=lambda i: 0.1 * i, judge=lambda i: 0.7)
    h[-1].update(distinct_2=0.2, identical_share=0.5, repeated_3gram_rate=0.3, saturation=0.8)
    out = warnings(h)
    assert len(out) == 4
    assert any("distinct-2" in w for w in out) and any("copies" in w for w in out)


def test_quiet_on_a_healthy_history():
    h = _history(40, score=lambda i: 0.1 * i, judge=lambda i: 0.5 + 0.01 * i)
    assert warnings(h) == []
    assert warnings([]) == []
    assert warnings(h, Thresholds(saturation=0.05))  # a stricter threshold does fire
