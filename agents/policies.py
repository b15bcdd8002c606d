"""Policies for `agents.ppo`: the agent protocol and `MLPAgent`, CleanRL's separate actor and critic MLPs.

The agent protocol (see `agents.ppo`):
    get_value(obs (B, *obs_shape)) -> value (B,)
    get_action_and_value(obs, action=None) -> action (B,), logprob (B,), entropy (B,), value (B,)
    act(obs, deterministic=True) -> action (B,)
Optional: evaluate_sequences(obs (T, E, ...), actions (T, E), valid (T, E)) -> logprob, entropy, value (T, E),
and reset_cache(). Agents that honour action masks take an `action_mask=` keyword (bool (B, n_actions), or
(T, E, n_actions) for evaluate_sequences; True = allowed) in all three; `agents.ppo` passes it only when the env
reports `infos["action_mask"]`.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from torch import nn


def layer_init(layer: nn.Linear, std: float = float(np.sqrt(2)), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std`, constant bias (the PPO implementation detail #2, Huang et al. 2022)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def check_action_mask(mask: object, logits: torch.Tensor) -> torch.Tensor:
    """An action mask as a bool tensor shaped like `logits` (..., A) on its device, or a clear error."""
    mask = torch.as_tensor(mask, device=logits.device)
    if mask.dtype != torch.bool or mask.shape != logits.shape:
        raise ValueError(f"action_mask must be a bool tensor of shape {tuple(logits.shape)} (True = allowed), got "
                         f"{mask.dtype} {tuple(mask.shape)}; pass infos['action_mask'] of the env's observation.")
    return mask


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """log_softmax over the allowed entries only: disallowed logits become -inf (log-prob -inf, probability 0)."""
    return (logits if mask is None else logits.masked_fill(~mask, float("-inf"))).log_softmax(-1)


def entropy_of(logp: torch.Tensor, mask: torch.Tensor | None, probs: torch.Tensor | None = None) -> torch.Tensor:
    """-sum p log p over the last dim; masked entries (p = 0, log p = -inf) count 0, without NaN in value or grad.
    `probs`: exp(logp) when the caller has it already (a large vocabulary makes the exp cost)."""
    probs = logp.exp() if probs is None else probs
    return -(probs * (logp if mask is None else logp.masked_fill(~mask, 0.0))).sum(-1)


def categorical(logits: torch.Tensor, action: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (if `action` is None), log-prob and entropy of a categorical over the last dim, restricted to the
    entries where `mask` (bool, like logits) is True when given.

    Written out instead of `torch.distributions.Categorical`, whose argument checks cost more than the
    tiny MLP itself at one call per environment step."""
    mask = None if mask is None else check_action_mask(mask, logits)
    logp = masked_log_softmax(logits, mask)  # (B, A)
    if action is None:  # Gumbel-max: argmax(logp + Gumbel noise) is an exact sample, cheaper than multinomial
        action = (logp - torch.empty_like(logp).exponential_().log()).argmax(-1)
        if mask is not None:  # a zero exponential draw would give -inf - -inf = NaN: never pick a masked entry
            action = torch.where(mask.gather(-1, action[..., None])[..., 0], action, logp.argmax(-1))
    logprob = logp.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
    return action, logprob, entropy_of(logp, mask)


class MLPAgent(nn.Module):
    """Actor and critic, each a 2-layer tanh MLP (64 wide), as in CleanRL's `ppo.py` and SB3's `MlpPolicy`."""

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, hidden: int = 64):
        super().__init__()
        if not isinstance(action_space, gym.spaces.Discrete):
            raise TypeError(f"MLPAgent needs a Discrete action space, got {action_space}; use a discrete env.")
        if not isinstance(observation_space, gym.spaces.Box):
            raise TypeError(
                f"MLPAgent needs a Box observation space, got {observation_space}; "
                "flatten the observation (gymnasium.wrappers.FlattenObservation) or pass your own agent."
            )
        n_in, n_out = int(np.prod(observation_space.shape)), int(action_space.n)
        self.critic = nn.Sequential(
            layer_init(nn.Linear(n_in, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, 1), std=1.0),
        )  # fmt: skip
        self.actor = nn.Sequential(
            layer_init(nn.Linear(n_in, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, hidden)), nn.Tanh(),
            layer_init(nn.Linear(hidden, n_out), std=0.01),
        )  # fmt: skip

    @staticmethod
    def _flat(obs: torch.Tensor) -> torch.Tensor:
        return obs.reshape(obs.shape[0], math.prod(obs.shape[1:])).float()  # (B, n_in), also for B = 0

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s): (B,)."""
        return self.critic(self._flat(obs)).squeeze(-1)

    def get_action_and_value(
        self, obs: torch.Tensor, action: torch.Tensor | None = None, action_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample an action (or score the given one) among those `action_mask` allows: action, logprob,
        entropy, value, each (B,)."""
        x = self._flat(obs)
        action, logprob, entropy = categorical(self.actor(x), action, action_mask)
        return action, logprob, entropy, self.critic(x).squeeze(-1)

    def act(self, obs: torch.Tensor, deterministic: bool = True, action_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The most likely allowed action (or a sample): (B,)."""
        logits = self.actor(self._flat(obs))
        if deterministic:
            mask = None if action_mask is None else check_action_mask(action_mask, logits)
            return masked_log_softmax(logits, mask).argmax(-1)
        return categorical(logits, None, action_mask)[0]
