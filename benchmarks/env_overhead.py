"""Environment overhead: what TextEnv itself costs per token step, next to a tiny GPT's decode step.

Measured side by side in one run (rounds interleaved, medians reported), at the seed recipe's shape
(queries of 2-8 tokens cut from IMDb reviews, responses of 4-16 tokens, batch 64):

- `TextEnv` (one env), `SyncVectorEnv` of 64 TextEnvs, and the batched `TextVectorEnv` (64 envs),
  each with a rule reward and with a small HF classifier reward (a DistilBERT from config);
- the decode step of a tiny GPT-2 (4 layers x 256, 4k vocabulary, as in DESIGN.md) with KV cache at
  batch 64, both raw (`model(token, cache=...)` + sampling) and through `textenv.lm.CachedLM`
  on the environment's own observations (the rollout path of `agents.gpt_policy`).

Texts and tokenizer come from the package (`textenv.build.data.load_texts`, `textenv.build.bpe.train_bpe`): a
seeded sample of IMDb train reviews when IMDb lies beside the repo (else the embedded corpus). Results written
before this used an every-k-th-review sample and a 2-special-token BPE: a slightly different vocabulary.

Target: the batched env adds <= 10% to the GPT decode step at batch 64.
Torch uses `--threads` (default 1, as `agents.ppo.Args.torch_threads`) threads.

    python benchmarks/env_overhead.py            # full run, writes benchmarks/results/env_overhead.json
    python benchmarks/env_overhead.py --quick    # a short smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import gymnasium as gym
import numpy as np
import torch
from _common import bench_texts, print_table, target, write_result
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from agents.gpt_policy import sample_categorical  # the policy's own sampler (inverse CDF)
from textenv import HFRewardModel, KeywordReward, TextEnv, TextVectorEnv
from textenv.build.bpe import train_bpe
from textenv.lm import CachedLM


class Timed:
    """A reward model that also adds up the seconds spent inside it (splits env bookkeeping from scoring)."""

    def __init__(self, reward_model) -> None:
        self.reward_model, self.seconds = reward_model, 0.0

    def __call__(self, texts: list[str]) -> list[float]:
        start = time.perf_counter()
        scores = self.reward_model(texts)
        self.seconds += time.perf_counter() - start
        return scores


def time_single(env: TextEnv, actions: np.ndarray) -> float:
    """Microseconds per step of one env (resets included, amortised)."""
    env.reset(seed=0)
    start = time.perf_counter()
    for a in actions:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    return (time.perf_counter() - start) / len(actions) * 1e6


def time_vector(envs: gym.vector.VectorEnv, actions: np.ndarray) -> float:
    """Microseconds per vector step (`actions` (T, E)); autoreset steps included."""
    envs.reset(seed=0)
    start = time.perf_counter()
    for a in actions:
        envs.step(a)
    return (time.perf_counter() - start) / len(actions) * 1e6


@torch.inference_mode()
def time_decode(model: GPT2LMHeadModel, batch: int, prompt: int, new: int, vocab: int) -> float:
    """Microseconds per KV-cached decode step at `batch` (prefill of `prompt` tokens not counted)."""
    ids = torch.randint(0, vocab, (batch, prompt))
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(new):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache = out.cache
        token = sample_categorical(torch.softmax(out.logits[:, -1, :vocab], dim=-1))[:, None]  # (B, 1)
    return (time.perf_counter() - start) / new * 1e6


@torch.inference_mode()
def time_cached_rollout(model: GPT2LMHeadModel, envs: TextVectorEnv, steps: int) -> tuple[float, float]:
    """(us per CachedLM step + sampling, us per env step) of a rollout driving `envs` with the GPT."""
    lm = CachedLM(model, envs.env.pad_token_id)
    obs, _ = envs.reset(seed=0)
    t_lm = t_env = 0.0
    n = envs.single_action_space.n
    for _ in range(steps):
        t0 = time.perf_counter()
        logits, _ = lm.step(torch.as_tensor(obs))
        actions = sample_categorical(torch.softmax(logits[:, :n], dim=-1)).numpy()
        t1 = time.perf_counter()
        obs, *_ = envs.step(actions)
        t_lm, t_env = t_lm + t1 - t0, t_env + time.perf_counter() - t1
    return t_lm / steps * 1e6, t_env / steps * 1e6


def parse_args() -> argparse.Namespace:
    """The command line: --quick, --batch, --rounds, --threads, --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--batch", type=int, default=64, help="vector env size = GPT decode batch")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (agents.ppo default: 1)")
    parser.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/env_overhead.json)"
    )
    return parser.parse_args()


def build_models(tok: PreTrainedTokenizerFast) -> tuple[dict[str, object], GPT2LMHeadModel]:
    """The two reward models ("rule" and a DistilBERT classifier from config) and the tiny GPT, on `tok`."""
    V = len(tok)
    classifier = DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=V, dim=128, hidden_dim=256, n_layers=2, n_heads=2, pad_token_id=tok.pad_token_id
        )
    )
    rewards = {"rule": KeywordReward(["great", "good", "love", "bad"]), "hf": HFRewardModel(classifier, tok)}
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=256, n_layer=4, n_head=4)).eval()
    return rewards, gpt


def build_envs(
    tok: PreTrainedTokenizerFast, texts: list[str], rewards: dict[str, object], E: int
) -> dict[str, tuple[object, Timed]]:
    """Every env timed (single, sync, batched; per reward), keyed as in the JSON, with its Timed reward."""
    # The seed recipe's episode shape: 2-8 token queries, 4-16 token responses.
    kw = dict(tokenizer=tok, prompts=texts, query_tokens=(2, 8), max_prompt_tokens=8, max_new_tokens=(4, 16))
    envs: dict[str, tuple[object, Timed]] = {}
    for name, rm in rewards.items():
        timed = Timed(rm)
        envs[f"single_{name}"] = (TextEnv(reward_model=timed, **kw), timed)
        envs[f"sync_{name}"] = (
            gym.vector.SyncVectorEnv([lambda t=timed: TextEnv(reward_model=t, **kw)] * E),
            timed,
        )
        envs[f"batched_{name}"] = (TextVectorEnv(E, reward_model=timed, **kw), timed)
    # All 64 responses 16 tokens long: they finish together, one reward call per 16 steps (as a batch scorer).
    timed = Timed(rewards["hf"])
    envs["batched_hf_fixed16"] = (
        TextVectorEnv(E, reward_model=timed, **(kw | {"max_new_tokens": 16})),
        timed,
    )
    return envs


def measure(
    gpt: GPT2LMHeadModel, envs: dict[str, tuple[object, Timed]], actions: np.ndarray, rounds: int, vocab: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-round us/step of every case (rounds interleaved) and, per env, the us/step in its reward model."""
    steps, E = actions.shape
    times: dict[str, list[float]] = {}
    scoring: dict[str, list[float]] = {}  # of which inside the reward model
    for _ in range(rounds):
        times.setdefault("gpt_decode", []).append(time_decode(gpt, E, 8, 16, vocab))
        for key, (env, timed) in envs.items():
            timed.seconds = 0.0
            if key.startswith("single"):
                n, us = 4 * steps, time_single(env, actions.reshape(-1)[: 4 * steps])
            else:
                n = steps // 4 if key.startswith("sync") else steps  # SyncVectorEnv is slow: fewer steps
                us = time_vector(env, actions[:n])
            times.setdefault(key, []).append(us)
            scoring.setdefault(key, []).append(timed.seconds / n * 1e6)
        lm_us, env_us = time_cached_rollout(gpt, envs["batched_rule"][0], steps // 2)
        times.setdefault("gpt_cachedlm_step", []).append(lm_us)
        times.setdefault("rollout_env_rule", []).append(env_us)
    return times, scoring


def medians(per_round: dict[str, list[float]]) -> dict[str, float]:
    """The median over rounds of each case."""
    return {k: statistics.median(v) for k, v in per_round.items()}


def case_results(
    times: dict[str, list[float]], med: dict[str, float], med_score: dict[str, float], E: int
) -> tuple[dict[str, dict], list[list]]:
    """Each case's JSON record and table row, with fractions of the GPT decode step for batch-E cases."""
    decode = med["gpt_decode"]
    records: dict[str, dict] = {}
    rows = []
    for key, label, batch in [
        ("gpt_decode", "tiny GPT decode step (KV cache, raw HF)", E),
        ("gpt_cachedlm_step", "tiny GPT step via CachedLM on env obs", E),
        ("single_rule", "TextEnv, rule reward", 1),
        ("single_hf", "TextEnv, HF classifier reward", 1),
        ("sync_rule", "SyncVectorEnv(TextEnv), rule reward", E),
        ("sync_hf", "SyncVectorEnv(TextEnv), HF classifier reward", E),
        ("batched_rule", "TextVectorEnv, rule reward", E),
        ("batched_hf", "TextVectorEnv, HF classifier reward", E),
        ("batched_hf_fixed16", "TextVectorEnv, HF reward, all responses 16 tokens", E),
        ("rollout_env_rule", "TextVectorEnv, rule reward, in a GPT rollout", E),
    ]:
        us, rm_us = med[key], med_score.get(key, 0.0)
        r = {"us_per_step": us, "us_per_token": us / batch, "batch": batch, "all_rounds_us": times[key]}
        if key in med_score:
            r |= {"reward_model_us_per_step": rm_us, "env_own_us_per_step": us - rm_us}
        if batch == E:
            r |= {"fraction_of_gpt_decode_step": us / decode}
            if key in med_score:
                r |= {"env_own_fraction_of_gpt_decode_step": (us - rm_us) / decode}
        records[key] = r
        pct = (lambda x: f"{100 * x / decode:.1f}%") if batch == E else (lambda x: "-")
        rows.append(
            [label, batch, round(us, 1), round(us / batch, 2), pct(us), round(us - rm_us, 1), pct(us - rm_us)]
        )
    return records, rows


def print_cases(rows: list[list]) -> None:
    """Print the table of every case: us per step and per token, with and without the reward model."""
    print_table(
        [
            "what",
            "batch",
            "us/step",
            "us/token",
            "vs GPT decode",
            "us/step w/o reward model",
            "vs GPT decode",
        ],
        rows,
    )


def overhead_targets(med: dict[str, float], med_score: dict[str, float]) -> list[dict]:
    """The batched env's cost, total and without the reward model, as a fraction of the GPT decode step."""
    decode = med["gpt_decode"]
    targets = []
    for r in ("rule", "hf"):
        total, own = med[f"batched_{r}"] / decode, (med[f"batched_{r}"] - med_score[f"batched_{r}"]) / decode
        targets.append(
            target(f"batched_env_{r}_fraction_of_gpt_decode_step", total, "<= 0.10", total <= 0.10)
        )
        targets.append(
            target(f"batched_env_{r}_own_cost_fraction_of_gpt_decode_step", own, "<= 0.10", own <= 0.10)
        )
    return targets


def main() -> None:
    """Build the models and envs, time them in rounds, print the table and targets, write the JSON."""
    args = parse_args()
    rounds = 2 if args.quick else args.rounds
    steps = 48 if args.quick else 160  # vector steps per round (x batch tokens)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    E = args.batch

    texts, text_source = bench_texts(1000 if args.quick else 5000)
    tok = train_bpe(texts)  # the project's byte-level BPE (4096 tokens), as the model factory trains it
    V = len(tok)
    rewards, gpt = build_models(tok)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, V, size=(steps, E))  # random tokens: EOS is rare, as in sampled text
    envs = build_envs(tok, texts, rewards, E)

    times, scoring = measure(gpt, envs, actions, rounds, V)
    med, med_score = medians(times), medians(scoring)
    results: dict = {
        "batch": E,
        "torch_threads": args.threads,
        "text_source": text_source,
        "vocab": V,
        "episode": "queries of 2-8 tokens, responses of 4-16 tokens (random tokens)",
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # other jobs on the machine inflate times
    }
    records, rows = case_results(times, med, med_score, E)
    results |= records
    print_cases(rows)
    targets = overhead_targets(med, med_score)
    path = write_result("env_overhead", results, targets, args.quick, args.out)
    for t in targets:
        print(f"{t['name']}: {t['value']:.3f} (target {t['target']}) {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
