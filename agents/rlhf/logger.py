"""What an RLHF run logs each PPO iteration: the `hooks` object `agents.ppo.train` calls.

PPO logs the generic losses (policy, value, entropy, approx-KL, clip fraction) and the KL to the reference
(`charts/kl`, `charts/kl_coef`). This hook adds what is specific to text, read from the iteration's rollout:
the reward-model score of the finished episodes, KL per token and per response (the mean of PPO's per-episode
sums `[e.kl for e in rollout.episodes]`), a sampled entropy estimate, the over-optimisation signals of
`agents.rlhf.signals` (distinct-n, repeated 3-grams, identical responses, reward saturation, and the held-out
judge's mean beside the reward model's on the same texts), a warning line when one crosses its threshold, a
TensorBoard text table of samples every `sample_every` iterations, and one progress line with tokens/s.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from agents.cli import UsageError
from agents.rlhf.report import md_cell
from agents.rlhf.signals import Thresholds, batch_signals, check
from agents.rollout import Rollout


class RLHFLogger:
    """`on_iteration(iteration, global_step, rollout, writer, kl_coef) -> dict` for `agents.ppo.train(hooks=...)`.

    `history` keeps one dict per iteration (for the report's plots); `warnings` every over-optimisation warning
    printed (each kind once per run). `judge_fn` (texts -> P(positive)) scores the same texts as the reward model.
    `reward_state` (None until set): a training reward that remembers earlier calls
    (`textenv.rewards.StalePhrasePenalty`); its `state_dict` joins the checkpoint with the history, so a resumed run
    pays the rewards an uninterrupted one would.
    """

    reward_state: Any = None

    def __init__(self, tokenizer: Any, total_iterations: int, sample_every: int = 10, n_samples: int = 8,
                 print_every: int = 1, world_size: int = 1, judge_fn: Any = None,
                 thresholds: Thresholds | None = None) -> None:
        self.tokenizer = tokenizer
        self.world_size = world_size  # torchrun: the hook sees rank 0's rollout; tokens/s counts all ranks
        self.total_iterations = total_iterations
        self.sample_every, self.n_samples, self.print_every = sample_every, n_samples, print_every
        self.judge_fn, self.thresholds = judge_fn, thresholds or Thresholds()
        self.history: list[dict] = []
        self.warnings: list[str] = []
        self._warned: set[str] = set()
        self.start = self.last = time.time()

    def on_iteration(self, iteration: int, global_step: int, rollout: Rollout, writer: Any = None,
                     kl_coef: float = 0.0) -> dict:
        """The iteration's text statistics (`kl_coef`: the KL coefficient PPO shaped the rollout's rewards with)."""
        now = time.time()
        valid = rollout.valid.bool()  # (T, E)
        tokens = int(valid.sum()) * self.world_size  # rank 0's rollout x ranks (each runs as many steps)
        eps = [e.info for e in rollout.episodes]
        scores = [float(e["score"]) for e in eps if "score" in e]
        completions = [str(e.get("completion", "")) for e in eps]
        lengths = [int(e["length"]) - int(e["prompt_length"]) for e in eps if "length" in e and "prompt_length" in e]
        logp = rollout.logprobs[valid].double()
        stats: dict[str, float] = {"rlhf/tokens_per_second": tokens / max(now - self.last, 1e-9)}
        if logp.numel():
            stats["rlhf/entropy_sampled"] = float(-logp.mean())  # E[-log pi(a)] = entropy, estimated from samples
        ref = rollout.ref_logprobs
        if ref is not None and logp.numel():
            stats["rlhf/kl_per_token"] = float((logp - ref[valid].double()).mean())
        episode_kls = [e.kl for e in rollout.episodes if e.kl is not None]
        if episode_kls:  # PPO's per-episode sums of log pi - log p_ref (the episodes that finished)
            stats["rlhf/kl"] = float(np.mean(episode_kls))  # nats per response
        stats["rlhf/kl_coef"] = float(kl_coef)
        if scores:
            stats["rlhf/score_mean"] = float(np.mean(scores))
            stats["rlhf/score_std"] = float(np.std(scores))
        if lengths:
            stats["rlhf/response_tokens"] = float(np.mean(lengths))
        if completions and len(scores) == len(completions):
            ids = [self.tokenizer.encode(c, add_special_tokens=False) for c in completions]
            judged = self.judge_fn([str(e.get("text", "")) for e in eps]) if self.judge_fn is not None else None
            stats.update({f"rlhf/{k}": v for k, v in batch_signals(ids, completions, scores, judged).items()})
        if writer is not None and eps and self.sample_every and (iteration == 1 or iteration % self.sample_every == 0):
            rows = [f"| {md_cell(e.get('prompt', ''))} | {md_cell(e.get('completion', ''))} | {float(e.get('score', 0)):+.3f} |"
                    for e in eps[: self.n_samples]]
            writer.add_text("samples", "| prompt | completion | score |\n|---|---|---|\n" + "\n".join(rows), global_step)
        self.history.append({"iteration": iteration, "global_step": global_step, "time_s": now - self.start,
                             **{k.split("/", 1)[1]: v for k, v in stats.items()}})
        if self.print_every and (iteration % self.print_every == 0 or iteration == self.total_iterations):
            h = self.history[-1]
            kl = f"kl {h['kl']:6.2f} (coef {h.get('kl_coef', 0):.3f})" if "kl" in h else "kl    n/a"
            score = f"score {h['score_mean']:+7.3f}" if "score_mean" in h else "score     n/a"
            print(f"iter {iteration:4d}/{self.total_iterations} | {score} | {kl} | "
                  f"ent {h.get('entropy_sampled', float('nan')):5.2f} | d2 {h.get('distinct_2', float('nan')):.2f} | "
                  f"{h['tokens_per_second']:6.0f} tok/s | {now - self.start:6.1f}s", flush=True)
        self._warn(iteration)
        self.last = now
        return stats

    def state_dict(self) -> dict:
        """What a checkpoint keeps (`agents.ppo.train` saves it): the history, the warnings given so far and the
        training reward's memory."""
        state = {"history": self.history, "warnings": self.warnings, "warned": sorted(self._warned)}
        return state if self.reward_state is None else {**state, "reward": self.reward_state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue a resumed run's history (its clock too: `time_s` goes on from the checkpoint's last value)."""
        self.history, self.warnings = list(state["history"]), list(state["warnings"])
        self._warned = set(state["warned"])
        if self.reward_state is not None and "reward" in state:  # none saved: the run began without that term
            try:
                self.reward_state.load_state_dict(state["reward"])
            except ValueError as e:  # another setting than the checkpoint's (a window of another size): one line
                raise UsageError(str(e)) from None
        self.last = time.time()
        if self.history:
            self.start = self.last - self.history[-1]["time_s"]

    def _warn(self, iteration: int) -> None:
        """Print each kind of over-optimisation warning the first time it fires."""
        for kind, line in check(self.history, self.thresholds).items():
            if kind not in self._warned:
                self._warned.add(kind)
                self.warnings.append(line)
                print(f"warning: {line}", flush=True)
