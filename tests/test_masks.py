"""Action masks: the env reports and enforces them, PPO honours them in sampling, log-probs, entropy and the KL
term (rollout and update alike), sb3-contrib's MaskablePPO trains on them, and bad masks get clear errors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.policies import MLPAgent, categorical
from textenv import EndsWithReward, RefLogprob, TextEnv, TextVectorEnv, char_tokenizer
from textenv.masks import (
    AllMasks,
    AllowedTokens,
    BannedTokens,
    NoRepeatNgram,
    NoRepeatWord,
    RegexMask,
    check_mask,
    pack,
    unpack,
)
from tiny import tiny_gpt

TOK = char_tokenizer("abcd")
A, B, C, D = (TOK.convert_tokens_to_ids(c) for c in "abcd")
EOS, V = TOK.eos_token_id, len(TOK)
AB = AllowedTokens([A, B], V)  # a 2-token vocabulary inside a 7-token one
KW = dict(tokenizer=TOK, reward_model=EndsWithReward("b"), prompts=list("abcd"), max_prompt_tokens=1, max_new_tokens=3)


def test_env_reports_and_enforces_the_mask():
    env = TextEnv(**KW, action_mask=AB)
    obs, info = env.reset(seed=0)
    assert info["action_mask"].dtype == np.bool_ and np.flatnonzero(info["action_mask"]).tolist() == [A, B]
    assert (env.action_masks() == info["action_mask"]).all()
    with pytest.raises(ValueError, match="action 5 is masked out"):
        env.step(C)
    for _ in range(3):
        obs, reward, term, trunc, info = env.step(B)
    assert trunc and reward == 1.0 and info["action_mask"].all()  # after the end: every token allowed
    plain = TextEnv(**KW)
    assert "action_mask" not in plain.reset(seed=0)[1] and plain.action_masks().all()


def test_bad_masks_get_clear_errors():
    nothing = TextEnv(**KW, action_mask=lambda prefix, turn: [])
    with pytest.raises(ValueError, match="allows no token"):
        nothing.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        TextEnv(**KW, action_mask=lambda prefix, turn: np.ones(3, bool)).reset(seed=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TextEnv(**KW, action_mask=lambda prefix, turn: [99]).reset(seed=0)
    with pytest.raises(TypeError, match="not callable"):
        TextEnv(**KW, action_mask=[A, B])
    with pytest.raises(ValueError, match="bans the whole vocabulary"):
        BannedTokens(range(V), V)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        RegexMask("(", TOK)


def test_builtin_masks_and_packing():
    assert np.flatnonzero(BannedTokens([EOS], V)([A], [])).tolist() == [i for i in range(V) if i != EOS]
    masks = np.random.default_rng(0).random((3, 4, V)) < 0.5
    assert (unpack(pack(masks), V) == masks).all() and pack(masks).shape == (3, 4, 1)
    assert check_mask(np.array([B, A]), V).sum() == 2


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_bans_what_transformers_bans(n):
    """The mask over prompt + turn equals `generate`'s `no_repeat_ngram_size` over the same ids, wherever the
    prompt ends: random texts over 5 tokens repeat n-grams often."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    rng, mask, banned_some = np.random.default_rng(n), NoRepeatNgram(n, 5), 0
    for _ in range(200):
        ids = rng.integers(0, 5, int(rng.integers(1, 40))).tolist()
        cut = int(rng.integers(0, len(ids) + 1))
        expected = NoRepeatNGramLogitsProcessor(n)(torch.tensor([ids]), torch.zeros(1, 5))[0] == 0
        got = mask(ids[:cut], ids[cut:])
        assert got.dtype == np.bool_ and (got == expected.numpy()).all(), (ids, cut)
        banned_some += not got.all()
    assert banned_some > 10
    env = TextEnv(**KW, action_mask=NoRepeatNgram(2, V))  # through the env: "a" then "a" bans a third "a"
    env.reset(seed=0, options={"prompt_index": 0})
    _, _, _, _, info = env.step(A)
    assert not info["action_mask"][A] and info["action_mask"].sum() == V - 1
    with pytest.raises(ValueError, match="NoRepeatNgram n=0"):
        NoRepeatNgram(0, V)


WORDS = ["It is a great movie and the Great acting is great.", "The film was great fun, a great film. Great!",
         "A Great film. Greatness is not entertaining, the movie is entertaining."] * 20


def test_no_repeat_word_bans_a_word_said_again_in_the_turn_only():
    """Once " great" is in the turn, every token that starts "great" again is banned, whatever its case; short
    words, pieces inside a word and the prompt's words are not."""
    from textenv.build.bpe import train_bpe

    tok = train_bpe(WORDS, vocab_size=300, min_frequency=2)
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    great, cap, film, is_ = (ids(w)[0] for w in (" great", " Great", " film", " is"))
    assert len({great, cap, film, is_}) == 4 and len(ids(" great")) == len(ids(" Great")) == 1
    mask = NoRepeatWord(tok, min_letters=4)
    assert mask(ids("It is"), []).all()  # nothing said yet
    assert mask(ids("a great film"), ids(" is")).all()  # the prompt's words may come back
    said = mask([], ids(" a great movie and it is"))
    assert not said[great] and not said[cap] and said[film] and said[is_]  # "is" is under 4 letters
    assert said.sum() < len(tok) and mask([], ids(" Great fun"))[great] is np.False_
    pieces = [i for i in range(len(tok)) if not tok.convert_ids_to_tokens(i).startswith("Ġ")]
    assert said[pieces].all()  # a piece inside a word ("ness") never counts as saying a word
    with pytest.raises(ValueError, match="NoRepeatWord min_letters=0"):
        NoRepeatWord(tok, min_letters=0)


def test_all_masks_allows_what_every_mask_allows():
    both = AllMasks(V, AB, BannedTokens([B], V))
    assert np.flatnonzero(both([A], [])).tolist() == [A]
    env = TextEnv(**KW, action_mask=AllMasks(V, NoRepeatNgram(2, V), AB))  # through the env: "a a" bans a third
    env.reset(seed=0, options={"prompt_index": 0})
    _, _, _, _, info = env.step(A)
    assert np.flatnonzero(info["action_mask"]).tolist() == [B]
    with pytest.raises(ValueError, match="together allow no token"):
        AllMasks(V, AllowedTokens([A], V), AllowedTokens([B], V))([], [])
    with pytest.raises(ValueError, match="at least one mask"):
        AllMasks(V)


def test_regex_mask_walks_a_tool_call():
    tok = char_tokenizer("0123456789+:acl=")
    ids = {c: tok.convert_tokens_to_ids(c) for c in "0123456789+:acl"}
    mask = RegexMask(r"calc:[0-9]\+[0-9]|[0-9]{1,2}", tok)
    allowed = lambda text: {tok.convert_ids_to_tokens(int(i)) for i in np.flatnonzero(mask([5], tok.encode(text)))}  # noqa: E731
    assert allowed("") == set("0123456789c")
    assert allowed("cal") == {"c"} and allowed("calc:2+") == set("0123456789")
    assert allowed("calc:2+3") == {"<eos>"}  # complete: only the end of the turn
    assert allowed("4") == set("0123456789") | {"<eos>"} and allowed("42") == {"<eos>"}
    env = TextEnv(tokenizer=tok, reward_model=EndsWithReward("5"), prompts=["2+3"], max_prompt_tokens=3,
                  max_new_tokens=9, action_mask=mask)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="masked out"):
        env.step(ids["+"])
    for c in "calc:2+3":
        env.step(ids[c])
    *_, term, _, info = env.step(tok.eos_token_id)
    assert term and info["completion"] == "calc:2+3"


def test_vector_env_stacks_masks_and_matches_sync_vector_env():
    vec = TextVectorEnv(3, **KW, action_mask=AB)
    sync = gym.vector.SyncVectorEnv([lambda: TextEnv(**KW, action_mask=AB) for _ in range(3)])
    (_, vi), (_, si) = vec.reset(seed=1), sync.reset(seed=1)
    assert vi["action_mask"].shape == (3, V) and (vi["action_mask"] == si["action_mask"]).all()
    rng = np.random.default_rng(0)
    for _ in range(8):
        actions = rng.choice([A, B], size=3)
        (_, vr, *_, vi), (_, sr, *_, si) = vec.step(actions), sync.step(actions)
        assert (vr == sr).all() and (vi["action_mask"] == si["action_mask"]).all()
    with pytest.raises(ValueError, match="masked out"):
        vec.step(np.array([C, A, A]))


def test_masked_categorical_renormalises_without_nan():
    logits = torch.randn(64, V, requires_grad=True)
    mask = torch.zeros(64, V, dtype=torch.bool)
    mask[:, [A, B]] = True
    action, logprob, entropy = categorical(logits, None, mask)
    assert set(action.tolist()) == {A, B}
    ref = torch.log_softmax(logits[:, [A, B]], -1)  # the distribution over the allowed tokens only
    expect = torch.where(action == A, ref[:, 0], ref[:, 1])
    assert torch.allclose(logprob, expect) and torch.allclose(entropy, -(ref.exp() * ref).sum(-1))
    (logprob.sum() + entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[:, C] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gpt_agents_in_place_mask_gives_the_masked_softmaxs_log_probs_entropy_and_gradients(temperature):
    """`GPTAgent` writes the lowest float into banned logits in place, outside autograd: the same log-probs (to the
    bit), entropy and gradients as `masked_log_softmax` with -inf, and no NaN."""
    from agents.gpt_policy import GPTAgent
    from agents.policies import entropy_of, masked_log_softmax

    torch.manual_seed(0)
    lm = tiny_gpt(V)
    agent = GPTAgent(lm, TOK.pad_token_id, V, temperature=temperature)
    hidden = torch.randn(32, lm.config.n_embd)
    mask = torch.rand(32, V) > 0.3
    mask[:, A] = True
    action = torch.full((32,), A)
    _, logprob, entropy = agent._stats(agent._logits(hidden), action, mask)
    (logprob.sum() + 0.1 * entropy.sum()).backward()
    got = [logprob.detach(), entropy.detach(), lm.get_output_embeddings().weight.grad.clone()]
    lm.zero_grad()
    logp = masked_log_softmax(agent._logits(hidden), mask)
    want_lp, want_ent = logp[:, A], entropy_of(logp, mask)
    (want_lp.sum() + 0.1 * want_ent.sum()).backward()
    assert torch.equal(got[0], want_lp.detach())
    assert torch.allclose(got[1], want_ent.detach(), atol=1e-6)
    assert torch.isfinite(got[2]).all() and torch.allclose(got[2], lm.get_output_embeddings().weight.grad, atol=1e-6)


def test_gpt_rollout_and_update_score_masked_actions_alike():
    """Cached, masked rollout log-probs == the episode-grouped update's; the reference is masked the same way."""
    from agents.gpt_policy import GPTAgent
    from agents.rollout import Carry, collect_rollout, score_minibatch

    ref_model = tiny_gpt(V)
    envs = RefLogprob(TextVectorEnv(4, **KW, action_mask=AB), ref_model)
    agent = GPTAgent(tiny_gpt(V), TOK.pad_token_id, vocab_size=V)
    r = collect_rollout(envs, agent, Carry.start(envs, 0), 10, 0, 4, 0.0, torch.device("cpu"))
    assert r.action_masks.shape == (10, 4, V) and set(r.actions[r.valid].tolist()) <= {A, B}
    b = {"actions": r.actions.reshape(-1)}
    logprob, entropy, _, valid, _ = score_minibatch(agent, r, b, torch.arange(4), by_env=True)
    assert torch.allclose(logprob[valid], r.logprobs.reshape(-1)[valid], atol=1e-5)
    assert torch.isfinite(entropy).all() and (entropy[valid] <= np.log(2) + 1e-6).all()  # two allowed tokens
    # the same model as policy and reference: masked KL is exactly 0 on every valid step
    same = RefLogprob(TextVectorEnv(4, **KW, action_mask=AB), agent.lm)
    r2 = collect_rollout(same, agent, Carry.start(same, 0), 10, 0, 4, 0.0, torch.device("cpu"))
    assert torch.allclose(r2.logprobs[r2.valid], r2.ref_logprobs[r2.valid], atol=1e-5)


def test_agent_without_the_mask_keyword_gets_a_clear_error():
    from agents.rollout import Carry, collect_rollout

    class Plain(MLPAgent):
        def get_action_and_value(self, obs, action=None):
            return super().get_action_and_value(obs, action)

    envs = TextVectorEnv(2, **KW, action_mask=AB)
    agent = Plain(envs.single_observation_space, envs.single_action_space)
    with pytest.raises(TypeError, match="takes no `action_mask`"):
        collect_rollout(envs, agent, Carry.start(envs, 0), 2, 0, 2, 0.0, torch.device("cpu"))


def test_agents_ppo_learns_a_masked_task(tmp_path):
    """Any masked token sent to the env would raise: finishing proves rollout and evaluation honour the mask."""
    from agents import ppo

    envs = TextVectorEnv(8, **KW, action_mask=AB)
    agent = MLPAgent(envs.single_observation_space, envs.single_action_space)
    args = ppo.Args(total_timesteps=1_024, num_envs=8, num_steps=32, learning_rate=1e-2, gamma=1.0, seed=0, torch_threads=1,
                    bootstrap_truncated=False, run_dir=str(tmp_path), eval_episodes=16, save_every=0, log_every=0)
    result = ppo.train(args, envs=envs, agent=agent)
    scores = [r for _, r in result["episode_returns"]]
    assert np.mean(scores[:50]) < 0.7 and result["eval_mean"] == 1.0, (np.mean(scores[:50]), result["eval_mean"])


def test_sb3_contrib_maskable_ppo_trains_a_masked_text_env():
    sb3_contrib = pytest.importorskip("sb3_contrib")
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(lambda: TextEnv(**KW, action_mask=AB), n_envs=4, seed=0)
    model = sb3_contrib.MaskablePPO("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=4, learning_rate=1e-2,
                                    gamma=1.0, seed=0, policy_kwargs=dict(net_arch=[32]), device="cpu")
    model.learn(total_timesteps=1_024)  # a masked action would make TextEnv.step raise
    env, wins = TextEnv(**KW, action_mask=AB), []
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            action, _ = model.predict(obs, action_masks=env.action_masks(), deterministic=True)
            obs, reward, term, trunc, _ = env.step(int(action))
            done = term or trunc
        wins.append(reward)
    assert np.mean(wins) == 1.0  # random masked play ends with "b" half the time
