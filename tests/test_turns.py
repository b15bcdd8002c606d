"""TurnEnv: one step is one whole turn of the same episode that TextEnv plays token by token (same seed, same
episode through either view), with the turn's summed reward, and clear errors for malformed turns."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import textenv
from textenv import EndsWithReward, TextEnv, TurnEnv, char_tokenizer
from textenv.masks import AllowedTokens
from textenv.rewards import TokenReward

TOK = char_tokenizer("abcd")
A, B, C, D = (TOK.convert_tokens_to_ids(c) for c in "abcd")
EOS = TOK.eos_token_id
KW = dict(tokenizer=TOK, reward_model=EndsWithReward("d", 10.0), prompts=["a", "bb", "cab"], max_prompt_tokens=3,
          max_new_tokens=6, token_rewards=TokenReward({A: 1.0}))


def token_view(seed: int, tokens: list[int]) -> tuple[list[np.ndarray], float, dict]:
    env = TextEnv(**KW)
    obs, _ = env.reset(seed=seed)
    seen, total = [obs], 0.0
    for a in tokens:
        obs, reward, term, trunc, info = env.step(a)
        seen.append(obs)
        total += reward
        if term or trunc:
            break
    return seen, total, info


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_seed_same_episode_through_either_view(seed):
    turn_env = TurnEnv(gym.make("TextEnv-v0", **KW))
    first, info0 = turn_env.reset(seed=seed)
    obs, reward, term, trunc, info = turn_env.step("abad")  # no EOS given: TurnEnv ends the turn with one
    seen, total, token_info = token_view(seed, [A, B, A, D, EOS])
    assert (first == seen[0]).all() and (obs == seen[-1]).all() and term and not trunc
    assert reward == total == 2.0 + 10.0 and info["text"] == token_info["text"] and info["score"] == 10.0
    assert info["turn_actions"] == [A, B, A, D, EOS] and info0["prompt"] == token_info["prompt"]
    again = TurnEnv(TextEnv(**KW))
    again.reset(seed=seed)
    obs2, reward2, *_ = again.step([A, B, A, D, EOS])  # token ids with their EOS: the same
    assert (obs2 == obs).all() and reward2 == reward


def test_budget_cuts_a_long_turn_and_the_score_is_paid():
    env = TurnEnv(TextEnv(**KW))
    env.reset(seed=0)
    obs, reward, term, trunc, info = env.step("aaaaadddd")  # 9 tokens, budget 6
    assert trunc and not term and info["turn_actions"] == [A] * 5 + [D] and reward == 5.0 + 10.0


def test_bad_turns_get_clear_errors():
    env = TurnEnv(TextEnv(**KW))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="empty"):
        env.step("")
    with pytest.raises(ValueError, match="2 tokens follow"):
        env.step([A, EOS, B, C])
    with pytest.raises(TypeError, match="neither a str"):
        TurnEnv(TextEnv(**KW)).step([0.5])
    with pytest.raises(TypeError, match="wraps a TextEnv"):
        TurnEnv(gym.make("CartPole-v1"))
    masked = TurnEnv(TextEnv(**{**KW, "token_rewards": None}, action_mask=AllowedTokens([A, B, EOS], len(TOK))))
    masked.reset(seed=0)
    with pytest.raises(ValueError, match="masked out"):
        masked.step("abc")


def test_every_name_the_package_exports_exists():
    missing = [name for name in textenv.__all__ if not hasattr(textenv, name)]
    assert not missing and "TurnEnv" in textenv.__all__, missing
