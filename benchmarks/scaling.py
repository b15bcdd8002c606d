"""Data-parallel scaling of `agents.ppo`: steps per second with 1 and N processes (torchrun, gloo / NCCL).

Weak scaling, as data-parallel PPO is used: every process keeps the same rollout (`num_envs` x `num_steps`) and
iteration count, so N processes collect and train on N times the batch. The baseline is what a user runs:
1 process with all the threads (`--threads`, default every usable core); N processes split those threads
(cores // N each). speedup = steps/s(config) / steps/s(1 process, all threads). The old baseline, 1 process
with 1 thread, stays as a row labelled so (`speedup_vs_1_thread`: the number earlier READMEs quoted).
Workloads:

- `cartpole`: CartPole-v1, `MLPAgent`, the zoo preset's shapes (8 envs x 32 steps per process, 20 epochs).
- `textenv`: the embedded RLHF job's shapes with a rule reward: `TextVectorEnv` (64 envs x 34 steps per process,
  char tokenizer, keyword reward, 4-16 new tokens), a GPT-2 of 4 layers x 128 (`GPTAgent`, KV cache, 4 minibatches
  of env columns, 4 epochs), the per-token KL penalty to a frozen reference copy (`RefLogprob`), gamma 1.

One process runs with no launcher (`python benchmarks/scaling.py --worker ...`), N under
`torchrun --standalone --nproc-per-node N`; each process gets its share of the threads (torch and OMP). The
machine may be shared: each round runs every configuration back to back (order alternating), medians over
rounds are reported, plus the CPU seconds per step summed over the processes (per token for `textenv`: one env
step is one token; what the work itself costs, steadier than wall time under load) and the load average.
`cpu_efficiency` = CPU per step of the baseline / CPU per step of the configuration (1.0: no extra work; > 1:
the configuration spends less CPU per step, e.g. no threads spinning on tiny ops).

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
    """process counts (1 = no launcher); the first must be 1 (the baseline)"""
    threads: int = 0
    """threads shared by the processes of a configuration (0 = every usable core)"""
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
    worker_threads: int = 1
    """internal: torch threads of each worker process"""


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
    torch.set_num_threads(args.worker_threads)
    n_iter = args.iterations or ITERATIONS[args.worker][args.quick]
    if args.worker == "cartpole":
        envs, agent = None, None
        ppo = dataclasses.replace(PPOArgs(), num_envs=8, num_steps=32, num_minibatches=1, update_epochs=20,
                                  gamma=0.98, gae_lambda=0.8, learning_rate=1e-3, ent_coef=0.0, clip_vloss=False)
    else:  # under torchrun on GPUs, build on this rank's GPU
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device == "cuda" else args.device
        envs, agent, ppo = textenv_setup(device)
    ppo = dataclasses.replace(ppo, total_timesteps=n_iter * ppo.num_envs * ppo.num_steps * world, eval_episodes=0,
                              save_every=0, log_every=0, torch_threads=args.worker_threads, device=args.device, seed=1,
                              run_dir=tempfile.mkdtemp(prefix="scaling-"))
    wall, cpu = time.perf_counter(), time.process_time()
    result = train(ppo, envs=envs, agent=agent)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    line = MARK + json.dumps({"rank": result["rank"], "world": world, "steps": result["global_step"],
                              "sps": result["sps"], "wall_s": wall, "cpu_s": cpu})
    sys.stdout.flush()
    os.write(1, (line + "\n").encode())  # one write: the ranks share the pipe, a print() may interleave
    distributed.exit_worker(0)


def launch(workload: str, nproc: int, threads: int, args: Args) -> dict:
    """Run one configuration (`nproc` fresh processes of `threads` threads each); returns steps/s and CPU seconds
    per step (all ranks)."""
    worker = [str(Path(__file__).resolve()), "--worker", workload, "--device", args.device,
              "--worker-threads", str(threads)]
    worker += ["--quick"] if args.quick else []
    cmd = [sys.executable] + worker if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] + worker
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(m) for m in re.findall(MARK + r"(\{[^{}]*\})", run.stdout)]
    if run.returncode != 0 or len(rows) != nproc:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    steps = rows[0]["steps"]
    cpu = sum(r["cpu_s"] for r in rows)
    return {"sps": rows[0]["sps"], "cpu_s_per_step": cpu / steps, "cpu_s_per_1k_steps": 1000 * cpu / steps,
            "wall_s": max(r["wall_s"] for r in rows), "steps": steps}


def configurations(args: Args) -> list[tuple[int, int]]:
    """(processes, threads per process): 1 x all threads (the baseline), N x threads // N, and 1 x 1 thread."""
    if args.nproc[0] != 1:
        raise SystemExit("--nproc must start with 1: the baseline is 1 process with all the threads")
    cores = args.threads or len(os.sched_getaffinity(0))
    configs = [(n, max(1, cores // n)) for n in args.nproc]
    return configs + ([(1, 1)] if cores > 1 else [])


def label(n: int, threads: int, cores: int) -> str:
    if n == 1 and threads == 1 and cores > 1:
        return "1 proc x 1 thread (old baseline)"
    return f"{n} proc x {threads} thread{'s' if threads > 1 else ''}" + (" (baseline)" if n == 1 else "")


def main() -> None:
    import tyro

    args = tyro.cli(Args, description=__doc__)
    if args.worker:
        return run_worker(args)
    from _common import machine_info, print_table, target, write_result

    rounds = 1 if args.quick else args.rounds
    configs = configurations(args)
    cores = configs[0][1]
    samples: dict[tuple[str, int, int], list[dict]] = {(w, n, t): [] for w in args.workloads for n, t in configs}
    loads = [os.getloadavg()[0]]
    for r in range(rounds):
        order = list(samples) if r % 2 == 0 else list(reversed(samples))
        for w, n, t in order:
            samples[(w, n, t)].append(launch(w, n, t, args))
            s = samples[(w, n, t)][-1]
            print(f"round {r + 1}/{rounds} {w} {label(n, t, cores)}: {s['sps']:.0f} steps/s, "
                  f"{s['cpu_s_per_1k_steps']:.2f} CPU s / 1k steps (load {os.getloadavg()[0]:.1f})", flush=True)
            loads.append(os.getloadavg()[0])

    results: dict = {"load_average": {"min": min(loads), "max": max(loads)}, "rounds": rounds, "threads": cores,
                     "baseline": label(1, cores, cores), "runs": {}}  # fmt: skip
    rows, targets = [], []
    for w in args.workloads:
        base, one = samples[(w, 1, cores)], samples.get((w, 1, 1), samples[(w, 1, cores)])
        for n, t in configs:
            s = samples[(w, n, t)]
            # per-round ratios (the rounds see different loads): median speedup over rounds
            speedups = [x["sps"] / b["sps"] for x, b in zip(s, base, strict=True)]
            vs_one = [x["sps"] / b["sps"] for x, b in zip(s, one, strict=True)]
            cpu_eff = [b["cpu_s_per_step"] / x["cpu_s_per_step"] for x, b in zip(s, base, strict=True)]
            rec = {"label": label(n, t, cores), "procs": n, "threads_per_proc": t,
                   "sps": statistics.median(x["sps"] for x in s),
                   "cpu_s_per_step": statistics.median(x["cpu_s_per_step"] for x in s),
                   "cpu_s_per_1k_steps": statistics.median(x["cpu_s_per_1k_steps"] for x in s),
                   "speedup": statistics.median(speedups), "speedup_vs_1_thread": statistics.median(vs_one),
                   "cpu_efficiency": statistics.median(cpu_eff), "samples": s}  # fmt: skip
            results["runs"][f"{w}_x{n}_t{t}"] = rec
            rows.append([w, rec["label"], rec["sps"], rec["speedup"], rec["speedup_vs_1_thread"],
                         1e3 * rec["cpu_s_per_step"], rec["cpu_efficiency"]])  # fmt: skip
        two = [(n, t) for n, t in configs if n == 2]
        if two:
            rec = results["runs"][f"{w}_x2_t{two[0][1]}"]
            if w == "textenv":
                targets.append(target("textenv_speedup_2_procs_vs_1_proc_all_threads", rec["speedup"],
                                      "> 1.0 (informational)", rec["speedup"] > 1.0))  # fmt: skip
                targets.append(target("textenv_speedup_2_procs_vs_1_proc_1_thread", rec["speedup_vs_1_thread"],
                                      ">= 1.6 (the old baseline)", rec["speedup_vs_1_thread"] >= 1.6))  # fmt: skip
            targets.append(target(f"{w}_cpu_efficiency_2_procs_vs_1_proc_all_threads", rec["cpu_efficiency"],
                                  ">= 0.8 (informational)", rec["cpu_efficiency"] >= 0.8))  # fmt: skip
    print_table(["workload", "configuration", "steps/s", "speedup (vs 1 proc, all threads)", "speedup vs 1 thread",
                 "CPU ms/step (= /token for textenv)", "CPU efficiency"], rows)  # fmt: skip
    print(f"load average during the run: {min(loads):.1f} - {max(loads):.1f} on {machine_info()['cores']} cores")
    print(f"wrote {write_result('scaling', results, targets, args.quick, args.out)}")


if __name__ == "__main__":
    main()
