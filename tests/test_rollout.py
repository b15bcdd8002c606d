"""The phases on their own: collect_rollout across rollout boundaries (agents.rollout), compute_advantages
(agents.advantages)."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.advantages import RLOO, compute_advantages
from agents.policies import MLPAgent
from agents.rollout import Carry, collect_rollout, first_ratio_deviation
from tiny import FixedLength  # episodes of a fixed length with a known ref_logprob


def setup(seed: int = 0):
    envs = gym.vector.SyncVectorEnv([lambda: FixedLength(length=3) for _ in range(2)])
    torch.manual_seed(seed)
    return envs, MLPAgent(envs.single_observation_space, envs.single_action_space), Carry.start(envs, seed)


def test_collect_rollout_carries_episodes_and_the_reset_mask_across_rollouts():
    envs, agent, carry = setup()
    cpu = torch.device("cpu")
    # 2 envs (x 2 ranks: 4 global steps per vector step); the episodes end at the last step of the first rollout
    first = collect_rollout(envs, agent, carry, 3, global_step=0, steps_per_step=4, kl_coef=0.0, device=cpu)
    assert bool(first.valid.all()) and first.truncated[2].all() and not first.truncated[:2].any()
    assert [(e.global_step, e.ret, e.length) for e in first.episodes] == [(12, 1.0, 3)] * 2
    per_token = (first.logprobs - first.ref_logprobs).double()
    np.testing.assert_allclose([e.kl for e in first.episodes], per_token.sum(0).numpy(), rtol=1e-6)
    assert first.episodes[0].info["ref_logprob"] == pytest.approx(math.log(0.5) - 0.5)
    second = collect_rollout(envs, agent, carry, 5, global_step=12, steps_per_step=4, kl_coef=0.0, device=cpu)
    # its first step only resets the envs: masked, reward 0, acting on the final observation of the first
    assert second.valid.tolist() == [[False, False]] + [[True, True]] * 3 + [[False, False]]
    assert torch.equal(second.obs[0], first.next_obs) and bool((second.rewards[0] == 0).all())
    assert [(e.global_step, e.length) for e in second.episodes] == [(28, 3)] * 2  # steps 1-3, not the reset step
    # the second's last step was a reset, not an episode end: the third's first step is a transition
    third = collect_rollout(envs, agent, carry, 1, global_step=32, steps_per_step=4, kl_coef=0.0, device=cpu)
    assert third.valid.tolist() == [[True, True]] and third.episodes == []


def test_compute_advantages_shapes_rewards_only_with_a_kl_coefficient():
    envs, agent, carry = setup()
    cpu = torch.device("cpu")
    plain = collect_rollout(envs, agent, carry, 4, 0, 2, kl_coef=0.0, device=cpu)
    compute_advantages(plain, agent, kl_coef=0.0, gamma=1.0, gae_lambda=1.0, bootstrap_truncated=False)
    assert plain.shaped_rewards is plain.rewards
    # gamma = lambda = 1, no bootstrap: the return of steps 0..2 is the episode's reward 1; reset step 3: advantage 0
    torch.testing.assert_close(plain.returns[:3], torch.ones(3, 2))
    assert bool((plain.advantages[3] == 0).all())
    shaped = collect_rollout(envs, agent, carry, 4, 8, 2, kl_coef=0.1, device=cpu)
    compute_advantages(shaped, agent, 0.1, 1.0, 1.0, False)
    expected = shaped.rewards - 0.1 * (shaped.logprobs - shaped.ref_logprobs) * shaped.valid
    torch.testing.assert_close(shaped.shaped_rewards, expected)


def test_kl_coef_needs_the_reference_log_probs():
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2)
    agent = MLPAgent(envs.single_observation_space, envs.single_action_space)
    with pytest.raises(ValueError, match="ref_logprob"):
        collect_rollout(envs, agent, Carry.start(envs, 0), 2, 0, 2, kl_coef=0.1, device=torch.device("cpu"))
    rollout = collect_rollout(envs, agent, Carry.start(envs, 0), 2, 0, 2, kl_coef=0.0, device=torch.device("cpu"))
    assert rollout.ref_logprobs is None and all(e.kl is None for e in rollout.episodes)


class GarbageAtReset(FixedLength):
    """Reports a NaN `ref_logprob` on its reset info: a step whose action is ignored must not use it."""

    def reset(self, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        return obs, {"ref_logprob": float("nan")}


def test_garbage_at_ignored_steps_stays_out_of_episodes_and_advantages():
    envs = gym.vector.SyncVectorEnv([lambda: GarbageAtReset(length=3) for _ in range(2)])
    torch.manual_seed(0)
    agent = MLPAgent(envs.single_observation_space, envs.single_action_space)
    carry = Carry.start(envs, 0)
    for _ in range(2):  # the second rollout starts with the autoreset steps of the first one's episodes
        r = collect_rollout(envs, agent, carry, 5, 0, 2, kl_coef=0.1, device=torch.device("cpu"))
        compute_advantages(r, agent, kl_coef=0.1, gamma=1.0, gae_lambda=0.95, bootstrap_truncated=False)
        assert bool(torch.isfinite(r.advantages).all()) and bool(torch.isfinite(r.shaped_rewards).all())
        assert r.episodes and all(math.isfinite(e.kl) for e in r.episodes)


class NoReference(FixedLength):
    def step(self, action):
        obs, reward, terminated, truncated, _ = super().step(action)
        return obs, reward, terminated, truncated, {}


def test_episode_kl_counts_only_steps_with_a_reference():
    envs = gym.vector.SyncVectorEnv([lambda: FixedLength(length=3), lambda: NoReference(length=3)])
    torch.manual_seed(0)
    agent = MLPAgent(envs.single_observation_space, envs.single_action_space)
    r = collect_rollout(envs, agent, Carry.start(envs, 0), 3, 0, 2, kl_coef=0.0, device=torch.device("cpu"))
    kl = {e.global_step: e.kl for e in r.episodes}  # both end at the 3rd step
    expected = float((r.logprobs[:, 0] - r.ref_logprobs[:, 0]).sum())
    assert [e.kl for e in r.episodes] == pytest.approx([expected, 0.0]), kl


def test_group_advantages_by_hand():
    from agents.advantages import group_advantages, grpo, rloo

    returns, groups = np.array([1.0, 2.0, 3.0, 6.0]), np.array([0, 0, 1, 1])
    # RLOO: the return minus the mean of the group's other returns
    np.testing.assert_allclose(group_advantages(returns, groups, rloo), [1 - 2, 2 - 1, 3 - 6, 6 - 3])
    # GRPO: (return - group mean) / group std; means 1.5 and 4.5, stds 0.5 and 1.5
    np.testing.assert_allclose(group_advantages(returns, groups, grpo), [-1, 1, -1, 1], rtol=1e-6)
    three = group_advantages(np.array([0.0, 3.0, 6.0]), np.zeros(3, int), rloo)
    np.testing.assert_allclose(three, [0 - 4.5, 3 - 3, 6 - 1.5])
    with pytest.raises(ValueError, match="needs >= 2 per group"):
        group_advantages(returns, np.array([0, 0, 1, 2]), rloo)


def test_episodic_collection_stops_when_every_episode_ended_and_ignores_what_follows():
    envs = gym.vector.SyncVectorEnv([lambda n=n: FixedLength(length=n) for n in (2, 4, 3)])
    torch.manual_seed(0)
    agent = MLPAgent(envs.single_observation_space, envs.single_action_space)
    cpu = torch.device("cpu")
    r = collect_rollout(envs, agent, Carry.start(envs, 0, episodic=True), 10, 0, 3, kl_coef=0.0, device=cpu)
    # the longest episode has 4 steps: the rollout stops there, one episode per env; after its episode ends an env
    # (stepped on with the others: it autoresets and starts another) counts for nothing
    assert r.valid.shape == (4, 3) and sorted(e.length for e in r.episodes) == [2, 3, 4]
    assert r.valid.T.tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]
    compute_advantages(r, agent, 0.0, 1.0, 1.0, False)
    assert bool((r.advantages[~r.valid] == 0).all())
    with pytest.raises(ValueError, match="did not end within num_steps=3"):
        collect_rollout(envs, agent, Carry.start(envs, 0, episodic=True), 3, 0, 3, kl_coef=0.0, device=cpu)


def test_group_advantages_need_an_env_that_reports_groups():
    envs, agent, _ = setup()
    r = collect_rollout(envs, agent, Carry.start(envs, 0, episodic=True), 5, 0, 2, kl_coef=0.0,
                        device=torch.device("cpu"))
    with pytest.raises(ValueError, match="reports no infos\\['group'\\]"):
        compute_advantages(r, agent, 0.0, 1.0, 1.0, False, RLOO)


def test_the_first_ratio_warning_names_rounding_under_bf16_and_a_mismatch_otherwise():
    ratio, mask = torch.tensor([1.0, 1.07, 0.2]), torch.tensor([True, True, False])  # the 0.2 is masked out
    with pytest.warns(UserWarning, match=r"deviates from 1 by 7\.00e-02.*bf16 rounding.*--dtype float32"):
        assert first_ratio_deviation(ratio, mask, tol=2e-2, low_precision=True) == pytest.approx(0.07, abs=1e-6)
    with pytest.warns(UserWarning, match=r"by 7\.00e-02.*dropout on\?"):
        first_ratio_deviation(ratio, mask, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the tolerance: silent
        assert first_ratio_deviation(ratio, mask, tol=0.1, low_precision=True) == pytest.approx(0.07, abs=1e-6)
