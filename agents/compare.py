"""Side by side with Stable-Baselines3: its PPO with an `agents.ppo.Args`'s hyperparameters, learning curves,
and policy adapters for `agents.evaluate.evaluate`. Used by the notebooks (no logic is born in a notebook).

    from agents.ppo import train, zoo
    from agents.compare import train_sb3, plot_curves
    ours, sb3 = train(zoo()), train_sb3(zoo())
    plot_curves({"ours": ours["episode_returns"], "SB3": sb3["episode_returns"]}, target=475)

Hyperparameter mapping (`sb3_kwargs`): the same names mean the same thing, with two differences in form.
Our value loss is CleanRL's `0.5 * MSE` and SB3's is the MSE, so SB3 gets `vf_coef / 2`; and with
`clip_vloss` SB3 clips the value prediction by `clip_coef` (`clip_range_vf`) where CleanRL takes the max of
the clipped and unclipped losses. SB3's PPO always bootstraps truncated episodes (our default too).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch

from agents.ppo import Args
from agents.vector import set_torch_threads

Returns = Sequence[tuple[int, float]]


def sb3_kwargs(args: Args) -> dict:
    """Keyword arguments of `stable_baselines3.PPO` equivalent to `args` (see the module docstring)."""
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches:
        raise ValueError(f"num_envs * num_steps = {batch} is not divisible by num_minibatches = "
                         f"{args.num_minibatches}; pick a divisor of {batch}")
    lr, clip = args.learning_rate, args.clip_coef
    return dict(
        n_steps=args.num_steps, batch_size=batch // args.num_minibatches, n_epochs=args.update_epochs,
        gamma=args.gamma, gae_lambda=args.gae_lambda, ent_coef=args.ent_coef, vf_coef=args.vf_coef / 2,
        max_grad_norm=args.max_grad_norm, normalize_advantage=args.norm_adv, target_kl=args.target_kl,
        # SB3 calls schedules with progress_remaining, 1 -> 0: linear annealing to 0 as ours
        learning_rate=(lambda p: lr * p) if args.anneal_lr else lr,
        clip_range=(lambda p: clip * p) if args.anneal_clip else clip,
        clip_range_vf=clip if args.clip_vloss else None,
        seed=args.seed, device="cpu" if args.device == "auto" else args.device)


def train_sb3(args: Args, env: str | Callable[[], gym.Env] | None = None, **ppo_kwargs) -> dict:
    """Train SB3's PPO (`MlpPolicy`, 2 x 64 tanh, as `MLPAgent`) with `args`'s hyperparameters on `args.num_envs`
    copies of `env` (an env id or a thunk; default `args.env_id`) for `args.total_timesteps`.

    Returns `model`, `episode_returns` [(global_step, return)] (as `agents.ppo.train`), `sps`, `wall_s` and
    `cpu_s` (process CPU time of the training alone).
    `ppo_kwargs` override the mapped settings (e.g. `policy_kwargs`)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    class Episodes(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.returns: list[tuple[int, float]] = []

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:  # make_vec_env's Monitor wrapper
                    self.returns.append((self.num_timesteps, float(info["episode"]["r"])))
            return True

    set_torch_threads(args.torch_threads)  # the flag's one rule (0: automatic)
    venv = make_vec_env(env or args.env_id, n_envs=args.num_envs, seed=args.seed)
    model = PPO("MlpPolicy", venv, verbose=0, **(sb3_kwargs(args) | ppo_kwargs))
    episodes = Episodes()
    t, cpu = time.time(), time.process_time()
    model.learn(args.total_timesteps, callback=episodes)
    wall, cpu = time.time() - t, time.process_time() - cpu
    return {"model": model, "episode_returns": episodes.returns, "sps": args.total_timesteps / wall, "wall_s": wall,
            "cpu_s": cpu}


def rolling_mean(returns: Returns, window: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(global steps, mean of the last <= `window` episode returns) after each episode."""
    steps = np.array([s for s, _ in returns], dtype=float)
    r = np.array([x for _, x in returns], dtype=float)
    c = np.concatenate([[0.0], np.cumsum(r)])
    i = np.arange(1, len(r) + 1)
    n = np.minimum(i, window)
    return steps, (c[i] - c[i - n]) / n


def plot_curves(curves: dict[str, Returns], window: int = 100, ax=None, target: float | None = None,
                title: str = "", ylabel: str | None = None):
    """One line per run: the rolling mean return against environment steps; returns the matplotlib axes."""
    if ax is None:
        import matplotlib.pyplot as plt

        ax = plt.subplots(figsize=(6.5, 4))[1]
    for name, returns in curves.items():
        ax.plot(*rolling_mean(returns, window), label=name, lw=1.2)
    if target is not None:
        ax.axhline(target, color="gray", ls="--", lw=0.8)
    ax.set(title=title, xlabel="environment steps", ylabel=ylabel or f"mean return, last {window} episodes")
    ax.legend(loc="lower right")
    return ax


class RandomAgent:
    """Uniformly random actions, speaking the `act` part of the agent protocol (for `agents.evaluate.evaluate`)."""

    def __init__(self, action_space: gym.spaces.Discrete, seed: int = 0) -> None:
        self.n, self.rng = int(action_space.n), np.random.default_rng(seed)

    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        return torch.as_tensor(self.rng.integers(0, self.n, size=len(obs)))


class SB3Agent:
    """An SB3 model's `predict` as the agent protocol's `act` (for `agents.evaluate.evaluate`)."""

    def __init__(self, model) -> None:
        self.model = model

    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        return torch.as_tensor(self.model.predict(obs.cpu().numpy(), deterministic=deterministic)[0])
