"""Vector-env plumbing for `agents.ppo`: build or wrap the env, check what PPO supports, devices, CPU threads and
dtypes.

An env PPO cannot train on (an unknown id, continuous actions, same-step autoreset, no prompt groups for a
group-relative baseline) or a device this machine lacks is a `UsageError`: one `error:` line from the CLI."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import gymnasium as gym
import numpy as np
import torch

from agents.cli import UsageError

if TYPE_CHECKING:
    from agents.advantages import AdvantageMode


def vector_env(envs: gym.Env | gym.vector.VectorEnv | None, env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """`envs` as a vector env (None: `num_envs` copies of `env_id`), checked: Discrete actions, NEXT_STEP autoreset."""
    if envs is None:
        try:  # an unknown or misspelt id, a missing optional dependency (box2d, ale-py): the user's to fix
            envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)])
        except gym.error.Error as e:
            raise UsageError(f"env_id {env_id!r}: {e}") from None
    elif not isinstance(envs, gym.vector.VectorEnv):
        single = envs
        envs = gym.vector.SyncVectorEnv([lambda: single])
    if not isinstance(envs.single_action_space, gym.spaces.Discrete):
        raise UsageError(f"agents.ppo supports Discrete action spaces only; {env_name(envs)} has "
                         f"{envs.single_action_space}: use a discrete env (or discretize the actions with a wrapper)")
    mode = autoreset_mode(envs)
    if mode != gym.vector.AutoresetMode.NEXT_STEP:  # the rollout's reset-step mask is next-step autoreset's
        raise UsageError(f"the vector env's autoreset_mode is {mode.name}; agents.ppo needs next-step autoreset: "
                         "build it with autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP (Gymnasium's default)")
    return envs


def check_groups(envs: gym.vector.VectorEnv, mode: AdvantageMode, seed: int | None) -> None:
    """A group-relative advantages `mode` (rloo, grpo) compares the episodes that answer one prompt: refuse an
    env whose reset reports no `infos["group"]`, or a group of one episode (no baseline). Resets `envs`."""
    if not mode.grouped:
        return
    advantages = mode.name
    _, infos = envs.reset(seed=seed)
    if "group" not in infos:
        raise UsageError(f"advantages={advantages!r} compares the episodes that answer one prompt, but "
                         f"{env_name(envs)} hands out no groups (no infos['group'] at reset); use "
                         "advantages='gae' (--advantages gae), or an env with groups: "
                         "gymnasium.make_vec('TextEnv-v0', num_envs=n, group_size=k, ...) with k >= 2")
    _, sizes = np.unique(np.asarray(infos["group"]), return_counts=True)
    if sizes.min() < 2:
        raise UsageError(f"advantages={advantages!r} compares the episodes of a group, but a group holds "
                         f"{sizes.min()} env: build the env with group_size >= 2 (e.g. 4)")


def env_name(envs: gym.vector.VectorEnv) -> str:
    """What the run folder calls `envs`: the id they were made from (the vector env's spec, else its first env's),
    else the class of its first env (or its own); '/' (a namespace) becomes '-'."""
    base = envs.unwrapped
    first = base.envs[0] if getattr(base, "envs", None) else None
    spec = envs.spec or base.spec or (first.spec if first is not None else None)
    name = spec.id if spec is not None else type(base if first is None else first.unwrapped).__name__
    return name.replace("/", "-")


def check_device(name: str) -> None:
    """Refuse a device torch cannot parse, or a CUDA or MPS device this machine lacks ("auto" always works)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"device {name!r} is not a device ({e}); use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) visible to "
                         "torch; use cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r}: MPS is not available here; use cpu or auto")


def autoreset_mode(envs: gym.vector.VectorEnv) -> gym.vector.AutoresetMode:
    """The vector env's declared autoreset mode; NEXT_STEP when it declares none (Gymnasium 1.0's only mode)."""
    return gym.vector.AutoresetMode(envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP))


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; anything else as torch.device."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


_AUTO_THREADS: int | None = None  # the automatic thread count, decided once per process


def set_torch_threads(threads: int) -> int:
    """Apply `--torch-threads` (one rule for `agents.ppo` and `agents.rlhf`); returns the torch thread count in use.

    `threads` > 0: that many. 0, automatic: torch's count as the first call finds it (every core unless set
    earlier), or 1 when the machine is already busy (load average >= cores), where more threads fighting for
    shared cores run several times slower; decided once per process, as later calls would count the process's
    own work (after a long model build the load average is the build's)."""
    global _AUTO_THREADS
    if threads == 0:
        if _AUTO_THREADS is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= cores
            _AUTO_THREADS = 1 if busy else torch.get_num_threads()
        threads = _AUTO_THREADS
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def obs_dtype(space: gym.Space) -> torch.dtype:
    """float32 for float observations (the network's dtype); integer observations (token ids) keep their type."""
    return torch.float32 if np.issubdtype(space.dtype, np.floating) else torch.from_numpy(np.zeros(0, space.dtype)).dtype
