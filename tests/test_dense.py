"""Dense rewards: each policy token's reward is paid on the step that emitted it (plus the terminal score), the
vector env pays the same as SyncVectorEnv, wrong lengths and non-causal rewards get clear errors, and PPO learns."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from textenv import EndsWithReward, TextEnv, TextVectorEnv, char_tokenizer
from textenv.rewards import TokenReward

TOK = char_tokenizer("abcd")
A, B, C, D = (TOK.convert_tokens_to_ids(c) for c in "abcd")
KW = dict(tokenizer=TOK, reward_model=EndsWithReward("d", 10.0), prompts=list("abcd"), max_prompt_tokens=1,
          max_new_tokens=4)
DENSE = TokenReward({A: 1.0, B: -0.5})


def test_each_token_is_paid_on_its_step_and_the_score_on_the_last():
    env = TextEnv(**KW, token_rewards=DENSE)
    env.reset(seed=0)
    paid = [env.step(a)[1] for a in (A, B, C)]
    assert paid == [1.0, -0.5, 0.0]
    _, reward, _, truncated, info = env.step(D)
    assert truncated and reward == 0.0 + 10.0 and info["score"] == 10.0
    assert info["token_rewards"] == [1.0, -0.5, 0.0, 0.0] and info["token_reward"] == 0.0
    plain = TextEnv(**KW)  # the default stays terminal-only
    plain.reset(seed=0)
    assert [plain.step(a)[1] for a in (A, B, C, D)] == [0.0, 0.0, 0.0, 10.0]


def test_vector_env_pays_as_sync_vector_env():
    vec = TextVectorEnv(3, **KW, token_rewards=DENSE)
    sync = gym.vector.SyncVectorEnv([lambda: TextEnv(**KW, token_rewards=DENSE) for _ in range(3)])
    vec.reset(seed=2), sync.reset(seed=2)
    rng = np.random.default_rng(0)
    total = 0.0
    for _ in range(12):
        actions = rng.choice([A, B, C, D], size=3)
        (_, vr, vt, vu, vi), (_, sr, st, su, si) = vec.step(actions), sync.step(actions)
        assert np.allclose(vr, sr) and (vt == st).all() and (vu == su).all()
        done = vt | vu
        for i in np.flatnonzero(done):
            assert vi["token_rewards"][i] == si["token_rewards"][i]
        total += abs(vr).sum()
    assert total > 0


def test_wrong_length_and_non_causal_rewards_get_clear_errors():
    short = TextEnv(**KW, token_rewards=lambda texts, ids: [[1.0] for _ in ids])
    short.reset(seed=0)
    short.step(A)
    with pytest.raises(ValueError, match="1 rewards .* for text 0, which has 2 policy tokens"):
        short.step(A)
    hindsight = TextEnv(**KW, token_rewards=lambda texts, ids: [[float(len(i))] * len(i) for i in ids])
    hindsight.reset(seed=0)
    hindsight.step(A)
    with pytest.raises(ValueError, match="not causal"):
        hindsight.step(A)
    with pytest.raises(ValueError, match="non-finite"):
        bad = TextEnv(**KW, token_rewards=lambda texts, ids: [[float("nan")] * len(i) for i in ids])
        bad.reset(seed=0)
        bad.step(A)
    with pytest.raises(TypeError, match="not callable"):
        TextEnv(**KW, token_rewards={A: 1.0})


def test_agents_ppo_learns_from_dense_rewards(tmp_path):
    """Only dense rewards (+1 per "a", -1 per "b"): PPO ends writing "a" nearly every token."""
    from agents import ppo
    from agents.policies import MLPAgent

    kw = {**KW, "reward_model": EndsWithReward("d", 0.0)}
    envs = TextVectorEnv(8, **kw, token_rewards=TokenReward({A: 1.0, B: -1.0}))
    agent = MLPAgent(envs.single_observation_space, envs.single_action_space)
    args = ppo.Args(total_timesteps=2_048, num_envs=8, num_steps=32, learning_rate=1e-2, gamma=1.0, seed=0,
                    torch_threads=1, bootstrap_truncated=False, run_dir=str(tmp_path), eval_episodes=16,
                    save_every=0, log_every=0)
    result = ppo.train(args, envs=envs, agent=agent)
    first = np.mean([r for _, r in result["episode_returns"][:50]])  # random: 4 tokens x (1 - 1) / 7 = 0
    assert abs(first) < 1.0 and result["eval_mean"] > 3.5, (first, result["eval_mean"])
