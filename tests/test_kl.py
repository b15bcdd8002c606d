"""Reference log-prob wrappers: cached log-probs equal a full recompute, one prefill per episode."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from textenv import LengthReward, TextEnv, TextVectorEnv, char_tokenizer
from textenv.kl import RefLogprob, RefLogprobEnv
from tiny import tiny_gpt

TOK = char_tokenizer("abcd ")
N = len(TOK)
KW = dict(tokenizer=TOK, reward_model=LengthReward(), prompts=["a", "ab c", "dd", "bcd"], max_prompt_tokens=4,
          max_new_tokens=(1, 5), min_new_tokens=1)  # fmt: skip


def padded_gpt(vocab: int = N + 3) -> GPT2LMHeadModel:
    """A random tiny GPT-2 whose vocabulary is padded beyond the tokenizer's (log-probs renormalise over N)."""
    return tiny_gpt(vocab, width=32, layers=2, positions=32, resid_pdrop=0.5)


def recompute(model, obs_row: np.ndarray, length: int, action: int, temperature: float = 1.0) -> float:
    """log p(action | the real tokens of obs_row) at `temperature`: one unpadded forward, no cache."""
    ids = torch.as_tensor(obs_row[len(obs_row) - length :])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1, :N]
    return torch.log_softmax(logits / temperature, -1)[action].item()


@pytest.mark.parametrize("vector,temperature", [("batched", 1.0), ("sync", 1.0), ("batched", 0.6)])
def test_ref_logprob_equals_full_recompute(vector, temperature):
    E = 4
    model = padded_gpt()
    base = (
        TextVectorEnv(E, **KW)
        if vector == "batched"
        else gym.vector.SyncVectorEnv([lambda: TextEnv(**KW)] * E)
    )
    envs = RefLogprob(base, model, temperature=temperature)
    assert not model.training  # frozen: resid_pdrop=0.5 would make log-probs random
    prefilled = []
    real_prefill = envs.cache._prefill
    envs.cache._prefill = lambda rows, prefix, *rest, **kw: (prefilled.append(len(rows)), real_prefill(rows, prefix, *rest, **kw))
    obs, infos = envs.reset(seed=0)
    length = infos["length"]
    rng = np.random.default_rng(0)
    starts, ended = E, np.zeros(E, dtype=bool)
    for _ in range(25):
        actions = rng.integers(0, N, size=E)
        new_obs, _, term, trunc, infos = envs.step(actions)
        assert infos["_ref_logprob"].tolist() == (~ended).tolist()
        for i in np.flatnonzero(~ended):
            expected = recompute(model, obs[i], length[i], actions[i], temperature)
            assert infos["ref_logprob"][i] == pytest.approx(expected, abs=1e-4)
        assert np.all(infos["ref_logprob"][ended] == 0.0)
        starts += ended.sum()
        obs, length, ended = new_obs, infos["length"], term | trunc
    # Each episode start is prefilled once (one-token prompts need no prefill); other steps feed one token.
    assert 0 < sum(prefilled) <= starts and starts > E


def test_single_env_wrapper_matches_recompute():
    model = padded_gpt()
    env = RefLogprobEnv(TextEnv(**KW), model, temperature=1.5)
    obs, info = env.reset(seed=1)
    length = info["length"]
    for a in [3, 4, 5, 6, 7, 3, 4, 5, 6, 7]:
        new_obs, _, term, trunc, info = env.step(a)
        assert info["ref_logprob"] == pytest.approx(recompute(model, obs, length, a, 1.5), abs=1e-4)
        obs, length = new_obs, info["length"]
        if term or trunc:
            obs, info = env.reset()
            length = info["length"]


def test_vocab_mismatch_and_bad_env():
    smaller = f"vocabulary of {N - 1} tokens, smaller than its tokenizer's {N}.*same or padded"
    with pytest.raises(ValueError, match=smaller):
        RefLogprob(TextVectorEnv(2, **KW), padded_gpt(vocab=N - 1))
    with pytest.raises(ValueError, match="reference model of RefLogprobEnv"):
        RefLogprobEnv(TextEnv(**KW), padded_gpt(vocab=N - 1))
    with pytest.raises(ValueError, match="not a transformers causal LM"):
        RefLogprob(TextVectorEnv(2, **KW), torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="Discrete"):
        RefLogprobEnv(gym.make("Pendulum-v1"), padded_gpt(), pad_token_id=0)
