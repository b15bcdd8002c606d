"""Genericity proof: SB3's PPO and our agents.ppo (MLP policies) learn a tiny rule-reward TextEnv task
through the plain Gymnasium API, beating a random policy by a margin that cannot be chance.

Task: vocabulary {a, b, c, d} (+ pad, eos, unk), one-letter prompts, up to 3 new tokens; reward 1 if the
finished text ends with "d". A uniformly random policy scores about 0.3; always writing "d" scores 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from textenv import EndsWithReward, TextEnv, TextVectorEnv, char_tokenizer

TOK = char_tokenizer("abcd")
KW = dict(
    tokenizer=TOK,
    reward_model=EndsWithReward("d"),
    prompts=list("abcd"),
    max_prompt_tokens=1,
    max_new_tokens=3,
)
EPISODES = 400  # the mean of 400 Bernoulli rewards has std <= 0.025


def mean_score(policy, seed: int) -> float:
    """Mean final reward over EPISODES episodes of a 16-env TextVectorEnv; policy(obs (E, L)) -> actions (E,)."""
    envs = TextVectorEnv(16, **KW)
    obs, _ = envs.reset(seed=seed)
    scores: list[float] = []
    while len(scores) < EPISODES:
        obs, _, term, trunc, infos = envs.step(policy(obs))
        scores += infos["score"][term | trunc].tolist() if "score" in infos else []
    return float(np.mean(scores[:EPISODES]))


def random_policy(seed: int):
    rng = np.random.default_rng(seed)
    return lambda obs: rng.integers(0, len(TOK), size=len(obs))


@pytest.mark.slow
def test_sb3_ppo_learns_text_env():
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    torch.manual_seed(0)
    venv = make_vec_env(lambda: TextEnv(**KW), n_envs=4, seed=0)
    model = PPO("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=4, learning_rate=3e-3, gamma=1.0, seed=0,
                policy_kwargs=dict(net_arch=[32]), device="cpu")  # fmt: skip
    model.learn(total_timesteps=4_096)
    learned = mean_score(lambda obs: model.predict(obs, deterministic=False)[0], seed=100)
    random = mean_score(random_policy(1), seed=100)
    # 0.4 is more than 10 standard deviations of the difference of two 400-episode means.
    assert 0.15 < random < 0.5 and learned > random + 0.4, (learned, random)


@pytest.mark.slow
def test_agents_ppo_learns_text_env(tmp_path):
    from agents import ppo
    from agents.policies import MLPAgent

    envs = TextVectorEnv(8, **KW)
    agent = MLPAgent(envs.single_observation_space, envs.single_action_space)
    args = ppo.Args(total_timesteps=4_096, num_envs=8, num_steps=32, learning_rate=3e-3, gamma=1.0, seed=0,
                    bootstrap_truncated=False, run_dir=str(tmp_path), eval_episodes=0, save_every=0)  # fmt: skip
    ppo.train(args, envs=envs, agent=agent)

    def policy(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return agent.get_action_and_value(torch.as_tensor(obs))[0].numpy()

    learned, random = mean_score(policy, seed=100), mean_score(random_policy(1), seed=100)
    assert 0.15 < random < 0.5 and learned > random + 0.4, (learned, random)
