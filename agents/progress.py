"""What a PPO run reports (rank 0): TensorBoard with the hyperparameters as a text table, each iteration's
statistics and what the `hooks` add, and one printed progress line per iteration."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from agents import distributed
from agents.rollout import Rollout


def open_writer(run_dir: Path, args: object, dist: distributed.Dist):
    """Rank 0's TensorBoard writer with the hyperparameters (the dataclass `args`) as a text table (other ranks
    write nothing)."""
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

    if not dist.is_main:
        return distributed.NullWriter()
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
        f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))
    return writer


def log_iteration(writer, stats: dict, hooks: object | None, iteration: int, global_step: int, rollout: Rollout,
                  kl_coef: float = 0.0) -> list:
    """Write `stats` and what `hooks.on_iteration` returns (rank 0, its own rollout: 1/W of the batch) to
    TensorBoard; returns the hook's logs as a list of 0 or 1 dicts. A hook whose `on_iteration` takes a `kl_coef`
    keyword gets the KL coefficient the rollout's rewards were shaped with."""
    for k, v in stats.items():
        writer.add_scalar(k, v, global_step)
    on_iteration = getattr(hooks, "on_iteration", None)
    logs = None
    if on_iteration is not None:
        kw = {"kl_coef": kl_coef} if "kl_coef" in inspect.signature(on_iteration).parameters else {}
        logs = on_iteration(iteration, global_step, rollout, writer, **kw)
    for k, v in (logs or {}).items():
        if isinstance(v, (int, float)):
            writer.add_scalar(k, v, global_step)
    return [{"iteration": iteration, "global_step": global_step, **logs}] if logs else []


def progress_line(iteration: int, n_iterations: int, global_step: int, stats: dict) -> str:
    """One printed line per iteration: the return, the losses and the throughput."""
    ret = stats.get("charts/episodic_return")
    ret = "     n/a" if ret is None else f"{ret:8.2f}"  # no episode finished in this iteration
    return (f"iter {iteration}/{n_iterations} step {global_step} return {ret} "
            f"pi {stats['losses/policy_loss']:+.4f} v {stats['losses/value_loss']:.4f} "
            f"ent {stats['losses/entropy']:.3f} kl {stats['losses/approx_kl']:.4f} "
            f"clipfrac {stats['losses/clipfrac']:.3f} | {stats['charts/SPS']:.0f} SPS")
