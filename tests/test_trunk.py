"""Any causal-LM family through the KV cache, and the frozen-trunk split (`trainable_layers`)."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

import textenv
from agents.gpt_policy import GPTAgent
from textenv.kl import RefLogprob
from textenv.lm import CachedLM, LMError, TrunkSplit, forward_full
from tiny import tiny_gpt, tiny_llama

PAD, VOCAB, FAMILIES = 0, 50, ("gpt2", "llama", "qwen2", "neox")


def tiny_lm(family: str, seed: int = 0, layers: int = 3) -> torch.nn.Module:
    """A random tiny causal LM of `family`: GPT-2 (absolute positions), Llama (RoPE, GQA, tied embeddings),
    Qwen2 (RoPE, GQA, attention biases), GPT-NeoX (partial rotary, parallel residual)."""
    if family == "gpt2":
        return tiny_gpt(VOCAB, seed=seed, width=32, layers=layers, positions=64).eval()
    if family == "llama":
        return tiny_llama(VOCAB, layers, seed=seed, max_position_embeddings=64, tie_word_embeddings=True).eval()
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2)).eval()
    return GPTNeoXForCausalLM(GPTNeoXConfig(**common, rotary_pct=0.5)).eval()


def episodes(steps: int, batch: int = 5, window: int = 10, seed: int = 1):
    """Yield left-padded observations of token-step episodes with prompts of 1-4 tokens; rows restart at random
    (and all at once once), and the caller's sampled action is appended otherwise (send it in)."""
    g = torch.Generator().manual_seed(seed)

    def prompt() -> torch.Tensor:
        n = int(torch.randint(1, 5, (1,), generator=g))
        row = torch.full((window,), PAD)
        row[window - n :] = torch.randint(2, VOCAB, (n,), generator=g)
        return row

    obs = torch.stack([prompt() for _ in range(batch)])
    for t in range(steps):
        action = yield obs.clone()
        obs = torch.cat([obs[:, 1:], action[:, None]], dim=1)
        for i in range(batch):
            if t == steps // 2 or torch.rand(1, generator=g) < 0.2:
                obs[i] = prompt()


def run(caches, model, steps: int = 16) -> list[torch.Tensor]:
    """Step every cache through the same episodes; assert each matches a full recompute; return the obs."""
    gen, seen = episodes(steps), []
    obs = next(gen)
    try:
        while True:
            full, _ = forward_full(model, obs, PAD)
            for cache in caches:
                logits, _ = cache.step(obs)
                torch.testing.assert_close(logits, full[:, -1], atol=1e-5, rtol=1e-4)
            seen.append(obs)
            obs = gen.send(torch.distributions.Categorical(logits=full[:, -1]).sample())
    except StopIteration:
        return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_steps_match_a_full_recompute_for_every_family(family):
    model = tiny_lm(family)
    run([CachedLM(model, PAD)], model)
    tokens = torch.tensor([[5, 6, 7, 8]])  # left padding changes nothing (positions from the mask)
    short, _ = forward_full(model, tokens, PAD)
    padded, _ = forward_full(model, torch.cat([torch.full((1, 3), PAD), tokens], dim=1), PAD)
    torch.testing.assert_close(short[:, -1], padded[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_policy_and_reference_match_the_whole_model(family):
    model, reference = tiny_lm(family), tiny_lm(family)
    split = TrunkSplit(model, 1, PAD)
    shared = split.sharing(reference)  # same weights: the reference over the policy's trunk
    seen = run([split.cached(), shared.cached()], model)
    # every row's trunk window is remembered (finished rows and the live ones) and equals a fresh forward
    ids = torch.cat(seen)
    torch.testing.assert_close(split.trunk.lookup(ids), split.trunk.full(ids), atol=1e-6, rtol=1e-5)
    assert len(split.trunk.known) > 5


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_frozen_trunk_agent_scores_like_the_whole_model_and_trains_only_its_top(family):
    whole = GPTAgent(tiny_lm(family), PAD)
    part = GPTAgent(tiny_lm(family), PAD, trainable_layers=1)
    part.value_head.load_state_dict(whole.value_head.state_dict())
    gen, obs_list, actions = episodes(9, batch=4), [], []
    obs = next(gen)
    try:
        while True:
            with torch.no_grad():
                action, logprob, _, value = part.get_action_and_value(obs)  # cached rollout through the split
                _, logprob_whole, _, value_whole = whole.get_action_and_value(obs, action)
            torch.testing.assert_close(logprob, logprob_whole, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(value, value_whole, atol=1e-5, rtol=1e-4)
            obs_list.append(obs)
            actions.append(action)
            obs = gen.send(action)
    except StopIteration:
        pass
    obs, actions = torch.stack(obs_list).float(), torch.stack(actions)
    valid = torch.ones(actions.shape, dtype=torch.bool)
    for a, b in zip(whole.evaluate_sequences(obs, actions, valid), part.evaluate_sequences(obs, actions, valid),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # same loss as the uncached whole model
    assert part.split.trunk.recomputed == 0  # every segment's trunk outputs came from the rollout
    frozen = {n: p.clone() for n, p in part.named_parameters() if not p.requires_grad}
    trainable = [p for p in part.parameters() if p.requires_grad]
    assert frozen and trainable
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    logprob, _, value = part.evaluate_sequences(obs, actions, valid)
    (logprob.sum() + value.sum()).backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in part.named_parameters() if n in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_reference_over_the_shared_trunk_gives_the_same_ref_logprobs():
    tok = textenv.char_tokenizer("abcdefgh")
    kwargs = dict(tokenizer=tok, reward_model=textenv.EndsWithReward("h"), prompts=["ab", "cde", "f"],
                  max_prompt_tokens=3, max_new_tokens=5)  # fmt: skip
    model = tiny_llama(len(tok), 3, max_position_embeddings=32).eval()
    agent = GPTAgent(copy.deepcopy(model), tok.pad_token_id, len(tok), trainable_layers=2)
    plain = RefLogprob(gym.make_vec("TextEnv-v0", num_envs=4, **kwargs), copy.deepcopy(model))
    shared = RefLogprob(gym.make_vec("TextEnv-v0", num_envs=4, **kwargs), agent.reference(copy.deepcopy(model)))
    obs, _ = plain.reset(seed=3)
    obs2, _ = shared.reset(seed=3)
    for _ in range(12):
        np.testing.assert_array_equal(obs, obs2)
        with torch.no_grad():
            action = agent.get_action_and_value(torch.as_tensor(obs))[0].numpy()
        obs, *_, info = plain.step(action)
        obs2, *_, info2 = shared.step(action)
        np.testing.assert_allclose(info["ref_logprob"], info2["ref_logprob"], atol=1e-5)


def test_trainable_layers_out_of_range_is_a_clear_error():
    with pytest.raises(LMError, match="trainable_layers=4 is out of range for a model of 3 blocks; use 1..3"):
        GPTAgent(tiny_lm("llama"), PAD, trainable_layers=4)
    with pytest.raises(LMError, match="trainable_layers=0"):
        GPTAgent(tiny_lm("gpt2"), PAD, trainable_layers=0)


def test_a_reference_split_is_checked_once_and_a_different_trunk_is_refused(monkeypatch):
    model = tiny_lm("llama")
    split = TrunkSplit(model, 1, PAD)
    reference = copy.deepcopy(model)
    calls = []
    check = TrunkSplit._check
    monkeypatch.setattr(TrunkSplit, "_check", lambda self, base: calls.append(1) or check(self, base))
    for _ in range(3):  # a report evaluation makes one reference split per call
        split.sharing(reference)
    assert len(calls) == 1
    with pytest.raises(LMError, match="changes its outputs"):  # other weights below the cut: not the same trunk
        split.sharing(tiny_lm("llama", seed=1))


def test_trunk_lookup_promotes_remembered_bf16_windows_with_recomputed_rows():
    split = TrunkSplit(tiny_lm("gpt2"), 1, PAD)
    ids = torch.tensor([[PAD, 3, 4, 5], [6, 7, 8, 9]])
    exact = split.trunk.full(ids)
    split.trunk._keep(ids[:1], exact[:1].to(torch.bfloat16))  # as an autocast rollout would remember it
    out = split.trunk.lookup(ids)
    assert out.dtype == torch.float32 and split.trunk.recomputed == 1
    torch.testing.assert_close(out, exact, atol=0.05, rtol=0.02)
