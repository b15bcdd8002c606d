"""Reference-model log-probs for the per-token KL penalty of RLHF.

The seed recipe's reward is `score - beta * KL` per token, with `KL_t = log pi(a_t|s_t) - log p_ref(a_t|s_t)`
(Ziegler et al. 2019, https://arxiv.org/abs/1909.08593). `log p_ref` depends only on the environment's
text, so a wrapper around the environment owns the frozen reference LM and reports it as
`infos["ref_logprob"]`; `log pi` is known to the agent at rollout time, so the PPO loop forms the
penalty (and adapts beta) itself. The environment stays a plain Gymnasium env, and an agent with no
KL term ignores the extra info key.

Why incremental: a token-step episode of T tokens would cost T full forwards over the growing prefix
if each step re-encoded its observation. `CachedLM` keeps each row's keys/values, feeds the one new
token per step, and re-prefills only rows whose episode just started, so the reference model costs one
batched single-token decode per vector step (a test checks the result equals a full recompute).

Log-probs are normalised over the environment's action space (the first `action_space.n` ids): if the
reference model's vocabulary is padded beyond the tokenizer's, those extra ids are never actions, and
the policy restricts its logits the same way, so both distributions share a support.

Action masks: when the env reports `info["action_mask"]`, the reference is normalised over the same allowed set
as the masked policy, `log p_ref(a|s) - log sum_{b allowed} p_ref(b|s)`. The masked policy can only be compared
with the reference conditioned on the constraint: without renormalising, every step would carry an extra
`-log p_ref(allowed set)` >= 0 that no policy can reduce (and that punishes choices leading into tightly
constrained states), and a policy equal to the masked reference would not have KL 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper
from torch import nn

from textenv.lm import CachedLM, TrunkSplit, check_lm_vocab


def _pad_token_id(env: Any, lookup: Callable[[], Any]) -> int:
    """The env's pad id from its public attribute API (`lookup`), or an error naming the fix."""
    try:
        return int(lookup())
    except AttributeError:
        raise ValueError(f"cannot find the pad token id of {env}; pass pad_token_id=tokenizer.pad_token_id") from None


class _Reference:
    """The frozen reference LM with its KV cache, restricted to the env's action space (both wrappers use it)."""

    def __init__(self, action_space: spaces.Space, ref_model: nn.Module, pad_token_id: int,
                 device: str | torch.device | None, who: str, temperature: float = 1.0) -> None:
        if not (isinstance(temperature, int | float) and 0 < temperature < float("inf")):
            raise ValueError(f"{who}: temperature {temperature!r} must be a positive number (the policy's)")
        self.temperature = float(temperature)
        if not isinstance(action_space, spaces.Discrete):
            raise TypeError(f"{who} needs Discrete token actions, got {action_space}; wrap a TextEnv.")
        self.n_actions = int(action_space.n)
        split = ref_model if isinstance(ref_model, TrunkSplit) else None  # shares the policy's frozen trunk
        ref_model = ref_model.model if split is not None else ref_model
        self.device = torch.device(device) if device is not None else next(ref_model.parameters()).device
        check_lm_vocab(ref_model, self.n_actions, f"the reference model of {who}")
        self.model = ref_model.eval().requires_grad_(False).to(self.device)  # frozen: no dropout, no grad
        self.cache = split.cached() if split is not None else CachedLM(self.model, pad_token_id)

    @torch.no_grad()
    def logprobs(self, obs: np.ndarray, actions: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """log p_ref(actions | obs) (E,) float64 for obs (E, L), advancing the KV cache by one token per row;
        normalised over the allowed actions of `mask` (E, n_actions) bool when given."""
        try:
            logits, _ = self.cache.step(torch.as_tensor(obs, device=self.device))  # (E, V)
        except Exception as e:  # its own error, type kept, with where it came from
            e.add_note(f"while the reference model scored the actions of {len(obs)} envs (the KL penalty's "
                       "log p_ref)")
            raise
        logits = logits[:, : self.n_actions]  # (E, n_actions)
        if self.temperature != 1.0:  # the reference at the policy's temperature: the KL of what is sampled
            logits = logits / self.temperature
        if mask is not None:
            logits = logits.masked_fill(~torch.as_tensor(mask, device=self.device), float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)  # (E, n_actions)
        # Clamped: under NEXT_STEP autoreset an ignored action need not be a valid id.
        idx = torch.as_tensor(np.asarray(actions, dtype=np.int64), device=self.device).clamp(0, self.n_actions - 1)
        return logp.gather(1, idx[:, None])[:, 0].double().cpu().numpy()


def check_finite(logp: np.ndarray, applied: np.ndarray) -> None:
    """A ValueError naming the envs whose applied action got a non-finite reference log-prob: the KL penalty
    would turn their rewards, and then PPO's loss, into NaN one step later with the cause gone."""
    bad = np.flatnonzero(applied & ~np.isfinite(logp))
    if bad.size:
        raise ValueError(f"the reference model gave a non-finite log-prob ({logp[bad[0]]}) to the action of env "
                         f"{bad[0]}" + (f" (and {bad.size - 1} more)" if bad.size > 1 else "") + "; check its "
                         "weights for NaN or inf (a bad load, an overflow in half precision) and that it is the "
                         "policy's pretrained model")


class RefLogprob(VectorWrapper):
    """Adds `infos["ref_logprob"]` (E,) float64: log p_ref(action | obs before it) under a frozen causal LM.

    Works on any vector env with `Discrete` actions and left-padded token-id observations (TextVectorEnv,
    or SyncVectorEnv of TextEnv). `ref_model` is a causal LM, or `agent.reference(model)` of a `GPTAgent`
    with `trainable_layers` (the reference then runs only its top blocks over the policy's frozen trunk). Under
    NEXT_STEP autoreset the step right after an episode end applies no action: its `ref_logprob` is 0 and its
    `_ref_logprob` mask False. `temperature`: the reference is softmax(logits / temperature), as a `GPTAgent` of
    that temperature samples; pass the policy's, so the penalty is the KL of the distributions actually sampled.
    """

    def __init__(
        self,
        env: VectorEnv,
        ref_model: nn.Module,
        pad_token_id: int | None = None,
        device: str | torch.device | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(env)
        if pad_token_id is None:  # the vector envs' attribute API (TextVectorEnv, SyncVectorEnv of TextEnvs)
            pad_token_id = _pad_token_id(env, lambda: env.unwrapped.get_attr("pad_token_id")[0])
        self.ref = _Reference(env.single_action_space, ref_model, pad_token_id, device, "RefLogprob", temperature)
        self.cache = self.ref.cache
        self.next_step = (
            env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP) == AutoresetMode.NEXT_STEP
        )
        self._obs: np.ndarray | None = None
        self._ended = np.zeros(self.num_envs, dtype=np.bool_)
        self._mask: np.ndarray | None = None  # (E, n_actions): the actions allowed on self._obs

    def _remember_mask(self, infos: dict, rows: np.ndarray) -> None:
        if "action_mask" in infos:
            if self._mask is None:
                self._mask = np.ones((self.num_envs, self.ref.n_actions), dtype=np.bool_)
            has = rows & infos.get("_action_mask", np.ones(self.num_envs, np.bool_))
            self._mask[has] = np.asarray(infos["action_mask"])[has]

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        # read before resetting: SyncVectorEnv.reset pops "reset_mask" from the options it is given
        mask = (options or {}).get("reset_mask", np.ones(self.num_envs, dtype=np.bool_))
        obs, infos = self.env.reset(seed=seed, options=options)
        self._ended = self._ended & ~mask
        self._obs = obs
        self._remember_mask(infos, mask)
        return obs, infos

    def step(self, actions: Any):
        if self._obs is None:
            raise gym.error.ResetNeeded("step() called before reset(); call envs.reset() first.")
        obs, rewards, terminated, truncated, infos = self.env.step(actions)  # validates the actions first
        logp = self.ref.logprobs(self._obs, np.asarray(actions), self._mask)  # on the obs they were taken in
        applied = ~self._ended if self.next_step else np.ones(self.num_envs, dtype=np.bool_)
        check_finite(logp, applied)
        infos["ref_logprob"], infos["_ref_logprob"] = np.where(applied, logp, 0.0), applied
        self._obs, self._ended = obs, terminated | truncated
        self._remember_mask(infos, np.ones(self.num_envs, dtype=np.bool_))
        return obs, rewards, terminated, truncated, infos


class RefLogprobEnv(gym.Wrapper):
    """Single-env version of `RefLogprob`: adds `info["ref_logprob"]` (a float) after each step."""

    def __init__(
        self, env: gym.Env, ref_model: nn.Module, pad_token_id: int | None = None, device: str | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(env)
        if pad_token_id is None:
            pad_token_id = _pad_token_id(env, lambda: env.get_wrapper_attr("pad_token_id"))
        self.ref = _Reference(env.action_space, ref_model, pad_token_id, device, "RefLogprobEnv", temperature)
        self.cache = self.ref.cache
        self._obs: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    def reset(self, **kwargs: Any):
        self._obs, info = self.env.reset(**kwargs)
        self._mask = info.get("action_mask")
        return self._obs, info

    def step(self, action: Any):
        if self._obs is None:
            raise gym.error.ResetNeeded("step() called before reset(); call env.reset() first.")
        obs, reward, terminated, truncated, info = self.env.step(action)  # validates the action first
        mask = None if self._mask is None else self._mask[None]
        logp = self.ref.logprobs(self._obs[None], np.asarray(action).reshape(1), mask)
        check_finite(logp, np.ones(1, dtype=np.bool_))
        logp = logp[0]
        self._obs, self._mask = obs, info.get("action_mask")
        return obs, reward, terminated, truncated, {**info, "ref_logprob": float(logp)}
