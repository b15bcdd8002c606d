"""Rollout throughput: TextEnv + GPTAgent (KV-cached, one token per env step) vs HF `generate` vs naive.

Generated tokens per second of the same GPT-2-architecture model on the same prompts, in one run:

- `textenv+gptagent`: `TextVectorEnv` stepped by `GPTAgent.get_action_and_value` under no_grad, exactly as the
  PPO rollout drives it (obs -> tensor, sample, `envs.step`), counting the tokens of valid (non-autoreset) steps.
- `gptagent (no env)`: the same agent loop with the env replaced by a tensor shift: the agent's own cost.
- `hf generate`: `model.generate` with KV cache, pure sampling (do_sample, top_k=0, temperature 1) and a fixed
  number of new tokens (min = max), as the seed recipe samples.
- `naive recompute`: a loop that re-encodes the whole prefix for every token (what a token-step env costs
  without an agent-side cache).

Every episode generates exactly `--new-tokens` tokens (`min_new_tokens` = max, so EOS does not end it early).
The machine is shared and noisy: each round times all methods back to back (order alternating), and the
targets use the median over rounds of the per-round ratios. Both wall-clock and CPU-time (process time) rates
are reported: when other jobs share the cores, CPU time measures each method's own work far more steadily.

    python benchmarks/rollout.py                      # CPU: 4 layers x 256, 4k vocab, batch 64, 8 + 16 tokens
    python benchmarks/rollout.py --device cuda --dtype bf16 --preset gpt2-small --batch 256
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from _common import bench_texts, print_table, target, write_result
from transformers import GPT2Config, GPT2LMHeadModel

from agents.gpt_policy import GPTAgent
from textenv.lm_cache import forward_full
from textenv.vector import TextVectorEnv

PRESETS = {  # (n_layer, n_embd, n_head, vocab)
    "small": (4, 256, 4, 4096),  # DESIGN.md's CPU reference model (4.2M parameters)
    "gpt2-small": (12, 768, 12, 50257),  # GPT-2 124M shape
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
    """generated tokens per episode"""
    episodes: int = 1
    """batches of episodes per method per round"""
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


def tokenizer(vocab: int):
    """A byte-level BPE of `vocab` tokens, trained on IMDb when present, else on the embedded corpus."""
    from textenv.build.bpe import train_bpe

    texts, _ = bench_texts(3000)
    return train_bpe(texts, vocab_size=vocab), texts


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def env_loop(agent: GPTAgent, envs: TextVectorEnv, episodes: int, args: Args) -> int:
    """PPO's rollout loop: one get_action_and_value per vector step. Returns tokens generated."""
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


def generate_loop(model: GPT2LMHeadModel, prompts: torch.Tensor, episodes: int, args: Args, pad: int) -> int:
    for _ in range(episodes):
        with torch.no_grad(), autocast(args):
            out = model.generate(
                input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0, top_p=1.0,
                temperature=1.0, min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens, pad_token_id=pad,
            )  # fmt: skip
        assert out.shape[1] == prompts.shape[1] + args.new_tokens
    return episodes * prompts.shape[0] * args.new_tokens


def naive_loop(model: GPT2LMHeadModel, prompts: torch.Tensor, episodes: int, args: Args, pad: int) -> int:
    for _ in range(episodes):
        ids = prompts
        for _ in range(args.new_tokens):
            with torch.no_grad(), autocast(args):
                logits = forward_full(model, ids, pad)[0][:, -1]  # the whole prefix again, every token
            action = torch.multinomial(torch.softmax(logits.float(), -1), 1)
            ids = torch.cat([ids, action], dim=1)
    return episodes * prompts.shape[0] * args.new_tokens


def autocast(args: Args):
    dtype = torch.bfloat16 if args.dtype in ("bf16", "bfloat16") else None
    return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


def main(args: Args) -> None:
    if args.quick:
        args.episodes, args.rounds = 1, 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    n_layer, n_embd, n_head, vocab = PRESETS[args.preset]
    tok, texts = tokenizer(vocab)
    vocab = len(tok)  # the embedded corpus may give fewer merges than asked
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    model = GPT2LMHeadModel(cfg).to(args.device).eval()
    pad = tok.pad_token_id
    agent = GPTAgent(model, pad, vocab_size=vocab, dtype=args.dtype)

    def zero_reward(texts: list[str]) -> list[float]:
        return [0.0] * len(texts)

    envs = TextVectorEnv(args.batch, tokenizer=tok, reward_model=zero_reward, prompts=texts,
                         max_prompt_tokens=args.prompt_tokens, max_new_tokens=args.new_tokens,
                         min_new_tokens=args.new_tokens, query_tokens=(args.prompt_tokens, args.prompt_tokens))  # fmt: skip
    first, _ = envs.reset(seed=0)  # the same prompts for every method
    prompts = torch.as_tensor(first[:, -args.prompt_tokens :]).to(args.device)
    assert (prompts != pad).all(), "prompts must be exactly --prompt-tokens long"

    methods = {
        "textenv+gptagent": lambda n: env_loop(agent, envs, n, args),
        "gptagent (no env)": lambda n: agent_loop(agent, prompts, n, args),
        "hf generate": lambda n: generate_loop(model, prompts, n, args, pad),
        "naive recompute": lambda n: naive_loop(model, prompts, n, args, pad),
    }
    for fn in methods.values():  # warm-up (allocator, autocast caches, lazy imports)
        fn(1)
    rates: dict[str, list[float]] = {k: [] for k in methods}  # wall-clock tokens/s per round
    cpu_rates: dict[str, list[float]] = {k: [] for k in methods}  # tokens per CPU-second per round
    load_before = os.getloadavg()[0]  # the CPU is shared: say how busy it was
    for r in range(args.rounds):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            tokens = methods[name](args.episodes)
            sync(args.device)
            rates[name].append(tokens / (time.perf_counter() - t0))
            cpu_rates[name].append(tokens / (time.process_time() - c0))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))

    def ratio(table: dict[str, list[float]], other: str, ours: str = "textenv+gptagent") -> float:
        """Median over rounds of ours / other, both timed in the same round."""
        return statistics.median(np.array(table[ours]) / np.array(table[other]))

    rows = [[k, statistics.median(v), min(v), max(v), ratio(rates, "hf generate", k),
             statistics.median(cpu_rates[k]), ratio(cpu_rates, "hf generate", k)] for k, v in rates.items()]  # fmt: skip
    headers = ["method", "tokens/s (median)", "min", "max", "x generate", "tokens/cpu-s", "x generate (cpu)"]
    print_table(headers, rows)
    gpu = args.device.startswith("cuda")
    want = 1.0 if gpu else 0.8
    targets = []
    for clock, table in (("wall", rates), ("cpu_time", cpu_rates)):
        if gpu and clock == "cpu_time":
            continue
        vs_gen, vs_naive = ratio(table, "hf generate"), ratio(table, "naive recompute")
        targets.append(
            target(f"tokens_per_s_ratio_vs_generate_{clock}", round(vs_gen, 3), f">= {want}", vs_gen >= want)
        )
        if not gpu:
            targets.append(
                target(f"tokens_per_s_ratio_vs_naive_{clock}", round(vs_naive, 2), ">= 3.0", vs_naive >= 3.0)
            )
    for t in targets:
        print(f"target {t['name']}: {t['value']} (want {t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    results = {
        "model": {"preset": args.preset, "n_layer": n_layer, "n_embd": n_embd, "vocab": vocab,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "episodes_per_round": args.episodes, "rounds": args.rounds, "device": args.device, "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "tokens_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "median_tokens_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
        "tokens_per_cpu_s": {k: [round(x, 1) for x in v] for k, v in cpu_rates.items()},
        "median_tokens_per_cpu_s": {k: round(statistics.median(v), 1) for k, v in cpu_rates.items()},
        "ratio_vs_generate": {"wall": round(ratio(rates, "hf generate"), 3),
                              "cpu_time": round(ratio(cpu_rates, "hf generate"), 3)},
        "ratio_vs_naive": {"wall": round(ratio(rates, "naive recompute"), 2),
                           "cpu_time": round(ratio(cpu_rates, "naive recompute"), 2)},
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }  # fmt: skip
    print(f"wrote {write_result('rollout', results, targets, args.quick, args.out)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
