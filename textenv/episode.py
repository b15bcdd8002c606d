"""`EpisodeSpec`: the shape of a TextEnv episode, one definition for the env, the RLHF job and its report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def token_range(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    """An int `n` or a pair `(lo, hi)` as an inclusive range of positive ints, or a ValueError naming `name`."""
    lo, hi = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if not (int(lo) == lo and int(hi) == hi and 1 <= lo <= hi):
        raise ValueError(f"{name}={value!r} is not a positive int or a pair (lo, hi) with 1 <= lo <= hi.")
    return int(lo), int(hi)


@dataclass(frozen=True)
class EpisodeSpec:
    """The prompt part of the observation window and the response's token budget: `TextEnv(episode=...)` (or its
    fields by name); `check()` validates them."""

    max_prompt_tokens: int = 8
    """prompt part of the observation window"""
    max_new_tokens: int | tuple[int, int] = 16
    """tokens per response at most, or a range (lo, hi) drawn per episode"""
    min_new_tokens: int = 0
    """EOS ends an episode only after this many tokens"""
    query_tokens: tuple[int, int] | None = None
    """cut queries of lo..hi tokens from the prompts, which are then texts (None: whole prompts)"""

    def check(self) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """(the response budget's range, the query length's range or None), or a ValueError naming the fix."""
        if not isinstance(self.max_prompt_tokens, (int, np.integer)):
            raise TypeError(
                f"max_prompt_tokens={self.max_prompt_tokens!r} must be an int (the prompt part of the window)."
            )
        token_range("max_prompt_tokens", self.max_prompt_tokens)
        new_tokens = token_range("max_new_tokens", self.max_new_tokens)
        if not 0 <= int(self.min_new_tokens) <= new_tokens[1]:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens={new_tokens[1]}]."
            )
        query = None if self.query_tokens is None else token_range("query_tokens", self.query_tokens)
        if query and query[1] > self.max_prompt_tokens:
            raise ValueError(
                f"query_tokens={self.query_tokens} can cut queries longer than max_prompt_tokens="
                f"{self.max_prompt_tokens}; raise max_prompt_tokens to at least {query[1]}."
            )
        return new_tokens, query

    @property
    def window(self) -> int:
        """Prompt + response tokens at most: the observation window of a single-turn episode."""
        return int(self.max_prompt_tokens) + token_range("max_new_tokens", self.max_new_tokens)[1]
