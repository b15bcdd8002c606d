"""TextEnv and TextVectorEnv: Gymnasium/SB3 conformance, episode semantics, batching, bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env as gym_check_env

import textenv
from textenv import EndsWithReward, LengthReward, TextEnv, TextVectorEnv, char_tokenizer

TOK = char_tokenizer("abcd ")
A, B, C, D, SPACE = (TOK.convert_tokens_to_ids(c) for c in "abcd ")
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
PROMPTS = ["a", "ab", "abc d", "dd"]
TEXTS = ["abcd abcd abcd", "dcba", "a b c d", "cc", "dcb " * 40]  # the last is cut before tokenizing


def make(**kw) -> TextEnv:
    args = dict(
        tokenizer=TOK, reward_model=LengthReward(), prompts=PROMPTS, max_prompt_tokens=5, max_new_tokens=4
    )
    return TextEnv(**(args | kw))


def test_gymnasium_check_env():
    kw = dict(
        tokenizer=TOK, reward_model=LengthReward(), prompts=PROMPTS, max_prompt_tokens=5, render_mode="ansi"
    )
    gym_check_env(gym.make("TextEnv-v0", **kw).unwrapped, skip_render_check=False)
    kw |= dict(prompts=TEXTS, query_tokens=(1, 3), max_new_tokens=(2, 4), min_new_tokens=1, render_mode=None)
    gym_check_env(gym.make("TextEnv-v0", **kw).unwrapped)


def test_sb3_check_env_and_dummy_vec_env():
    from stable_baselines3.common.env_checker import check_env as sb3_check_env
    from stable_baselines3.common.env_util import make_vec_env

    sb3_check_env(make(), warn=True)
    venv = make_vec_env(make, n_envs=3, seed=0)
    obs = venv.reset()
    assert obs.shape == (3, 9) and obs.dtype == np.int64
    ended = []
    for _ in range(6):  # episodes end after 4 tokens and auto-reset inside SB3's DummyVecEnv
        obs, rewards, dones, infos = venv.step(np.array([A, B, C]))
        ended += [info for info, done in zip(infos, dones, strict=True) if done]
    assert len(ended) == 3 and all("score" in i and "terminal_observation" in i for i in ended)


def test_registration_make_and_make_vec():
    kw = dict(
        tokenizer=TOK,
        reward_model=EndsWithReward("b"),
        prompts=PROMPTS,
        max_prompt_tokens=5,
        max_new_tokens=3,
    )
    env = gym.make("TextEnv-v0", **kw)
    assert isinstance(env.unwrapped, TextEnv) and env.unwrapped.max_new_tokens == 3
    envs = gym.make_vec("TextEnv-v0", num_envs=4, **kw)
    assert isinstance(envs, TextVectorEnv) and envs.num_envs == 4
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    sync = gym.make_vec("TextEnv-v0", num_envs=2, vectorization_mode="sync", **kw)
    assert isinstance(sync, gym.vector.SyncVectorEnv)
    assert sync.reset(seed=1)[0].shape == (2, 8)
    assert gym.spec("TextEnv-v0").to_json()  # registered kwargs stay JSON-able


def test_an_episode_spec_is_handed_through_whole_or_by_its_fields():
    spec = textenv.EpisodeSpec(max_prompt_tokens=5, max_new_tokens=(2, 3), min_new_tokens=1)
    whole = TextEnv(TOK, LengthReward(), PROMPTS, episode=spec)
    assert whole.episode is spec  # the very spec, not rebuilt from keywords
    fields = TextEnv(TOK, LengthReward(), PROMPTS, max_prompt_tokens=5, max_new_tokens=(2, 3), min_new_tokens=1)
    assert fields.episode == spec and fields.window == whole.window == 8
    assert gym.make("TextEnv-v0", tokenizer=TOK, reward_model=LengthReward(), prompts=PROMPTS,
                    episode=spec).unwrapped.episode is spec
    vec = gym.make_vec("TextEnv-v0", num_envs=2, tokenizer=TOK, reward_model=LengthReward(), prompts=PROMPTS,
                       episode=spec)
    assert vec.env.episode is spec and vec.reset(seed=0)[0].shape == (2, 8)
    turns = textenv.Turns(interaction=lambda conv: ("", True), max_context_tokens=12)
    assert TextEnv(TOK, LengthReward(), PROMPTS, episode=spec, turns=turns).window == 12
    with pytest.raises(TypeError, match="not both"):
        TextEnv(TOK, LengthReward(), PROMPTS, episode=spec, max_new_tokens=4)
    with pytest.raises(TypeError, match="must be of type EpisodeSpec"):
        TextEnv(TOK, LengthReward(), PROMPTS, episode={"max_new_tokens": 4})
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_tokens'"):
        TextEnv(TOK, LengthReward(), PROMPTS, max_tokens=4)


def test_reward_zero_until_last_step_and_truncation():
    env = make(reward_model=LengthReward(), max_new_tokens=4)
    obs, info = env.reset(seed=3)
    prompt = info["prompt"]
    rewards = []
    for t in range(4):
        obs, r, term, trunc, info = env.step(A)
        rewards.append(r)
        assert not term and trunc == (t == 3)
        assert info["length"] == info["prompt_length"] + t + 1 and info["text"] == prompt + "a" * (t + 1)
    assert rewards[:3] == [0.0, 0.0, 0.0] and rewards[3] == len(prompt) + 4 == info["score"]
    assert info["completion"] == "aaaa" and obs[-4:].tolist() == [A] * 4  # newest last
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(A)


def test_eos_terminates_and_min_new_tokens():
    env = make(reward_model=EndsWithReward("b"))
    env.reset(seed=0)
    env.step(B)
    obs, r, term, trunc, info = env.step(EOS)
    assert term and not trunc and obs[-1] == EOS and info["completion"] == "b" and r == 1.0

    env = make(min_new_tokens=2)
    env.reset(seed=0)
    _, _, term, _, info = env.step(EOS)  # too early: an ordinary, invisible token
    assert not term and "score" not in info
    _, _, term, _, _ = env.step(A)
    _, _, term, trunc, info = env.step(EOS)
    assert term and not trunc and info["completion"] == "a"


def test_observation_left_padded():
    env = make(prompts=["abc"], max_prompt_tokens=5, max_new_tokens=2)
    obs, info = env.reset(seed=0)
    assert obs.tolist() == [PAD] * 4 + [A, B, C] and obs.dtype == np.int64
    assert env.observation_space.contains(obs) and env.action_space.n == len(TOK)
    obs, *_ = env.step(D)
    assert obs.tolist() == [PAD] * 3 + [A, B, C, D]


def test_same_seed_same_prompts_and_query_cuts():
    env = make(prompts=TEXTS, query_tokens=(2, 4), max_new_tokens=(1, 3))
    draws = [env.reset(seed=7 + i)[1]["prompt"] for i in range(20)]
    assert draws == [env.reset(seed=7 + i)[1]["prompt"] for i in range(20)]
    assert len(set(draws)) > 3 and all(2 <= len(p) <= 4 or p == "cc" for p in draws)
    assert all(any(t.startswith(p) for t in TEXTS) for p in draws)
    env.reset(seed=1)
    assert [env.reset()[1]["prompt"] for _ in range(10)] != [env.reset()[1]["prompt"] for _ in range(10)]


def _compare(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].tolist() == b[k].tolist(), k


@pytest.mark.parametrize(
    "kw", [{}, dict(prompts=TEXTS, query_tokens=(1, 4), max_new_tokens=(1, 4), min_new_tokens=1)]
)
def test_vector_env_matches_sync_vector_env(kw):
    calls = []

    def reward(texts):
        calls.append(len(texts))
        return [float(len(t)) for t in texts]

    E = 5
    args = (
        dict(tokenizer=TOK, reward_model=reward, prompts=PROMPTS, max_prompt_tokens=5, max_new_tokens=4) | kw
    )
    fast = TextVectorEnv(E, **args)
    sync = gym.vector.SyncVectorEnv([lambda: TextEnv(**args)] * E)
    rng = np.random.default_rng(0)
    o1, i1 = fast.reset(seed=11)
    o2, i2 = sync.reset(seed=11)
    np.testing.assert_array_equal(o1, o2)
    _compare(i1, i2)
    ends = 0
    for _ in range(60):
        actions = rng.choice([A, B, C, D, SPACE, EOS, PAD], size=E, p=[0.2, 0.2, 0.1, 0.1, 0.1, 0.2, 0.1])
        n_calls = len(calls)
        fast_out = fast.step(actions)
        fast_calls = len(calls) - n_calls
        sync_out = sync.step(actions)
        for x, y in zip(fast_out[:4], sync_out[:4], strict=True):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
        _compare(fast_out[4], sync_out[4])
        done = fast_out[2] | fast_out[3]
        assert fast_calls == int(done.any())  # all episodes ending on a step: one reward-model call
        ends += done.sum()
    assert ends > 30
    assert fast.observation_space == sync.observation_space and fast.action_space == sync.action_space


def test_vector_env_reset_mask_and_render():
    envs = TextVectorEnv(3, tokenizer=TOK, reward_model=LengthReward(), prompts=PROMPTS, max_prompt_tokens=5,
                         max_new_tokens=2, render_mode="ansi")  # fmt: skip
    envs.reset(seed=0)
    envs.step(np.array([A, A, A]))
    obs, infos = envs.reset(options={"reset_mask": np.array([True, False, False])})
    assert infos["_prompt"].tolist() == [True, False, False]
    frames = envs.render()
    assert len(frames) == 3 and frames[1].endswith("|a") and frames[0].endswith("|")


def test_reset_prompt_index_picks_the_prompt():
    env = make(max_new_tokens=(1, 4))
    assert [env.reset(seed=s, options={"prompt_index": i})[1]["prompt"] for s in range(3) for i in range(4)] == (
        PROMPTS * 3
    )
    budgets = set()
    for s in range(30):  # the budget is still drawn from the seed
        env.reset(seed=s, options={"prompt_index": np.int64(1)})
        budgets.add(env._budget)
    assert budgets == {1, 2, 3, 4}
    queries = make(prompts=TEXTS, query_tokens=(1, 3))
    cuts = {queries.reset(seed=s, options={"prompt_index": 4})[1]["prompt"] for s in range(20)}
    assert cuts == {"d", "dc", "dcb"} and queries.query_ids(4) == textenv.env.cut_query(TOK, TEXTS[4], 3)
    for bad, error in [(4, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("0", TypeError)]:
        with pytest.raises(error, match="prompt_index"):
            env.reset(options={"prompt_index": bad})

    envs = TextVectorEnv(3, tokenizer=TOK, reward_model=LengthReward(), prompts=PROMPTS, max_prompt_tokens=5,
                         max_new_tokens=2)  # fmt: skip
    _, infos = envs.reset(seed=0, options={"prompt_index": np.array([3, 3, 0])})
    assert infos["prompt"].tolist() == ["dd", "dd", "a"]
    envs.step(np.array([A, A, A]))
    mask = np.array([False, True, False])
    _, infos = envs.reset(options={"reset_mask": mask, "prompt_index": np.array([9, 2, 9])})  # 9s: not reset
    assert infos["prompt"].tolist() == [None, "abc d", None] and infos["_prompt"].tolist() == mask.tolist()
    assert envs.render() is None and envs._new.tolist() == [1, 0, 1]
    for bad in (np.array([0, 1]), np.array([0.0, 1.0, 2.0]), 1):
        with pytest.raises(ValueError, match="prompt_index"):
            envs.reset(options={"prompt_index": bad})
    with pytest.raises(ValueError, match="out of range"):
        envs.reset(options={"prompt_index": np.array([0, 4, 0])})


@pytest.mark.parametrize(
    "action, error, match",
    [(len(TOK), ValueError, "out of range"), (-1, ValueError, "out of range"), (1.0, TypeError, "integer"),
     ("a", TypeError, "integer"), (True, TypeError, "integer")],
)  # fmt: skip
def test_bad_actions(action, error, match):
    env = make()
    env.reset(seed=0)
    with pytest.raises(error, match=match):
        env.step(action)
    env.step(np.int64(A))  # numpy ints and 1-element arrays are fine
    env.step(np.array([A]))
    envs = TextVectorEnv(2, tokenizer=TOK, reward_model=LengthReward(), prompts=PROMPTS, max_prompt_tokens=5)
    with pytest.raises(ResetNeeded):
        envs.step(np.array([A, A]))
    envs.reset(seed=0)
    with pytest.raises(error, match=match):
        envs.step(np.array([action, action]))
    with pytest.raises(ValueError, match="shape"):
        envs.step(np.array([A]))


def test_step_before_reset():
    with pytest.raises(ResetNeeded, match="reset"):
        make().step(A)


def test_bad_construction():
    with pytest.raises(ValueError, match="longer than max_prompt_tokens"):
        make(prompts=["abcdabcd"], max_prompt_tokens=4)
    with pytest.raises(ValueError, match="prompts is empty"):
        make(prompts=[])
    with pytest.raises(ValueError, match="prompt 1 is an empty string"):
        make(prompts=["a", ""])
    with pytest.raises(TypeError, match="list of strings"):
        make(prompts="abc")
    with pytest.raises(ValueError, match="raise max_prompt_tokens"):
        make(prompts=TEXTS, query_tokens=(2, 8), max_prompt_tokens=4)
    with pytest.raises(TypeError, match="not callable"):
        make(reward_model="sentiment")
    tok = char_tokenizer("ab")
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token.*pad_token = tokenizer.eos_token"):
        make(tokenizer=tok)
    tok = char_tokenizer("ab")
    tok.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        make(tokenizer=tok)


@pytest.mark.parametrize(
    "reward, match",
    [(lambda t: [1.0] * (len(t) + 1), "one float per text"), (lambda t: [float("nan")] * len(t), "non-finite"),
     (lambda t: None, "shape"), (lambda t: ["x"] * len(t), "not a sequence of numbers")],
)  # fmt: skip
def test_bad_reward_model_output(reward, match):
    env = make(reward_model=reward, max_new_tokens=1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=f"reward model <lambda>.*{match}") as error:
        env.step(A)
    assert error.value.__notes__ == [f"while scoring a batch of 1 finished episodes (prompts {env.unwrapped._prompt!r})"]
    envs = TextVectorEnv(
        2, tokenizer=TOK, reward_model=reward, prompts=PROMPTS, max_prompt_tokens=5, max_new_tokens=1
    )
    envs.reset(seed=0)
    with pytest.raises(ValueError, match=match) as error:
        envs.step(np.array([A, B]))
    assert error.value.__notes__ == [f"while scoring a batch of 2 finished episodes (prompts {envs._prompt[0]!r}, "
                                     f"{envs._prompt[1]!r})"]


def test_a_reward_model_that_raises_or_returns_inf_is_named_with_its_batch():
    def broken(texts):
        raise RuntimeError("CUDA out of memory")

    envs = TextVectorEnv(5, tokenizer=TOK, reward_model=broken, prompts=PROMPTS, max_prompt_tokens=5,
                         max_new_tokens=1)
    envs.reset(seed=0)
    with pytest.raises(RuntimeError, match="CUDA out of memory") as error:  # its own error, type kept
        envs.step(np.full(5, A))
    (note,) = error.value.__notes__
    assert note.startswith(f"while scoring a batch of 5 finished episodes (prompts {envs._prompt[0]!r}, ")
    assert note.endswith(" and 2 more)")
    envs = TextVectorEnv(2, tokenizer=TOK, reward_model=lambda t: [1.0, float("inf")], prompts=PROMPTS,
                         max_prompt_tokens=5, max_new_tokens=1)
    envs.reset(seed=0)
    with pytest.raises(ValueError, match="non-finite score .inf. for text 1") as error:
        envs.step(np.array([A, B]))
    assert envs._prompt[1] in error.value.__notes__[0]


def test_exports_short():
    assert set(textenv.__all__) >= {"TextEnv", "TextVectorEnv", "HFRewardModel", "char_tokenizer"}
    assert len(textenv.__all__) <= 16


def test_groups_share_their_prompt_and_budget_at_reset():
    tok = char_tokenizer("abcd")
    kw = dict(tokenizer=tok, reward_model=EndsWithReward("d"), prompts=["a", "b", "c", "d", "ab", "cd"],
              max_prompt_tokens=2, max_new_tokens=(1, 4))
    envs = TextVectorEnv(8, group_size=4, **kw)
    for seed in range(5):
        obs, infos = envs.reset(seed=seed)
        assert infos["group"].tolist() == [0] * 4 + [1] * 4 and infos["_group"].all()
        assert (obs[:4] == obs[0]).all() and (obs[4:] == obs[4]).all()
        assert len(set(envs._budget[:4])) == 1 and len(set(envs._budget[4:])) == 1
    # the first env of each group draws: the same prompts as a TextVectorEnv without groups gives those envs
    plain, _ = TextVectorEnv(8, **kw).reset(seed=3)
    grouped, _ = envs.reset(seed=3)
    assert (grouped[0] == plain[0]).all() and (grouped[4] == plain[4]).all()
    with pytest.raises(ValueError, match="group_size=3 must be a positive divisor of num_envs=8"):
        TextVectorEnv(8, group_size=3, **kw)


def test_groups_take_a_prompt_index_per_group_and_refuse_one_split_across_a_group():
    tok = char_tokenizer("abcd")
    envs = TextVectorEnv(8, group_size=4, tokenizer=tok, reward_model=EndsWithReward("d"),
                         prompts=["a", "b", "c", "d", "ab", "cd"], max_prompt_tokens=2, max_new_tokens=(1, 4))
    _, infos = envs.reset(seed=0, options={"prompt_index": np.array([5] * 4 + [2] * 4)})
    assert infos["prompt"].tolist() == ["cd"] * 4 + ["c"] * 4
    # a group whose leader does not restart keeps its episode: a follower's index is then its own
    _, infos = envs.reset(options={"prompt_index": np.array([0] * 4 + [1] * 4),
                                   "reset_mask": np.array([True] * 4 + [False] * 4)})
    assert infos["prompt"][:4].tolist() == ["a"] * 4
    with pytest.raises(ValueError, match="env 2 prompt 3 but the first env of its group .env 0. prompt 0"):
        envs.reset(options={"prompt_index": np.array([0, 0, 3, 0, 1, 1, 1, 1])})
