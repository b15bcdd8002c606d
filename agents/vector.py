"""Vector-env plumbing for `agents.ppo`: build or wrap the env, check what PPO supports, devices and dtypes."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch


def vector_env(envs: gym.Env | gym.vector.VectorEnv | None, env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """`envs` as a vector env (None: `num_envs` copies of `env_id`), checked: Discrete actions, NEXT_STEP autoreset."""
    if envs is None:
        envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)])
    elif not isinstance(envs, gym.vector.VectorEnv):
        single = envs
        envs = gym.vector.SyncVectorEnv([lambda: single])
    if not isinstance(envs.single_action_space, gym.spaces.Discrete):
        raise TypeError(f"agents.ppo supports Discrete action spaces only, got {envs.single_action_space}; "
                        "use a discrete env (or discretize the actions with a wrapper)")
    mode = autoreset_mode(envs)
    if mode != gym.vector.AutoresetMode.NEXT_STEP:  # the rollout's reset-step mask is next-step autoreset's
        raise ValueError(f"the vector env's autoreset_mode is {mode.name}; agents.ppo needs next-step autoreset: "
                         "build it with autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP (Gymnasium's default)")
    return envs


def autoreset_mode(envs: gym.vector.VectorEnv) -> gym.vector.AutoresetMode:
    """The vector env's declared autoreset mode; NEXT_STEP when it declares none (Gymnasium 1.0's only mode)."""
    return gym.vector.AutoresetMode(envs.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP))


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; anything else as torch.device."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def obs_dtype(space: gym.Space) -> torch.dtype:
    """float32 for float observations (the network's dtype); integer observations (token ids) keep their type."""
    return torch.float32 if np.issubdtype(space.dtype, np.floating) else torch.from_numpy(np.zeros(0, space.dtype)).dtype
