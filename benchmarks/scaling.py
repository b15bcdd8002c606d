"""Data-parallel scaling of `agents.ppo`: steps per second with 1 and 2 processes (torchrun, gloo / NCCL).

Weak scaling, as data-parallel PPO is used: every process keeps the same rollout (`num_envs` x `num_steps`) and
iteration count, so 2 processes collect and train on twice the batch; speedup = steps/s(2) / steps/s(1),
efficiency = speedup / 2. Workloads:

- `cartpole`: CartPole-v1, `MLPAgent`, the zoo preset's shapes (8 envs x 32 steps per process, 20 epochs).
- `textenv`: the embedded RLHF job's shapes with a rule reward: `TextVectorEnv` (64 envs x 34 steps per process,
  char tokenizer, keyword reward, 4-16 new tokens), a GPT-2 of 4 layers x 128 (`GPTAgent`, KV cache, 4 minibatches
  of env columns, 4 epochs), the per-token KL penalty to a frozen reference copy (`RefLogprob`), gamma 1.

One process runs with no launcher (`python benchmarks/scaling.py --worker ...`), two under
`torchrun --standalone --nproc-per-node 2`; each process uses 1 torch thread. The machine may be shared: each
round runs every configuration back to back (order alternating), medians over rounds are reported, plus CPU time
per 1k steps summed over the processes (what the work itself costs, steadier than wall time under load) and the
load average. `cpu_efficiency` = CPU per step with 1 process / CPU per step with 2 (1.0: distribution adds no
work); on otherwise idle cores, wall-clock speedup ~= 2 x cpu_efficiency.

    python benchmarks/scaling.py                     # CPU, 3 rounds
    python benchmarks/scaling.py --quick             # 1 round, shorter runs
    python benchmarks/scaling.py --device cuda --nproc 1 2 4 8   # GPUs: one per process (NCCL)
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "SCALING_RESULT "


@dataclass
class Args:
    workloads: tuple[str, ...] = ("cartpole", "textenv")
    """which runs to time"""
    nproc: tuple[int, ...] = (1, 2)
    """process counts (1 = no launcher)"""
    rounds: int = 3
    """timing rounds (every configuration once per round)"""
    device: str = "cpu"
    """`cpu` or `cuda` (one GPU per process)"""
    quick: bool = False
    """smoke run: 1 round, fewer iterations"""
    out: str | None = None
    """JSON path (default benchmarks/results/scaling[-gpu].json)"""
    worker: str | None = None
    """internal: run one workload in this process (under torchrun or not) and print its numbers"""
    iterations: int = 0
    """internal: PPO iterations of the worker (0 = the workload's default)"""


ITERATIONS = {"cartpole": (60, 12), "textenv": (6, 2)}  # (full, quick)


def textenv_setup(device: str):
    """The tiny RLHF-style pieces: env with reference log-probs, GPT agent, PPO args (per process)."""
    import copy

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from agents.gpt_policy import GPTAgent
    from agents.ppo import Args as PPOArgs
    from textenv import KeywordReward, RefLogprob, TextVectorEnv, char_tokenizer

    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz .")
    torch.manual_seed(0)
    # the embedded RLHF job's policy shape ("mini": 4 layers x 128, a 1k vocabulary; the env uses its first ids)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_positions=32, n_embd=128, n_layer=4, n_head=4,
                                    bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    reference = copy.deepcopy(lm).eval().requires_grad_(False)
    prompts = ["the movie", "this film", "a story", "i think", "the actors", "it was"]
    envs = TextVectorEnv(64, tokenizer=tok, reward_model=KeywordReward(["good", "great"]), prompts=prompts,
                         max_prompt_tokens=10, max_new_tokens=16, min_new_tokens=4)
    envs = RefLogprob(envs, reference, pad_token_id=tok.pad_token_id, device=device)
    agent = GPTAgent(lm, tok.pad_token_id, len(tok), device=device)
    args = PPOArgs(num_envs=64, num_steps=34, num_minibatches=4, update_epochs=4, learning_rate=5e-5, gamma=1.0,
                   gae_lambda=0.95, vf_coef=0.1, ent_coef=0.0, max_grad_norm=1.0, minibatch_by_env=True,
                   bootstrap_truncated=False, kl_coef=0.2, kl_target=6.0, kl_horizon=1000, anneal_lr=False)
    return envs, agent, args


def run_worker(args: Args) -> None:
    """One process of one configuration: train, then print this rank's wall/CPU time as a JSON line."""
    import dataclasses

    import torch

    from agents import distributed
    from agents.ppo import Args as PPOArgs
    from agents.ppo import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    n_iter = args.iterations or ITERATIONS[args.worker][args.quick]
    if args.worker == "cartpole":
        envs, agent = None, None
        ppo = dataclasses.replace(PPOArgs(), num_envs=8, num_steps=32, num_minibatches=1, update_epochs=20,
                                  gamma=0.98, gae_lambda=0.8, learning_rate=1e-3, ent_coef=0.0, clip_vloss=False)
    else:  # under torchrun on GPUs, build on this rank's GPU
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device == "cuda" else args.device
        envs, agent, ppo = textenv_setup(device)
    ppo = dataclasses.replace(ppo, total_timesteps=n_iter * ppo.num_envs * ppo.num_steps * world, eval_episodes=0,
                              save_every=0, log_every=0, torch_threads=1, device=args.device, seed=1,
                              run_dir=tempfile.mkdtemp(prefix="scaling-"))
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(ppo, envs=envs, agent=agent)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    line = MARK + json.dumps({"rank": result["rank"], "world": world, "steps": result["global_step"],
                              "sps": result["sps"], "wall_s": wall, "cpu_s": cpu})
    sys.stdout.flush()
    os.write(1, (line + "\n").encode())  # one write: the ranks share the pipe, a print() may interleave
    distributed.exit_worker(0)


def launch(workload: str, nproc: int, args: Args) -> dict:
    """Run one configuration in fresh processes; returns steps/s and CPU seconds per 1k steps (all ranks)."""
    worker = [str(Path(__file__).resolve()), "--worker", workload, "--device", args.device]
    worker += ["--quick"] if args.quick else []
    cmd = [sys.executable] + worker if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] + worker
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(m) for m in re.findall(MARK + r"(\{[^{}]*\})", run.stdout)]
    if run.returncode != 0 or len(rows) != nproc:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    steps = rows[0]["steps"]
    return {"sps": rows[0]["sps"], "cpu_s_per_1k_steps": 1000 * sum(r["cpu_s"] for r in rows) / steps,
            "wall_s": max(r["wall_s"] for r in rows), "steps": steps}


def main() -> None:
    import tyro

    args = tyro.cli(Args, description=__doc__)
    if args.worker:
        return run_worker(args)
    from _common import machine_info, print_table, target, write_result

    rounds = 1 if args.quick else args.rounds
    samples: dict[tuple[str, int], list[dict]] = {(w, n): [] for w in args.workloads for n in args.nproc}
    loads = [os.getloadavg()[0]]
    for r in range(rounds):
        order = list(samples) if r % 2 == 0 else list(reversed(samples))
        for w, n in order:
            samples[(w, n)].append(launch(w, n, args))
            s = samples[(w, n)][-1]
            print(f"round {r + 1}/{rounds} {w} x{n}: {s['sps']:.0f} steps/s, "
                  f"{s['cpu_s_per_1k_steps']:.2f} CPU s / 1k steps (load {os.getloadavg()[0]:.1f})", flush=True)
            loads.append(os.getloadavg()[0])

    results: dict = {"load_average": {"min": min(loads), "max": max(loads)}, "rounds": rounds, "runs": {}}
    rows, targets = [], []
    for w in args.workloads:
        base = samples[(w, args.nproc[0])]
        for n in args.nproc:
            s = samples[(w, n)]
            # per-round ratios (the rounds see different loads): median speedup over rounds
            speedups = [b["sps"] and x["sps"] / b["sps"] for x, b in zip(s, base, strict=True)]
            cpu_eff = [b["cpu_s_per_1k_steps"] / x["cpu_s_per_1k_steps"] for x, b in zip(s, base, strict=True)]
            rec = {"sps": statistics.median(x["sps"] for x in s),
                   "cpu_s_per_1k_steps": statistics.median(x["cpu_s_per_1k_steps"] for x in s),
                   "speedup": statistics.median(speedups), "efficiency": statistics.median(speedups) / n,
                   "cpu_efficiency": statistics.median(cpu_eff), "samples": s}
            results["runs"][f"{w}_x{n}"] = rec
            rows.append([w, n, rec["sps"], rec["speedup"], rec["efficiency"], rec["cpu_s_per_1k_steps"],
                         rec["cpu_efficiency"]])
        if 2 in args.nproc and args.nproc[0] == 1:
            rec = results["runs"][f"{w}_x2"]
            if w == "textenv":
                targets.append(target("textenv_speedup_2_procs", rec["speedup"], ">= 1.6", rec["speedup"] >= 1.6))
            targets.append(target(f"{w}_cpu_efficiency_2_procs", rec["cpu_efficiency"], ">= 0.8 (informational)",
                                  rec["cpu_efficiency"] >= 0.8))
    print_table(["workload", "procs", "steps/s", "speedup", "efficiency", "CPU s/1k steps", "CPU efficiency"], rows)
    print(f"load average during the run: {min(loads):.1f} - {max(loads):.1f} on {machine_info()['cores']} cores")
    print(f"wrote {write_result('scaling', results, targets, args.quick, args.out)}")


if __name__ == "__main__":
    main()
