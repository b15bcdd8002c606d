"""Same seed, same run: the RLHF main job run as a user runs it, per seed and torch thread count, side by side.

Each run is `python -m agents.rlhf PRESET --ppo.seed S --ppo.torch-threads T` in its own process (models cached in
`--artifacts-dir`, built by the first run when absent). The first setting runs twice: its two reports must be
identical (same seed, same thread count, same numbers). Across thread counts the float sums of the matrix
products split differently, so runs of one seed may part; the table shows by how much, beside the spread across
seeds, which is what any comparison of two settings has to beat.

    python benchmarks/determinism.py                       # seeds 1 2 3 x threads 1 2, the full main job
    python benchmarks/determinism.py --quick               # `--quick` runs (6 PPO iterations, 64 prompts)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro
from _common import print_table, target, write_result

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["gain", "reward_mean", "positive_rate_judge", "kl_mean", "ref_perplexity", "distinct_2"]


@dataclass
class Args:
    preset: str = "embedded"
    """`agents.rlhf` preset"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds to run"""
    threads: list[int] = field(default_factory=lambda: [1, 2])
    """torch thread counts to run each seed with"""
    artifacts_dir: str = str(ROOT / "artifacts")
    """the models' cache (built once by the first run when empty)"""
    quick: bool = False
    """`--quick` runs of the job"""
    out: str | None = None
    """JSON path (default benchmarks/results/determinism.json)"""


def run_job(args: Args, seed: int, threads: int, run_dir: Path) -> dict:
    """One run of the job in a fresh process; its report's numbers (after training) and its wall time."""
    cmd = [sys.executable, "-m", "agents.rlhf", args.preset, "--ppo.seed", str(seed), "--ppo.torch-threads",
           str(threads), "--ppo.run-dir", str(run_dir), "--artifacts-dir", args.artifacts_dir] + (
        ["--quick"] if args.quick else [])
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((run_dir / "report.json").read_text())
    after = {k: report["after"][k] for k in METRICS[1:]}
    after["ref_perplexity"] /= report["before"]["ref_perplexity"]  # as a ratio to the start
    history = [{k: v for k, v in h.items() if k not in ("time_s", "tokens_per_second")} for h in report["history"]]
    return {"seed": seed, "threads": threads, "gain": report["gain"]["reward_mean"], **after,
            "history": history, "samples": report["samples"], "wall_s": time.time() - t0}


def same(a: dict, b: dict) -> bool:
    """Two runs gave the same report: numbers, per-iteration history (timings aside) and every sample."""
    return all(a[k] == b[k] for k in METRICS + ["history", "samples"])


def main(args: Args) -> None:
    runs, work = [], Path(tempfile.mkdtemp(prefix="determinism-"))
    for seed in args.seeds:
        for threads in args.threads:
            runs.append(run_job(args, seed, threads, work / f"s{seed}-t{threads}"))
            print(f"seed {seed}, {threads} thread(s): " + ", ".join(f"{k} {runs[-1][k]:.4f}" for k in METRICS)
                  + f" ({runs[-1]['wall_s']:.0f} s)", flush=True)
    repeat = run_job(args, args.seeds[0], args.threads[0], work / "repeat")
    identical = same(runs[0], repeat)
    print_table(["seed", "threads"] + METRICS, [[r["seed"], r["threads"]] + [r[k] for k in METRICS] for r in runs])
    print(f"seed {args.seeds[0]}, {args.threads[0]} thread(s) run twice: {'identical' if identical else 'DIFFERENT'}")
    by_seed = {s: [r for r in runs if r["seed"] == s] for s in args.seeds}
    threads_spread = {k: max(max(r[k] for r in rs) - min(r[k] for r in rs) for rs in by_seed.values())
                      for k in METRICS}  # the largest gap between thread counts of one seed
    seeds_sd = {k: statistics.stdev(statistics.mean(r[k] for r in rs) for rs in by_seed.values())
                if len(by_seed) > 1 else 0.0 for k in METRICS}  # the spread across seeds
    print_table(["metric", "max gap across thread counts (one seed)", "std across seeds"],
                [[k, threads_spread[k], seeds_sd[k]] for k in METRICS])
    results = {"preset": args.preset, "quick": args.quick, "repeat_identical": identical,
               "runs": [{k: v for k, v in r.items() if k not in ("history", "samples")} for r in runs],
               "max_gap_across_threads": threads_spread, "std_across_seeds": seeds_sd,
               "thread_changes_any_run": any(not same(rs[0], r) for rs in by_seed.values() for r in rs[1:])}
    targets = [target("same_seed_same_threads_identical", identical, "true", identical)]
    print(f"wrote {write_result('determinism', results, targets, args.quick, args.out)}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
