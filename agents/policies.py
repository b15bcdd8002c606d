"""Policies for `agents.ppo`: the agent protocol and `MLPAgent`, CleanRL's separate actor and critic MLPs.

The agent protocol (see `agents.ppo`):
    get_value(obs (B, *obs_shape)) -> value (B,)
    get_action_and_value(obs, action=None) -> action (B,), logprob (B,), entropy (B,), value (B,)
    act(obs, deterministic=True) -> action (B,)
Optional: evaluate_sequences(obs (T, E, ...), actions (T, E), valid (T, E)) -> logprob, entropy, value (T, E),
and reset_cache().
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn


def layer_init(layer: nn.Linear, std: float = float(np.sqrt(2)), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights with gain `std`, constant bias (the PPO implementation detail #2, Huang et al. 2022)."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def categorical(logits: torch.Tensor, action: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (if `action` is None), log-prob and entropy of a categorical over the last dim.

    Written out instead of `torch.distributions.Categorical`, whose argument checks cost more than the
    tiny MLP itself at one call per environment step."""
    logp = logits.log_softmax(-1)  # (B, A)
    if action is None:  # Gumbel-max: argmax(logp + Gumbel noise) is an exact sample, cheaper than multinomial
        action = (logp - torch.empty_like(logp).exponential_().log()).argmax(-1)
    logprob = logp.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return action, logprob, entropy


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
        return obs.reshape(obs.shape[0], -1).float()  # (B, n_in)

    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s): (B,)."""
        return self.critic(self._flat(obs)).squeeze(-1)

    def get_action_and_value(
        self, obs: torch.Tensor, action: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample an action (or score the given one): action, logprob, entropy, value, each (B,)."""
        x = self._flat(obs)
        action, logprob, entropy = categorical(self.actor(x), action)
        return action, logprob, entropy, self.critic(x).squeeze(-1)

    def act(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        """The most likely action (or a sample): (B,)."""
        logits = self.actor(self._flat(obs))
        return logits.argmax(-1) if deterministic else categorical(logits, None)[0]


def __getattr__(name: str):
    """`from agents.policies import GPTAgent` works, but importing this module (as `agents.ppo` does)
    never pulls in transformers: the LM policy lives in `agents.gpt_policy` and loads on first use."""
    if name == "GPTAgent":
        from agents.gpt_policy import GPTAgent

        return GPTAgent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
