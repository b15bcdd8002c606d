"""Property-based tests (hypothesis) of the environment contract.

Fuzzed inputs: char tokenizers over random alphabets (1-8 characters, `textenv.char_tokenizer`); prompt lists
(with empty and over-long strings for the construction check, characters outside the alphabet that encode to
<unk>, and texts cut by `query_tokens`); `max_prompt_tokens`, `max_new_tokens` (an int or a range),
`min_new_tokens` and `max_context_tokens`; reward models; action masks (random tables of allowed ids, looked
up from the prefix and the turn so far); dense rewards (`TokenReward` tables); stop strings and interactions
(single envs: `TextVectorEnv` refuses them); seeds, numbers of envs (<= 4), group sizes, partial resets; and
random VALID actions, picked among the tokens the current mask allows (EOS first: episodes also end by EOS).

Properties, one test each: `TextVectorEnv` == `SyncVectorEnv` of `TextEnv`s step for step; groups share their
first episode; `TurnEnv` plays the same episode as the token view; observations lie in the observation space
and rewards are finite; a masked action raises ValueError and changes nothing; `RefLogprob`'s cached log-probs
equal a full recompute; construction accepts exactly the valid prompts and reset starts from them.

Each property runs twice: a fast, derandomized profile in the default suite (a few examples each, the file in
~10 s) and a `slow`-marked one with 10x the examples, random (`pytest -m slow tests/test_fuzz.py`). No example
database is written (`database=None`).
"""

from __future__ import annotations

import functools
import itertools
import string
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2LMHeadModel

from textenv import (
    EndsWithReward,
    KeywordReward,
    LengthReward,
    TextEnv,
    TextVectorEnv,
    TurnEnv,
    char_tokenizer,
)
from textenv.kl import RefLogprob
from textenv.rewards import TokenReward
from tiny import tiny_gpt

MAX_CHARS = 8
OUTSIDE = "~"  # never in an alphabet: encodes to <unk>
ALPHABETS = st.lists(st.sampled_from(string.ascii_lowercase[:12] + " .?"), min_size=1, max_size=MAX_CHARS,
                     unique=True).map("".join)
CHOICES = st.integers(0, 63)  # an index into the allowed tokens (EOS first)
SEEDS = st.integers(0, 2**16)
REWARDS = st.floats(-5.0, 5.0, allow_nan=False, allow_infinity=False)


def profiles(n: int) -> list:
    """("fast", n) derandomized in the default suite, and ("slow", 10 n) random, marked slow."""
    return [pytest.param("fast", n, id="fast"),
            pytest.param("slow", 10 * n, id="slow", marks=pytest.mark.slow)]


def check(prop, strategy: st.SearchStrategy, profile: str, examples: int) -> None:
    """Run `prop(case)` over `examples` cases drawn from `strategy` under the named profile."""
    run = settings(max_examples=examples, deadline=None, database=None, derandomize=profile == "fast",
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
    run(given(strategy)(prop))()


# -- generated pieces -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableMask:
    """A random but deterministic action mask: the allowed ids are looked up from the prefix and the turn."""

    table: tuple[tuple[int, ...], ...]

    def __call__(self, prefix_ids: list[int], turn_ids: list[int]) -> list[int]:
        return list(self.table[(len(prefix_ids) + 3 * len(turn_ids) + sum(turn_ids)) % len(self.table)])


@dataclass(frozen=True)
class Reply:
    """A random but deterministic interaction: the reply and `done` depend on the conversation's length."""

    replies: tuple[str, ...]
    done_after: int

    def __call__(self, conversation: str) -> tuple[str, bool]:
        return self.replies[len(conversation) % len(self.replies)], len(conversation) >= self.done_after


def texts(alphabet: str, min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.sampled_from(alphabet + OUTSIDE), min_size=min_size, max_size=max_size)


@st.composite
def table_masks(draw, vocab: int, proper: bool = False) -> TableMask:
    """1-3 non-empty allowed sets (`proper`: each also leaves out at least one id)."""
    allowed = st.sets(st.integers(0, vocab - 1), min_size=1, max_size=vocab - 1 if proper else vocab)
    return TableMask(tuple(tuple(sorted(s)) for s in draw(st.lists(allowed, min_size=1, max_size=3))))


@st.composite
def prompt_kwargs(draw, alphabet: str, max_prompt: int) -> dict:
    """Whole prompts that fit, or texts (longer than the window) to cut queries of lo..hi tokens from."""
    if draw(st.booleans()):
        lo = draw(st.integers(1, max_prompt))
        query = (lo, draw(st.integers(lo, max_prompt)))
        prompts = draw(st.lists(texts(alphabet, 1, 40), min_size=1, max_size=3))
        return dict(prompts=prompts, query_tokens=query)
    return dict(prompts=draw(st.lists(texts(alphabet, 1, max_prompt), min_size=1, max_size=3)))


@st.composite
def interaction_kwargs(draw, alphabet: str) -> dict:
    replies = tuple(draw(st.lists(texts(alphabet, 0, 3), min_size=1, max_size=3)))
    stop = draw(st.lists(st.text(st.sampled_from(alphabet), min_size=1, max_size=2), max_size=2))
    return dict(interaction=Reply(replies, draw(st.integers(1, 20))), stop_strings=stop)


@st.composite
def env_kwargs(draw, interactions: bool = False, masked: bool | None = None) -> dict:
    """TextEnv keyword arguments; `masked`: always (True, proper masks), never (False) or maybe (None)."""
    alphabet = draw(ALPHABETS)
    tok = char_tokenizer(alphabet)
    vocab, max_prompt = len(tok), draw(st.integers(1, 4))
    kw = dict(tokenizer=tok, max_prompt_tokens=max_prompt, **draw(prompt_kwargs(alphabet, max_prompt)))
    lo = draw(st.integers(1, 8))
    hi = draw(st.integers(lo, 8))
    kw["max_new_tokens"] = lo if lo == hi and draw(st.booleans()) else (lo, hi)
    kw["min_new_tokens"] = draw(st.integers(0, hi))
    kw["max_context_tokens"] = draw(st.none() | st.integers(max_prompt + 1, max_prompt + 12))
    kw["reward_model"] = draw(st.sampled_from([LengthReward(0.5), EndsWithReward(alphabet[-1], 2.0),
                                               KeywordReward([alphabet[0]], -1.5)]))
    if masked or (masked is None and draw(st.booleans())):
        kw["action_mask"] = draw(table_masks(vocab, proper=bool(masked)))
    if draw(st.booleans()):
        table = draw(st.dictionaries(st.integers(0, vocab - 1), REWARDS, max_size=4))
        kw["token_rewards"] = TokenReward(table)
    if interactions and draw(st.booleans()):
        kw |= draw(interaction_kwargs(alphabet))
    return kw


@st.composite
def vector_ops(draw, n: int) -> list[tuple[list[int], np.ndarray]]:
    """Vector steps: each one choice per env, and the envs to reset (with `reset_mask`) before it, if any."""
    resets = st.lists(st.booleans(), min_size=n, max_size=n).map(lambda r: np.array(r, dtype=np.bool_))
    some_resets = st.one_of(st.just(np.zeros(n, dtype=np.bool_)), resets)
    step = st.tuples(st.lists(CHOICES, min_size=n, max_size=n), some_resets)
    return draw(st.lists(step, min_size=6, max_size=14))


def pick(mask: np.ndarray | None, vocab: int, eos: int, choice: int) -> int:
    """A valid action: the `choice`-th allowed id (modulo), EOS first; every id without a mask."""
    ids = np.arange(vocab) if mask is None else np.flatnonzero(mask)
    ids = ids[np.argsort(ids != eos, kind="stable")]
    return int(ids[choice % len(ids)])


def masks_of(infos: dict, n: int, vocab: int) -> np.ndarray:
    return np.asarray(infos["action_mask"]) if "action_mask" in infos else np.ones((n, vocab), dtype=np.bool_)


def assert_same_step(a: tuple, b: tuple) -> None:
    """Two vector steps (or resets) are the same: arrays equal with equal dtypes, infos equal."""
    for x, y in zip(a[:-1], b[:-1], strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    assert a[-1].keys() == b[-1].keys()
    for k in a[-1]:
        assert a[-1][k].dtype == b[-1][k].dtype and a[-1][k].tolist() == b[-1][k].tolist(), k


def assert_infos_agree(vec: dict, sync: dict) -> None:
    """Every info the SyncVectorEnv reports, the TextVectorEnv reports too, equal in dtype and value. It may
    report more: a key whose `_key` mask is all False, and on a partial reset every env's `action_mask`."""
    for k in (k for k in sync if not k.startswith("_")):
        has = sync[f"_{k}"]
        assert k in vec and vec[k].dtype == sync[k].dtype, k
        assert (vec[f"_{k}"] == has).all() or (k == "action_mask" and vec[f"_{k}"].all()), k
        assert vec[k][has].tolist() == sync[k][has].tolist(), k
    assert not any(vec[f"_{k}"].any() for k in vec if not k.startswith("_") and k not in sync)


def assert_same_vector_step(vec: tuple, sync: tuple) -> None:
    for x, y in zip(vec[:-1], sync[:-1], strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    assert_infos_agree(vec[-1], sync[-1])


# -- 1. TextVectorEnv == SyncVectorEnv --------------------------------------------------------------


@st.composite
def vector_cases(draw):
    n = draw(st.integers(1, 4))
    return draw(env_kwargs()), n, draw(SEEDS), draw(vector_ops(n)), draw(st.none() | SEEDS)


def _vector_matches_sync(case) -> None:
    kw, n, seed, ops, reset_seed = case
    fast = TextVectorEnv(n, **kw)
    sync = SyncVectorEnv([lambda: TextEnv(**kw) for _ in range(n)])
    assert sync.metadata["autoreset_mode"] == fast.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    out = fast.reset(seed=seed)
    assert_same_vector_step(out, sync.reset(seed=seed))
    vocab, eos = fast.env.vocab_size, fast.env.eos_token_id
    masks = masks_of(out[1], n, vocab)
    for choices, reset in ops:
        if reset.any():  # reset_mask: sync pops it from options, so each gets its own dict
            out = fast.reset(seed=reset_seed, options={"reset_mask": reset.copy()})
            assert_same_vector_step(out, sync.reset(seed=reset_seed, options={"reset_mask": reset.copy()}))
            masks[reset] = masks_of(out[1], n, vocab)[reset]
        actions = np.array([pick(masks[i], vocab, eos, c) for i, c in enumerate(choices)])
        out = fast.step(actions)
        assert_same_vector_step(out, sync.step(actions))
        assert fast.observation_space.contains(out[0]) and np.isfinite(out[1]).all()
        masks = masks_of(out[4], n, vocab)


@pytest.mark.parametrize("profile, examples", profiles(25))
def test_vector_env_equals_sync_vector_env(profile, examples):
    check(_vector_matches_sync, vector_cases(), profile, examples)


# -- 1b. groups share their first episode -----------------------------------------------------------


@st.composite
def group_cases(draw):
    k = draw(st.integers(2, 4))
    groups = draw(st.integers(1, 4 // k))
    steps = st.lists(st.lists(CHOICES, min_size=groups, max_size=groups), min_size=3, max_size=12)
    return draw(env_kwargs()), groups, k, draw(SEEDS), draw(steps)


def _groups_share_episodes(case) -> None:
    """Group members start from their leader's prompt and budget: given the same actions, they play the same
    first episode as each other, and as an ungrouped env seeded as the leader plays it."""
    kw, groups, k, seed, steps = case
    envs, leaders = TextVectorEnv(groups * k, group_size=k, **kw), TextVectorEnv(groups, **kw)
    obs, infos = envs.reset(seed=seed)
    leader_obs, _ = leaders.reset(seed=[seed + g * k for g in range(groups)])
    assert infos["group"].tolist() == np.repeat(np.arange(groups), k).tolist() and infos["_group"].all()
    assert (obs == np.repeat(leader_obs, k, axis=0)).all()
    vocab, eos = envs.env.vocab_size, envs.env.eos_token_id
    for choices in steps:
        masks = masks_of(infos, groups * k, vocab)
        actions = np.array([pick(masks[g * k], vocab, eos, c) for g, c in enumerate(choices)])
        out, leader_out = envs.step(np.repeat(actions, k)), leaders.step(actions)
        infos = out[4]
        for x, y in zip(out[:4], leader_out[:4], strict=True):
            assert (x == np.repeat(y, k, axis=0)).all()
        if (out[2] | out[3]).any():  # all members end together; autoreset then draws on each env's own
            break


@pytest.mark.parametrize("profile, examples", profiles(15))
def test_groups_share_their_first_episode(profile, examples):
    check(_groups_share_episodes, group_cases(), profile, examples)


# -- 2. TurnEnv == the token view -----------------------------------------------------------------------


@dataclass
class Turn:
    tokens: list[int]
    step: tuple  # (obs, summed reward, terminated, truncated, info of the last token step)


def play_tokens(kw: dict, seed: int, choices: list[int]) -> tuple[tuple, list[Turn]]:
    """One episode token by token (valid picks from `choices`, then EOS-first ones): its reset and turns."""
    env = TextEnv(**kw)
    first = env.reset(seed=seed)
    turns, tokens, total = [], [], 0.0
    for t in itertools.count():
        a = pick(env.action_masks(), env.vocab_size, env.eos_token_id, choices[t] if t < len(choices) else 0)
        obs, reward, term, trunc, info = env.step(a)
        tokens, total = [*tokens, a], total + float(reward)
        if term or trunc or info.get("turn_ended", False):
            turns.append(Turn(tokens, (obs, total, term, trunc, info)))
            tokens, total = [], 0.0
        if term or trunc:
            return first, turns
    raise AssertionError("unreachable")


def as_given(turn: Turn, how: int, tok, junk: list[int]) -> list[int] | str:
    """The turn as TurnEnv is given it: its ids (0), without its final EOS (1), as text (2), with junk after a
    truncated end (3); the ids when that form does not apply."""
    ids, eos = turn.tokens, tok.eos_token_id
    bare = ids[:-1] if ids[-1] == eos else ids
    if how == 1 and bare and bare != ids:
        return bare  # TurnEnv ends the turn with EOS itself
    if how == 2 and bare and min(bare) >= len(tok.all_special_ids):
        return tok.decode(bare)
    if how == 3 and turn.step[3]:
        return ids + junk  # tokens after a budget cut are ignored
    return ids


@st.composite
def turn_cases(draw):
    hows = st.lists(st.integers(0, 3), min_size=1, max_size=4)
    junk = st.lists(st.integers(0, 10), max_size=3)
    choices = st.lists(CHOICES, max_size=12)
    return draw(env_kwargs(interactions=True)), draw(SEEDS), draw(choices), draw(hows), draw(junk)


def _turns_match_tokens(case) -> None:
    kw, seed, choices, hows, junk = case
    (first_obs, first_info), turns = play_tokens(kw, seed, choices)
    env = TurnEnv(TextEnv(**kw))
    obs, info = env.reset(seed=seed)
    assert (obs == first_obs).all() and info["prompt"] == first_info["prompt"]
    tok = kw["tokenizer"]
    for k, turn in enumerate(turns):
        obs, reward, term, trunc, info = env.step(as_given(turn, hows[k % len(hows)], tok, junk))
        t_obs, t_reward, t_term, t_trunc, t_info = turn.step
        assert info["turn_actions"] == turn.tokens
        assert (obs == t_obs).all() and reward == t_reward and (term, trunc) == (t_term, t_trunc)
        assert info["text"] == t_info["text"] and info.get("score") == t_info.get("score")
    assert term or trunc


@pytest.mark.parametrize("profile, examples", profiles(30))
def test_turn_env_plays_the_token_episode(profile, examples):
    check(_turns_match_tokens, turn_cases(), profile, examples)


# -- 3. observations in the space, finite rewards -------------------------------------------------


def check_observation(env: TextEnv, obs: np.ndarray, info: dict) -> None:
    """In the space; left-padded: pads before the `length` real tokens, which start with a non-pad id."""
    assert env.observation_space.contains(obs), obs
    pad, start = env.pad_token_id, env.window - info["length"]
    assert 0 < info["length"] <= env.window and (obs[:start] == pad).all() and obs[start] != pad


@st.composite
def episode_cases(draw):
    return draw(env_kwargs(interactions=True)), draw(SEEDS), draw(st.lists(CHOICES, min_size=1, max_size=24))


def _observations_in_space(case) -> None:
    kw, seed, choices = case
    env = TextEnv(**kw)
    check_observation(env, *env.reset(seed=seed))
    for c in choices:
        a = pick(env.action_masks(), env.vocab_size, env.eos_token_id, c)
        obs, reward, term, trunc, info = env.step(a)
        check_observation(env, obs, info)
        assert isinstance(reward, float) and np.isfinite(reward)
        if term or trunc:
            check_observation(env, *env.reset())


@pytest.mark.parametrize("profile, examples", profiles(40))
def test_observations_in_space_and_rewards_finite(profile, examples):
    check(_observations_in_space, episode_cases(), profile, examples)


# -- 4. masked actions raise ----------------------------------------------------------------------------


def single_env_refuses(kw: dict, seed: int, choices: list[int]) -> None:
    """Each step: a masked action raises ValueError; the env then plays on exactly as a twin never sent it."""
    env, twin = TextEnv(**kw), TextEnv(**kw)
    env.reset(seed=seed), twin.reset(seed=seed)
    for c in choices:
        mask = env.action_masks()
        banned = np.flatnonzero(~mask)
        assert len(banned)  # every generated mask leaves out a token
        with pytest.raises(ValueError, match="masked out"):
            env.step(int(banned[c % len(banned)]))
        a = pick(mask, env.vocab_size, env.eos_token_id, c)
        out, want = env.step(a), twin.step(a)
        assert (out[0] == want[0]).all() and out[1:4] == want[1:4]
        if out[2] or out[3]:
            env.reset(), twin.reset()


def vector_env_refuses(kw: dict, n: int, seed: int, steps: list[list[int]]) -> None:
    envs, twin = TextVectorEnv(n, **kw), TextVectorEnv(n, **kw)
    (_, infos), _ = envs.reset(seed=seed), twin.reset(seed=seed)
    vocab, eos = envs.env.vocab_size, envs.env.eos_token_id
    for choices in steps:
        masks = infos["action_mask"]
        actions = np.array([pick(masks[i], vocab, eos, c) for i, c in enumerate(choices)])
        live = np.flatnonzero(~masks.all(axis=1))  # envs whose episode did not just end
        if len(live):
            i = live[choices[0] % len(live)]
            bad = actions.copy()
            bad[i] = np.flatnonzero(~masks[i])[choices[-1] % (~masks[i]).sum()]
            with pytest.raises(ValueError, match="masked out"):
                envs.step(bad)
        out = envs.step(actions)
        assert_same_step(out, twin.step(actions))
        infos = out[4]


@st.composite
def masked_cases(draw):
    n = draw(st.integers(1, 4))
    steps = draw(st.lists(st.lists(CHOICES, min_size=n, max_size=n), min_size=3, max_size=10))
    return draw(env_kwargs(masked=True)), n, draw(SEEDS), steps


def _masked_actions_raise(case) -> None:
    kw, n, seed, steps = case
    single_env_refuses(kw, seed, [c for row in steps for c in row])
    vector_env_refuses(kw, n, seed, steps)


@pytest.mark.parametrize("profile, examples", profiles(20))
def test_masked_action_raises_and_changes_nothing(profile, examples):
    check(_masked_actions_raise, masked_cases(), profile, examples)


# -- 5. RefLogprob == a full recompute -------------------------------------------------------------


@functools.cache
def reference_model() -> GPT2LMHeadModel:
    """A tiny random GPT-2 (seeded), its vocabulary padded beyond every generated tokenizer's."""
    return tiny_gpt(3 + MAX_CHARS + 2, positions=32).eval()


@torch.no_grad()
def recompute(row: np.ndarray, length: int, action: int, allowed: np.ndarray) -> float:
    """log p_ref(action | the real tokens of `row`) over the `allowed` ids (a bool array over the env's
    actions): one plain forward over the unpadded sequence, no cache."""
    logits = reference_model()(input_ids=torch.as_tensor(row[len(row) - length :])[None]).logits[0, -1]
    logits = logits[: len(allowed)].masked_fill(~torch.as_tensor(allowed), float("-inf"))
    return torch.log_softmax(logits, -1)[action].item()


@st.composite
def ref_cases(draw):
    n, sync = draw(st.integers(1, 3)), draw(st.booleans())
    return draw(env_kwargs(interactions=sync)), n, sync, draw(SEEDS), draw(vector_ops(n))


def _ref_logprob_matches_recompute(case) -> None:
    kw, n, sync, seed, ops = case
    base = SyncVectorEnv([lambda: TextEnv(**kw) for _ in range(n)]) if sync else TextVectorEnv(n, **kw)
    envs = RefLogprob(base, reference_model())
    vocab, eos = base.single_action_space.n, kw["tokenizer"].eos_token_id
    obs, infos = envs.reset(seed=seed)
    length, masks, ended = infos["length"].copy(), masks_of(infos, n, vocab), np.zeros(n, dtype=np.bool_)
    for choices, reset in ops:
        if reset.any():
            obs, infos = envs.reset(options={"reset_mask": reset.copy()})
            length[reset], masks[reset] = infos["length"][reset], masks_of(infos, n, vocab)[reset]
            ended &= ~reset
        actions = np.array([pick(masks[i], vocab, eos, c) for i, c in enumerate(choices)])
        new_obs, _, term, trunc, infos = envs.step(actions)
        assert infos["_ref_logprob"].tolist() == (~ended).tolist()  # NEXT_STEP: no action after an end
        for i in range(n):
            want = 0.0 if ended[i] else recompute(obs[i], length[i], actions[i], masks[i])
            assert infos["ref_logprob"][i] == pytest.approx(want, abs=1e-4), i
        obs, length, masks, ended = new_obs, infos["length"].copy(), masks_of(infos, n, vocab), term | trunc


@pytest.mark.parametrize("profile, examples", profiles(12))
def test_ref_logprob_equals_full_recompute(profile, examples):
    check(_ref_logprob_matches_recompute, ref_cases(), profile, examples)


# -- 6. construction and reset: prompts -----------------------------------------------------------


@st.composite
def prompt_cases(draw):
    alphabet, max_prompt = draw(ALPHABETS), draw(st.integers(1, 4))
    prompts = draw(st.lists(texts(alphabet, 0, max_prompt + 3), min_size=1, max_size=4))
    lo = draw(st.integers(1, max_prompt))
    query = draw(st.none() | st.just((lo, draw(st.integers(lo, max_prompt)))))
    return alphabet, max_prompt, prompts, query, draw(SEEDS)


def _prompts_accepted_iff_valid(case) -> None:
    """Empty prompts, and whole prompts over `max_prompt_tokens`, are refused; every other prompt starts
    episodes as its own tokens (with `query_tokens=(lo, hi)`: its first lo..hi, fewer if it has fewer)."""
    alphabet, max_prompt, prompts, query, seed = case
    tok = char_tokenizer(alphabet)
    kw = dict(tokenizer=tok, reward_model=LengthReward(), prompts=prompts, max_prompt_tokens=max_prompt,
              max_new_tokens=2, query_tokens=query)
    if "" in prompts or (query is None and max(map(len, prompts)) > max_prompt):  # one char, one token
        with pytest.raises(ValueError, match="empty string|longer than max_prompt_tokens"):
            TextEnv(**kw)
        return
    env = TextEnv(**kw)
    for i, prompt in enumerate(prompts):
        obs, info = env.reset(seed=seed + i, options={"prompt_index": i})
        ids, n = tok.encode(prompt, add_special_tokens=False), info["prompt_length"]
        assert obs[env.window - n :].tolist() == ids[:n]
        assert info["prompt"] == tok.decode(ids[:n], skip_special_tokens=True)
        lo, hi = query or (len(ids), len(ids))
        assert n == len(ids) if len(ids) < lo else lo <= n <= hi


@pytest.mark.parametrize("profile, examples", profiles(30))
def test_construction_accepts_exactly_the_valid_prompts(profile, examples):
    check(_prompts_accepted_iff_valid, prompt_cases(), profile, examples)
