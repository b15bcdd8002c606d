"""Before/after evaluation of an RLHF run, written as Markdown, JSON and PNG plots.

The seed recipe reports the mean and median reward of 16 samples before and after training. This report
keeps that table and adds what tells a real gain from reward hacking, measured on held-out prompts:

- reward: mean, median, standard error, and the positive rate by the reward model;
- positive rate by a held-out judge (a different classifier the policy never trained against);
- KL(pi || p_ref) per response: the sum over response tokens of log pi - log p_ref, with the responses
  sampled from pi (so its expectation is the true KL and is >= 0);
- the reference model's perplexity of the samples (fluency as the pretrained model sees it);
- distinct-2 over response tokens (diversity; a collapsed policy repeats itself).

Sampling is pure ancestral sampling (temperature 1, no top-k/top-p), the distribution PPO trains, through
the same left-padded window and KV cache (`textenv.lm_cache.CachedLM`) the environment's agents use.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from textenv.lm_cache import CachedLM, forward_full

TextScorer = Callable[[list[str]], Sequence[float]]


def distinct_n(seqs: Sequence[Sequence], n: int) -> float:
    """Unique n-grams / all n-grams over a set of sequences (0.0 when there is no n-gram at all)."""
    grams = [tuple(s[i : i + n]) for s in seqs for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class Samples:
    """Responses sampled for a list of prompts; `response_ids[i]` includes the EOS token if one ended it."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    completions: list[str]  # decoded responses without special tokens
    texts: list[str] = field(default_factory=list)  # prompt + completion: what the reward model scores

    def __len__(self) -> int:
        return len(self.prompts)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, keeping the last `max_prompt_tokens` (an error for an empty prompt)."""
    out = []
    for p in prompts:
        ids = tokenizer.encode(p, add_special_tokens=False)
        if not ids:
            raise ValueError(f"prompt {p!r} encodes to no tokens; drop empty prompts from the evaluation set")
        out.append(ids[-max_prompt_tokens:])
    return out


def _left_pad(rows: Sequence[Sequence[int]], width: int, pad: int) -> torch.Tensor:
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r) :] = torch.tensor(r[-width:], dtype=torch.long)
    return out


def _budgets(max_new_tokens: int | Sequence[int], n: int, seed: int) -> list[int]:
    """Per-response token budgets: `max_new_tokens`, or drawn uniformly in `lo..hi` for a pair (as the env)."""
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * n
    lo, hi = max_new_tokens
    return np.random.default_rng(seed).integers(lo, hi + 1, size=n).tolist()


def _cut(row: list[int], eos: int, min_new_tokens: int, budget: int) -> list[int]:
    """The env's episode end: the first EOS at or after `min_new_tokens` tokens, else the budget."""
    for k in range(min_new_tokens, min(budget, len(row))):
        if row[k] == eos:
            return row[: k + 1]
    return row[:budget]


@torch.no_grad()
def sample(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int | Sequence[int],
    min_new_tokens: int = 0,
    max_prompt_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 64,
) -> Samples:
    """Pure sampling (temperature 1, full vocabulary) of one response per prompt, with TextEnv's episode
    end: an EOS ends the response only after `min_new_tokens` tokens (an earlier one is an ordinary,
    invisible token, as in the env), and `max_new_tokens` is the budget (or a `(lo, hi)` range drawn per
    prompt)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    device = _device_of(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    responses: list[list[int]] = []
    lm = CachedLM(model, pad)
    budgets = _budgets(max_new_tokens, len(prompt_ids), seed)
    longest = max(budgets)
    width = max_prompt_tokens + longest
    vocab = len(tokenizer)
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        obs = _left_pad(chunk, width, pad).to(device)  # (B, L) the env's observation window
        lm.reset()
        tokens = torch.zeros(len(chunk), longest, dtype=torch.long)
        for t in range(longest):  # rows that ended keep sampling; `_cut` drops the extra tokens
            logits, _ = lm.step(obs)  # (B, V) float32
            probs = torch.softmax(logits[:, :vocab].cpu(), -1)  # a wider model vocab never samples past the tokenizer
            a = torch.multinomial(probs, 1, generator=gen).squeeze(1)  # (B,)
            tokens[:, t] = a
            obs = torch.cat([obs[:, 1:], a[:, None].to(device)], dim=1)
        for row, budget in zip(tokens.tolist(), budgets[start : start + batch_size], strict=True):
            responses.append(_cut(row, eos, min_new_tokens, budget))
    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
    texts = [tokenizer.decode(p + r, skip_special_tokens=True) for p, r in zip(prompt_ids, responses, strict=True)]
    return Samples(list(prompts), prompt_ids, responses, completions, texts)


@torch.no_grad()
def response_logprobs(model: nn.Module, tokenizer, samples: Samples, *, batch_size: int = 64) -> list[np.ndarray]:
    """log p_model(response token | prefix) for every response token of every sample (teacher-forced)."""
    pad = tokenizer.pad_token_id
    device = _device_of(model)
    vocab = len(tokenizer)
    out: list[np.ndarray] = []
    for start in range(0, len(samples), batch_size):
        p = samples.prompt_ids[start : start + batch_size]
        r = samples.response_ids[start : start + batch_size]
        seqs = [a + b for a, b in zip(p, r, strict=True)]
        width = max(len(s) for s in seqs)
        ids = _left_pad(seqs, width, pad).to(device)  # (B, T)
        logits, _ = forward_full(model, ids, pad)  # (B, T, V) float32
        logits = logits[..., :vocab]
        for i, ri in enumerate(r):
            if not ri:
                out.append(np.zeros(0))
                continue
            # logits at position j predict token j+1; response token k sits at width - len(ri) + k
            first = width - len(ri)
            lg = logits[i, first - 1 : width - 1]  # (len(ri), V)
            lp = torch.log_softmax(lg, -1).gather(1, torch.tensor(ri, device=device)[:, None]).squeeze(1)
            out.append(lp.cpu().double().numpy())
    return out


def _positive_rate(scores: Sequence[float], threshold: float) -> float:
    return float(np.mean(np.asarray(scores, dtype=float) > threshold))


def evaluate(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    reward_fn: TextScorer,
    judge_fn: TextScorer | None = None,
    reward_positive_fn: TextScorer | None = None,
    reward_threshold: float = 0.0,
    judge_threshold: float = 0.5,
    max_new_tokens: int | Sequence[int],
    min_new_tokens: int = 0,
    max_prompt_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[dict, Samples]:
    """Sample one response per prompt from `policy` and measure it; returns (metrics, samples).

    `reward_fn` gives the training score (e.g. the positive-class logit); a sample counts as positive by
    the reward model when `reward_positive_fn(texts)` (default `reward_fn`) exceeds `reward_threshold`.
    `judge_fn` returns the judge's probability of positive, compared with `judge_threshold`.
    """
    was_training = policy.training, reference.training
    policy.eval()
    reference.eval()
    try:
        s = sample(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                   max_prompt_tokens=max_prompt_tokens, seed=seed, batch_size=batch_size)
        lp_pi = response_logprobs(policy, tokenizer, s, batch_size=batch_size)
        lp_ref = response_logprobs(reference, tokenizer, s, batch_size=batch_size)
    finally:
        policy.train(was_training[0])
        reference.train(was_training[1])
    rewards = np.asarray(reward_fn(s.texts), dtype=float)
    if rewards.shape != (len(s),):
        raise ValueError(f"reward_fn returned shape {rewards.shape} for {len(s)} texts; it must return one float per text")
    kl = np.array([float((a - b).sum()) for a, b in zip(lp_pi, lp_ref, strict=True)])
    n_tokens = sum(len(r) for r in s.response_ids)
    ref_nll = -sum(float(b.sum()) for b in lp_ref) / max(n_tokens, 1)
    pos_scores = rewards if reward_positive_fn is None else np.asarray(reward_positive_fn(s.texts), dtype=float)
    metrics = {
        "n": len(s),
        "reward_mean": float(rewards.mean()),
        "reward_median": float(np.median(rewards)),
        "reward_std": float(rewards.std(ddof=1)) if len(s) > 1 else 0.0,
        "reward_sem": float(rewards.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else 0.0,
        "positive_rate_reward_model": _positive_rate(pos_scores, reward_threshold),
        "positive_rate_judge": None,
        "kl_mean": float(kl.mean()),
        "kl_sem": float(kl.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else 0.0,
        "ref_perplexity": float(math.exp(ref_nll)),
        "distinct_1": distinct_n(s.response_ids, 1),
        "distinct_2": distinct_n(s.response_ids, 2),
        "mean_response_tokens": n_tokens / max(len(s), 1),
    }
    if judge_fn is not None:
        metrics["positive_rate_judge"] = _positive_rate(judge_fn(s.texts), judge_threshold)
    metrics["_rewards"] = rewards.tolist()  # per-sample, for the sample table; dropped from the summary
    return metrics, s


# ----------------------------------------------------------------------------------------------- writing

_ROWS = [
    ("reward mean", "reward_mean"),
    ("reward median", "reward_median"),
    ("reward std", "reward_std"),
    ("positive rate (reward model)", "positive_rate_reward_model"),
    ("positive rate (held-out judge)", "positive_rate_judge"),
    ("KL to reference (nats/response)", "kl_mean"),
    ("reference perplexity", "ref_perplexity"),
    ("distinct-1", "distinct_1"),
    ("distinct-2", "distinct_2"),
    ("response tokens (mean)", "mean_response_tokens"),
]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def plot_history(history: Sequence[dict], path: Path) -> Path | None:
    """PNG of the score mean and KL (with the KL coefficient) over training; None without history."""
    if not history:
        return None
    # a bare Figure (no pyplot, no matplotlib.use): the backend of a Jupyter session calling this stays as it is
    from matplotlib.figure import Figure

    steps = [h["global_step"] for h in history]
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    axes[0].plot(steps, [h.get("score_mean", float("nan")) for h in history])
    axes[0].set(xlabel="env steps (tokens)", ylabel="reward-model score", title="score mean per iteration")
    axes[1].plot(steps, [h.get("kl", float("nan")) for h in history], label="KL (nats/episode)")
    if any("kl_coef" in h for h in history):
        ax2 = axes[1].twinx()
        ax2.plot(steps, [h.get("kl_coef", float("nan")) for h in history], color="tab:orange", label="KL coef")
        ax2.set_ylabel("KL coefficient")
    axes[1].set(xlabel="env steps (tokens)", ylabel="KL to reference", title="KL per iteration")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)  # a Figure without a canvas saves through Agg
    return path


def report_table(record: dict) -> str:
    """The before/after Markdown table of a report record (`write_report`'s or `agents.rlhf.run`'s return)."""
    b, a = record["before"], record["after"]
    lines = ["| metric | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(b.get(k))} | {_fmt(a.get(k))} |" for name, k in _ROWS]
    return "\n".join(lines)


def write_report(
    run_dir: str | Path,
    before: tuple[dict, Samples],
    after: tuple[dict, Samples],
    *,
    history: Sequence[dict] = (),
    config: dict | None = None,
    extra: dict | None = None,
    n_pairs: int = 16,
) -> dict:
    """Write `report.md`, `report.json` and `training.png` into `run_dir`; returns the JSON record."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (mb, sb), (ma, sa) = before, after
    if sb.prompts != sa.prompts:
        raise ValueError("before and after were evaluated on different prompts; evaluate both on the same list")
    rb, ra = mb.get("_rewards", [None] * len(sb)), ma.get("_rewards", [None] * len(sa))
    pairs = [
        {"prompt": sb.prompts[i], "before": sb.completions[i], "after": sa.completions[i],
         "reward_before": rb[i], "reward_after": ra[i]}
        for i in range(min(n_pairs, len(sb)))
    ]
    summary_b = {k: v for k, v in mb.items() if not k.startswith("_")}
    summary_a = {k: v for k, v in ma.items() if not k.startswith("_")}
    png = plot_history(history, run_dir / "training.png")
    record = {
        "before": summary_b,
        "after": summary_a,
        "gain": {"reward_mean": summary_a["reward_mean"] - summary_b["reward_mean"],
                 "reward_median": summary_a["reward_median"] - summary_b["reward_median"]},
        "samples": pairs,
        "history": list(history),
        "config": config or {},
        **(extra or {}),
    }
    tmp = run_dir / "report.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(run_dir / "report.json")

    n = summary_b["n"]
    lines = ["# RLHF report", "",
             f"Held-out prompts: {n}, one pure-sampled response each (same prompts and seed before and after).",
             f"Reward mean gain: {record['gain']['reward_mean']:+.3f} "
             f"(standard error before {summary_b['reward_sem']:.3f}, after {summary_a['reward_sem']:.3f}).", "",
             report_table(record)]
    flat = {f"{k}.{k2}" if isinstance(v, dict) else k: v2 for k, v in (extra or {}).items()
            for k2, v2 in (v.items() if isinstance(v, dict) else [(k, v)])}
    flat = {k: v for k, v in flat.items() if isinstance(v, int | float | str)}
    if flat:
        lines += ["", "| run | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
    lines += ["", f"## {len(pairs)} sample pairs", "",
              "| prompt | before | reward | after | reward |", "|---|---|---|---|---|"]
    lines += [f"| {_cell(p['prompt'])} | {_cell(p['before'])} | {_fmt(p['reward_before'])} | "
              f"{_cell(p['after'])} | {_fmt(p['reward_after'])} |" for p in pairs]
    if png is not None:
        lines += ["", "## Training", "", f"![score and KL over training]({png.name})"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return record

