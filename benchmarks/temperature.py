"""Sampling temperature before any RL: what the `smollm2` preset's starting policy writes at each T, against real
reviews of the same lengths.

For each temperature the warm-started SmolLM2 samples one response per held-out prompt through the report's env
(`agents.rlhf.report.evaluate_held_out`, the distribution PPO would train), and the row gives the reward model's and
the judge's positive rates, distinct-2, identical responses and the perplexity under the original LM (fluency), beside
the same measures of real held-out reviews cut to the same lengths (`agents.rlhf.yardstick`). A lower T trims the
tail a small LM's unreadable text comes from, and costs diversity: this table is where the preset's T is chosen.

`--min-p` adds min-p truncation on top of each temperature (Nguyen et al. 2024, https://arxiv.org/abs/2407.01082):
tokens whose tempered probability is below min_p times the most likely token's are dropped and the rest
renormalised. It trims the tail by how peaked each step is, so it is a candidate for diversity at a fluency that
temperature alone cannot reach; here it only samples (the rows say what it would start RL from), it is not a
policy option of the job.

    python benchmarks/temperature.py                      # T = 1, 0.8, 0.7, 0.6, 0.5; results/temperature.json
    python benchmarks/temperature.py --prompts 64 --temperatures 1 0.5 --out /tmp/t.json
    python benchmarks/temperature.py --temperatures 1 1.5 --min-p 0.05 0.1   # every T with every min-p
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass

import torch
import tyro
from _common import IMDB_DIR, print_table, target, write_result

from agents.gpt_policy import GPTAgent
from agents.rlhf import prepare
from agents.rlhf.config import smollm2
from agents.rlhf.job import held_out
from agents.rlhf.report import evaluate_held_out
from agents.rlhf.yardstick import yardstick
from agents.vector import resolve_device

KEYS = ("positive_rate_reward_model", "positive_rate_judge", "distinct_2", "identical_share", "original_perplexity")


@dataclass
class Args:
    temperatures: tuple[float, ...] = (1.0, 0.8, 0.7, 0.6, 0.5)
    """sampling temperatures to measure"""
    min_p: tuple[float, ...] = (0.0,)
    """min-p thresholds in [0, 1) to combine with every temperature (0: none)"""
    prompts: int = 256
    """held-out prompts (one response each per temperature)"""
    seed: int = 1
    """the prompts' and the sampling's seed"""
    data_dir: str = str(IMDB_DIR)
    """IMDb as gzipped JSON Lines"""
    out: str | None = None
    """JSON path (default benchmarks/results/temperature.json)"""


class MinPAgent(GPTAgent):
    """A `GPTAgent` that samples from its tempered distribution truncated by min-p (sampling only: its log-probs
    are of the truncated distribution, which no reference here is normalised to)."""

    def __init__(self, *args, min_p: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log_min_p = math.log(min_p)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super()._logits(hidden)
        return logits.masked_fill(logits < logits.amax(-1, keepdim=True) + self.log_min_p, float("-inf"))


def sampler(policy: torch.nn.Module, tokenizer, temperature: float, min_p: float) -> torch.nn.Module | GPTAgent:
    """What `evaluate_held_out` samples with: the LM itself, or a min-p agent over it."""
    if not 0 <= min_p < 1:
        raise SystemExit(f"--min-p {min_p} must be in [0, 1) (0: no truncation)")
    if not min_p:
        return policy
    return MinPAgent(policy, tokenizer.pad_token_id, len(tokenizer), temperature=temperature, min_p=min_p)


def main(a: Args) -> None:
    cfg = smollm2()
    cfg = dataclasses.replace(cfg, data_dir=a.data_dir, eval_prompts=a.prompts,
                              ppo=dataclasses.replace(cfg.ppo, seed=a.seed))
    pieces = prepare(cfg, resolve_device("cpu"))  # the preset's warm start, reward model and judge (cached)
    rows, real = [], None
    for t, min_p in itertools.product(a.temperatures, a.min_p):
        t0 = time.time()
        evaluation = held_out(dataclasses.replace(cfg, temperature=t), pieces)
        policy = sampler(pieces.policy, pieces.tokenizer, t, min_p)
        metrics, samples = evaluate_held_out(policy, pieces.policy, evaluation)
        real = real or yardstick(evaluation, samples)
        rows.append({"temperature": t, "min_p": min_p, **{k: metrics.get(k) for k in KEYS},
                     "seconds": time.time() - t0,
                     "examples": [p + c for p, c in zip(samples.prompts[:5], samples.completions[:5], strict=True)]})
    print_table(["T", "min-p", *KEYS], [[r["temperature"], r["min_p"], *(r[k] for k in KEYS)] for r in rows]
                + [["real reviews", "", *(real.get(k) for k in KEYS)]])
    d2 = real["distinct_2"]
    names = [f"distinct_2_ratio_to_real_at_T{r['temperature']:g}" + (f"_min_p{r['min_p']:g}" if r["min_p"] else "")
             for r in rows]
    targets = [target(name, r["distinct_2"] / d2, ">= 0.8", r["distinct_2"] >= 0.8 * d2)
               for name, r in zip(names, rows, strict=True)]
    path = write_result("temperature", {"rows": rows, "real_reviews": real, "prompts": a.prompts,
                                        "policy": pieces.info.get("warm_start", {}).get("path")},
                        targets, quick=False, out=a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
