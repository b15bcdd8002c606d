"""Before/after evaluation of an RLHF run, written as Markdown, JSON and PNG plots.

The seed recipe reports the mean and median reward of 16 samples before and after training. This report
keeps that table and adds what tells a real gain from reward hacking, measured on held-out prompts:

- reward: mean, median, standard error, and the positive rate by the reward model;
- positive rate by a held-out judge (a different classifier the policy never trained against);
- KL(pi || p_ref) per response: the sum over response tokens of log pi - log p_ref, with the responses
  sampled from pi (so its expectation is the true KL and is >= 0);
- the reference model's perplexity of the samples (fluency as the pretrained model sees it);
- distinct-2 over response tokens (diversity; a collapsed policy repeats itself), and the other
  over-optimisation signals of `agents.rlhf.signals` (repeated 3-grams, identical responses, reward
  saturation, the judge's mean), with a warning section when they cross their thresholds.

The samples come from the environment itself: a `TextVectorEnv` over the held-out prompts (each started
once, in order, by `reset(options={"prompt_index": ...})`) wrapped with `textenv.kl.RefLogprob`, stepped by
a `GPTAgent`. Prompts, EOS, min/max new tokens and scores thus have one definition, the env's; sampling is
the agent's pure ancestral sampling at the job's temperature (no top-k/top-p), the distribution PPO trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agents.checkpoint import written
from agents.gpt_policy import GPTAgent
from agents.rlhf.signals import batch_signals, compare, on_topic_rate
from agents.rollout import action_mask_of
from textenv.build.texts import Texts
from textenv.episode import EpisodeSpec
from textenv.kl import RefLogprob
from textenv.masks import ActionMask
from textenv.rewards import RewardModel
from textenv.vector import TextVectorEnv


@dataclass
class Samples:
    """One episode per prompt, in prompt order; `response_ids[i]` includes the EOS token if one ended it."""

    prompts: list[str]  # the prompts as given
    prompt_ids: list[list[int]]  # as the env encoded them
    response_ids: list[list[int]]
    completions: list[str]  # the env's info["completion"]: decoded response without special tokens
    texts: list[str] = field(default_factory=list)  # the env's info["text"]: prompt + completion, as scored
    scores: list[float] = field(default_factory=list)  # the env's info["score"]: the reward model's score
    logprobs: list[np.ndarray] = field(default_factory=list)  # log pi of each response token (the agent's)
    ref_logprobs: list[np.ndarray] = field(default_factory=list)  # log p_ref of each (infos["ref_logprob"])

    def __len__(self) -> int:
        return len(self.prompts)


def as_agent(policy: GPTAgent | nn.Module, tokenizer, temperature: float = 1.0) -> GPTAgent:
    """`policy` itself if it is a GPTAgent over the tokenizer's vocabulary at `temperature`, else a causal LM
    wrapped in one (float32, on the LM's device, sampling at `temperature`; its value head is never used)."""
    if isinstance(policy, GPTAgent):
        if policy.vocab_size != len(tokenizer) or policy.pad_token_id != tokenizer.pad_token_id:
            raise ValueError(f"the agent's vocabulary ({policy.vocab_size}) / pad id ({policy.pad_token_id}) differ "
                             f"from the tokenizer's ({len(tokenizer)} / {tokenizer.pad_token_id}); evaluate with the "
                             "tokenizer the agent was built with")
        if policy.temperature != temperature:
            raise ValueError(f"the agent samples at temperature {policy.temperature}, the evaluation at {temperature}; "
                             "evaluate at the agent's temperature (HeldOut.temperature)")
        return policy
    return GPTAgent(policy, tokenizer.pad_token_id, len(tokenizer), temperature=temperature)


@dataclass
class HeldOut:
    """What the report evaluates a policy on: held-out prompts (whole, already cut), the episode shape of training
    (its `query_tokens` are ignored: the prompts are whole), how a response is scored, and the sampling seed."""

    tokenizer: Any
    prompts: Sequence[str]
    reward_fn: RewardModel  # the env's reward model (e.g. the positive-class logit)
    episode: EpisodeSpec
    reward_positive_fn: RewardModel | None = None  # P(positive) by the reward model (None: positive means score > 0)
    judge_fn: RewardModel | None = None  # a held-out judge: P(positive)
    seed: int = 0
    batch_size: int = 64  # envs side by side
    original: nn.Module | None = None  # the LM the reference was fine-tuned from: its perplexity is reported too
    temperature: float = 1.0  # the policy's and the reference's sampling temperature (softmax(logits / T))
    real: Texts | None = None  # real held-out reviews (labelled), the yardstick's (`agents.rlhf.yardstick`)
    action_mask: ActionMask | None = None  # the training envs' (`textenv.masks`): the policy samples as it trained


@torch.no_grad()
def sample_episodes(policy: GPTAgent | nn.Module, reference: nn.Module, held_out: HeldOut) -> Samples:
    """One episode per held-out prompt, in order: the env (`TextVectorEnv` + `RefLogprob`) stepped by the policy.

    `batch_size` envs run side by side; an env whose episode ends starts the next prompt right away. Prompt
    `k`'s episode is reset with seed `seed + k` (so a `(lo, hi)` budget is the same for every policy), and
    the agent samples under `torch.manual_seed(seed)` inside a forked RNG (the caller's RNG state stays).
    """
    h, tokenizer = held_out, held_out.tokenizer
    prompts = list(h.prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts to evaluate; pass at least one held-out prompt")
    E = min(h.batch_size, n)
    # every CUDA device forked too: manual_seed reseeds them all, and the caller's RNG state must survive
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        agent = as_agent(policy, tokenizer, h.temperature)  # before seeding: a new (unused) value head does not shift the draws
        torch.manual_seed(h.seed)
        episode = dataclasses.replace(h.episode, query_tokens=None)  # the prompts are whole
        envs = RefLogprob(
            TextVectorEnv(E, tokenizer=tokenizer, reward_model=h.reward_fn, prompts=prompts, episode=episode,
                          action_mask=h.action_mask),
            agent.reference(reference), pad_token_id=tokenizer.pad_token_id, device=agent.device,
            temperature=h.temperature)  # a top-k
        # agent's reference runs only its top blocks over the agent's frozen trunk (the same log-probs)
        agent.reset_cache()
        try:
            return _run(agent, envs, prompts, h.seed)
        finally:
            agent.reset_cache()  # PPO's rollout cache does not keep the evaluation's rows
            envs.close()


def _run(agent: GPTAgent, envs: RefLogprob, prompts: list[str], seed: int) -> Samples:
    """Step `envs` with `agent` until every prompt has had its one episode; see `sample_episodes`."""
    n, E = len(prompts), envs.num_envs
    W = envs.single_observation_space.shape[0]
    out = Samples(prompts, [[]] * n, [[]] * n, [""] * n, [""] * n, [0.0] * n, [np.zeros(0)] * n, [np.zeros(0)] * n)
    slot = np.arange(E)  # the prompt each env is on; -1: none left for it (it idles, its autoreset ignored)
    obs, infos = envs.reset(seed=[seed + k for k in range(E)], options={"prompt_index": slot.copy()})
    rows = [_Row(obs[i, W - infos["prompt_length"][i] :].tolist()) for i in range(E)]
    following = E  # the next prompt to start
    while (slot >= 0).any():
        mask = action_mask_of(infos, E, envs.single_action_space)  # None without an action mask
        action, logprob, _, _ = agent.get_action_and_value(
            torch.as_tensor(obs, device=agent.device),
            action_mask=None if mask is None else torch.as_tensor(mask, device=agent.device))
        actions, logprob = action.cpu().numpy(), logprob.double().cpu().numpy()
        obs, _, terminated, truncated, infos = envs.step(actions)
        for i in np.flatnonzero(slot >= 0):
            rows[i].add(int(actions[i]), logprob[i], infos["ref_logprob"][i])
        done = np.flatnonzero((terminated | truncated) & (slot >= 0))
        for i in done:
            k, r = slot[i], rows[i]
            out.prompt_ids[k], out.response_ids[k] = r.prompt_ids, r.tokens
            out.logprobs[k], out.ref_logprobs[k] = np.array(r.logprobs), np.array(r.ref_logprobs)
            out.completions[k], out.texts[k] = infos["completion"][i], infos["text"][i]
            out.scores[k] = float(infos["score"][i])
            slot[i] = following if following < n else -1
            following += 1
        restart = np.zeros(E, dtype=np.bool_)
        restart[done] = slot[done] >= 0
        if restart.any():  # the next prompts start now, in place of NEXT_STEP autoreset's random ones
            seeds = [int(seed + slot[i]) if restart[i] else None for i in range(E)]
            obs, infos = envs.reset(seed=seeds, options={"reset_mask": restart, "prompt_index": np.maximum(slot, 0)})
            for i in np.flatnonzero(restart):
                rows[i] = _Row(obs[i, W - infos["prompt_length"][i] :].tolist())
    return out


@dataclass
class _Row:
    """The episode one env is running: its prompt and, so far, its response tokens and their log-probs."""

    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ref_logprobs: list[float] = field(default_factory=list)

    def add(self, token: int, logprob: float, ref_logprob: float) -> None:
        self.tokens.append(token)
        self.logprobs.append(float(logprob))
        self.ref_logprobs.append(float(ref_logprob))


def _positive_rate(scores: Sequence[float], threshold: float) -> float:
    return float(np.mean(np.asarray(scores, dtype=float) > threshold))


def evaluate_held_out(policy: GPTAgent | nn.Module, reference: nn.Module, held_out: HeldOut) -> tuple[dict, Samples]:
    """One episode per held-out prompt (`sample_episodes`: the env stepped by `policy`) and its measures; returns
    (metrics, samples).

    `policy` is a `GPTAgent` (e.g. the trained one) or a causal LM (wrapped in a float32 GPTAgent: pass the
    reference itself for "before"); `reference` is the frozen KL anchor (put in eval mode, no grad). A sample is
    positive by the reward model when `reward_positive_fn` says P > 0.5 (without it: when its score is > 0),
    and by the judge when the judge says P > 0.5.
    """
    s, h = sample_episodes(policy, reference, held_out), held_out
    rewards = np.asarray(s.scores, dtype=float)
    kl = np.array([float((a - b).sum()) for a, b in zip(s.logprobs, s.ref_logprobs, strict=True)])
    n_tokens = sum(len(r) for r in s.response_ids)
    ref_nll = -sum(float(b.sum()) for b in s.ref_logprobs) / max(n_tokens, 1)
    pos_scores = rewards if h.reward_positive_fn is None else np.asarray(h.reward_positive_fn(s.texts), dtype=float)
    metrics = {
        "n": len(s),
        "reward_mean": float(rewards.mean()),
        "reward_median": float(np.median(rewards)),
        "reward_std": float(rewards.std(ddof=1)) if len(s) > 1 else 0.0,
        "reward_sem": float(rewards.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else 0.0,
        "positive_rate_reward_model": _positive_rate(pos_scores, 0.0 if h.reward_positive_fn is None else 0.5),
        "reward_prob_mean": None if h.reward_positive_fn is None else float(pos_scores.mean()),
        "reward_prob_std": None if h.reward_positive_fn is None or len(s) < 2 else float(pos_scores.std(ddof=1)),
        "positive_rate_judge": None,
        "kl_mean": float(kl.mean()),
        "kl_sem": float(kl.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else 0.0,
        "ref_perplexity": float(math.exp(ref_nll)),
        "mean_response_tokens": n_tokens / max(len(s), 1),
    }
    if h.original is not None:
        metrics["original_perplexity"] = perplexity_under(h.original, s, h.tokenizer)
    judged = None if h.judge_fn is None else np.asarray(h.judge_fn(s.texts), dtype=float)
    metrics.update(batch_signals(s.response_ids, s.completions, rewards, judged))  # distinct-n, collapse, judge mean
    metrics["on_topic_rate"] = on_topic_rate(s.texts)  # names a film: tracks a reader's "on-topic"
    if judged is not None:
        metrics["positive_rate_judge"] = _positive_rate(judged, 0.5)
        metrics["_judge"] = judged.tolist()
    metrics["_rewards"] = rewards.tolist()  # per-sample, for the sample table; dropped from the summary
    return metrics, s


@torch.no_grad()
def perplexity_under(model: nn.Module, s: Samples, tokenizer, batch_size: int = 64) -> float:
    """Perplexity of the samples' response tokens under `model`, given their prompts (teacher-forced; over the
    tokenizer's ids, as the env's reference log-probs are)."""
    from textenv.lm import forward_full

    device, pad, n = next(model.parameters()).device, tokenizer.pad_token_id, len(tokenizer)
    nll, count = 0.0, 0
    for i in range(0, len(s), batch_size):
        rows = [p + r for p, r in zip(s.prompt_ids[i : i + batch_size], s.response_ids[i : i + batch_size], strict=True)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # left-padded (B, W)
        logp = forward_full(model, ids, pad)[0][:, :-1, :n].log_softmax(-1)  # (B, W-1, n)
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, W-1): log p of each next token
        for b, r in enumerate(s.response_ids[i : i + batch_size]):
            nll -= float(token_logp[b, width - 1 - len(r) :].sum())
            count += len(r)
    return math.exp(nll / max(count, 1))


# ----------------------------------------------------------------------------------------------- writing

_ROWS = [
    ("reward mean", "reward_mean"),
    ("reward median", "reward_median"),
    ("reward std", "reward_std"),
    ("positive rate (reward model)", "positive_rate_reward_model"),
    ("positive rate (reward model) of real positive reviews", "positive_rate_reward_model_of_positive"),
    ("positive rate (reward model) of real negative reviews", "positive_rate_reward_model_of_negative"),
    ("positive rate (held-out judge)", "positive_rate_judge"),
    ("positive rate (judge) of real positive reviews", "positive_rate_judge_of_positive"),
    ("positive rate (judge) of real negative reviews", "positive_rate_judge_of_negative"),
    ("KL to reference (nats/response)", "kl_mean"),
    ("reference perplexity", "ref_perplexity"),
    ("perplexity under the original LM (before the warm start)", "original_perplexity"),
    ("judge mean P(positive)", "judge_mean"),
    ("names a film (share of texts with a film word)", "on_topic_rate"),
    ("distinct-1", "distinct_1"),
    ("distinct-2", "distinct_2"),
    ("repeated 3-grams (share)", "repeated_3gram_rate"),
    ("identical responses (share)", "identical_share"),
    ("reward saturation (share at the max)", "saturation"),
    ("response tokens (mean)", "mean_response_tokens"),
]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def md_cell(text: str) -> str:
    """`text` as one Markdown table cell: pipes escaped, newlines as spaces (the project's one escaping rule)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


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
    written(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))  # a Figure without a canvas saves through Agg
    return path


def report_table(record: dict) -> str:
    """The before/after Markdown table of a report record (`write_report`'s or `agents.rlhf.run`'s return), with a
    column of real reviews cut to the same lengths where the record has them (`agents.rlhf.yardstick`)."""
    cols = [record["before"], record["after"]] + ([record["real_reviews"]] if record.get("real_reviews") else [])
    head = ["before", "after", "real reviews, same lengths"][: len(cols)]
    lines = ["| metric | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_fmt(c.get(k)) for c in cols) + " |" for name, k in _ROWS
              if any(c.get(k) is not None for c in cols)]  # a row only where the run measured it
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
    warnings: Sequence[str] = (),
) -> dict:
    """Write `report.md`, `report.json` and `training.png` into `run_dir`; returns the JSON record.

    `report.json` holds every held-out sample (prompt, both completions, both rewards and judge scores), the
    Markdown its first `n_pairs`. `warnings` (e.g. the training log's) are listed with the over-optimisation
    checks of the held-out samples (`agents.rlhf.signals.compare`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (mb, sb), (ma, sa) = before, after
    if sb.prompts != sa.prompts:
        raise ValueError("before and after were evaluated on different prompts; evaluate both on the same list")
    rb, ra = mb.get("_rewards", [None] * len(sb)), ma.get("_rewards", [None] * len(sa))
    jb, ja = mb.get("_judge", [None] * len(sb)), ma.get("_judge", [None] * len(sa))
    samples = [
        {"prompt": sb.prompts[i], "before": sb.completions[i], "after": sa.completions[i],
         "reward_before": rb[i], "reward_after": ra[i], "judge_before": jb[i], "judge_after": ja[i]}
        for i in range(len(sb))
    ]
    summary_b = {k: v for k, v in mb.items() if not k.startswith("_")}
    summary_a = {k: v for k, v in ma.items() if not k.startswith("_")}
    png = plot_history(history, run_dir / "training.png")
    record = {
        "before": summary_b,
        "after": summary_a,
        "gain": {"reward_mean": summary_a["reward_mean"] - summary_b["reward_mean"],
                 "reward_median": summary_a["reward_median"] - summary_b["reward_median"]},
        "warnings": list(warnings) + list(compare(summary_b, summary_a).values()),
        "samples": samples,
        "history": list(history),
        "config": config or {},
        **(extra or {}),
    }
    written(run_dir / "report.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str) + "\n"))
    written(run_dir / "report.md", lambda tmp: tmp.write_text(report_markdown(record, samples[:n_pairs], extra or {}, png)))
    return record


def best_of_n_table(bon: dict, after: dict) -> list[str]:
    """Markdown lines: best-of-n of the initial policy (`agents.rlhf.baselines`) beside the tuned policy."""
    lines = ["## Best-of-n of the initial policy beside the tuned one", "",
             f"{bon['samples_per_prompt']} samples on each of the first {bon['prompts']} held-out prompts; the reward "
             "model's favourite of the first n is kept. KL: at most log n - (n-1)/n nats to the initial policy.", "",
             "| policy | KL (nats) | positive (reward model) | positive (judge) | reward mean |", "|---|---|---|---|---|"]
    lines += [f"| best-of-{r['n']} | <= {r['kl_bound']:.2f} | {_fmt(r['positive_rate_reward_model'])} | "
              f"{_fmt(r['positive_rate_judge'])} | {_fmt(r['reward_mean'])} |" for r in bon["rows"]]
    lines.append(f"| tuned policy | {_fmt(after['kl_mean'])} | {_fmt(after['positive_rate_reward_model'])} | "
                 f"{_fmt(after['positive_rate_judge'])} | {_fmt(after['reward_mean'])} |")
    return lines


def report_markdown(record: dict, pairs: list[dict], extra: dict, png: Path | None) -> str:
    """The Markdown report of a record: the before/after table, warnings, the run's numbers, sample pairs, plot."""
    summary_b, summary_a, n = record["before"], record["after"], record["before"]["n"]
    cfg = record.get("config", {})
    masks = ([f"no {cfg['no_repeat_ngram']} tokens in a row twice in a text"] if cfg.get("no_repeat_ngram") else []) + (
        [f"no word of {cfg['no_repeat_word']}+ letters twice in a response"] if cfg.get("no_repeat_word") else [])
    lines = ["# RLHF report", "",
             f"Held-out prompts: {n}, one response each, sampled at temperature {cfg.get('temperature', 1.0)}"
             f"{''.join(', ' + m for m in masks)} (same prompts and seed before and after).",
             f"Reward mean gain: {record['gain']['reward_mean']:+.3f} "
             f"(standard error before {summary_b['reward_sem']:.3f}, after {summary_a['reward_sem']:.3f}).", "",
             report_table(record)]
    if record["warnings"]:
        lines += ["", "## Over-optimisation warnings", "", *[f"- {md_cell(w)}" for w in record["warnings"]]]
    if "best_of_n" in extra:
        lines += ["", *best_of_n_table(extra["best_of_n"], summary_a)]
    shown = {k: v for k, v in extra.items() if k != "real_reviews"}  # the table's third column already
    flat = {f"{k}.{k2}" if isinstance(v, dict) else k: v2 for k, v in shown.items()
            for k2, v2 in (v.items() if isinstance(v, dict) else [(k, v)])}
    flat = {k: v for k, v in flat.items() if isinstance(v, int | float | str)}
    if flat:
        lines += ["", "| run | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
    lines += ["", f"## {len(pairs)} sample pairs", "",
              "| prompt | before | reward | after | reward |", "|---|---|---|---|---|"]
    lines += [f"| {md_cell(p['prompt'])} | {md_cell(p['before'])} | {_fmt(p['reward_before'])} | "
              f"{md_cell(p['after'])} | {_fmt(p['reward_after'])} |" for p in pairs]
    if png is not None:
        lines += ["", "## Training", "", f"![score and KL over training]({png.name})"]
    return "\n".join(lines) + "\n"

