"""What real reviews of the same length score: the yardstick beside every rate in the report.

A judge or reward model that says "0.81 positive" of 20-token samples says little until one knows what it says of
real review openings of 20 tokens. At that length a classifier trained on whole reviews mostly measures the absence
of negative words, so it calls many real negative openings positive, and off-topic text too. The report therefore
scores real held-out reviews (never prompts, never trained on), each cut to the token length of one of the initial
policy's episodes (its prompt length, then its response length), with the same reward model and judge, positive and
negative reviews apart; and it measures their diversity (distinct-n over the part standing for the response) and their
perplexity under the original LM, so a sample's fluency and sameness read against real text.
"""

from __future__ import annotations

import numpy as np

from agents.rlhf.report import HeldOut, Samples, perplexity_under
from agents.rlhf.signals import batch_signals, on_topic_rate
from textenv.build.texts import Texts


def real_windows(tokenizer, real: Texts, like: Samples) -> tuple[Samples, list[int]]:
    """(Samples, labels): for episode i of `like`, the next real text with enough tokens cut to episode i's prompt
    length + response length, its first part standing for the prompt, the rest for the response."""
    out = Samples([], [], [], [], [])
    labels: list[int] = []
    texts = iter(range(len(real)))
    for p, r in zip(like.prompt_ids, like.response_ids, strict=True):
        for j in texts:
            ids = tokenizer(real.texts[j][:4000], add_special_tokens=False)["input_ids"]
            if len(ids) >= len(p) + len(r) and len(p) > 0:
                break
        else:
            break  # no real text left: the yardstick covers fewer episodes
        prompt, response = ids[: len(p)], ids[len(p) : len(p) + len(r)]
        out.prompt_ids.append(prompt)
        out.response_ids.append(response)
        out.prompts.append(tokenizer.decode(prompt, skip_special_tokens=True))
        out.completions.append(tokenizer.decode(response, skip_special_tokens=True))
        out.texts.append(tokenizer.decode(prompt + response, skip_special_tokens=True))
        labels.append(int(real.labels[j]) if real.labels is not None else -1)
    return out, labels


def _rates(scores: np.ndarray, labels: np.ndarray, threshold: float, what: str) -> dict:
    positive = scores > threshold
    out = {f"positive_rate_{what}": float(positive.mean())}
    for name, lab in (("positive", 1), ("negative", 0)):
        if (labels == lab).any():
            out[f"positive_rate_{what}_of_{name}"] = float(positive[labels == lab].mean())
    return out


def yardstick(held_out: HeldOut, like: Samples) -> dict:
    """The report's measures of real held-out reviews cut to `like`'s episode lengths: the reward model's and the
    judge's positive rates (overall, of positive and of negative reviews), distinct-n and repeated 3-grams of the
    response part, and its perplexity under the original LM (`held_out.original`, when the job warm-started).
    Empty without `held_out.real`."""
    h = held_out
    if h.real is None or not len(h.real):
        return {}
    s, labels = real_windows(h.tokenizer, h.real, like)
    if not len(s):
        return {}
    lab = np.asarray(labels)
    pos = np.asarray(h.reward_fn(s.texts) if h.reward_positive_fn is None else h.reward_positive_fn(s.texts), float)
    metrics = {"n": len(s), **_rates(pos, lab, 0.0 if h.reward_positive_fn is None else 0.5, "reward_model")}
    judged = None
    if h.judge_fn is not None:
        judged = np.asarray(h.judge_fn(s.texts), dtype=float)
        metrics |= _rates(judged, lab, 0.5, "judge")
    signals = batch_signals(s.response_ids, s.completions, pos, judged)
    metrics |= {k: signals[k] for k in ("distinct_1", "distinct_2", "repeated_3gram_rate", "identical_share")}
    metrics["on_topic_rate"] = on_topic_rate(s.texts)
    if h.original is not None:
        metrics["original_perplexity"] = perplexity_under(h.original, s, h.tokenizer)
    metrics["mean_response_tokens"] = sum(map(len, s.response_ids)) / len(s)
    return metrics
