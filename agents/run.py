"""What one `agents.ppo.train` call works with (`Run`: the run's settings, pieces and counters) and its checkpoints:
rank 0 saves them atomically (`save_run`), a new run starts from one (`resume_run`), and an error that stops
training says which one is kept (`note_last_checkpoint`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gymnasium as gym
import torch
from torch import nn

from agents import distributed
from agents.checkpoint import restore, run_state, save_checkpoint
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
    """Rank 0's atomic checkpoint of the run at `iteration`, with the hooks' `state_dict()` when they have one."""
    state = run_state(r.agent, r.optimizer, iteration, r.global_step, r.kl_ctl, r.episode_returns, r.args,
                      r.dist.world_size)
    if hasattr(hooks, "state_dict"):
        state["hooks"] = hooks.state_dict()
    save_checkpoint(r.ckpt_path, state)
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
