"""TextEnv: text generation as a Gymnasium environment, one token per step."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.error import ResetNeeded

import textenv.interaction as multiturn
from textenv.episode import EpisodeSpec
from textenv.masks import ActionMask, check_allowed, check_mask
from textenv.rewards import check_scores, pay_token_rewards


def check_tokenizer(tokenizer: Any) -> tuple[int, int, int]:
    """(eos_token_id, pad_token_id, vocab_size) of a transformers tokenizer, or a clear error."""
    for attr in ("encode", "batch_decode", "__len__"):
        if not hasattr(tokenizer, attr):
            raise TypeError(
                f"tokenizer {type(tokenizer).__name__} has no `{attr}`; pass a transformers tokenizer "
                "(AutoTokenizer.from_pretrained(...) or textenv.char_tokenizer())."
            )
    eos, pad, vocab = tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)
    if eos is None:
        raise ValueError(
            "the tokenizer has no EOS token, so episodes could never terminate; "
            "set one, e.g. tokenizer.add_special_tokens({'eos_token': '<eos>'})."
        )
    if pad is None:
        raise ValueError(
            "the tokenizer has no pad token, needed to left-pad observations; "
            "set tokenizer.pad_token = tokenizer.eos_token, or add a dedicated '<pad>' token."
        )
    if not (0 <= eos < vocab and 0 <= pad < vocab):
        raise ValueError(
            f"EOS id {eos} / pad id {pad} lie outside the tokenizer's {vocab} ids; fix the tokenizer."
        )
    return int(eos), int(pad), int(vocab)


def decode_rows(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    """Decode token-id rows (special tokens skipped), straight through the Rust decoder when that gives the
    same text as `tokenizer.decode` (cheaper: no Python-side post-processing). One call per row: `decode_batch` starts a thread pool that
    is slower for short rows and competes with the model for the cores."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return [backend.decode(row, skip_special_tokens=True) for row in rows]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def cut_query(tokenizer: Any, text: str, n: int) -> list[int]:
    """The first `n` token ids of `text` (the env's query rule). Only the text's head is encoded: cut at a
    space, so the tokens before the cut are those of the full text; the full text if the head is too short.
    A text without tokens is a ValueError."""
    space = text.rfind(" ", 0, 16 * n)
    head = text[:space] if len(text) > 16 * n and space > 0 else text
    ids = tokenizer.encode(head, add_special_tokens=False)
    if len(ids) < n + 2 and head is not text:
        ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"text {text[:40]!r} has no tokens; remove it from prompts.")
    return list(ids[:n])


def episode_and_turns(episode: EpisodeSpec | None, turns: multiturn.Turns | None,
                      fields: dict[str, Any]) -> tuple[EpisodeSpec, multiturn.Turns]:
    """`TextEnv`'s `episode` and `turns`, each given whole or by its fields (`fields`, the keywords passed by name),
    or a TypeError naming an unknown keyword or a spec given both ways."""
    specs = []
    for name, given, cls in (("episode", episode, EpisodeSpec), ("turns", turns, multiturn.Turns)):
        names = {f.name for f in dataclasses.fields(cls)}
        mine = {k: fields.pop(k) for k in list(fields) if k in names}
        if given is not None and not isinstance(given, cls):
            raise TypeError(f"{name}={given!r} must be of type {cls.__name__} (or pass its fields by name: {sorted(names)}).")
        if given is not None and mine:
            raise TypeError(f"pass {name}={cls.__name__}(...) or its fields ({', '.join(sorted(mine))}), not both.")
        specs.append(given if given is not None else cls(**mine))
    if fields:
        raise TypeError(f"TextEnv() got an unexpected keyword argument {next(iter(fields))!r}.")
    return specs[0], specs[1]


class TextEnv(gym.Env[np.ndarray, np.int64]):
    """
    ## Description

    Text generation as reinforcement learning: each episode starts from a prompt, each step the agent
    appends one token, and a frozen reward model scores the finished text. This is the environment of
    RLHF fine-tuning (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593) written as a plain
    Gymnasium environment, so any agent (a GPT policy, or SB3's PPO with an MLP) can train on it.

    ## Action Space

    `Discrete(len(tokenizer))`: the id of the next token. A policy whose vocabulary is larger (e.g. a
    model's embedding padded to a multiple of 64) must restrict its logits to the first
    `action_space.n` ids. EOS ends the episode (see Episode End); the pad id is an ordinary token.

    ## Observation Space

    `Box(0, vocab_size - 1, (max_prompt_tokens + max_new_tokens,), int64)`: token ids, LEFT-padded with
    `tokenizer.pad_token_id`, newest token last, so `obs[-1]` is always the last token. A row's real
    tokens start at its first non-pad id (`mask = cumsum(obs != pad) > 0`); `info["length"]` also
    gives their number.

    ## Rewards

    0 on every step but the last; on the last step, the reward model's score of the decoded prompt +
    completion (special tokens skipped), also in `info["score"]`. A reward model is any callable
    `list[str] -> sequence of float` (see `textenv.rewards`).

    Dense rewards (`token_rewards=f`, see `textenv.rewards`): every step also pays the reward of the token it
    emitted (`info["token_reward"]`; the episode's list is `info["token_rewards"]` on the last step).

    ## Starting State

    A prompt drawn uniformly with `self.np_random` from `prompts` (each string a whole prompt), or, with
    `query_tokens=(lo, hi)`, the first `n ~ U{lo..hi}` tokens of a text drawn uniformly from `prompts`
    (the seed recipe's 2-8 token queries cut from IMDb reviews; a shorter text gives its whole length).
    With `max_new_tokens=(lo, hi)`, the episode's token budget is drawn next, uniformly in `lo..hi`.
    `reset(options={"prompt_index": i})` starts from prompt (or text) `i` instead of a random one, e.g. to
    evaluate every held-out prompt once; the query length and budget are still drawn.

    ## Episode End

    1. Termination: the agent emits EOS after at least `min_new_tokens` new tokens. An EOS earlier
       than that is kept as an ordinary (invisible) token, as `generate(min_new_tokens=...)` never
       ends there; policies that want to forbid it mask it.
    2. Truncation: the completion reaches the episode's token budget (`max_new_tokens`) without EOS.

    ## Arguments

    | Parameter           | Type                   | Default | Description                                   |
    |---------------------|------------------------|---------|-----------------------------------------------|
    | `tokenizer`         | transformers tokenizer | -       | needs EOS and pad tokens                      |
    | `reward_model`      | callable               | -       | `list[str] -> sequence of float`              |
    | `prompts`           | list of str            | -       | whole prompts, or texts to cut queries from   |
    | `episode`           | `EpisodeSpec` or None  | None    | the episode's shape (the next four fields)    |
    | `max_prompt_tokens` | int                    | 8       | prompt part of the observation window         |
    | `max_new_tokens`    | int or (lo, hi)        | 16      | completion budget (per episode if a range)    |
    | `min_new_tokens`    | int                    | 0       | EOS ends the episode only after this many     |
    | `query_tokens`      | (lo, hi) or None       | None    | cut queries of lo..hi tokens from `prompts`   |
    | `render_mode`       | "ansi" or None         | None    | `render()` returns "prompt|completion"        |
    | `action_mask`       | callable or None       | None    | `(prefix_ids, turn_ids) -> allowed` (masks)   |
    | `token_rewards`     | callable or None       | None    | `(texts, action_ids) -> per-token rewards`    |
    | `turns`             | `Turns` or None        | None    | multi-turn settings (the next three fields)   |
    | `interaction`       | callable or None       | None    | `conversation -> (next_text, done)` per turn  |
    | `stop_strings`      | list of str            | ()      | also end a turn (with `interaction`)          |
    | `max_context_tokens`| int or None            | None    | window; default prompt + new tokens           |

    The fields of `episode` (`textenv.EpisodeSpec`) and of `turns` (`textenv.interaction.Turns`) may also be
    passed by name, as in the example below: `TextEnv(..., max_new_tokens=3)` is
    `TextEnv(..., episode=EpisodeSpec(max_new_tokens=3))`.

    Multi-turn and tool episodes (see `textenv.interaction`): a turn's end (EOS or a stop string) calls
    `interaction`, whose text joins the observation in the same step ("turn_ended", "inserted" in info).

    Info: "prompt", "text" (decoded prompt + completion so far), "length" (real tokens), "prompt_length";
    on the last step also "score" and "completion". With `action_mask` (see `textenv.masks`): "action_mask",
    a bool array (vocab_size,) of the tokens allowed next (all True once the episode has ended), also returned
    by `action_masks()` (sb3-contrib's `MaskablePPO` calls it); a masked action sent to `step` raises.

    ```python
    >>> import gymnasium as gym, textenv
    >>> tok = textenv.char_tokenizer("ab")
    >>> env = gym.make("TextEnv-v0", tokenizer=tok, reward_model=textenv.EndsWithReward("b"),
    ...                prompts=["a", "ab"], max_prompt_tokens=2, max_new_tokens=3)
    >>> obs, info = env.reset(seed=0)
    >>> envs = gym.make_vec("TextEnv-v0", num_envs=8, tokenizer=tok, reward_model=textenv.EndsWithReward("b"),
    ...                     prompts=["a", "ab"], max_prompt_tokens=2, max_new_tokens=3)  # TextVectorEnv

    ```

    ## Version History

    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        tokenizer: Any,
        reward_model: Callable[[list[str]], Sequence[float]],
        prompts: Sequence[str],
        episode: EpisodeSpec | None = None,
        render_mode: str | None = None,
        action_mask: ActionMask | None = None,
        token_rewards: Callable[[list[str], list[list[int]]], Sequence] | None = None,
        turns: multiturn.Turns | None = None,
        **fields: Any,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id, self.pad_token_id, self.vocab_size = check_tokenizer(tokenizer)
        if not callable(reward_model):
            raise TypeError(
                f"reward_model {type(reward_model).__name__} is not callable; pass a function or object "
                "mapping list[str] -> list[float], e.g. textenv.HFRewardModel.from_pretrained(path)."
            )
        self.reward_model = reward_model
        self.episode, turns = episode_and_turns(episode, turns, fields)
        self.new_tokens, self.query_tokens = self.episode.check()  # the budget's and the query length's ranges
        self.max_prompt_tokens, self.max_new_tokens = int(self.episode.max_prompt_tokens), self.new_tokens[1]
        self.min_new_tokens = int(self.episode.min_new_tokens)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r} is not supported; use 'ansi' or None.")
        self.render_mode = render_mode
        self.action_mask = multiturn.check_callable(
            "action_mask", action_mask, "(prefix_ids, turn_ids) -> allowed ids or bool mask, e.g. textenv.masks.BannedTokens")
        self.token_rewards = multiturn.check_callable(
            "token_rewards", token_rewards, "(texts, action_ids) -> one reward per token, e.g. textenv.rewards.TokenReward")
        self.interaction, self.stop_strings = multiturn.check_interaction(turns.interaction, turns.stop_strings)
        # whole prompts as token ids, or (with query_tokens) the texts queries are cut from; their decoded texts
        self._prompt_sources, self._prompt_texts = self._encode_prompts(prompts)

        self.window = multiturn.context_window(turns.max_context_tokens, self.max_prompt_tokens, self.max_new_tokens)
        self.observation_space = spaces.Box(0, self.vocab_size - 1, (self.window,), np.int64)
        self.action_space = spaces.Discrete(self.vocab_size)
        self._obs = np.full(self.window, self.pad_token_id, dtype=np.int64)
        self._done: bool | None = None  # None: never reset
        self._mask: np.ndarray | None = None  # the tokens allowed next (with `action_mask`)

    # -- pieces shared with the batched TextVectorEnv ------------------------------------------------

    def _encode_prompts(self, prompts: Sequence[str]) -> tuple[list, list[str] | None]:
        """Whole prompts: tokenized and checked once, here. Texts to cut queries from: kept as text and
        tokenized on first draw (`query_ids`), so 25k reviews cost nothing up front."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(
                "prompts must be a list of strings (whole prompts, or texts with query_tokens=(lo, hi))."
            )
        if len(prompts) == 0:
            raise ValueError(
                "prompts is empty; pass at least one prompt string (or text to cut queries from)."
            )
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is an empty string; remove empty prompts.")
        if self.query_tokens:
            self._query_cache: dict[int, list[int]] = {}
            return list(prompts), None
        ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        for i, row in enumerate(ids):
            if len(row) == 0:
                raise ValueError(f"prompt {i} ({prompts[i][:40]!r}) has no tokens; remove empty prompts.")
            if len(row) > self.max_prompt_tokens:
                raise ValueError(
                    f"prompt {i} ({prompts[i][:40]!r}) is {len(row)} tokens, longer than max_prompt_tokens="
                    f"{self.max_prompt_tokens}; raise max_prompt_tokens or shorten the prompt "
                    "(or cut queries with query_tokens=(lo, hi))."
                )
        return [list(row) for row in ids], decode_rows(self.tokenizer, ids)

    def query_ids(self, i: int) -> list[int]:
        """The first `query_tokens[1]` token ids of text `i` (`cut_query`, cached); an episode keeps n of them."""
        ids = self._query_cache.get(i)
        if ids is None:
            try:
                ids = cut_query(self.tokenizer, self._prompt_sources[i], self.query_tokens[1])
            except ValueError as e:
                raise ValueError(f"text {i}: {e}") from None
            self._query_cache[i] = ids
        return ids

    def draw_episode(self, rng: np.random.Generator, index: int | None = None) -> tuple[list[int], str, int]:
        """(prompt ids, prompt text, token budget) of a new episode, drawn from `rng` in a fixed order; `index`
        picks the prompt (or query text) instead of drawing it (the query length and budget are still drawn)."""
        i = int(rng.integers(len(self._prompt_sources))) if index is None else self.check_prompt_index(index)
        if self.query_tokens:
            n = int(rng.integers(self.query_tokens[0], self.query_tokens[1] + 1))
            ids = self.query_ids(i)[:n]
            text = decode_rows(self.tokenizer, [ids])[0]
        else:
            ids, text = self._prompt_sources[i], self._prompt_texts[i]
        lo, hi = self.new_tokens
        budget = hi if lo == hi else int(rng.integers(lo, hi + 1))
        return ids, text, budget

    def check_prompt_index(self, index: Any) -> int:
        """`options["prompt_index"]` as an int in [0, len(prompts)), or an error that says how to fix it."""
        try:
            index = index.reshape(())[()] if isinstance(index, np.ndarray) else index
            if isinstance(index, (bool, np.bool_)):
                raise TypeError
            i = operator.index(index)
        except (TypeError, ValueError):
            raise TypeError(
                f"prompt_index {index!r} is not an integer; pass the index of a prompt in `prompts`."
            ) from None
        if not 0 <= i < len(self._prompt_sources):
            raise ValueError(
                f"prompt_index {i} is out of range for {len(self._prompt_sources)} prompts; "
                f"pass an index in [0, {len(self._prompt_sources)})."
            )
        return i

    def score(self, texts: list[str], prompts: Sequence[str] = ()) -> np.ndarray:
        """The reward model's scores (float64, one per text), validated. Whatever the reward model raises, or the
        validation, carries a note naming the batch: how many texts and the first `prompts`."""
        try:
            return check_scores(self.reward_model(texts), len(texts), self.reward_model)
        except Exception as exc:
            shown = ", ".join(repr(p[:60]) for p in list(prompts)[:3])
            more = f" and {len(prompts) - 3} more" if len(prompts) > 3 else ""
            exc.add_note(f"while scoring a batch of {len(texts)} finished episodes"
                         + (f" (prompts {shown}{more})" if shown else ""))
            raise

    def check_action(self, action: Any) -> int:
        """The action as an int in [0, vocab_size), or a TypeError/ValueError that says how to fix it."""
        if isinstance(action, np.ndarray) and action.size == 1:
            action = action.reshape(())[()]
        if isinstance(action, (bool, np.bool_)) or isinstance(action, (float, np.floating)):
            raise TypeError(
                f"action {action!r} is a {type(action).__name__}; pass an integer token id (int(a))."
            )
        try:
            a = operator.index(action)
        except TypeError:
            raise TypeError(
                f"action {action!r} of type {type(action).__name__} is not an integer token id; "
                "pass an int or a numpy integer (for a torch tensor, .item())."
            ) from None
        if not 0 <= a < self.vocab_size:
            raise ValueError(
                f"action {a} is out of range for a vocabulary of {self.vocab_size} tokens; "
                f"pass a token id in [0, {self.vocab_size}) (restrict the policy's logits to action_space.n)."
            )
        return a

    def compute_mask(self, prefix_ids: Sequence[int], turn_ids: Sequence[int]) -> np.ndarray:
        """The `action_mask` callable's answer as a checked bool array (vocab_size,)."""
        allowed = self.action_mask([int(i) for i in prefix_ids], [int(i) for i in turn_ids])
        return check_mask(allowed, self.vocab_size, self.action_mask)

    def action_masks(self) -> np.ndarray:
        """The tokens allowed next, bool (vocab_size,): all True without `action_mask` (sb3-contrib's MaskablePPO)."""
        return np.ones(self.vocab_size, dtype=np.bool_) if self._mask is None else self._mask.copy()

    # -- the Gymnasium API --------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Start an episode; `options={"prompt_index": i}` starts it from prompt `i` instead of a random one."""
        super().reset(seed=seed)
        index = (options or {}).get("prompt_index")
        ids, self._prompt, self._budget = self.draw_episode(self.np_random, index)
        self._prompt_length, self._new, self._paid = len(ids), [], []  # _new: every token after the prompt
        self._actions, self._turn = [], []  # the policy's tokens: all of them, and those of the current turn
        self._obs[:] = self.pad_token_id
        self._obs[self.window - len(ids) :] = ids
        self._done = False
        info = {"prompt": self._prompt, "text": self._prompt, "length": len(ids), "prompt_length": len(ids)}
        if self.action_mask is not None:
            self._mask = info["action_mask"] = self.compute_mask(ids, [])
        return self._obs.copy(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._done is None:
            raise ResetNeeded("step() called before reset(); call env.reset() first.")
        if self._done:
            raise ResetNeeded("step() called after the episode ended; call env.reset() to start a new one.")
        a = self.check_action(action)
        check_allowed(a, self._mask)
        ends = a == self.eos_token_id and len(self._actions) >= self.min_new_tokens  # EOS ends the turn
        self._push([a])
        self._actions.append(a)
        self._turn.append(a)
        if self.stop_strings and not ends:
            ends = multiturn.ends_turn(decode_rows(self.tokenizer, [self._turn])[0], self.stop_strings)
        info = self._info()
        reward = 0.0
        if self.token_rewards is not None:
            reward = info["token_reward"] = float(pay_token_rewards(self.token_rewards, [info["text"]],
                                                                    [self._actions], [self._paid])[0])
        terminated, full = ends and self.interaction is None, False
        if ends and self.interaction is not None:  # the tool / user answers within this step
            reply, terminated = multiturn.check_reply(self.interaction(info["text"]), self.interaction)
            ids = self.tokenizer.encode(reply, add_special_tokens=False) if reply else []
            room = self.window - self._prompt_length - len(self._new)
            self._push(ids[:room])
            full, self._turn = len(ids) > room, []
            info.update(self._info(), turn_ended=True, inserted=reply)
        length = self._prompt_length + len(self._new)
        truncated = not terminated and (full or len(self._actions) >= self._budget or length >= self.window)
        if terminated or truncated:
            self._done = True
            info["score"] = float(self.score([info["text"]], [self._prompt])[0])
            reward += info["score"]
            if self.token_rewards is not None:
                info["token_rewards"] = list(self._paid)  # a list: episodes differ in length
            info["completion"] = decode_rows(self.tokenizer, [self._new])[0]
        if self.action_mask is not None:  # nothing follows an episode's end: every token allowed
            real = self._obs[self.window - length :]
            prefix = real[: length - len(self._turn)]
            self._mask = np.ones(self.vocab_size, np.bool_) if self._done else self.compute_mask(prefix, self._turn)
            info["action_mask"] = self._mask.copy()
        return self._obs.copy(), reward, bool(terminated), bool(truncated), info

    def _push(self, ids: list[int]) -> None:
        """Append tokens to the observation (shifted left, newest last) and to the episode's tokens."""
        if ids:
            self._obs[: -len(ids)] = self._obs[len(ids) :]
            self._obs[-len(ids) :] = ids
            self._new.extend(int(i) for i in ids)

    def _info(self) -> dict:
        length = self._prompt_length + len(self._new)
        text = decode_rows(self.tokenizer, [self._obs[self.window - length :].tolist()])[0]
        return {"prompt": self._prompt, "text": text, "length": length, "prompt_length": self._prompt_length}

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._done is None:
            return None
        return f"{self._prompt}|{decode_rows(self.tokenizer, [self._new])[0]}"
