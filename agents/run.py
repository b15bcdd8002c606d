"""What one `agents.ppo.train` call works with (`Run`: the run's settings, pieces and counters) and its checkpoints:
they are saved atomically (`save_run`), a new run starts from one (`resume_run`), and an error that stops
training says which one is kept (`note_last_checkpoint`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gymnasium as gym
import torch
from torch import nn

from agents import distributed, sharding
from agents.checkpoint import checkpoint_path, remove, restore, run_state, save_checkpoint
from agents.rollout import Carry

if TYPE_CHECKING:
    from agents.ppo import Args


@dataclass
class Run:
    """What one `train` call works with: the run's settings and pieces, and its counters."""

    args: Args
    dist: distributed.Dist
    device: torch.device
    envs: gym.vector.VectorEnv
    agent: nn.Module
    optimizer: torch.optim.Optimizer
    kl_ctl: object
    writer: object
    ckpt_path: Path
    n_iterations: int
    global_step: int
    episode_returns: list
    carry: Carry
    saved_at: int | None  # the iteration of the newest checkpoint (None: none yet)


def save_run(r: Run, hooks: object | None, iteration: int) -> None:
    """The run's atomic checkpoint at `iteration`, with the hooks' `state_dict()` when they have one: rank 0's file,
    or with a sharded agent every rank's shards in one folder (every rank calls it). The other kind of checkpoint,
    left by a run resumed the other way, is removed once this one is written."""
    sharded = sharding.is_sharded(r.agent)
    if not (sharded or r.dist.is_main):
        r.saved_at = iteration
        return
    state = run_state(iteration, r.global_step, r.kl_ctl, r.episode_returns, r.args, r.dist.world_size)
    if hasattr(hooks, "state_dict"):
        state["hooks"] = hooks.state_dict()
    if sharded:
        sharding.save_sharded(r.ckpt_path, r.agent, r.optimizer, state if r.dist.is_main else None, r.dist)
    else:
        save_checkpoint(r.ckpt_path, {"agent": r.agent.state_dict(), "optimizer": r.optimizer.state_dict(), **state})
    other = checkpoint_path(r.ckpt_path.parent, not sharded)
    if r.dist.is_main and other.exists():
        remove(other)
    r.saved_at = iteration


@contextlib.contextmanager
def note_last_checkpoint(r: Run):
    """An error that stops training (a reward model that raised, a NaN loss) leaves with a note on rank 0 saying
    which checkpoint is kept and how to continue from it once the cause is fixed."""
    try:
        yield
    except Exception as e:
        if r.dist.is_main:
            run_dir = r.ckpt_path.parent
            e.add_note(f"training stopped; no checkpoint was written yet (--save-every {r.args.save_every})"
                       if r.saved_at is None else
                       f"training stopped; the last good checkpoint, {r.ckpt_path} (iteration {r.saved_at}), is "
                       f"kept: fix the cause, then continue with --resume --run-dir {run_dir} (agents.rlhf: "
                       f"--ppo.resume --ppo.run-dir {run_dir})")
        raise


def resume_run(ckpt: dict | None, agent: nn.Module, optimizer: torch.optim.Optimizer, kl_ctl: object, args: Args,
            dist: distributed.Dist, path: Path) -> tuple[int, list, int]:
    """(global_step, episode_returns, the envs' seed) of a new run, or of the checkpoint `ckpt` once its weights,
    Adam, RNG and KL-controller states are restored."""
    if ckpt is None:
        return 0, [], dist.seed(args.seed)
    global_step, episode_returns = restore(ckpt, agent, optimizer, kl_ctl)
    # episodes in progress at the kill are lost: restart the envs, seeded so a resumed run is reproducible
    iteration = global_step // (args.num_steps * args.num_envs * dist.world_size)
    env_seed = dist.seed(args.seed + 7919 * iteration)
    if dist.enabled:  # rank 0's saved RNG state on every rank would repeat its samples
        torch.manual_seed(env_seed)
    dist.is_main and print(f"resumed {path} at iteration {iteration}, global_step {global_step}")
    return global_step, episode_returns, env_seed
