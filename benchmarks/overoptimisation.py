"""Proxy vs held-out judge over KL: where to set `kl_target` (Gao et al. 2022, https://arxiv.org/abs/2210.10760).

Trains a preset of `agents.rlhf` (embedded by default) at several KL setpoints (and with no KL penalty at all, the fixed
coefficient 0), two seeds each, and plots, against the KL each run measured on the held-out prompts, the reward
model's score (the proxy the policy trains on) and the held-out judge's P(positive) (a "gold" it never sees).
Past some KL the proxy keeps rising while the judge stops following or falls: that knee is where `kl_target`
belongs. The best setpoint by the judge is saved in the JSON.

    python benchmarks/overoptimisation.py            # setpoints 1, 2, 4, 8 + coef 0, 2 seeds; JSON + PNG in results/
    python benchmarks/overoptimisation.py --quick    # 2 setpoints, 1 seed, 8 iterations: a smoke run
    python benchmarks/overoptimisation.py --preset smollm2 --quick   # the same on SmolLM2

Runs train in parallel processes (`--workers`, default one per core), each with its share of the threads. Beside
the runs, the best-of-n baseline of the initial policy (`agents.rlhf.baselines`; n = 1, 4, 16 against its KL
bound): a setpoint whose judge score lies below that curve bought less than picking from samples does.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro
from _common import RESULTS_DIR, final_quarter_kl, print_table, target, write_result

from agents.rlhf import prepare, run
from agents.rlhf.config import PRESETS
from agents.vector import resolve_device


@dataclass
class Args:
    preset: str = "embedded"
    """the `agents.rlhf` preset trained at each setpoint (`embedded`, `imdb`, `smollm2`)"""
    setpoints: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    """KL setpoints (nats per response) of the adaptive controller"""
    no_penalty: bool = True
    """also train with a fixed KL coefficient of 0 (the right end of the curve)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    """seeds per setpoint (each point of the plot is their mean)"""
    iterations: int | None = None
    """PPO iterations per run (default: the embedded preset's)"""
    eval_prompts: int = 256
    """held-out prompts per evaluation (cut once, when the models are prepared; the best-of-n baseline samples the
    first --best-of-n-prompts of them)"""
    best_of_n: list[int] = field(default_factory=lambda: [1, 4, 16])
    """n of the best-of-n baseline (sampled once, from the initial policy, on the first --best-of-n-prompts)"""
    best_of_n_prompts: int = 64
    """held-out prompts of the best-of-n baseline (0: none)"""
    workers: int = 0
    """runs trained at once, each in its own process (0: one per core, up to the number of runs; 1 on a GPU).
    The embedded models are small: one thread per run uses a core better than two threads on one run"""
    torch_threads: int = 0
    """torch CPU threads per run (0: the cores divided among the workers)"""
    quick: bool = False
    """2 setpoints, 1 seed, 8 iterations, 32 prompts"""
    out: str | None = None
    """JSON path (default benchmarks/results/overoptimisation.json; the PNG goes beside it)"""


def one_run(base, pieces, setpoint: float | None, seed: int, a: Args) -> tuple[dict, dict]:
    """Train from the pretrained policy (a fresh copy: `run` tunes the policy it is given in place); returns the
    run's point and the report's "before" (the reference's held-out numbers, the same for every run)."""
    ppo = dataclasses.replace(base.ppo, seed=seed, torch_threads=a.torch_threads,
                              kl_target=setpoint, kl_coef=base.ppo.kl_coef if setpoint else 0.0,
                              run_dir=f"runs/bench-overopt-{a.preset}-{setpoint or 0:g}-{seed}-{int(time.time())}")
    if a.iterations:
        ppo.total_timesteps = a.iterations * ppo.num_envs * ppo.num_steps
    cfg = dataclasses.replace(base, ppo=ppo, best_of_n_prompts=0)  # main() samples the baseline once
    rec = run(cfg, dataclasses.replace(pieces, policy=copy.deepcopy(pieces.policy)))
    af = rec["after"]
    return {"setpoint": setpoint, "seed": seed, "kl": af["kl_mean"], "proxy": af["reward_mean"],
            "judge": af["judge_mean"], "judge_positive": af["positive_rate_judge"],
            "reward_positive": af["positive_rate_reward_model"], "distinct_2": af["distinct_2"],
            "ref_perplexity": af["ref_perplexity"], "train_kl_final_quarter": final_quarter_kl(rec["history"]),
            "warnings": rec["warnings"], "seconds": rec["timing"]["total_s"]}, rec["before"]


_WORKER: dict = {}


def preset_config(a: Args):
    """The preset's config with this benchmark's held-out prompt count (`prepare` cuts the prompts from it)."""
    return dataclasses.replace(PRESETS[a.preset](), eval_prompts=a.eval_prompts)


def _init_worker(threads: int, a: Args) -> None:
    """A worker process: its share of the threads, and the preset's models loaded once (cached in artifacts/)."""
    import torch

    torch.set_num_threads(threads)
    base = preset_config(a)
    _WORKER.update(base=base, pieces=prepare(base, resolve_device(base.ppo.device)))


def _work(job: tuple[int, int, float | None, int, Args]) -> tuple[int, dict, dict]:
    i, n, setpoint, seed, a = job
    print(f"\n=== run {i + 1}/{n} (pid {os.getpid()}): kl_target {setpoint}, seed {seed}", flush=True)
    return (i, *one_run(_WORKER["base"], _WORKER["pieces"], setpoint, seed, a))


def baseline(base, pieces, a: Args) -> dict | None:
    """Best-of-n of the initial policy on the held-out prompts the runs are evaluated on."""
    if not a.best_of_n_prompts:
        return None
    from agents.rlhf.baselines import best_of_n
    from agents.rlhf.job import held_out

    policy = pieces.policy.eval()
    return best_of_n(policy, policy, held_out(base, pieces), a.best_of_n, a.best_of_n_prompts)


def plot(points: list[dict], before: dict, path, bon: dict | None = None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ax2 = ax.twinx()
    for p in points:
        ax.scatter(p["kl"], p["proxy"], color="tab:blue", alpha=0.35, s=14)
        ax2.scatter(p["kl"], p["judge"], color="tab:green", alpha=0.35, s=14)
    means = _means(points)
    xs = [m["kl"] for m in means]
    ax.plot(xs, [m["proxy"] for m in means], "o-", color="tab:blue", label="reward model (proxy, trained on)")
    ax2.plot(xs, [m["judge"] for m in means], "s-", color="tab:green", label="held-out judge P(positive)")
    for m in means:
        ax.annotate("coef 0" if m["setpoint"] is None else f"{m['setpoint']:g}", (m["kl"], m["proxy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    if bon is not None:
        rows = bon["rows"]
        ax2.plot([r["kl_bound"] for r in rows], [r["judge_mean"] for r in rows], "^--", color="tab:olive",
                 label="best-of-n of the initial policy, judge (KL: its bound)")
    ax.axhline(before["reward_mean"], color="tab:blue", ls=":", lw=1)
    ax2.axhline(before["judge_mean"], color="tab:green", ls=":", lw=1)
    ax.set(xlabel="KL to the reference on held-out prompts (nats per response)", ylabel="reward-model score",
           title="Proxy vs judge over KL (labels: kl_target; dotted: before)")
    ax2.set_ylabel("judge P(positive)")
    fig.legend(loc="lower right", bbox_to_anchor=(0.88, 0.2), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _means(points: list[dict]) -> list[dict]:
    out = []
    for sp in dict.fromkeys(p["setpoint"] for p in points):
        group = [p for p in points if p["setpoint"] == sp]
        out.append({"setpoint": sp, **{k: float(np.mean([p[k] for p in group]))
                                       for k in ("kl", "proxy", "judge", "judge_positive", "reward_positive",
                                                 "distinct_2", "ref_perplexity", "train_kl_final_quarter")}})
    return sorted(out, key=lambda m: m["kl"])


def main(a: Args) -> None:
    if a.quick:
        a = dataclasses.replace(a, setpoints=a.setpoints[:2], seeds=a.seeds[:1], iterations=8, eval_prompts=32)
    t0 = time.time()
    base = preset_config(a)
    device = resolve_device(base.ppo.device)
    pieces = prepare(base, device)  # build the models once, before any worker loads them
    runs = [(sp, seed) for sp in a.setpoints for seed in a.seeds] + [(None, s) for s in a.seeds if a.no_penalty]
    cores = os.cpu_count() or 1
    workers = 1 if device.type != "cpu" else min(len(runs), a.workers or cores)
    threads = a.torch_threads or max(1, cores // workers)
    a = dataclasses.replace(a, torch_threads=threads)
    print(f"{len(runs)} runs, {workers} at a time x {threads} torch thread(s)", flush=True)
    jobs = [(i, len(runs), sp, seed, a) for i, (sp, seed) in enumerate(runs)]
    if workers == 1:  # in this process, with the models just prepared
        import torch

        torch.set_num_threads(threads)
        _WORKER.update(base=base, pieces=pieces)
        done = [_work(job) for job in jobs]
    else:  # spawn: no forked torch thread pools
        with mp.get_context("spawn").Pool(workers, _init_worker, (threads, a)) as pool:
            done = list(pool.imap_unordered(_work, jobs))
    done.sort(key=lambda d: d[0])
    points, before = [d[1] for d in done], done[-1][2]
    means = _means(points)
    rows = [["coef 0" if m["setpoint"] is None else m["setpoint"], m["kl"], m["train_kl_final_quarter"], m["proxy"],
             m["judge"], m["judge_positive"], m["distinct_2"]] for m in means]
    print_table(["kl_target", "KL held-out", "KL train (last 25%)", "reward", "judge P(pos)", "judge pos rate",
                 "distinct-2"], rows)
    best = max(means, key=lambda m: m["judge"])
    name = "overoptimisation" + ("" if a.preset == "embedded" else f"_{a.preset}")
    png = RESULTS_DIR / f"{name}.png" if a.out is None else Path(a.out).with_suffix(".png")
    bon = baseline(base, pieces, a)
    plot(points, before, png, bon)
    total_s = time.time() - t0
    held = [m for m in means if m["setpoint"] is not None]
    worst = max((abs(m["train_kl_final_quarter"] - m["setpoint"]) / m["setpoint"] for m in held), default=float("nan"))
    targets = [target("points", len(means), ">= 5 (setpoints + coef 0)", len(means) >= 5),
               target("seeds_per_point", len(a.seeds), ">= 2", len(a.seeds) >= 2),
               target("wall_minutes", total_s / 60, "<= 30", total_s <= 30 * 60),
               target("worst_final_quarter_kl_error", worst, "<= 0.2 (fraction of the setpoint)", worst <= 0.2)]
    results = {"points": points, "means": means, "before": before, "best_of_n": bon,
               "best_setpoint_by_judge": best["setpoint"],
               "best": best, "png": png.name, "total_s": total_s, "workers": workers, "threads_per_run": threads,
               "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    print(f"\nbest kl_target by the judge: {best['setpoint']} (judge {best['judge']:.3f} at KL {best['kl']:.2f})")
    print(f"wrote {write_result(name, results, targets, a.quick, a.out)} and {png}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
