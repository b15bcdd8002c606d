"""TurnEnv: the turn-level view of a TextEnv episode (one `step` = one whole turn of the policy).

Turn-level trainers and environment hubs (Tinker's `Env.step(list[int])`, GEM, OpenEnv) take a whole turn of
token ids as one action and return the next observation and the turn's reward. `TurnEnv` gives that view of the
very same episode that `TextEnv` plays one token at a time: it feeds the turn's tokens to the wrapped env, so
seeds, prompts, masks, dense rewards, tool calls and scores are exactly those of the token-level view (tested).
"""

from __future__ import annotations

import operator
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from textenv.env import TextEnv


class TurnEnv(gym.Wrapper):
    """`TurnEnv(env)` over a `TextEnv` (wrapped or not): `step(turn)` takes a whole turn and returns
    `(obs, turn_reward, terminated, truncated, info)`.

    A turn is a `str` (encoded with the env's tokenizer, no special tokens) or a sequence of token ids. It ends
    where the episode's turn ends: EOS, a stop string of the env's interaction, or the episode's end. A turn that
    does not end by itself gets EOS appended (one more token, as a sampler's stop condition would have produced);
    tokens after the turn's end are an error, except when the token budget cut the turn short (then
    `info["turn_actions"]` shows the tokens actually taken). The turn's reward is the sum of its steps' rewards
    (dense token rewards and, on the last turn, the score); `info` is that of the turn's last token step plus
    `turn_actions`. The action space is `Sequence(Discrete(vocab_size))`; observations are the TextEnv's.
    """

    def __init__(self, env: gym.Env) -> None:
        if not isinstance(env.unwrapped, TextEnv):
            raise TypeError(f"TurnEnv wraps a TextEnv (gymnasium.make('TextEnv-v0', ...) or TextEnv(...)), got "
                            f"{type(env.unwrapped).__name__}.")
        super().__init__(env)
        self.text_env: TextEnv = env.unwrapped
        self.action_space = spaces.Sequence(spaces.Discrete(self.text_env.vocab_size))

    def turn_ids(self, turn: Any) -> list[int]:
        """The turn as a non-empty list of token ids, or a clear error."""
        if isinstance(turn, str):
            ids = self.text_env.tokenizer.encode(turn, add_special_tokens=False)
        else:
            try:
                ids = [operator.index(t) for t in np.asarray(turn).reshape(-1).tolist()]
            except TypeError:
                raise TypeError(f"turn {turn!r} is neither a str nor a sequence of integer token ids.") from None
        if not ids:
            raise ValueError("the turn is empty; pass at least one token (EOS alone ends a turn with no text).")
        return list(ids)

    def step(self, turn: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        ids = self.turn_ids(turn)
        eos = self.text_env.eos_token_id
        total, taken = 0.0, []
        ended = lambda term, trunc, info: term or trunc or info.get("turn_ended", False)  # noqa: E731
        for k, a in enumerate(ids):
            obs, reward, terminated, truncated, info = self.env.step(a)
            total, taken = total + float(reward), [*taken, a]
            if ended(terminated, truncated, info):
                if k < len(ids) - 1 and not truncated:
                    raise ValueError(f"the turn ended at its token {k} ({'EOS' if a == eos else 'a stop string'}) "
                                     f"but {len(ids) - 1 - k} tokens follow; pass each turn up to and including "
                                     "its end, and the next turn in the next step().")
                break
        else:  # the given tokens did not end the turn: end it as a sampler's stop condition would, with EOS
            obs, reward, terminated, truncated, info = self.env.step(eos)
            total, taken = total + float(reward), [*taken, eos]
            if not ended(terminated, truncated, info):
                raise ValueError("EOS did not end the turn (fewer than min_new_tokens tokens so far); pass a longer turn.")
        return obs, total, bool(terminated), bool(truncated), {**info, "turn_actions": taken}
