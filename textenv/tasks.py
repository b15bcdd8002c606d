"""Two worked multi-turn examples (see `textenv.interaction`): a calculator tool and a rule-scripted guessing game.

Each `*_task()` returns the `TextEnv` keyword arguments of a small char-level task, so
`TextEnv(**calculator_task())` or `gym.make_vec("TextEnv-v0", num_envs=8, vectorization_mode="sync",
**guessing_task())` builds it. `benchmarks/tools.py` trains `agents.ppo` + a tiny `GPTAgent` on both.

Calculator: the prompt is a question "3+4?". The policy's first turn is either a direct answer ("7": the episode
ends) or a tool call `calc:3+4` (the action mask allows only these two shapes; the policy decides whether to call
and picks the operands); the tool inserts "=7;", then the policy answers "7" and the episode ends. Reward: 1 for the
right final answer, plus a small dense reward for each call operand copied from the question (`ArgumentReward`,
paid when written). An untrained policy calls in ~1 episode of 11 (the first token is "c" or one of 10 digits);
learning to call, then to copy the operands and the tool's result, is what PPO has to find.

Guessing game: the prompt "#abc:" hides a secret digit 0-7 (a hash of the prompt); each turn the policy guesses a
digit, the game answers "<" (the secret is lower), ">" (higher) or "=" (found: the episode ends); after
`max_guesses` wrong guesses it answers "!" and the episode ends. Reward: 1 when found. Random guessing finds it about a
third of the time in 3 guesses; a binary search finds 7 of 8.
"""

from __future__ import annotations

import ast
import itertools
import operator
import re
import zlib
from typing import Any

from textenv.char_tokenizer import char_tokenizer
from textenv.masks import RegexMask

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expr: str) -> int:
    """The value of an integer expression of digits and + - * (no names, no calls), or ValueError."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise ValueError(f"not an arithmetic expression: {expr!r}")

    try:
        return walk(ast.parse(expr, mode="eval").body)
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from None


class Calculator:
    """Tool: a turn that ends with `calc:EXPR` gets "=VALUE;" back; any other turn (or a call beyond `max_calls`) is
    the final answer and ends the episode."""

    CALL = re.compile(r"calc:([0-9+*-]+)$")

    def __init__(self, max_calls: int = 1) -> None:
        self.max_calls = int(max_calls)

    def __call__(self, conversation: str) -> tuple[str, bool]:
        call = self.CALL.search(conversation)
        if call is None or conversation.count("calc:") > self.max_calls:
            return "", True
        try:
            return f"={calculate(call.group(1))};", False
        except ValueError:
            return "=error;", False


def final_answer(text: str) -> tuple[str, str]:
    """(question, final answer) of a calculator conversation: the answer follows the last tool result."""
    question, _, rest = text.partition("?")
    return question, rest.rsplit(";", 1)[-1]


class CalculatorReward:
    """1.0 if the final answer is the question's value, else 0.0."""

    def __call__(self, texts: list[str]) -> list[float]:
        out = []
        for text in texts:
            question, answer = final_answer(text)
            out.append(float(answer == str(calculate(question))))
        return out


class ArgumentReward:
    """Dense: `bonus` for each token of the first turn that extends a correct copy of the question into
    `calc:QUESTION` (paid on the step that writes it; it depends only on the text so far)."""

    def __init__(self, tokenizer: Any, bonus: float = 0.2) -> None:
        self.pieces = [tokenizer.decode([i]) for i in range(len(tokenizer))]  # one decode per id, once
        self.eos, self.bonus = tokenizer.eos_token_id, float(bonus)

    def __call__(self, texts: list[str], action_ids: list[list[int]]) -> list[list[float]]:
        out = []
        for text, ids in zip(texts, action_ids, strict=True):
            target = "calc:" + text.partition("?")[0]
            first = list(itertools.takewhile(lambda t: t != self.eos, ids))
            row = [0.0] * len(ids)
            so_far = ""
            for j, t in enumerate(first):
                so_far += self.pieces[t]
                if len(so_far) > 5 and target.startswith(so_far) and so_far[-1].isdigit():
                    row[j] = self.bonus
            out.append(row)
        return out


class TurnRegexMask:
    """`RegexMask(call)` for the first turn, `RegexMask(answer)` once a tool result (";") is in the conversation."""

    def __init__(self, tokenizer: Any, call: str, answer: str) -> None:
        self.call, self.answer = RegexMask(call, tokenizer), RegexMask(answer, tokenizer)
        self.semi = tokenizer.convert_tokens_to_ids(";")

    def __call__(self, prefix_ids: list[int], turn_ids: list[int]) -> Any:
        return (self.answer if self.semi in prefix_ids else self.call)(prefix_ids, turn_ids)


def calculator_task(digits: int = 5) -> dict:
    """TextEnv kwargs: questions "x+y?" with x, y < `digits`, the calculator tool, mask and rewards (the first turn:
    a call or a direct answer)."""
    tok = char_tokenizer("0123456789+?calc:=;error")
    top = digits - 1
    return dict(
        tokenizer=tok, reward_model=CalculatorReward(), prompts=[f"{x}+{y}?" for x in range(digits) for y in range(digits)],
        max_prompt_tokens=4, max_new_tokens=12, max_context_tokens=24, interaction=Calculator(max_calls=1),
        action_mask=TurnRegexMask(tok, rf"calc:[0-{top}]\+[0-{top}]|[0-9]{{1,2}}", r"[0-9]{1,2}"),
        token_rewards=ArgumentReward(tok),
    )  # fmt: skip


class GuessingGame:
    """Rule-scripted opponent: the secret is `crc32(prompt) % n`; answers "<", ">", "=" (found, the end) or "!"
    (out of guesses, the end) to the last digit guessed."""

    def __init__(self, n: int = 8, max_guesses: int = 3) -> None:
        self.n, self.max_guesses = int(n), int(max_guesses)

    def secret(self, prompt: str) -> int:
        return zlib.crc32(prompt.encode()) % self.n

    def __call__(self, conversation: str) -> tuple[str, bool]:
        prompt, _, moves = conversation.partition(":")
        guesses = [int(c) for c in moves if c.isdigit()]
        if not guesses:
            return "!", True
        secret = self.secret(prompt + ":")
        if guesses[-1] == secret:
            return "=", True
        if len(guesses) >= self.max_guesses:
            return "!", True
        return ("<" if secret < guesses[-1] else ">"), False


class FoundReward:
    """1.0 when the game said "=" (found), else 0.0."""

    def __call__(self, texts: list[str]) -> list[float]:
        return [float(t.endswith("=")) for t in texts]


def guessing_task(n: int = 8, max_guesses: int = 3) -> dict:
    """TextEnv kwargs: 512 prompts "#abc:", a secret digit below `n` each, `max_guesses` one-digit guesses."""
    tok = char_tokenizer("0123456789abcdefgh#:<>=!")
    prompts = ["#" + "".join(p) + ":" for p in itertools.product("abcdefgh", repeat=3)]
    return dict(
        tokenizer=tok, reward_model=FoundReward(), prompts=prompts, max_prompt_tokens=5, max_new_tokens=2 * max_guesses,
        max_context_tokens=5 + 3 * max_guesses, interaction=GuessingGame(n, max_guesses),
        action_mask=RegexMask(rf"[0-{n - 1}]", tok),
    )  # fmt: skip
