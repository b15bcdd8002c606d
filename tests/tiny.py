"""The tiny models, env and RLHF run that several test files build, defined once here (fixtures live in
conftest.py). Every builder seeds torch itself, and sizes are arguments: a test's thresholds were set on its own
model, and the same arguments give the same weights."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from agents.rlhf import RLHFConfig
from agents.rlhf.config import rlhf_ppo
from textenv import EpisodeSpec

# ---- models ---------------------------------------------------------------------------------------------------


def tiny_gpt(vocab: int, *, seed: int = 0, width: int = 16, layers: int = 1, positions: int = 16,
             **config) -> GPT2LMHeadModel:
    """A random GPT-2 of `layers` blocks, `width` wide (2 heads, absolute positions, tied head), with
    `char_tokenizer`'s special ids (pad 0, bos = eos 1); `config` overrides GPT2Config fields (dropout, ...)."""
    torch.manual_seed(seed)
    base = dict(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=2, bos_token_id=1,
                eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**base | config))


def tiny_llama(vocab: int, layers: int = 2, *, seed: int = 0, **config) -> LlamaForCausalLM:
    """A random Llama of `layers` 32-wide blocks (grouped-query attention: 4 heads over 2 key-value heads, rotary
    positions, RMSNorm); `config` overrides LlamaConfig fields."""
    torch.manual_seed(seed)
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(LlamaConfig(**base | config))


def tiny_classifier(vocab: int, num_labels: int = 2, *, seed: int = 0, width: int = 16,
                    **config) -> DistilBertForSequenceClassification:
    """A random one-block DistilBERT sequence classifier, `width` wide (2 heads, 64 positions, pad id 0), the
    shape of a reward model; `config` overrides DistilBertConfig fields."""
    torch.manual_seed(seed)
    base = dict(vocab_size=vocab, dim=width, hidden_dim=2 * width, n_layers=1, n_heads=2, max_position_embeddings=64,
                num_labels=num_labels, pad_token_id=0)
    return DistilBertForSequenceClassification(DistilBertConfig(**base | config))


# ---- an env ---------------------------------------------------------------------------------------------------


class FixedLength(gym.Env):
    """Episodes of exactly `length` steps (truncated), reward 1 at the end, `ref_logprob` = log(0.5) - offset."""

    observation_space = gym.spaces.Box(-1, 1, (3,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length=4, offset=0.5):
        self.length, self.offset, self.t = length, offset, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.uniform(-1, 1, 3).astype(np.float32), {}

    def step(self, action):
        self.t += 1
        obs = self.np_random.uniform(-1, 1, 3).astype(np.float32)
        return obs, float(self.t == self.length), False, self.t == self.length, {"ref_logprob": math.log(0.5) - self.offset}


class OnRank1(gym.Wrapper):
    """CartPole whose 5th step fails on rank 1 (torchrun's `RANK`): `fault="hang"` never returns, as when a rank
    waits on a dead file system or device; `fault="raise"` raises. Test files register ids for it
    (`gym.register(..., entry_point="tests.tiny:OnRank1", kwargs=...)`) for `--env-id tests.test_x:Id`."""

    def __init__(self, fault: str = "raise"):
        super().__init__(gym.make("CartPole-v1"))
        self.fault, self.n = fault, 0

    def step(self, action):
        self.n += 1
        if self.n == 5 and os.environ.get("RANK") == "1":
            if self.fault == "hang":
                time.sleep(3600)
            raise RuntimeError("rank 1's env broke on purpose")
        return super().step(action)


# ---- a fixed PPO batch ---------------------------------------------------------------------------------------

VALID = {  # (T=8, E=4): which steps are transitions; ranks 0 and 1 hold columns 0-1 and 2-3
    "all": torch.ones(8, 4, dtype=torch.bool),
    "uneven": torch.arange(8)[:, None] < torch.tensor([2, 3, 8, 8]),  # rank 0 holds 5 steps, rank 1 holds 16
    "one rank empty": torch.arange(4).expand(8, 4) >= 2,  # rank 0 holds none
}


def fixed_batch(valid: str = "all", T: int = 8, E: int = 4) -> dict:
    """A rollout-shaped batch of CartPole-like data, the same on every process."""
    g = torch.Generator().manual_seed(0)
    return {"obs": torch.randn(T, E, 4, generator=g), "actions": torch.randint(0, 2, (T, E), generator=g),
            "logprobs": torch.full((T, E), -0.69), "values": torch.randn(T, E, generator=g),
            "advantages": torch.randn(T, E, generator=g), "returns": torch.randn(T, E, generator=g),
            "valid": VALID[valid]}


def update_on(cols: slice, dist, valid: str = "all", by_env: bool = False, shard: bool = False) -> tuple[dict, dict]:
    """Three PPO epochs (one full minibatch each, advantages normalised) on env columns `cols` of the fixed
    batch; `shard`: the agent sharded over `dist`'s ranks (agents.sharding). Returns the whole weights (on rank 0
    when sharded) and the update's statistics."""
    from agents import sharding
    from agents.policies import MLPAgent
    from agents.ppo import Args, update
    from agents.rollout import Rollout

    torch.manual_seed(0)
    agent = MLPAgent(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))
    if shard:
        sharding.shard_agent(agent, dist)
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2, eps=1e-5)
    args = Args(num_envs=4, num_minibatches=1, update_epochs=3, max_grad_norm=0.1,  # clipping active
                minibatch_by_env=by_env)
    b = {k: v[:, cols] for k, v in fixed_batch(valid).items()}
    zeros = torch.zeros_like(b["values"])
    rollout = Rollout(obs=b["obs"], actions=b["actions"], logprobs=b["logprobs"], values=b["values"], rewards=zeros,
                      ref_logprobs=None, valid=b["valid"], terminated=zeros.bool(), truncated=zeros.bool(),
                      next_obs=b["obs"][-1], episodes=[], shaped_rewards=zeros,
                      advantages=b["advantages"], returns=b["returns"])
    stats = update(agent, opt, rollout, args, 0.2, dist)
    return sharding.full_state_dict(agent), stats



# ---- a toy RLHF run -------------------------------------------------------------------------------------------

PROMPTS = ["ab", "b", "ba", "bb", " b", "a b"]  # over char_tokenizer("ab ")


def toy_config(tmp_path: Path, ppo: dict | None = None, **kw) -> RLHFConfig:
    """A 10-iteration run of 16 envs x 18 steps; `ppo` overrides PPO settings, `kw` the job's."""
    ppo = dict(run_dir=str(tmp_path / "run"), num_envs=16, num_steps=18, total_timesteps=16 * 18 * 10,
               learning_rate=3e-3, num_minibatches=2, kl_coef=0.01, kl_target=None, torch_threads=1) | (ppo or {})
    base = dict(episode=EpisodeSpec(max_prompt_tokens=4, max_new_tokens=8), eval_prompts=48)
    return RLHFConfig(**base | kw, ppo=rlhf_ppo(**ppo))


def without_clocks(history: list[dict]) -> list[dict]:
    """A report's per-iteration history less what depends on the clock: what two runs of one seed share."""
    return [{k: v for k, v in h.items() if k not in ("time_s", "tokens_per_second")} for h in history]
