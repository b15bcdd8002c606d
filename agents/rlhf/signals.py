"""Over-optimisation signals: is the policy gaming the reward model instead of writing better text?

A policy tuned against a learned reward model finds its blind spots (Gao et al. 2022, "Scaling Laws for
Reward Model Overoptimization", https://arxiv.org/abs/2210.10760): the proxy score climbs to the classifier's
ceiling while the text collapses into one phrase. These functions measure a batch of responses; `warnings`
reads a run's history and names what crossed its threshold (`Thresholds`, documented per field).

    batch_signals(response_ids, completions, scores, judge_scores) -> {"distinct_2": ..., "identical_share": ...}
    warnings(history, Thresholds()) -> ["iteration 30: the judge fell 0.21 while the reward model rose 1.3 ..."]
    compare(before, after) -> {"judge": "the held-out judge calls 44% of the tuned samples positive, ..."}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from textenv.rewards import WORD  # one rule for what a word is, here and in the repeated-words penalty


def distinct_n(seqs: Sequence[Sequence], n: int) -> float:
    """Unique n-grams / all n-grams over a set of sequences (0.0 when there is no n-gram at all)."""
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(seqs: Sequence[Sequence], n: int = 3) -> float:
    """Share of n-grams that repeat an n-gram seen earlier in the same response (0 = no phrase repeats
    inside a response; "great great great great" -> 3-grams (g,g,g) x2, the second a repeat: 0.5)."""
    total = repeats = 0
    for s in seqs:
        seen: set[tuple] = set()
        for i in range(len(s) - n + 1):
            g = tuple(s[i : i + n])
            repeats += g in seen
            seen.add(g)
            total += 1
    return repeats / total if total else 0.0


def identical_share(texts: Sequence[str]) -> float:
    """Share of responses that are identical to at least one other response in the batch."""
    if not texts:
        return 0.0
    counts = Counter(t.strip() for t in texts)
    return sum(c for c in counts.values() if c > 1) / len(texts)


def saturation(scores: Sequence[float], tol: float = 0.01) -> float:
    """Share of scores within `tol` (1%) of the batch maximum, relative to the batch's score range
    (max - min): many responses pinned at the classifier's ceiling means the proxy has nothing left to give."""
    s = np.asarray(scores, dtype=float)
    if s.size < 2 or s.max() == s.min():
        return 1.0 if s.size else 0.0
    return float(np.mean(s >= s.max() - tol * (s.max() - s.min())))


# words that name a film or its making: a text with one is about a film far more often than not (against a blind
# reader's "on-topic", an area under the ROC curve of 0.90: benchmarks/README.md, "RLHF with SmolLM2-135M-Instruct")
FILM_WORDS = frozenset("""film films movie movies cinema actor actors actress actresses acting acted cast casting
director directed directing direction script screenplay plot scene scenes character characters role roles performance
performances show series episode episodes season sequel remake documentary comedy drama thriller horror western
animation animated cartoon hollywood oscar oscars studio camera cinematography soundtrack score screen viewer viewers
audience watch watched watching dvd theater theatre story storyline ending dialogue""".split())


def film_word_share(text: str) -> float:
    """Share of the text's words that are in `FILM_WORDS`."""
    words = WORD.findall(text.lower())
    return sum(w in FILM_WORDS for w in words) / max(len(words), 1)


def on_topic_rate(texts: Sequence[str]) -> float:
    """Share of texts that name a film or its making at least once (`FILM_WORDS`): an offline stand-in for a reader's
    "is it about a film"."""
    return float(np.mean([film_word_share(t) > 0 for t in texts])) if texts else 0.0


def batch_signals(response_ids: Sequence[Sequence[int]], completions: Sequence[str], scores: Sequence[float],
                  judge_scores: Sequence[float] | None = None) -> dict[str, float]:
    """The collapse signals of one batch of responses, and the judge's mean beside the reward model's."""
    out = {
        "distinct_1": distinct_n(response_ids, 1),
        "distinct_2": distinct_n(response_ids, 2),
        "repeated_3gram_rate": repeated_ngram_rate(response_ids, 3),
        "identical_share": identical_share(completions),
        "saturation": saturation(scores),
    }
    if judge_scores is not None and len(judge_scores):
        out["judge_mean"] = float(np.mean(judge_scores))
    return out


@dataclass
class Thresholds:
    """When a signal means trouble. Defaults from the runs in benchmarks/results: a healthy embedded run stays
    well inside them; a reward-hacked run (half of its samples the same phrase) crosses four."""

    distinct_2_ratio: float = 0.8
    """warn when distinct-2 falls below this fraction of its value at the first iteration"""
    identical_share: float = 0.25
    """warn when more than this share of a batch's responses are copies of another response"""
    repeated_3gram_rate: float = 0.2
    """warn when more than this share of 3-grams repeat earlier ones in the same response"""
    saturation: float = 0.75
    """warn when more than this share of scores sit within 1% (of the range) of the batch maximum (a confident
    classifier puts its positive half there from the start: about half is healthy)"""
    window: int = 5
    """iterations averaged at each end when comparing the judge's and the reward model's trends"""
    judge_drop: float = 0.05
    """warn when the judge's mean falls by more than this while the reward model's rises"""
    judge_gap: float = 0.10
    """report: warn when the reward model's positive rate exceeds the judge's by more than this"""


def check(history: Sequence[dict], th: Thresholds | None = None) -> dict[str, str]:
    """Warning lines for a run's per-iteration history (dicts with `score_mean` and the `batch_signals` keys), by
    kind: {"distinct_2" | "identical_share" | "repeated_3gram_rate" | "saturation" | "judge": line}; empty when the
    run looks healthy. Checks the latest iteration against the thresholds, and the judge's trend against the
    reward model's over the last `window` iterations vs the `window` before them."""
    th = th or Thresholds()
    if not history:
        return {}
    it = history[-1].get("iteration", len(history))
    out = _collapse(history[0], history[-1], th, f"iteration {it}")
    judged = [h for h in history if "judge_mean" in h and "score_mean" in h]
    w = th.window
    if len(judged) >= 2 * w:
        before, after = judged[-2 * w : -w], judged[-w:]
        d_judge = np.mean([h["judge_mean"] for h in after]) - np.mean([h["judge_mean"] for h in before])
        d_score = np.mean([h["score_mean"] for h in after]) - np.mean([h["score_mean"] for h in before])
        if d_judge < -th.judge_drop and d_score > 0:
            out["judge"] = (f"iteration {it}: the held-out judge fell {-d_judge:.3f} while the reward model rose "
                            f"{d_score:.3f} over the last {w} iterations: the policy is exploiting the reward model; "
                            "lower kl_target or stop earlier")
    return out


def compare(before: dict, after: dict, th: Thresholds | None = None) -> dict[str, str]:
    """Warnings on a report's held-out samples (`agents.rlhf.report.evaluate_held_out` metrics, before vs after): the
    judge disagreeing with the reward model, and the collapse signals of the tuned policy's samples."""
    th = th or Thresholds()
    out = _collapse(before, after, th, "held-out samples after training")
    pr, pj = after.get("positive_rate_reward_model"), after.get("positive_rate_judge")
    if pr is not None and pj is not None and pr - pj > th.judge_gap:
        out["judge"] = (f"the held-out judge calls {pj:.0%} of the tuned samples positive, the reward model {pr:.0%}: "
                        f"a gap over {th.judge_gap:.0%} means the policy found the reward model's blind spots")
    return out


def _collapse(first: dict, last: dict, th: Thresholds, where: str) -> dict[str, str]:
    """The collapse checks of `last` (distinct-2 against `first`'s), each line starting with `where`."""
    out = {}
    if first.get("distinct_2") and last.get("distinct_2", 1e9) < th.distinct_2_ratio * first["distinct_2"]:
        out["distinct_2"] = (f"{where}: distinct-2 fell to {last['distinct_2']:.3f}, below {th.distinct_2_ratio:.0%} "
                             f"of its start {first['distinct_2']:.3f}: the policy is repeating itself")
    if last.get("identical_share", 0.0) > th.identical_share:
        out["identical_share"] = (f"{where}: {last['identical_share']:.0%} of responses are copies of another "
                                  f"(threshold {th.identical_share:.0%}): the policy collapsed onto a few answers")
    if last.get("repeated_3gram_rate", 0.0) > th.repeated_3gram_rate:
        out["repeated_3gram_rate"] = (f"{where}: {last['repeated_3gram_rate']:.0%} of 3-grams repeat inside a "
                                      f"response (threshold {th.repeated_3gram_rate:.0%})")
    if last.get("saturation", 0.0) > th.saturation:
        out["saturation"] = (f"{where}: {last['saturation']:.0%} of scores sit at the batch maximum (threshold "
                             f"{th.saturation:.0%}): the reward model is saturated, its gradient says little")
    return out
