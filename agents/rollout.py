"""The rollout arithmetic of PPO as small functions: autoreset mask, GAE, KL shaping, minibatch indices.

Layout: every array is (T, E) = (num_steps, num_envs), step t of env e, in Gymnasium 1.x's next-step autoreset
order: when step t ends an episode (terminated or truncated), the observation returned by that step is the
episode's final observation and becomes obs[t + 1]; step t + 1 then only resets the env (its action is ignored,
its reward is 0). That reset step is not a transition and is masked out (`valid` False).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def autoreset_valid(dones: np.ndarray, prev_done: np.ndarray) -> np.ndarray:
    """(T, E) bool, False at the next-step autoreset steps: where the same env's previous step ended an episode.

    dones: (T, E) terminated | truncated of each step; prev_done: (E,) dones of the step before this rollout."""
    before = np.concatenate([prev_done[None], dones[:-1]], axis=0)  # (T, E): done flag of step t - 1
    return ~before


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_value: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    valid: torch.Tensor,
    gamma: float,
    gae_lambda: float,
    bootstrap_truncated: bool = True,
    final_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

    rewards, values, terminated, truncated, valid: (T, E); next_value: (E,) the value of the observation returned
    by the last step. The successor of step t is obs[t + 1] (next_value for t = T - 1), which after an episode end
    is that episode's final observation, so a truncated episode bootstraps from it: the time limit is not part
    of the task. With `bootstrap_truncated=False` a truncation counts as a termination (RLHF: the score is given
    at the length limit, nothing follows). Masked (reset) steps get advantage 0. Returns (advantages, returns).
    With SAME_STEP autoreset, obs[t + 1] after an episode end is already the next episode's first: pass
    `final_values` (T, E), the value of the final observation of the episode that ended at step t.
    """
    # the loop runs in numpy: T small steps cost microseconds there, tens of microseconds as torch ops
    r, v, nv, term, trunc, ok = (x.detach().cpu().double().numpy() for x in
                                  (rewards, values, next_value, terminated, truncated, valid))
    done = np.maximum(term, trunc)
    no_future = term if bootstrap_truncated else done  # steps whose successor has no value
    fv = None if final_values is None else final_values.detach().cpu().double().numpy()
    advantages = np.zeros_like(v)
    lastgaelam = np.zeros_like(nv)
    for t in reversed(range(r.shape[0])):
        nextvalues = nv if t == r.shape[0] - 1 else v[t + 1]
        if fv is not None:
            nextvalues = np.where(done[t] > 0, fv[t], nextvalues)
        delta = r[t] + gamma * nextvalues * (1.0 - no_future[t]) - v[t]
        lastgaelam = (delta + gamma * gae_lambda * (1.0 - done[t]) * lastgaelam) * ok[t]
        advantages[t] = lastgaelam
    adv = torch.from_numpy(advantages).to(device=values.device, dtype=values.dtype)
    return adv, adv + values


def kl_penalty_rewards(
    rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, valid: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """r_t - kl_coef * (log pi_old(a_t|s_t) - log p_ref(a_t|s_t)) on valid steps (Ziegler et al. 2019,
    https://arxiv.org/abs/1909.08593): the per-token KL penalty to a frozen reference model. All (T, E)."""
    return rewards - kl_coef * (logprobs - ref_logprobs) * valid.float()


def adaptive_kl_coef(coef: float, kl: float, target: float, n_episodes: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return coef * (1.0 + error * n_episodes / horizon)


def warn_if_negative_kl(episode_kls: list[float], iteration: int) -> None:
    """Warn when the mean per-episode KL to the reference is negative beyond float noise and sampling error.

    sum_t log pi(a_t|s_t) - log p_ref(a_t|s_t) over sampled actions estimates KL(pi || p_ref) >= 0; a clearly
    negative mean means the actions were not drawn from the distribution whose log-probs PPO sees."""
    kl = float(np.mean(episode_kls))
    sem = float(np.std(episode_kls) / np.sqrt(len(episode_kls)))
    if kl < -1e-3 and kl + 2 * sem < 0:
        warnings.warn(f"iteration {iteration}: measured KL to the reference is negative ({kl:.4f} nats per episode): "
                      "the actions were not sampled from the policy whose logprobs PPO sees (temperature, top-k, "
                      "masking?) or ref_logprob is wrong", stacklevel=3)


def first_ratio_deviation(ratio: torch.Tensor, mask: torch.Tensor | None) -> float:
    """max |ratio - 1| over the (unmasked) entries of the first minibatch, with a warning when it is not ~0:
    before any step the policy is the rollout's, so the update must score the actions as the rollout did."""
    dev = ((ratio - 1).abs() if mask is None else torch.where(mask, ratio - 1, 0).abs()).max().item()
    if dev > 1e-4:
        warnings.warn(f"PPO ratio at the first minibatch deviates from 1 by {dev:.2e}: the update does not score "
                      "actions as the rollout did (dropout on? sampling from a different distribution? stale "
                      "cache?)", stacklevel=4)
    return dev


def flat_minibatches(valid: torch.Tensor, num_minibatches: int) -> list[torch.Tensor]:
    """Shuffled flat indices of the valid entries of a (T * E,) mask, split into `num_minibatches` parts."""
    idx = torch.nonzero(valid, as_tuple=False).squeeze(1)
    return list(idx[torch.randperm(idx.numel(), device=idx.device)].tensor_split(num_minibatches))


def env_minibatches(num_envs: int, num_minibatches: int) -> list[torch.Tensor]:
    """Shuffled env columns split into `num_minibatches` sets (all T steps of each column go together)."""
    return list(torch.randperm(num_envs).tensor_split(num_minibatches))


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor) -> float:
    """1 - Var[y_true - y_pred] / Var[y_true]: 1 is a perfect value function, 0 no better than a constant."""
    var_y = y_true.var().item() if y_true.numel() > 1 else float("nan")
    return float("nan") if var_y == 0 else 1 - (y_true - y_pred).var().item() / var_y


def env_info(infos: dict, i: int) -> dict:
    """Env `i`'s entries of a vector env's `infos` dict (Gymnasium's `_key` masks respected, nested dicts too)."""
    out = {}
    for k, v in infos.items():
        if k.startswith("_") or (f"_{k}" in infos and not infos[f"_{k}"][i]):
            continue
        out[k] = env_info(v, i) if isinstance(v, dict) else v[i]
    return out
