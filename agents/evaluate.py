"""Deterministic evaluation of an agent on a vector env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from agents.rollout import action_mask_of, mask_kwargs


@torch.no_grad()
def evaluate(
    agent: torch.nn.Module,
    envs: gym.vector.VectorEnv,
    n_episodes: int,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    deterministic: bool = True,
    next_step: bool = True,
) -> list[float]:
    """Returns of `n_episodes` episodes of `agent.act(obs, deterministic)`.

    Each env runs a fixed quota of episodes (as SB3's `evaluate_policy`), so short episodes are not
    over-counted. With next-step autoreset (`next_step`) the step after an episode end is a reset, not counted.
    When the env reports `infos["action_mask"]`, `act` gets it as `action_mask=`."""
    n = envs.num_envs
    quota = np.array([(n_episodes + i) // n for i in range(n)])
    counts = np.zeros(n, dtype=int)
    returns: list[float] = []
    ep_ret = np.zeros(n)
    obs, infos = envs.reset(seed=seed)
    prev_done = np.zeros(n, dtype=bool)
    dtype = torch.float32 if np.issubdtype(obs.dtype, np.floating) else None
    while (counts < quota).any():
        mask = action_mask_of(infos, n, envs.single_action_space)
        kw = mask_kwargs(agent, "act", None if mask is None else torch.as_tensor(mask, device=device))
        action = agent.act(torch.as_tensor(obs, dtype=dtype, device=device), deterministic=deterministic, **kw)
        obs, reward, term, trunc, infos = envs.step(action.cpu().numpy())
        ep_ret += np.where(prev_done, 0.0, reward)
        done = term | trunc
        prev_done = done & next_step
        for i in np.flatnonzero(done):
            if counts[i] < quota[i]:
                returns.append(float(ep_ret[i]))
                counts[i] += 1
            ep_ret[i] = 0.0
    return returns


def final_evaluation(agent: torch.nn.Module, envs: gym.vector.VectorEnv | None, args: object, device: torch.device,
                     writer: object, global_step: int) -> list[float]:
    """The end of a PPO run: `args.eval_episodes` deterministic episodes on `envs` (None: `args.num_envs` fresh
    copies of `args.env_id`), written to TensorBoard and printed."""
    from agents.vector import vector_env

    eval_envs = vector_env(None, args.env_id, args.num_envs) if envs is None else envs
    returns = evaluate(agent, eval_envs, args.eval_episodes, device, seed=args.seed + 10_000)
    if envs is None:
        eval_envs.close()
    writer.add_scalar("charts/eval_return", float(np.mean(returns)), global_step)
    print(f"eval: {np.mean(returns):.2f} +- {np.std(returns):.2f} over {len(returns)} episodes")
    return returns
