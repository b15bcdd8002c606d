"""Multi-turn and tool episodes: does `agents.ppo` with a tiny GPTAgent (from scratch) improve on the two worked
examples of `textenv.tasks` within a few CPU minutes?

For each task (the calculator tool and the guessing game): the success rate (final score 1) of the untrained policy
and of the trained one, each over the same seeded held-out episodes sampled from the policy (temperature 1, masks
honoured; greedy too), side by side with the uniformly random masked policy, and the share of episodes that call
the tool (the calculator's mask allows a direct answer: calling is learnt). Target: trained > untrained by more
than 4 standard errors (a clear gain) on at least 4 of 5 seeds per task.

    python benchmarks/tools.py            # full run (a few minutes), writes benchmarks/results/tools.json
    python benchmarks/tools.py --quick    # a short smoke run
"""

from __future__ import annotations

import argparse

from _common import print_table, target, write_result

from agents.worked_examples import TASKS, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--steps", type=int, default=32_768, help="env steps of PPO per task and seed")
    parser.add_argument("--episodes", type=int, default=400, help="held-out episodes per measurement")
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per task (0, 1, ...)")
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    steps, episodes, seeds = (4_096, 100, 1) if a.quick else (a.steps, a.episodes, a.seeds)
    results, targets, rows = {}, [], []
    for task in TASKS:
        runs = results[task] = [run(task, steps, episodes, seed, greedy=True) for seed in range(seeds)]
        for seed, r in enumerate(runs):
            rows.append([task, seed, r["random"], r["before"], r["after"], r["after_greedy"], r["stderr"],
                         r["called_before"], r["called_after"], r["train_seconds"]])
        gains = [(r["after"] - r["before"]) / max(r["stderr"], 1e-9) for r in runs]
        clear, need = sum(g > 4 for g in gains), len(runs) - len(runs) // 5  # 4 of 5
        targets.append(target(f"{task}_seeds_with_a_clear_gain", clear,
                              f">= {need} of {len(runs)} (gain > 4 standard errors; per seed: "
                              f"{', '.join(f'{g:.1f}' for g in gains)})", clear >= need))
    print_table(["task", "seed", "random", "untrained", "trained", "trained greedy", "stderr", "calls before",
                 "calls after", "train s"], rows)
    print(f"wrote {write_result('tools', results, targets, a.quick, a.out)}")


if __name__ == "__main__":
    main()
