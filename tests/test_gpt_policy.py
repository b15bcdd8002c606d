"""GPTAgent: cached rollout == full recompute == episode-grouped update; ratio 1; no dropout; clear errors."""

import copy

import pytest
import torch
from transformers import GPT2LMHeadModel

from agents.gpt_policy import GPTAgent, length_groups, sample_categorical
from tiny import tiny_gpt

PAD, VOCAB, MAX_PROMPT, MAX_NEW = 0, 50, 5, 7
WINDOW = MAX_PROMPT + MAX_NEW


def tiny_lm(seed: int = 0, dropout: float = 0.0, vocab: int = VOCAB) -> GPT2LMHeadModel:
    return tiny_gpt(vocab, seed=seed, width=32, layers=2, positions=64, attn_pdrop=dropout, resid_pdrop=dropout,
                    embd_pdrop=dropout)


def prompt(g: torch.Generator, window: int = WINDOW) -> torch.Tensor:
    n = int(torch.randint(1, MAX_PROMPT + 1, (1,), generator=g))
    row = torch.full((window,), PAD)
    row[window - n :] = torch.randint(2, VOCAB, (n,), generator=g)
    return row


def simulate(agent: GPTAgent, steps: int, envs: int, warmup: int = 3, seed: int = 0) -> dict:
    """A token env with Gymnasium NEXT_STEP autoreset, driven like PPO's rollout: an episode ends at
    MAX_NEW tokens or at random ("EOS"); the step after an end is invalid and returns a fresh prompt."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.stack([prompt(g) for _ in range(envs)])
    length, ended = [0] * envs, [False] * envs
    buf = {k: [] for k in ("obs", "actions", "valid", "logprobs", "entropy", "values")}
    for t in range(warmup + steps):
        with torch.no_grad():
            action, logprob, entropy, value = agent.get_action_and_value(obs.float())  # PPO passes float32
        if t >= warmup:  # so columns start mid-episode, as in every rollout but the first
            for k, x in zip(
                buf,
                (obs.clone(), action, torch.tensor([not e for e in ended]), logprob, entropy, value),
                strict=True,
            ):
                buf[k].append(x)
        nxt = obs.clone()
        for i in range(envs):
            if ended[i]:
                nxt[i], length[i], ended[i] = prompt(g), 0, False
            else:
                nxt[i] = torch.cat([obs[i, 1:], action[i : i + 1]])
                length[i] += 1
                ended[i] = length[i] >= MAX_NEW or bool(torch.rand(1, generator=g) < 0.15)
        obs = nxt
    return {k: torch.stack(v) for k, v in buf.items()}


def test_cached_rollout_matches_full_recompute_through_resets():
    agent = GPTAgent(tiny_lm(), PAD, vocab_size=VOCAB)
    roll = simulate(agent, steps=30, envs=5)
    assert (~roll["valid"]).sum() >= 5  # episodes really ended and restarted inside the rollout
    for t in range(roll["obs"].shape[0]):  # recompute each step from scratch, with grad (no cache)
        _, logprob, entropy, value = agent.get_action_and_value(roll["obs"][t], roll["actions"][t])
        torch.testing.assert_close(logprob, roll["logprobs"][t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, roll["entropy"][t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(value, roll["values"][t], atol=1e-5, rtol=1e-5)


def test_left_padding_does_not_change_logprobs():
    agent = GPTAgent(tiny_lm(), PAD)
    tokens, action = torch.tensor([[5, 6, 7, 8]]), torch.tensor([9])
    padded = torch.cat([torch.full((1, 6), PAD), tokens], dim=1)
    short = agent.get_action_and_value(tokens, action)
    long = agent.get_action_and_value(padded, action)
    with torch.no_grad():
        cached = agent.get_action_and_value(padded, action)
    for a, b, c in zip(short[1:], long[1:], cached[1:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_length_groups_split_rows_by_length_when_it_saves_padding():
    groups = length_groups(torch.tensor([24, 24, 10, 11, 24, 12, 3, 4]))
    assert [g.tolist() for g in groups] == [[6, 7], [2, 3, 5], [0, 1, 4]]  # cost 2*4 + 3*12 + 3*24 vs 8*24
    assert [g.tolist() for g in length_groups(torch.tensor([24, 23, 24]))] == [[0, 1, 2]]  # saves < 10%: one


def test_evaluate_sequences_equals_per_transition_evaluation():
    agent = GPTAgent(tiny_lm(1), PAD)
    roll = simulate(agent, steps=24, envs=4, seed=1)
    valid = roll["valid"]
    forwards, trunk = [], agent._trunk
    agent._trunk = lambda ids: forwards.append(len(ids)) or trunk(ids)
    logprob, entropy, value = agent.evaluate_sequences(roll["obs"].float(), roll["actions"], valid)
    assert logprob.shape == entropy.shape == value.shape == valid.shape
    assert len(forwards) > 1  # segments of several lengths: one forward per length group was exercised
    for t in range(valid.shape[0]):
        _, lp, ent, v = agent.get_action_and_value(roll["obs"][t], roll["actions"][t])
        m = valid[t]
        torch.testing.assert_close(logprob[t][m], lp[m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[t][m], ent[m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(value[t][m], v[m], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logprob).all() and torch.isfinite(value).all()
    (logprob[valid].sum() + value[valid].sum()).backward()  # differentiable end to end
    assert (
        agent.value_head.weight.grad is not None
        and agent.lm.transformer.h[0].attn.c_attn.weight.grad is not None
    )


@pytest.mark.parametrize("grouped", [True, False])
def test_ppo_ratio_is_one_at_first_minibatch_despite_dropout_config(grouped):
    agent = GPTAgent(tiny_lm(2, dropout=0.5), PAD).train()  # PPO calls .train() before the update
    roll = simulate(agent, steps=20, envs=6, seed=2)
    assert not agent.lm.training
    if grouped:
        new, _, _ = agent.evaluate_sequences(roll["obs"], roll["actions"], roll["valid"])
    else:
        new = torch.stack(
            [agent.get_action_and_value(o, a)[1] for o, a in zip(roll["obs"], roll["actions"], strict=True)]
        )
    ratio = (new - roll["logprobs"])[roll["valid"]].exp()
    assert (ratio - 1).abs().max() < 1e-4


def test_sampling_follows_the_policy_distribution():
    agent = GPTAgent(tiny_lm(3), PAD)
    obs = torch.tensor([[PAD, PAD, 5, 6]]).repeat(4000, 1)
    with torch.no_grad():
        actions, logprob, _, _ = agent.get_action_and_value(obs)
        probs = torch.softmax(agent.lm(torch.tensor([[5, 6]])).logits[0, -1], -1)  # plain HF forward
    freq = torch.bincount(actions, minlength=VOCAB).float() / len(actions)
    assert (freq - probs).abs().max() < 0.03  # temperature 1, no top-k/top-p
    torch.testing.assert_close(logprob.exp(), probs[actions], atol=1e-5, rtol=1e-5)


def test_no_grads_leak_into_the_reference_or_the_cache():
    model = tiny_lm(4)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    agent = GPTAgent(model, PAD)
    roll = simulate(agent, steps=8, envs=3, seed=4)
    assert not any(x.requires_grad for x in roll.values())
    assert not any(k.requires_grad for k in agent._rollout.keys)
    logprob, _, value = agent.evaluate_sequences(roll["obs"], roll["actions"], roll["valid"])
    (logprob.sum() + value.sum()).backward()
    assert all(p.grad is None for p in reference.parameters())
    assert all(p.grad is not None for p in agent.parameters())


def continue_after(agent: GPTAgent, change) -> None:
    """Roll one cached step, `change(agent)` the weights, roll the next step (it continues every cached row):
    its log-prob and value must be those of the new weights (a full forward), not of stale cached keys."""
    obs = torch.tensor([[PAD, PAD, 5, 6], [PAD, 7, 8, 9]])
    with torch.no_grad():
        action = agent.get_action_and_value(obs)[0]
    change(agent)
    nxt = torch.cat([obs[:, 1:], action[:, None]], dim=1)
    with torch.no_grad():
        action2, cached, _, value = agent.get_action_and_value(nxt)
    _, full, _, full_value = agent.get_action_and_value(nxt, action2)  # grad on: full forward, new weights
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value, full_value, atol=1e-5, rtol=1e-5)


def perturbed(agent: GPTAgent) -> dict:
    return {k: v + 0.05 * torch.randn_like(v) for k, v in agent.state_dict().items()}


def test_load_state_dict_drops_the_cache():
    new = perturbed(GPTAgent(tiny_lm(5), PAD))
    continue_after(GPTAgent(tiny_lm(5), PAD), lambda a: a.load_state_dict(new))  # no reset_cache() call


def test_watched_optimizer_step_drops_the_cache():
    agent = GPTAgent(tiny_lm(5), PAD)
    opt = torch.optim.SGD(agent.parameters(), lr=1.0)
    agent.watch(opt)

    def step(a: GPTAgent) -> None:
        for p in a.parameters():
            p.grad = 0.05 * torch.randn_like(p)
        opt.step()

    continue_after(agent, step)


def test_to_another_dtype_drops_the_cache():
    continue_after(GPTAgent(tiny_lm(5), PAD), lambda a: a.to(torch.float64))  # float32 keys cached


def test_a_stale_cache_would_be_caught():
    """The checks above can fail: an in-place change behind the agent's back (no reset_cache) is not seen."""
    agent = GPTAgent(tiny_lm(5), PAD)

    def behind_its_back(a: GPTAgent) -> None:
        with torch.no_grad():
            for p in a.parameters():
                p.add_(0.05 * torch.randn_like(p))

    with pytest.raises(AssertionError):
        continue_after(agent, behind_its_back)
    continue_after(agent, lambda a: (behind_its_back(a), a.reset_cache()))  # the contract: reset after a change


def test_vocab_checks():
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        GPTAgent(tiny_lm(vocab=40), PAD, vocab_size=VOCAB)
    agent = GPTAgent(tiny_lm(vocab=64), PAD, vocab_size=VOCAB)  # e.g. a vocab padded to a multiple of 64
    obs = torch.tensor([[PAD, 5, 6]]).repeat(500, 1)
    with torch.no_grad():
        actions = agent.get_action_and_value(obs)[0]
    assert actions.max() < VOCAB
    with pytest.raises(ValueError, match="dtype"):
        GPTAgent(tiny_lm(), PAD, dtype="int8")


def test_bf16_autocast_gives_float32_outputs_close_to_float32():
    model = tiny_lm(6)
    fp32, bf16 = GPTAgent(copy.deepcopy(model), PAD), GPTAgent(copy.deepcopy(model), PAD, dtype="bf16")
    bf16.value_head.load_state_dict(fp32.value_head.state_dict())
    obs, action = torch.tensor([[PAD, 5, 6, 7], [9, 8, 7, 6]]), torch.tensor([3, 4])
    a = fp32.get_action_and_value(obs, action)
    b = bf16.get_action_and_value(obs, action)
    assert b[1].dtype == torch.float32 and b[3].dtype == torch.float32
    torch.testing.assert_close(a[1], b[1], atol=0.1, rtol=0.05)


def test_sample_never_draws_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]).repeat(2000, 1)
    draws = sample_categorical(probs).view(-1, 3)
    assert set(draws[:, 0].tolist()) == {1, 3} and (draws[:, 1] == 3).all() and (draws[:, 2] == 0).all()
    assert abs((draws[:, 0] == 1).float().mean().item() - 0.5) < 0.05


# --- through agents.ppo on a TextEnv -----------------------------------------------------------------------


def keyword_envs(num_envs: int = 16, **kw):
    import gymnasium as gym

    import textenv

    tok = textenv.char_tokenizer("ab")
    envs = gym.make_vec(
        "TextEnv-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", tokenizer=tok,
        reward_model=textenv.KeywordReward("a"), prompts=["b", "bb", "ba", "ab"], max_prompt_tokens=2,
        max_new_tokens=4, min_new_tokens=4, **kw,
    )  # fmt: skip
    lm = tiny_gpt(len(tok), width=32, layers=2, embd_pdrop=0.3)
    return envs, GPTAgent(lm, tok.pad_token_id, vocab_size=len(tok))


def ppo_args(tmp_path, iterations: int, **kw):
    from agents.ppo import Args

    steps = kw.pop("num_steps", 20)
    return Args(
        num_envs=16, num_steps=steps, total_timesteps=16 * steps * iterations, learning_rate=3e-3,
        minibatch_by_env=True, num_minibatches=4, update_epochs=4, gamma=1.0, bootstrap_truncated=False, ent_coef=0.0,
        eval_episodes=0, save_every=1, run_dir=str(tmp_path / "run"), log_every=0, torch_threads=1, **kw,
    )  # fmt: skip


def ratio_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "ratio" in str(w.message)]


@pytest.mark.slow
def test_ppo_with_gptagent_learns_a_keyword_reward(tmp_path):
    import warnings

    from agents.ppo import train

    envs, agent = keyword_envs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = train(ppo_args(tmp_path, 6), envs=envs, agent=agent)
    assert not ratio_warnings(record)  # the first minibatch of every update saw ratio 1
    scores = torch.tensor([r for _, r in result["episode_returns"]])
    first, last = scores[:64], scores[-64:]  # a random policy writes "a" 1 time in 5; the optimum is 4 of 4
    print(f"first 64 episodes score {first.mean():.2f}, last 64 {last.mean():.2f}")  # ~1.5 -> ~3.7
    assert last.mean() > first.mean() + max(1.0, 6 * first.std().item() / 64**0.5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_group_relative_advantages_learn_a_keyword_reward_without_training_the_value_head(tmp_path, method):
    from agents.ppo import train

    envs, agent = keyword_envs(group_size=4)  # 4 groups of 4 episodes answering one prompt
    head = agent.value_head.weight.detach().clone()
    result = train(ppo_args(tmp_path, 24, advantages=method, num_steps=5), envs=envs, agent=agent)  # 384 episodes
    scores = torch.tensor([r for _, r in result["episode_returns"]])
    assert len(scores) == 16 * 24  # one whole episode per env and iteration
    first, last = scores[:32], scores[-32:]  # a random policy writes "a" 1 time in 5; the optimum is 4 of 4
    assert last.mean() > first.mean() + max(1.0, 6 * first.std().item() / 32**0.5), (first.mean(), last.mean())
    assert torch.equal(agent.value_head.weight, head)  # no value loss: the head's weights never move


def test_ppo_with_gptagent_resumes_from_a_checkpoint(tmp_path):
    import warnings

    from agents.ppo import train

    envs, agent = keyword_envs()
    first = train(ppo_args(tmp_path, 2), envs=envs, agent=agent)
    saved = torch.load(first["checkpoint"], weights_only=False)["agent"]

    class Seen:
        def __init__(self) -> None:
            self.iterations: list[int] = []

        def on_iteration(self, iteration, global_step, rollout, writer):
            self.iterations.append(iteration)

    envs, fresh = keyword_envs()
    with torch.no_grad():
        fresh.lm.transformer.wte.weight.add_(1.0)  # far from the checkpoint: only a real load brings it back
    seen = Seen()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        second = train(ppo_args(tmp_path, 4, resume=True), envs=envs, agent=fresh, hooks=seen)
    assert seen.iterations == [3, 4] and second["global_step"] == 4 * 16 * 20
    assert second["episode_returns"][: len(first["episode_returns"])] == first["episode_returns"]
    assert not ratio_warnings(record)  # no stale cache from before the load
    drift = (fresh.lm.transformer.wte.weight - saved["lm.transformer.wte.weight"]).abs().max()
    assert drift < 0.5  # continued from the checkpoint (2 more iterations of small Adam steps), not from +1.0


def test_cache_survives_a_change_of_window_and_batch():
    agent = GPTAgent(tiny_lm(7), PAD)
    g = torch.Generator().manual_seed(7)
    for batch, window in [(3, 4), (3, 40), (5, 40), (2, 6)]:  # the buffers must grow, shrink and re-allocate
        obs = torch.full((batch, window), PAD)
        obs[:, -3:] = torch.randint(2, VOCAB, (batch, 3), generator=g)
        for _ in range(window - 3):
            with torch.no_grad():
                action, logprob, _, _ = agent.get_action_and_value(obs)
            full = agent.get_action_and_value(obs, action)[1]
            torch.testing.assert_close(logprob, full, atol=1e-5, rtol=1e-5)
            obs = torch.cat([obs[:, 1:], action[:, None]], dim=1)


def test_evaluate_sequences_with_no_valid_step_is_zero_and_differentiable():
    agent = GPTAgent(tiny_lm(8), PAD)
    obs = torch.full((3, 2, 6), PAD)
    obs[..., -1] = 5
    logprob, entropy, value = agent.evaluate_sequences(
        obs, torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.bool)
    )
    assert logprob.shape == (3, 2) and (logprob == 0).all() and (entropy == 0).all() and (value == 0).all()
    (logprob.sum() + value.sum()).backward()


def test_temperature_is_part_of_the_policy():
    """At T != 1 the cached rollout, the recompute and the episode-grouped update agree, and all are
    softmax(logits / T); at T = 1 the logits are the LM's, untouched."""
    agent = GPTAgent(tiny_lm(5), PAD, temperature=0.7)
    roll = simulate(agent, steps=20, envs=4, seed=5)
    new, ent, _ = agent.evaluate_sequences(roll["obs"], roll["actions"], roll["valid"])
    m = roll["valid"]
    torch.testing.assert_close(new[m], roll["logprobs"][m], atol=1e-5, rtol=1e-5)  # stored == recomputed
    torch.testing.assert_close(ent[m], roll["entropy"][m], atol=1e-5, rtol=1e-5)
    obs = torch.tensor([[PAD, PAD, 5, 6]])
    with torch.no_grad():
        raw = agent.lm(torch.tensor([[5, 6]])).logits[0, -1]  # plain HF forward
        _, logprob, entropy, _ = agent.get_action_and_value(obs, torch.arange(VOCAB)[:1])
    expected = torch.log_softmax(raw / 0.7, -1)
    torch.testing.assert_close(logprob, expected[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy[0], -(expected.exp() * expected).sum(), atol=1e-5, rtol=1e-5)
    hidden = torch.randn(3, agent.lm.config.n_embd)
    one = GPTAgent(tiny_lm(5), PAD)
    assert torch.equal(one._logits(hidden), hidden @ one.lm.lm_head.weight.T)  # T = 1: no division at all
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            GPTAgent(tiny_lm(5), PAD, temperature=bad)
