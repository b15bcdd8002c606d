"""The tiny models, env and RLHF run that several test files build, defined once here (fixtures live in
conftest.py). Every builder seeds torch itself, and sizes are arguments: a test's thresholds were set on its own
model, and the same arguments give the same weights."""

from __future__ import annotations

import math
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
