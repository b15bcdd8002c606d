"""Multi-turn and tool episodes: inserted tokens enter the observation but are never actions; cached log-probs and
the reference KL stay exact across an inserted turn; TurnEnv plays the same conversation; bad input is caught."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from textenv import RefLogprob, TextEnv, TextVectorEnv, TurnEnv, char_tokenizer
from textenv.lm import forward_full
from textenv.tasks import Calculator, calculate, calculator_task, guessing_task
from tiny import tiny_gpt

GUESS = guessing_task()
TOK = GUESS["tokenizer"]
EOS = TOK.eos_token_id
ID = {c: TOK.convert_tokens_to_ids(c) for c in "01234567"}


def test_a_turn_end_inserts_the_reply_in_the_same_step():
    env = TextEnv(**GUESS)
    obs, info = env.reset(seed=3)  # prompt "#gdh:", secret 2
    assert info["prompt"] == "#gdh:" and env.interaction.secret("#gdh:") == 2
    obs, reward, term, trunc, info = env.step(ID["3"])
    assert "turn_ended" not in info and np.flatnonzero(info["action_mask"]).tolist() == [EOS]
    obs, reward, term, trunc, info = env.step(EOS)  # ends the turn: the game answers within this step
    assert info["turn_ended"] and info["inserted"] == "<" and not (term or trunc)
    assert info["text"] == "#gdh:3<" and info["length"] == 5 + 2 + 1 and obs[-1] == TOK.convert_tokens_to_ids("<")
    assert np.flatnonzero(info["action_mask"]).tolist() == [ID[c] for c in "01234567"]  # a fresh turn
    env.step(ID["2"])
    obs, reward, term, trunc, info = env.step(EOS)
    assert term and reward == 1.0 and info["completion"] == "3<2="


def test_calculator_tool_round_trip_and_evaluate():
    env = TurnEnv(TextEnv(**calculator_task()))
    obs, info = env.reset(seed=0)
    question = info["prompt"][:-1]
    _, reward, term, _, info = env.step("calc:" + question)
    assert not term and info["inserted"] == f"={calculate(question)};" and reward == pytest.approx(0.4)  # 2 operands
    _, reward, term, _, info = env.step(str(calculate(question)))
    assert term and reward == 1.0
    assert calculate("12*3-4") == 32 and Calculator()("7+1?calc:2**9") == ("=error;", False)
    with pytest.raises(ValueError, match="not an arithmetic"):
        calculate("__import__('os')")


@pytest.mark.parametrize("seed", [0, 5])
def test_same_seed_same_conversation_through_either_view(seed):
    turns = TurnEnv(gym.make("TextEnv-v0", **GUESS))
    turns.reset(seed=seed)
    tokens = TextEnv(**GUESS)
    tokens.reset(seed=seed)
    for guess in "351":
        obs, reward, term, trunc, info = turns.step(guess)
        for a in (ID[guess], EOS):
            t_obs, t_reward, t_term, t_trunc, t_info = tokens.step(a)
        assert (obs == t_obs).all() and reward == t_reward and term == t_term and info["text"] == t_info["text"]
        if term:
            break


def test_stop_strings_window_and_bad_interactions():
    tok = char_tokenizer("ab.?")
    kw = dict(tokenizer=tok, reward_model=lambda texts: [0.0] * len(texts), prompts=["a"], max_prompt_tokens=1,
              max_new_tokens=8, max_context_tokens=6)
    env = TextEnv(**kw, interaction=lambda conv: ("??", False), stop_strings=["."])
    env.reset(seed=0)
    a, b, dot = (tok.convert_tokens_to_ids(c) for c in "ab.")
    env.step(a)
    obs, _, term, trunc, info = env.step(dot)  # a stop string ends the turn; "??" fits exactly
    assert info["turn_ended"] and info["text"] == "aa.??" and not (term or trunc)
    obs, _, term, trunc, info = env.step(b)  # the window (6) is full: truncated, nothing fell off
    assert trunc and info["text"] == "aa.??b"
    for bad, match in [(lambda c: (3, False), "next_text of type int"), (lambda c: "x", "must return a pair"),
                       (lambda c: ("x", "no"), "done of type str")]:
        env = TextEnv(**kw, interaction=bad)
        env.reset(seed=0)
        with pytest.raises(TypeError, match=match):
            env.step(tok.eos_token_id)
    with pytest.raises(ValueError, match="only an interaction"):
        TextEnv(**kw, stop_strings=["."])
    with pytest.raises(ValueError, match="max_context_tokens"):
        TextEnv(**{**kw, "max_context_tokens": 1})
    with pytest.raises(ValueError, match="vectorization_mode='sync'"):
        TextVectorEnv(2, **GUESS)


@pytest.mark.usefixtures("one_thread")  # tiny models: 2 threads on busy cores can be 10x slower
def test_cached_logprobs_and_reference_kl_are_exact_across_inserted_turns():
    from agents.gpt_policy import GPTAgent
    from agents.rollout import Carry, collect_rollout, score_minibatch

    ref = tiny_gpt(len(TOK), seed=1, layers=2, positions=32)
    envs = RefLogprob(gym.vector.SyncVectorEnv([lambda: TextEnv(**GUESS) for _ in range(4)]), ref)
    agent = GPTAgent(tiny_gpt(len(TOK), layers=2, positions=32), TOK.pad_token_id, vocab_size=len(TOK))
    r = collect_rollout(envs, agent, Carry.start(envs, 0), 16, 0, 4, 0.0, torch.device("cpu"))
    logprob, _, _, valid, _ = score_minibatch(agent, r, {"actions": r.actions.reshape(-1)}, torch.arange(4), True)
    assert torch.allclose(logprob[valid], r.logprobs.reshape(-1)[valid], atol=1e-5)  # one forward per episode piece
    pad, V = TOK.pad_token_id, len(TOK)
    with torch.no_grad():
        for t, e in zip(*torch.nonzero(r.valid, as_tuple=True), strict=True):  # the reference from scratch
            logits = forward_full(ref, r.obs[t, e][None], pad)[0][0, -1, :V]
            logits = logits.masked_fill(~r.action_masks[t, e], float("-inf"))
            assert abs(torch.log_softmax(logits, -1)[r.actions[t, e]] - r.ref_logprobs[t, e]) < 1e-5
    assert r.episodes
    for ep in r.episodes:  # steps (actions, KL terms) = the policy's tokens: a digit and EOS per guess
        assert ep.length == 2 * sum(c.isdigit() for c in ep.info["completion"])
        assert sum(c in "<>=!" for c in ep.info["completion"]) == ep.length // 2  # one inserted answer per guess


@pytest.mark.parametrize("task", [calculator_task, guessing_task])
def test_env_checkers_pass_on_multi_turn_episodes(task):
    """Gymnasium's and SB3's checkers step random actions, which a mask would refuse by design: check without it."""
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    kw = task() | {"action_mask": None}
    check_env(TextEnv(**kw), skip_render_check=True)
    sb3_check_env(TextEnv(**kw), warn=True)
