"""Rollout throughput: TextEnv + GPTAgent (KV-cached, one token per env step) vs HF `generate` vs naive.

Generated tokens per second of the same GPT-2-architecture model on the same prompts, in one run, in two
scenarios:

- `realistic` (the headline): response lengths drawn uniformly in `--min-tokens`..`--new-tokens` per episode,
  so episodes end at different times. The env (`max_new_tokens=(lo, hi)`) is stepped continuously: each row
  resets on its own (its next-step autoreset step costs an agent call and yields no token), and the agent's
  cache is dropped every `new_tokens + 1` steps, as PPO drops it after each update (the next step re-prefills
  every row mid-episode). `generate` gets the same length distribution: a logits processor forces EOS at each
  row's drawn length, and, as `generate` does, the batch runs until its longest row ends. Tokens counted are
  the responses' tokens (EOS included), never the padding after a finished row.
- `best case` (the old headline): every episode is exactly `--new-tokens` long and all rows reset on the same
  step (`min_new_tokens` = max, so EOS does not end it early).

Methods:
- `textenv+gptagent`: `TextVectorEnv` stepped by `GPTAgent.get_action_and_value` under no_grad, exactly as the
  PPO rollout drives it (obs -> tensor, sample, `envs.step`), counting the tokens of valid (non-autoreset) steps.
- `gptagent (no env)` (best case only): the same agent loop with the env replaced by a tensor shift.
- `textenv, padded re-prefill` (realistic only): the same, with the batch re-encoded after each cache drop in
  one forward padded to its longest row, as before `CachedLM` grouped rows by length (a before/after number).
- `hf generate`: `model.generate` with KV cache, pure sampling (do_sample, top_k=0, temperature 1).
- `naive recompute`: re-encodes the whole prefix for every token, computes the logits of the last position
  only and samples as the agent does (`agents.gpt_policy.sample_categorical`): what a token-step env costs without an
  agent-side cache, done reasonably.

The machine is shared and noisy: each round times all methods back to back (order alternating), and the
targets use the median over rounds of the per-round ratios. Both wall-clock and CPU-time (process time) rates
are reported: when other jobs share the cores, CPU time measures each method's own work far more steadily.

    python benchmarks/rollout.py                      # CPU: 4 layers x 256, 4k vocab, batch 64, 8 + 4..16 tokens
    python benchmarks/rollout.py --device cuda --dtype bf16 --preset gpt2-small --batch 256
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from _common import bench_texts, print_table, target, write_result
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
)

from agents.gpt_policy import GPTAgent, sample_categorical
from textenv.lm import split_lm
from textenv.vector import TextVectorEnv

PRESETS = {  # (n_layer, n_embd, n_head, vocab)
    "small": (4, 256, 4, 4096),  # DESIGN.md's CPU reference model (4.2M parameters)
    "gpt2-small": (12, 768, 12, 50257),  # GPT-2 124M shape
    "tiny": (1, 32, 2, 300),  # smoke runs
}


@dataclass
class Args:
    preset: str = "small"
    """model shape: "small" (4 layers x 256, 4k vocab) or "gpt2-small" (12 x 768, 50k vocab)"""
    batch: int = 64
    """prompts per batch (= num_envs)"""
    prompt_tokens: int = 8
    """tokens per prompt"""
    new_tokens: int = 16
    """generated tokens per episode (best case; the realistic scenario's longest response)"""
    min_tokens: int = 4
    """the realistic scenario's shortest response"""
    episodes: int = 1
    """batches of episodes per method per round (realistic env: episodes x (new_tokens + 1) vector steps)"""
    rounds: int = 12
    """timing rounds (all methods back to back in each)"""
    threads: int = 1
    """torch CPU threads for every method (0 = torch's default). 1 by default: on a 2-core machine shared with
    other jobs, 2 threads make every method slower and far noisier (OpenMP workers spin against the others)"""
    device: str = "cpu"
    """torch device"""
    dtype: str = "float32"
    """"float32" or "bf16" (autocast, the same for every method)"""
    quick: bool = False
    """smoke run: 1 episode batch, 2 rounds"""
    out: str | None = None
    """JSON path (default benchmarks/results/rollout[-gpu].json)"""


def tokenizer(vocab: int, limit: int = 3000):
    """A byte-level BPE of `vocab` tokens trained on `limit` IMDb reviews when present, else on the embedded
    corpus; returns (tokenizer, texts, a line saying which texts, fillers). When the texts give fewer merges
    than `vocab` (the embedded corpus for GPT-2's 50k), `fillers` plain tokens `<fill_i>` bring it to `vocab`:
    the model keeps the preset's shape, and its output layer the cost it has in real use."""
    from textenv.build.bpe import train_bpe

    texts, source = bench_texts(limit)
    tok = train_bpe(texts, vocab_size=vocab)
    fillers = max(0, vocab - len(tok))
    if fillers:
        tok.add_tokens([f"<fill_{i}>" for i in range(fillers)])
    return tok, texts, source, fillers


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a timer measures it; nothing on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(args: Args):
    dtype = torch.bfloat16 if args.dtype in ("bf16", "bfloat16") else None
    return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


class EndAt(LogitsProcessor):
    """Logits processor: EOS is the only choice at each row's drawn response length (realistic lengths from a
    model that has not learnt to stop)."""

    def __init__(self, prompt_tokens: int, lengths: torch.Tensor, eos: int) -> None:
        self.prompt_tokens, self.lengths, self.eos = prompt_tokens, lengths, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # (B,) the next token is the row's last
        last = self.lengths == input_ids.shape[1] - self.prompt_tokens + 1
        forced = torch.full_like(scores[:1], -float("inf"))
        forced[:, self.eos] = 0.0
        return torch.where(last[:, None], forced, scores)


def response_tokens(out: torch.Tensor, prompt_tokens: int, eos: int) -> int:
    """Tokens of each row's response up to and including its first EOS (the rest is padding)."""
    gen = out[:, prompt_tokens:]  # (B, N)
    is_eos = gen == eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, gen.shape[1])
    return int(first.sum())


def env_loop(agent: GPTAgent, envs: TextVectorEnv, episodes: int, args: Args) -> int:
    """Best case: PPO's rollout loop from a reset of every env; one get_action_and_value per vector step."""
    next_obs, _ = envs.reset(seed=0)
    tokens, ended = 0, np.zeros(envs.num_envs, dtype=bool)
    for _ in range(episodes * (args.new_tokens + 1)):  # +1: the NEXT_STEP autoreset step of each episode
        obs = torch.as_tensor(next_obs).to(args.device, non_blocking=True)
        with torch.no_grad():
            action, _, _, _ = agent.get_action_and_value(obs)
        next_obs, _, terminated, truncated, _ = envs.step(action.cpu().numpy())
        tokens += int((~ended).sum())  # the step after an episode end only resets: no token
        ended = terminated | truncated
    agent.reset_cache()
    return tokens


class EnvStream:
    """Realistic: the env keeps running between calls (rows end and reset independently). An agent built with
    `group_lengths=False` re-encodes the mid-episode batch after each cache drop in one padded forward."""

    def __init__(self, agent: GPTAgent, envs: TextVectorEnv, args: Args) -> None:
        self.agent, self.envs, self.args = agent, envs, args
        self.obs, _ = envs.reset(seed=1)
        self.ended = np.zeros(envs.num_envs, dtype=bool)

    def __call__(self, episodes: int) -> int:
        tokens = 0
        for _ in range(episodes * (self.args.new_tokens + 1)):
            obs = torch.as_tensor(self.obs).to(self.args.device, non_blocking=True)
            with torch.no_grad():
                action = self.agent.get_action_and_value(obs)[0]
            self.obs, _, terminated, truncated, _ = self.envs.step(action.cpu().numpy())
            tokens += int((~self.ended).sum())
            self.ended = terminated | truncated
        self.agent.reset_cache()  # as PPO after each update: the next call re-prefills every row mid-episode
        return tokens


def agent_loop(agent: GPTAgent, prompts: torch.Tensor, episodes: int, args: Args) -> int:
    """The agent alone: the env replaced by a tensor shift (prompt window + new tokens, left-padded)."""
    B, P = prompts.shape
    window = P + args.new_tokens
    for _ in range(episodes):
        obs = torch.full((B, window), agent.pad_token_id, dtype=torch.long, device=args.device)
        obs[:, -P:] = prompts
        for _ in range(args.new_tokens):
            with torch.no_grad():
                action = agent.get_action_and_value(obs)[0]
            obs = torch.cat([obs[:, 1:], action[:, None]], dim=1)
    agent.reset_cache()
    return episodes * B * args.new_tokens


def draw_lengths(args: Args, batch: int) -> torch.Tensor:
    """Response lengths uniform in min_tokens..new_tokens, as the env draws its budgets."""
    return torch.randint(args.min_tokens, args.new_tokens + 1, (batch,), device=args.device)


def generate_loop(model: GPT2LMHeadModel, prompts: torch.Tensor, episodes: int, args: Args, pad: int,
                  realistic: bool) -> int:  # fmt: skip
    B, P = prompts.shape
    eos, tokens = model.config.eos_token_id, 0
    for _ in range(episodes):
        lengths = draw_lengths(args, B) if realistic else None
        extra = {"logits_processor": LogitsProcessorList([EndAt(P, lengths, eos)])} if realistic else {}
        with torch.no_grad(), autocast(args):
            out = model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                top_p=1.0, temperature=1.0, min_new_tokens=0 if realistic else args.new_tokens,
                max_new_tokens=args.new_tokens, pad_token_id=pad, eos_token_id=eos, **extra,
            )  # fmt: skip
        tokens += response_tokens(out, P, eos) if realistic else B * args.new_tokens
        assert realistic or out.shape[1] == P + args.new_tokens
    return tokens


def naive_loop(model: GPT2LMHeadModel, prompts: torch.Tensor, episodes: int, args: Args,
               realistic: bool) -> int:  # fmt: skip
    base, head = split_lm(model)
    tokens = 0
    for _ in range(episodes):
        lengths = draw_lengths(args, prompts.shape[0]) if realistic else None
        ids = prompts
        steps = int(lengths.max()) if realistic else args.new_tokens  # runs until the longest row ends
        for _ in range(steps):
            with torch.no_grad(), autocast(args):
                hidden = base(input_ids=ids).last_hidden_state[:, -1]  # (B, C): the whole prefix again
                logits = head(hidden).float()  # (B, V): the last position only
            action = sample_categorical(torch.softmax(logits, -1))
            ids = torch.cat([ids, action[:, None]], dim=1)
        tokens += int(lengths.sum()) if realistic else prompts.shape[0] * args.new_tokens
    return tokens


def zero_reward(texts: list[str]) -> list[float]:
    """A reward model that scores nothing: the benchmark times generation, not scoring."""
    return [0.0] * len(texts)


def build_model(tok: PreTrainedTokenizerFast, args: Args) -> GPT2LMHeadModel:
    """The preset's GPT-2-architecture model on `tok`'s vocabulary (seeded), on `args.device`, for eval."""
    n_layer, n_embd, n_head, _ = PRESETS[args.preset]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    return GPT2LMHeadModel(cfg).to(args.device).eval()


def build_methods(model: GPT2LMHeadModel, tok: PreTrainedTokenizerFast, texts: list[str],
                  args: Args) -> dict[tuple[str, str], Callable[[int], int]]:  # fmt: skip
    """Every (scenario, method) timed, each a function that runs n episode batches and returns its tokens."""
    pad, vocab = tok.pad_token_id, len(tok)
    agent = GPTAgent(model, pad, vocab_size=vocab, dtype=args.dtype)
    P, N = args.prompt_tokens, args.new_tokens
    common = dict(tokenizer=tok, reward_model=zero_reward, prompts=texts, max_prompt_tokens=P,
                  query_tokens=(P, P))  # fmt: skip
    envs = TextVectorEnv(args.batch, max_new_tokens=N, min_new_tokens=N, **common)
    stream = EnvStream(agent, TextVectorEnv(args.batch, max_new_tokens=(args.min_tokens, N), **common), args)
    padded = EnvStream(GPTAgent(model, pad, vocab_size=vocab, dtype=args.dtype, group_lengths=False),
                       TextVectorEnv(args.batch, max_new_tokens=(args.min_tokens, N), **common), args)
    first, _ = envs.reset(seed=0)  # the same prompts for every method
    prompts = torch.as_tensor(first[:, -P:]).to(args.device)
    assert (prompts != pad).all(), "prompts must be exactly --prompt-tokens long"
    return {
        ("realistic", "textenv+gptagent"): stream,
        ("realistic", "textenv, padded re-prefill"): padded,
        ("realistic", "hf generate"): lambda n: generate_loop(model, prompts, n, args, pad, True),
        ("realistic", "naive recompute"): lambda n: naive_loop(model, prompts, n, args, True),
        ("best case", "textenv+gptagent"): lambda n: env_loop(agent, envs, n, args),
        ("best case", "gptagent (no env)"): lambda n: agent_loop(agent, prompts, n, args),
        ("best case", "hf generate"): lambda n: generate_loop(model, prompts, n, args, pad, False),
        ("best case", "naive recompute"): lambda n: naive_loop(model, prompts, n, args, False),
    }


def time_rounds(methods: dict[tuple[str, str], Callable[[int], int]],
                args: Args) -> tuple[dict[tuple, list[float]], dict[tuple, list[float]]]:  # fmt: skip
    """Wall-clock and CPU-time tokens/s of every method per round (all back to back, order alternating)."""
    rates: dict[tuple, list[float]] = {k: [] for k in methods}  # wall-clock tokens/s per round
    cpu_rates: dict[tuple, list[float]] = {k: [] for k in methods}  # tokens per CPU-second per round
    for r in range(args.rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for key in order:
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = methods[key](args.episodes)
            sync(args.device)
            rates[key].append(tokens / (time.perf_counter() - t0))
            cpu_rates[key].append(tokens / (time.process_time() - c0))
        print(f"round {r + 1}/{args.rounds}: "
              + ", ".join(f"{s}/{m} {v[-1]:.0f}" for (s, m), v in rates.items()))  # fmt: skip
    return rates, cpu_rates


def ratio(table: dict, scenario: str, other: str, ours: str = "textenv+gptagent") -> float:
    """Median over rounds of ours / other, both timed in the same round."""
    return statistics.median(np.array(table[(scenario, ours)]) / np.array(table[(scenario, other)]))


def print_rates(rates: dict[tuple, list[float]], cpu_rates: dict[tuple, list[float]]) -> None:
    """Print each method's tokens/s (median, min, max; and per CPU-second), and its ratio to `generate`."""
    rows = [[s, m, statistics.median(v), min(v), max(v), ratio(rates, s, "hf generate", m),
             statistics.median(cpu_rates[(s, m)]), ratio(cpu_rates, s, "hf generate", m)]
            for (s, m), v in rates.items()]  # fmt: skip
    headers = ["scenario", "method", "tokens/s (median)", "min", "max", "x generate", "tokens/cpu-s",
               "x generate (cpu)"]  # fmt: skip
    print_table(headers, rows)


def rollout_targets(rates: dict[tuple, list[float]], cpu_rates: dict[tuple, list[float]],
                    gpu: bool) -> list[dict]:  # fmt: skip
    """The targets: ours against `generate` (both scenarios) and, on CPU, against naive recompute."""
    targets = []
    for clock, table in (("wall", rates), ("cpu_time", cpu_rates)):
        if gpu and clock == "cpu_time":
            continue
        v = ratio(table, "realistic", "hf generate")
        targets.append(target(f"realistic_tokens_per_s_ratio_vs_generate_{clock}", round(v, 3), ">= 1.0",
                              v >= 1.0))  # fmt: skip
        want = 1.0 if gpu else 0.8
        v = ratio(table, "best case", "hf generate")
        targets.append(target(f"best_case_tokens_per_s_ratio_vs_generate_{clock}", round(v, 3), f">= {want}",
                              v >= want))  # fmt: skip
        if not gpu:
            v = ratio(table, "best case", "naive recompute")
            targets.append(target(f"best_case_tokens_per_s_ratio_vs_naive_last_logits_{clock}", round(v, 2),
                                  ">= 3.0", v >= 3.0))  # fmt: skip
    return targets


def scenario_results(rates: dict[tuple, list[float]], cpu_rates: dict[tuple, list[float]]) -> dict[str, dict]:
    """The JSON record of each scenario: per-round and median rates of every method, and their ratios."""
    scenarios = {}
    for scenario in ("realistic", "best case"):
        keys = [k for k in rates if k[0] == scenario]
        scenarios[scenario] = {
            "tokens_per_s": {m: [round(x, 1) for x in rates[(s, m)]] for s, m in keys},
            "median_tokens_per_s": {m: round(statistics.median(rates[(s, m)]), 1) for s, m in keys},
            "tokens_per_cpu_s": {m: [round(x, 1) for x in cpu_rates[(s, m)]] for s, m in keys},
            "median_tokens_per_cpu_s": {m: round(statistics.median(cpu_rates[(s, m)]), 1) for s, m in keys},
            "ratio_vs_generate": {"wall": round(ratio(rates, scenario, "hf generate"), 3),
                                  "cpu_time": round(ratio(cpu_rates, scenario, "hf generate"), 3)},
            "ratio_vs_generate_by_method": {m: round(ratio(rates, s, "hf generate", m), 3) for s, m in keys},
            "ratio_vs_naive": {"wall": round(ratio(rates, scenario, "naive recompute"), 2),
                               "cpu_time": round(ratio(cpu_rates, scenario, "naive recompute"), 2)},
        }  # fmt: skip
    return scenarios


def main(args: Args) -> None:
    """Build the model and every method, time them in rounds, print the table and targets, write the JSON."""
    if args.quick:
        args.episodes, args.rounds = 1, 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    n_layer, n_embd, _, vocab = PRESETS[args.preset]
    tok, texts, source, fillers = tokenizer(vocab)
    vocab = len(tok)
    model = build_model(tok, args)
    methods = build_methods(model, tok, texts, args)

    for fn in methods.values():  # warm-up (allocator, autocast caches, lazy imports)
        fn(1)
    load_before = os.getloadavg()[0]  # the CPU is shared: say how busy it was
    rates, cpu_rates = time_rounds(methods, args)

    print_rates(rates, cpu_rates)
    targets = rollout_targets(rates, cpu_rates, args.device.startswith("cuda"))
    for t in targets:
        print(f"target {t['name']}: {t['value']} (want {t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    results = {
        "model": {"preset": args.preset, "n_layer": n_layer, "n_embd": n_embd, "vocab": vocab,
                  "filler_tokens": fillers, "parameters": sum(p.numel() for p in model.parameters())},
        "texts": source, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "realistic_tokens": [args.min_tokens, args.new_tokens],
        "episodes_per_round": args.episodes, "rounds": args.rounds, "device": args.device,
        "dtype": args.dtype, "threads": torch.get_num_threads(),
        "scenarios": scenario_results(rates, cpu_rates),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }  # fmt: skip
    print(f"wrote {write_result('rollout', results, targets, args.quick, args.out)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
