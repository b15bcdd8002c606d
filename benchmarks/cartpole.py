"""CartPole-v1: our PPO (agents/ppo.py) against Stable-Baselines3's PPO, same rl-zoo hyperparameters, one run.

    python benchmarks/cartpole.py               # 5 seeds of zoo (ours and SB3) + 5 seeds of the cleanrl preset
    python benchmarks/cartpole.py --quick       # 2 seeds of zoo only, about two minutes

Per seed, both trainers get the zoo settings (8 envs x 32 steps, batch 256, 20 epochs, gamma 0.98, GAE lambda
0.8, lr 1e-3 and clip 0.2 linearly annealed, no entropy bonus, 100k steps) and run back to back, so they see
the same machine load. "Steps to solve" is the first global step at which the mean return of the last 100
episodes reaches 475. Also checks the cleanrl preset: last-100 mean >= 475 at 500k steps on >= 4 of 5 seeds.
Writes benchmarks/results/cartpole.json (quick: cartpole-quick.json) and a PNG of the learning curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from _common import RESULTS_DIR, print_table, target, write_result  # noqa: E402

from agents.compare import rolling_mean, train_sb3  # noqa: E402
from agents.ppo import cleanrl, train, zoo  # noqa: E402

SOLVED, WINDOW = 475.0, 100


def steps_to_solve(returns: list[tuple[int, float]]) -> int | None:
    """First global step where the last-100-episode mean is >= 475 (at least 100 episodes), else None."""
    steps, mean = rolling_mean(returns, WINDOW)
    hit = np.flatnonzero((mean >= SOLVED) & (np.arange(len(mean)) >= WINDOW - 1))
    return int(steps[hit[0]]) if hit.size else None


def run_ours(args) -> dict:
    t, cpu = time.time(), time.process_time()
    r = train(args)  # includes its 10 evaluation episodes in the CPU time: conservative for us
    return {"returns": r["episode_returns"], "sps": r["sps"], "eval_mean": r["eval_mean"], "wall_s": time.time() - t,
            "cpu_sps": args.total_timesteps / (time.process_time() - cpu)}


def run_sb3(args) -> dict:
    """SB3's PPO with `args`'s hyperparameters (`agents.compare.train_sb3`), evaluated by SB3 on 10 episodes."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    r = train_sb3(args)
    eval_env = make_vec_env(args.env_id, n_envs=1, seed=args.seed + 10_000)
    eval_mean, _ = evaluate_policy(r["model"], eval_env, n_eval_episodes=10, deterministic=True)
    return {"returns": r["episode_returns"], "sps": r["sps"], "eval_mean": float(eval_mean), "wall_s": r["wall_s"],
            "cpu_sps": args.total_timesteps / r["cpu_s"]}


def summary(runs: dict[int, dict]) -> dict:
    per_seed = [{"seed": s, "steps_to_solve": steps_to_solve(r["returns"]), "sps": round(r["sps"], 1),
                 "cpu_sps": round(r["cpu_sps"], 1),
                 "eval_mean": r["eval_mean"], "last100_at_end": round(float(rolling_mean(r["returns"], WINDOW)[1][-1]), 2),
                 "episodes": len(r["returns"])} for s, r in runs.items()]
    solved = [p["steps_to_solve"] for p in per_seed]
    # an unsolved seed counts as infinitely slow, so the median stays honest
    finite = np.array([np.inf if x is None else x for x in solved], dtype=float)
    num = lambda x: None if x == np.inf else float(x)  # noqa: E731  (JSON has no infinity)
    return {"per_seed": per_seed, "solved_seeds": sum(x is not None for x in solved),
            "median_steps_to_solve": num(np.median(finite)), "min_steps_to_solve": num(finite.min()),
            "max_steps_to_solve": num(finite.max()), "median_sps": float(np.median([p["sps"] for p in per_seed])),
            "median_cpu_sps": float(np.median([p["cpu_sps"] for p in per_seed])),
            "mean_eval": float(np.mean([p["eval_mean"] for p in per_seed]))}


def plot(curves: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("zoo preset, 100k steps", ["ours (zoo)", "SB3 (zoo)"])]
    if "ours (cleanrl)" in curves:
        panels.append(("cleanrl preset, 500k steps", ["ours (cleanrl)"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels, strict=True):
        for color, name in zip(["C0", "C1"], names, strict=False):
            for i, r in enumerate(curves[name].values()):
                steps, mean = rolling_mean(r["returns"], WINDOW)
                ax.plot(steps, mean, color=color, alpha=0.7, lw=1, label=name if i == 0 else None)
        ax.axhline(SOLVED, color="gray", ls="--", lw=0.8)
        ax.set(title=f"CartPole-v1, {title}", xlabel="environment steps", ylabel="mean return, last 100 episodes")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds per trainer (default 5; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="2 seeds of the zoo comparison only (smoke run)")
    p.add_argument("--cleanrl", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the cleanrl preset check (default: on, off with --quick)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/cartpole.json, quick: cartpole-quick.json)")
    opts = p.parse_args()
    n_seeds = 2 if opts.quick and "--seeds" not in " ".join(sys.argv) else opts.seeds
    do_cleanrl = (not opts.quick) if opts.cleanrl is None else opts.cleanrl
    out = Path(opts.out) if opts.out else RESULTS_DIR / ("cartpole-quick.json" if opts.quick else "cartpole.json")
    from torch.utils import tensorboard  # noqa: F401  (imported before any timing)

    torch.set_num_threads(1)  # both trainers: 1 thread is fastest for 64-wide MLPs (and what our presets use)
    tmp = tempfile.mkdtemp(prefix="cartpole-bench-")

    curves: dict[str, dict[int, dict]] = {"ours (zoo)": {}, "SB3 (zoo)": {}}
    for seed in range(1, n_seeds + 1):
        args = dataclasses.replace(zoo(), seed=seed, run_dir=os.path.join(tmp, f"zoo{seed}"), log_every=0)
        curves["ours (zoo)"][seed] = run_ours(args)
        curves["SB3 (zoo)"][seed] = run_sb3(args)
        for name in ("ours (zoo)", "SB3 (zoo)"):
            r = curves[name][seed]
            print(f"seed {seed} {name}: solved at {steps_to_solve(r['returns'])}, {r['sps']:.0f} SPS, "
                  f"eval {r['eval_mean']:.1f}", flush=True)
    if do_cleanrl:
        curves["ours (cleanrl)"] = {}
        for seed in range(1, n_seeds + 1):
            args = dataclasses.replace(cleanrl(), seed=seed, run_dir=os.path.join(tmp, f"cleanrl{seed}"), log_every=0)
            r = curves["ours (cleanrl)"][seed] = run_ours(args)
            print(f"seed {seed} ours (cleanrl): last-100 mean at 500k {rolling_mean(r['returns'], WINDOW)[1][-1]:.1f}, "
                  f"{r['sps']:.0f} SPS", flush=True)

    results = {name: summary(runs) for name, runs in curves.items()}
    ours, sb3 = results["ours (zoo)"], results["SB3 (zoo)"]
    steps = lambda x: "unsolved" if x is None else f"{x:.0f}"  # noqa: E731
    rows = [[name, f"{s['solved_seeds']}/{len(s['per_seed'])}", steps(s["median_steps_to_solve"]),
             steps(s["min_steps_to_solve"]), steps(s["max_steps_to_solve"]), f"{s['median_sps']:.0f}",
             f"{s['median_cpu_sps']:.0f}", f"{s['mean_eval']:.1f}"] for name, s in results.items()]
    print()
    print_table(["trainer", "solved", "median steps", "min", "max", "SPS", "CPU-time SPS", "eval"], rows)
    inf = lambda x: np.inf if x is None else x  # noqa: E731
    steps_ratio = inf(ours["median_steps_to_solve"]) / inf(sb3["median_steps_to_solve"])
    sps_ratio = ours["median_sps"] / sb3["median_sps"]
    results["zoo_cpu_sps_ratio_vs_sb3"] = round(ours["median_cpu_sps"] / sb3["median_cpu_sps"], 3)  # steadier when shared
    targets = [target("zoo_steps_to_solve_ratio_vs_sb3", round(float(steps_ratio), 3) if np.isfinite(steps_ratio)
                      else None, "<= 1.0", steps_ratio <= 1.0),
               target("zoo_sps_ratio_vs_sb3", round(sps_ratio, 3), ">= 1.0", sps_ratio >= 1.0)]
    if do_cleanrl:
        c = results["ours (cleanrl)"]
        ok = sum(p["last100_at_end"] >= SOLVED for p in c["per_seed"])
        targets.append(target("cleanrl_seeds_last100_ge_475_at_500k", ok, f">= {int(np.ceil(0.8 * n_seeds))} of "
                              f"{n_seeds}", ok >= np.ceil(0.8 * n_seeds)))
    for t in targets:
        print(f"target {t['name']}: {t['value']} ({t['target']}) {'met' if t['met'] else 'NOT met'}")
    results["settings"] = {"seeds": n_seeds, "torch_threads": 1, "solved": f"last-{WINDOW} mean >= {SOLVED}",
                           "eval": "10 deterministic episodes"}
    path = write_result("cartpole", results, targets, opts.quick, out)
    plot(curves, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
