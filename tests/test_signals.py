"""Over-optimisation signals on hand-made batches, and the warning on scripted histories."""

import pytest

from agents.rlhf.signals import (
    Thresholds,
    batch_signals,
    check,
    distinct_n,
    identical_share,
    repeated_ngram_rate,
    saturation,
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
    out = list(check(h).values())
    assert len(out) == 1 and "judge fell" in out[0] and "iteration 20" in out[0]


def test_collapse_warnings_fire_on_a_collapsed_last_iteration():
    h = _history(10, score=lambda i: 0.1 * i, judge=lambda i: 0.7)
    h[-1].update(distinct_2=0.2, identical_share=0.5, repeated_3gram_rate=0.3, saturation=0.8)
    out = list(check(h).values())
    assert len(out) == 4
    assert any("distinct-2" in w for w in out) and any("copies" in w for w in out)


def test_quiet_on_a_healthy_history():
    h = _history(40, score=lambda i: 0.1 * i, judge=lambda i: 0.5 + 0.01 * i)
    assert list(check(h).values()) == []
    assert list(check([]).values()) == []
    assert check(h, Thresholds(saturation=0.05))  # a stricter threshold does fire


def test_the_rlhf_logger_logs_the_signals_and_warns_once_on_a_collapsed_batch(capsys):
    import torch

    from agents.rlhf.logger import RLHFLogger
    from agents.rollout import Episode, Rollout
    from textenv import char_tokenizer

    tok = char_tokenizer("ab ")
    zeros = torch.zeros(4, 2)

    def rollout(completions, scores):
        eps = [Episode(4, s, 2, 0.5, {"score": s, "completion": c, "text": "a" + c, "length": 3, "prompt_length": 1})
               for c, s in zip(completions, scores, strict=True)]
        return Rollout(obs=zeros, actions=zeros.long(), logprobs=zeros - 1, values=zeros, rewards=zeros,
                       ref_logprobs=zeros - 1, valid=torch.ones(4, 2, dtype=torch.bool), terminated=zeros.bool(),
                       truncated=zeros.bool(), next_obs=zeros[0], episodes=eps)

    judged = []
    logger = RLHFLogger(tok, total_iterations=3, print_every=0,
                        judge_fn=lambda texts: judged.append(list(texts)) or [0.25] * len(texts))
    stats = logger.on_iteration(1, 8, rollout(["ab", "ba", "a b", "bb a"], [1.0, 2.0, 3.0, 4.0]))
    assert stats["rlhf/identical_share"] == 0.0 and stats["rlhf/judge_mean"] == 0.25
    assert judged == [["aab", "aba", "aa b", "abb a"]]  # the judge scores the same prompt + completion texts
    assert logger.warnings == [] and "warning" not in capsys.readouterr().out
    for it in (2, 3):  # the policy collapses onto one answer: one warning per kind, printed once
        logger.on_iteration(it, 8 * it, rollout(["ab"] * 4, [4.0] * 4))
    out = capsys.readouterr().out
    assert out.count("warning:") == len(logger.warnings) >= 2
    assert any("copies" in w for w in logger.warnings) and any("saturated" in w for w in logger.warnings)


def test_on_topic_rate_counts_texts_that_name_a_film():
    from agents.rlhf.signals import film_word_share, on_topic_rate

    texts = ["The acting was superb.", "I bought a new car today.", "A MOVIE, and its Director's cut", "x"]
    assert on_topic_rate(texts) == 0.5 and on_topic_rate([]) == 0.0
    assert film_word_share("the film and the plot") == pytest.approx(2 / 5)
