"""The advantages phase of a PPO iteration: the per-token KL penalty (`kl_penalty_rewards`), then an estimator,
GAE (`compute_gae`) or a group-relative baseline (`group_advantages`: RLOO, GRPO).

`AdvantageMode` is `Args.advantages` ("gae", "rloo", "grpo") as one object that owns what the choice decides: how
the envs start each rollout (`next_carry`), which estimator runs (`estimate`) and whether the value loss counts
(`value_coef`). The flag stays a string; `ADVANTAGE_MODES` resolves it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from agents.rollout import Carry, Rollout


def rloo(returns: np.ndarray) -> np.ndarray:
    """RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740) on one group's k returns: each return minus
    the mean of the other k - 1, a baseline the episode itself does not bias."""
    return returns - (returns.sum() - returns) / (len(returns) - 1)


def grpo(returns: np.ndarray) -> np.ndarray:
    """GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300) on one group's returns: each return minus the
    group's mean, over the group's std."""
    return (returns - returns.mean()) / (returns.std() + 1e-8)


@dataclass(frozen=True)
class AdvantageMode:
    """What `--advantages` decides: GAE with a value head over envs that run on, or a group-relative baseline
    (no value head trained) over whole episodes that start together, k per prompt."""

    name: str
    """the flag's value: "gae", "rloo" or "grpo\""""
    group_baseline: Callable[[np.ndarray], np.ndarray] | None = None
    """one group's returns -> their advantages (`rloo`, `grpo`); None: GAE"""

    @property
    def grouped(self) -> bool:
        """Each rollout resets every env (prompts handed out in groups) and collects one whole episode per env."""
        return self.group_baseline is not None

    def next_carry(self, envs: gym.vector.VectorEnv, carry: Carry, seed: int | None) -> Carry:
        """What the next rollout starts from: `carry` (GAE: the envs run on), or fresh episodes seeded with `seed`."""
        return Carry.start(envs, seed, episodic=True) if self.grouped else carry

    def value_coef(self, vf_coef: float) -> float:
        """The value loss's weight: `vf_coef`, or 0 where no value head is trained (group-relative)."""
        return 0.0 if self.grouped else vf_coef

    def estimate(self, r: Rollout, agent: torch.nn.Module, gamma: float, gae_lambda: float,
                 bootstrap_truncated: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, returns) (T, E) of rollout `r` from its `shaped_rewards`."""
        if self.grouped:
            return group_relative(r, self)
        # the last step's successor counts only where that step is a transition whose episode goes on (or is
        # truncated and bootstrapped): otherwise skip the forward (an LM re-encodes a whole batch of new prompts there)
        goes_on = r.valid[-1] & ~(r.terminated[-1] | (r.truncated[-1] & (not bootstrap_truncated)))
        with torch.no_grad():
            next_value = (agent.get_value(r.next_obs).flatten() if bool(goes_on.any())
                          else torch.zeros_like(r.values[-1]))
        terminal = r.terminated if bootstrap_truncated else r.terminated | r.truncated  # RLHF: cut = the end
        return compute_gae(r.shaped_rewards, r.values, next_value, terminal, r.truncated, r.valid, gamma, gae_lambda)


GAE, RLOO, GRPO = AdvantageMode("gae"), AdvantageMode("rloo", rloo), AdvantageMode("grpo", grpo)
ADVANTAGE_MODES = {m.name: m for m in (GAE, RLOO, GRPO)}  # `Args.advantages` -> its mode


def compute_advantages(rollout: Rollout, agent: torch.nn.Module, kl_coef: float, gamma: float, gae_lambda: float,
                       bootstrap_truncated: bool = True, mode: AdvantageMode = GAE) -> None:
    """Fill `rollout.shaped_rewards` (the env's rewards with the per-token KL penalty of coefficient `kl_coef`),
    `advantages` and `returns` (`mode`'s estimator: GAE, or each episode's return against its group's)."""
    r = rollout
    r.shaped_rewards = (kl_penalty_rewards(r.rewards, r.logprobs, r.ref_logprobs, r.valid, kl_coef)
                        if kl_coef > 0 else r.rewards)
    r.advantages, r.returns = mode.estimate(r, agent, gamma, gae_lambda, bootstrap_truncated)


def group_relative(r: Rollout, mode: AdvantageMode) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) of an episodic rollout (each env column one whole episode): the episode's return
    against its group's (`group_advantages`) on every one of its steps; the returns are the values plus them."""
    if r.groups is None:
        raise ValueError(f"advantages={mode.name!r} compares episodes within groups, but the env reports no "
                         "infos['group'] at reset; use an env that hands prompts out in groups "
                         "(TextVectorEnv(group_size=k), gymnasium.make_vec('TextEnv-v0', group_size=k)) or 'gae'")
    episode_returns = torch.where(r.valid, r.shaped_rewards, 0.0).sum(0)  # (E,)
    adv = torch.as_tensor(group_advantages(episode_returns.double().cpu().numpy(), r.groups, mode.group_baseline),
                          dtype=r.values.dtype, device=r.values.device)
    advantages = torch.where(r.valid, adv[None, :], 0.0)  # (T, E): the episode's advantage on its steps
    return advantages, advantages + r.values  # no value head is trained in these modes


def group_advantages(returns: np.ndarray, groups: np.ndarray,
                     baseline: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Each episode's return against the other episodes of its group (k episodes answering one prompt), by
    `baseline` (`rloo`, `grpo`) on each group's returns. A group of one has no baseline: an error."""
    out = np.zeros(len(returns))
    for g in np.unique(groups):
        idx = groups == g
        k = int(idx.sum())
        if k < 2:
            raise ValueError(f"group {g} holds {k} episode: a group-relative baseline needs >= 2 per group")
        out[idx] = baseline(returns[idx])
    return out


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_value: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    valid: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

    rewards, values, terminated, truncated, valid: (T, E); next_value: (E,) the value of the observation returned
    by the last step. The successor of step t is obs[t + 1] (next_value for t = T - 1), which after an episode end
    is that episode's final observation, so a truncated episode bootstraps from it: the time limit is not part
    of the task. To treat a truncation as a termination instead (RLHF: the score is given at the length limit,
    nothing follows), pass it in `terminated` too. Masked (reset) steps get advantage 0. Returns (advantages,
    returns).
    """
    # the loop runs in numpy: T small steps cost microseconds there, tens of microseconds as torch ops
    r, v, nv, term, trunc, ok = (x.detach().cpu().double().numpy() for x in
                                  (rewards, values, next_value, terminated, truncated, valid))
    done = np.maximum(term, trunc)
    advantages = np.zeros_like(v)
    lastgaelam = np.zeros_like(nv)
    for t in reversed(range(r.shape[0])):
        nextvalues = nv if t == r.shape[0] - 1 else v[t + 1]
        delta = r[t] + gamma * nextvalues * (1.0 - term[t]) - v[t]
        lastgaelam = np.where(ok[t], delta + gamma * gae_lambda * (1.0 - done[t]) * lastgaelam, 0.0)
        advantages[t] = lastgaelam
    adv = torch.from_numpy(advantages).to(device=values.device, dtype=values.dtype)
    return adv, adv + values


def kl_penalty_rewards(
    rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, valid: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """r_t - kl_coef * (log pi_old(a_t|s_t) - log p_ref(a_t|s_t)) on valid steps (Ziegler et al. 2019,
    https://arxiv.org/abs/1909.08593): the per-token KL penalty to a frozen reference model. All (T, E)."""
    return rewards - kl_coef * torch.where(valid, logprobs - ref_logprobs, 0.0)
