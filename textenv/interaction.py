"""Multi-turn and tool episodes at token level: the `interaction` callable of `TextEnv`.

`TextEnv(interaction=f, stop_strings=(...), max_context_tokens=N)`: when the policy ends a turn (EOS, or its turn's
text ends with a stop string), the env calls `f(conversation) -> (next_text, done)` with the decoded conversation
so far (prompt, every turn and every inserted text, special tokens skipped) and appends `next_text`'s tokens to the
observation within the same `step`; `done=True` ends the episode (`terminated`; `next_text` is still appended, so
a verdict reaches the reward model). Every env step stays exactly one policy action: inserted tokens are in the
observation but never actions, so PPO trains only on the policy's tokens and the KL term (one reference log-prob
per action) covers only them. A KV cache (`textenv.lm.CachedLM`, `GPTAgent`) sees that the observation is
not the previous one plus one token and re-encodes that row, which is correct and costs one prefill per turn.

The observation window is `max_context_tokens` (default `max_prompt_tokens + max_new_tokens`, too small for most
conversations: set it): prompt, turns and inserted text must all fit. No token ever falls off the window's left
edge; an episode that fills it is truncated (an inserted text that does not fit is cut). `max_new_tokens` is the
budget of policy tokens per episode, over all its turns.

Worked examples (a calculator tool, a guessing game): `textenv.tasks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Interaction = Callable[[str], tuple[str, bool]]


@dataclass(frozen=True)
class Turns:
    """How a TextEnv conversation goes on (`TextEnv`'s arguments of the same names; all default: single-turn
    episodes in a window of prompt + response)."""

    interaction: Interaction | None = None
    """`conversation -> (next_text, done)`, called when the policy ends a turn (None: the turn ends the episode)"""
    stop_strings: Sequence[str] = ()
    """a turn whose text ends with one of these ends too (with `interaction`)"""
    max_context_tokens: int | None = None
    """the observation window, which holds the whole conversation (None: max_prompt_tokens + max_new_tokens)"""


def check_reply(reply: Any, fn: object) -> tuple[str, bool]:
    """An interaction's answer as `(next_text, done)`, or a TypeError naming the interaction and the fix."""
    name = getattr(fn, "__name__", type(fn).__name__)
    if not (isinstance(reply, tuple) and len(reply) == 2):
        raise TypeError(f"interaction {name} returned {reply!r}; it must return a pair (next_text: str, done: bool).")
    text, done = reply
    if not isinstance(text, str):
        raise TypeError(f"interaction {name} returned next_text of type {type(text).__name__} ({text!r}); return a "
                        "str (the tool's output or the user's reply; '' to insert nothing).")
    if not isinstance(done, (bool, np.bool_)):
        raise TypeError(f"interaction {name} returned done of type {type(done).__name__}; return a bool "
                        "(True ends the episode).")
    return text, bool(done)


def ends_turn(turn_text: str, stop_strings: Sequence[str]) -> bool:
    """The policy's turn ends here: its text ends with one of `stop_strings`."""
    return any(turn_text.endswith(s) for s in stop_strings)


def check_callable(name: str, value: Any, expected: str) -> Any:
    """`value` if it is None or callable, else a TypeError naming the argument and what to pass."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} {type(value).__name__} is not callable; pass a function {expected}.")
    return value


def context_window(max_context_tokens: int | None, max_prompt_tokens: int, max_new_tokens: int) -> int:
    """The observation width: `max_context_tokens`, or prompt + new tokens when it is None."""
    if max_context_tokens is None:
        return max_prompt_tokens + max_new_tokens
    if int(max_context_tokens) != max_context_tokens or max_context_tokens <= max_prompt_tokens:
        raise ValueError(f"max_context_tokens={max_context_tokens!r} must be an int larger than "
                         f"max_prompt_tokens={max_prompt_tokens} (it holds the prompt and every turn).")
    return int(max_context_tokens)


def check_interaction(interaction: Any, stop_strings: Any) -> tuple[Interaction | None, tuple[str, ...]]:
    """Validated `(interaction, stop_strings)` of a TextEnv."""
    check_callable("interaction", interaction, "conversation_text -> (next_text, done), e.g. textenv.tasks.Calculator()")
    if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
        raise TypeError(f"stop_strings={stop_strings!r} must be a list of non-empty strings.")
    if stop_strings and interaction is None:
        raise ValueError("stop_strings end a turn, which only an interaction can follow; pass interaction= too.")
    return interaction, tuple(stop_strings)
