"""Best-of-n sampling: the baseline an RL run has to beat.

Sample n responses per prompt from the initial policy, keep the reward model's favourite: no training at all, and a
KL to the sampling policy of at most log n - (n - 1) / n nats (Stiennon et al. 2020; Gao et al. 2022 plot it beside
RL against the KL). If an RL run's judge score at its KL lies below the best-of-n curve, the training bought less
than picking from samples does. The picks are scored by the held-out judge too: where the reward model and the
judge disagree at the top, the reward model's blind spots are showing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np
from torch import nn

from agents.rlhf.report import HeldOut, sample_episodes


def kl_bound(n: int) -> float:
    """The largest KL (nats) of best-of-n to the policy it samples from: log n - (n - 1) / n, for an integer n >= 1."""
    if not _is_count(n):
        raise ValueError(f"kl_bound: n = {n!r} must be an integer >= 1 (the samples best-of-n picks from)")
    return math.log(n) - (n - 1) / n


def check_ns(ns: Sequence[int], samples: int | None = None) -> None:
    """Raise ValueError unless `ns` holds at least one n and each is an integer >= 1 and at most `samples` (the
    samples per prompt to pick from; None: no upper end)."""
    allowed = ">= 1" if samples is None else f"in [1, {samples}] (the samples per prompt)"
    if not len(ns) or not all(_is_count(n) and (samples is None or n <= samples) for n in ns):
        raise ValueError(f"ns: best-of-n needs at least one n, integers, and every n {allowed}; got {tuple(ns)}")


def _is_count(n: object) -> bool:
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1


def best_of_n(policy: nn.Module, reference: nn.Module, held_out: HeldOut, ns: Sequence[int] = (1, 4, 16),
              prompts: int = 64) -> dict:
    """Best-of-n of `policy` for each n in `ns`, on the first `prompts` held-out prompts, through the report's env
    (`sample_episodes`: max(ns) samples per prompt, each its own seed). For each n the pick is the reward model's
    favourite among the first n samples; returns per n its KL bound and the picks' mean reward and positive rates
    by the reward model and by the judge."""
    check_ns(ns)
    n_max, base = max(ns), list(held_out.prompts[:prompts])
    repeated = dataclasses.replace(held_out, prompts=[p for p in base for _ in range(n_max)])
    s = sample_episodes(policy, reference, repeated)
    scores = np.asarray(s.scores, dtype=float).reshape(len(base), n_max)  # (P, n_max)
    h = held_out
    positive = (scores > 0) if h.reward_positive_fn is None else (
        np.asarray(h.reward_positive_fn(s.texts), dtype=float).reshape(len(base), n_max) > 0.5)
    judged = None if h.judge_fn is None else np.asarray(h.judge_fn(s.texts), dtype=float).reshape(len(base), n_max)
    return {"prompts": len(base), "samples_per_prompt": n_max, "rows": pick_best(scores, positive, judged, ns)}


def pick_best(scores: np.ndarray, positive: np.ndarray, judged: np.ndarray | None, ns: Sequence[int]) -> list[dict]:
    """Per n in `ns`: of each prompt's first n samples (rows of `scores`, shape (prompts, samples)) the reward
    model's favourite, and the picks' mean reward, positive rate by the reward model (`positive`, bools) and by the
    judge (`judged`, probabilities positive, or None). Every n must be in [1, samples]."""
    check_ns(ns, samples=scores.shape[1])
    rows, at = [], np.arange(len(scores))
    for n in sorted(ns):
        pick = scores[:, :n].argmax(axis=1)  # the reward model's favourite of the first n
        rows.append({"n": n, "kl_bound": kl_bound(n), "reward_mean": float(scores[at, pick].mean()),
                     "positive_rate_reward_model": float(positive[at, pick].mean()),
                     "positive_rate_judge": None if judged is None else float((judged[at, pick] > 0.5).mean()),
                     "judge_mean": None if judged is None else float(judged[at, pick].mean())})
    return rows
