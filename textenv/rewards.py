"""Reward models: anything that maps a batch of texts to one float score per text.

The environment calls `reward_model(texts)` once per finished batch of episodes with the decoded
prompt + completion of each. `HFRewardModel` wraps a frozen Hugging Face sequence classifier (as the
seed recipe's DistilBERT sentiment model); the rule rewards are for tests and tutorials.

Dense (per-token) rewards: `TextEnv(token_rewards=f)` with `f(texts, action_ids) -> one array per text`, one
reward per policy token so far (`action_ids[i]`, aligned to them), called on every step; the env pays each
array's last entry on the step that emitted that token (`check_token_rewards` validates; `TokenReward` is the
rule example). Why a call per step, not one call on the finished text: Gymnasium pays a reward when its step
returns, so a reward that depends on later tokens cannot be paid on its own step. A token's reward may depend
only on the text up to it, and the env checks that each answer's earlier entries equal what it already paid.
Cost: one call per (vector) step, on a text that grows by one token each time.
"""

from __future__ import annotations

import inspect
import re
import threading
from collections import deque
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn


@runtime_checkable
class RewardModel(Protocol):
    """A callable scoring texts: `list[str] -> sequence of float`, one score per text, in order."""

    def __call__(self, texts: list[str]) -> Sequence[float]: ...


def check_scores(scores: object, n: int, reward_model: object, what: str = "reward model") -> np.ndarray:
    """Scores as a float64 array of shape (n,), or a ValueError that names the scorer (`what`, e.g. "judge", and
    its name) and the fix."""
    name = f"{what} " + getattr(reward_model, "__name__", type(reward_model).__name__)
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{name} returned {type(scores).__name__}, which is not a sequence of numbers; "
            "it must return one float per text (a list, tuple or 1-D array)."
        ) from e
    if arr.shape != (n,):
        raise ValueError(
            f"{name} returned scores of shape {arr.shape} for {n} texts; "
            f"it must return exactly one float per text, shape ({n},)."
        )
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(
            f"{name} returned a non-finite score ({arr[bad]}) for text {bad}; "
            f"fix the {what} so every score is a finite float (check for NaN weights or division by zero)."
        )
    return arr


def check_token_rewards(rewards: object, lengths: Sequence[int], fn: object) -> list[np.ndarray]:
    """Per-token rewards as float64 arrays of shapes (lengths[i],), or a ValueError that names `fn` and the fix."""
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        rows = [np.asarray(r, dtype=np.float64) for r in rewards]  # type: ignore[union-attr]
    except (TypeError, ValueError) as e:
        raise ValueError(f"token_rewards {name} returned {type(rewards).__name__}; it must return one sequence of "
                         "floats per text (one float per policy token).") from e
    if len(rows) != len(lengths):
        raise ValueError(f"token_rewards {name} returned {len(rows)} reward arrays for {len(lengths)} texts; "
                         "return one array per text.")
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        if row.shape != (n,):
            raise ValueError(f"token_rewards {name} returned {row.size} rewards (shape {row.shape}) for text {i}, "
                             f"which has {n} policy tokens; return exactly one reward per policy token so far, "
                             "aligned to them.")
        if not np.all(np.isfinite(row)):
            raise ValueError(f"token_rewards {name} returned a non-finite reward for text {i}; return finite floats.")
    return rows


def pay_newest(row: np.ndarray, paid: list[float], fn: object) -> float:
    """The newest token's reward of `row`, after checking that its earlier entries are those already paid."""
    changed = np.abs(row[:-1] - paid) > 1e-6 + 1e-5 * np.abs(row[:-1]) if paid else ()  # np.isclose, without its overhead
    if np.any(changed):
        k = int(np.flatnonzero(changed)[0])
        name = getattr(fn, "__name__", type(fn).__name__)
        raise ValueError(f"token_rewards {name} is not causal: the reward of token {k} changed from {paid[k]} to "
                         f"{row[k]} once later tokens were known, but it was already paid on its own step; a token's "
                         "reward may depend only on the text up to that token (put whole-text judgements in "
                         "reward_model, which is paid on the last step).")
    paid.append(float(row[-1]))
    return float(row[-1])


def pay_token_rewards(fn: object, texts: list[str], action_ids: list[list[int]], paid: list[list[float]]) -> np.ndarray:
    """Call `token_rewards` `fn` on a batch; the newest token's reward of each text (float64), checked for length and
    causality and appended to `paid` (each text's rewards paid so far)."""
    rows = check_token_rewards(fn(texts, action_ids), [len(a) for a in action_ids], fn)  # type: ignore[operator]
    return np.array([pay_newest(r, p, fn) for r, p in zip(rows, paid, strict=True)])


class TokenReward:
    """Dense rule reward: `rewards[token_id]` for every policy token (0 for others), e.g. {id_of("a"): 1.0}."""

    def __init__(self, rewards: dict[int, float]) -> None:
        self.rewards = {int(k): float(v) for k, v in rewards.items()}

    def __call__(self, texts: list[str], action_ids: list[list[int]]) -> list[list[float]]:
        return [[self.rewards.get(int(t), 0.0) for t in ids] for ids in action_ids]


class HFRewardModel:
    """A frozen Hugging Face sequence classifier used as a reward model.

    Texts are re-tokenized with the classifier's own tokenizer (it may differ from the policy's), run in
    batches of `batch_size` on `device` in eval mode with no grad, and scored by `output`:
    `"logit"` (default, as the seed recipe: the positive-class logit) or `"prob"` (softmax probability;
    sigmoid for single-output heads) of class `label` (an index, or a name from `config.label2id`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        output: str = "logit",
        label: int | str = 1,
        batch_size: int = 64,
        max_length: int = 512,
        device: str | torch.device | None = None,
    ) -> None:
        if output not in ("logit", "prob"):
            raise ValueError(f"HFRewardModel output={output!r} is not supported; use 'logit' or 'prob'.")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the reward model's tokenizer has no pad token, so texts cannot be batched; "
                "set tokenizer.pad_token = tokenizer.eos_token (and model.config.pad_token_id) first."
            )
        n_embed = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > n_embed:
            raise ValueError(
                f"the reward model's tokenizer has {len(tokenizer)} tokens but the classifier embeds only "
                f"{n_embed}; pass the tokenizer the classifier was trained with."
            )
        num_labels = int(model.config.num_labels)
        if isinstance(label, str):
            label2id = dict(getattr(model.config, "label2id", {}) or {})
            if label not in label2id:
                raise ValueError(
                    f"label {label!r} is not one of the classifier's labels {sorted(label2id)}; "
                    "pass one of those names or a class index."
                )
            label = int(label2id[label])
        if not 0 <= label < num_labels and not (num_labels == 1 and label == 1):
            raise ValueError(
                f"label {label} is out of range for a classifier with {num_labels} labels; "
                f"pass a class index in [0, {num_labels})."
            )
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval().requires_grad_(False)  # frozen: no dropout, no grad
        self.tokenizer = tokenizer
        self.output, self.batch_size, self.max_length = output, int(batch_size), int(max_length)
        self.label = 0 if num_labels == 1 else label
        self.num_labels = num_labels
        self._inputs = set(inspect.signature(model.forward).parameters)

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str,
        *,
        device: str | torch.device | None = None,
        output: str = "logit",
        label: int | str = 1,
        batch_size: int = 64,
        max_length: int = 512,
    ) -> HFRewardModel:
        """Load a classifier and its tokenizer (a local folder, or a hub name such as
        `lvwerra/distilbert-imdb` when online)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(path_or_name)
        tokenizer = AutoTokenizer.from_pretrained(path_or_name)
        return cls(model, tokenizer, output, label, batch_size, max_length, device or "cpu")

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            batch = {k: v.to(self.device) for k, v in batch.items() if k in self._inputs}
            logits = self.model(**batch).logits.float()  # (B, num_labels)
            if self.output == "logit":
                out = logits[:, self.label]
            elif self.num_labels == 1:
                out = torch.sigmoid(logits[:, 0])
            else:
                out = torch.softmax(logits, dim=-1)[:, self.label]
            scores.extend(out.tolist())
        return scores


class EndsWithReward:
    """`reward` if the text ends with `suffix`, else 0."""

    def __init__(self, suffix: str, reward: float = 1.0) -> None:
        self.suffix, self.reward = suffix, float(reward)

    def __call__(self, texts: list[str]) -> list[float]:
        return [self.reward if t.endswith(self.suffix) else 0.0 for t in texts]


class NormalizedReward:
    """`(reward_model(texts) - mean) / std`: a reward model rescaled, e.g. to mean 0 and std 1 under the initial
    policy (Ziegler et al. 2019 normalise so), which puts the KL coefficient on one scale across reward models."""

    def __init__(self, reward_model: RewardModel, mean: float, std: float) -> None:
        if not std > 0:
            raise ValueError(f"std={std} must be > 0: the reward model gave every sample the same score")
        self.reward_model, self.mean, self.std = reward_model, float(mean), float(std)

    def __call__(self, texts: list[str]) -> list[float]:
        return [(float(s) - self.mean) / self.std for s in self.reward_model(texts)]


WORD = re.compile(r"[a-z']+")


def repeated_word_share(text: str, min_letters: int = 4) -> float:
    """Share of the text's words of at least `min_letters` letters (lower-cased) that repeat an earlier one: "It is
    a great movie. It is a great movie" -> great, movie, great, movie -> 0.5. Real IMDb review openings of 14 words
    average 0.02; a policy that pads its praise by repeating it, 0.09 and more."""
    words = [w for w in WORD.findall(text.lower()) if len(w) >= min_letters]
    return (len(words) - len(set(words))) / len(words) if words else 0.0


class SharePenalty:
    """`reward_model(texts) - coef * share`, one share in [0, 1] per text from `shares(texts)`, which a subclass
    defines: the reward terms below share their checks and the naming of the scorer their errors carry."""

    def __init__(self, reward_model: RewardModel, coef: float) -> None:
        if not coef >= 0:
            raise ValueError(f"coef={coef} must be >= 0 (0: no penalty)")
        self.reward_model, self.coef = reward_model, float(coef)
        self.__name__ = getattr(reward_model, "__name__", type(reward_model).__name__)  # errors name the scorer

    def shares(self, texts: list[str]) -> list[float]:
        raise NotImplementedError

    def __call__(self, texts: list[str]) -> list[float]:
        # scored and checked first: a scorer that raises, or gives a score too many or too few, leaves the term as
        # it was
        scores = [float(s) for s, _ in zip(self.reward_model(texts), texts, strict=True)]
        return [s - self.coef * share for s, share in zip(scores, self.shares(texts), strict=True)]


class RepetitionPenalty(SharePenalty):
    """`reward_model(texts) - coef * repeated_word_share(text)`: a reward term against padding praise by repeating
    it ("a great movie. It is a great movie"), which a classifier pays for and a reader calls not fluent. A reward
    term, scored on the whole text; not the sampling-time `repetition_penalty` of transformers' `generate`, which
    would change the distribution PPO's log-probs describe."""

    def __init__(self, reward_model: RewardModel, coef: float, min_letters: int = 4) -> None:
        super().__init__(reward_model, coef)
        self.min_letters = int(min_letters)

    def shares(self, texts: list[str]) -> list[float]:
        return [repeated_word_share(t, self.min_letters) for t in texts]


def word_pairs(text: str) -> list[tuple[str, str]]:
    """The text's consecutive lower-cased word pairs: "It is a great movie" -> (it, is), (is, a), (a, great), ..."""
    words = WORD.findall(text.lower())
    return list(zip(words, words[1:], strict=False))


class StalePhrasePenalty(SharePenalty):
    """`reward_model(texts) - coef * share of the text's word pairs that the last `window` texts scored already
    used`: a reward term against a policy collapsing onto a few stock phrases ("The acting is amazing. The story is
    perfect."), each of which the reward model pays for, and which lower the set's distinct-2. Each call compares
    its texts with the texts of earlier calls only (a batch's group-mates share their prompt), then adds them to the
    window; the first call, with an empty window, is unpenalised. `state_dict`/`load_state_dict` carry the window
    through a checkpoint, so a resumed run goes on with it. Against the other 255 of 256 held-out texts, 0.55-0.57
    of the pairs of SmolLM2's texts tuned without this term (2 seeds) are stale, 0.43-0.47 of its start's."""

    def __init__(self, reward_model: RewardModel, coef: float, window: int = 256) -> None:
        super().__init__(reward_model, coef)
        if int(window) != window or window < 1:
            raise ValueError(f"window={window!r} must be a positive number of texts")
        self.window = int(window)
        self._recent: deque[set] = deque()  # the pairs of each of the last `window` texts, oldest first
        self._counts: dict[tuple[str, str], int] = {}  # pair -> how many of those texts use it

    def shares(self, texts: list[str]) -> list[float]:
        """Each text's share of word pairs that a text in the window used (0.0 for a text of one word or none);
        then the texts join the window."""
        pairs = [word_pairs(t) for t in texts]
        out = [sum(p in self._counts for p in ps) / len(ps) if ps else 0.0 for ps in pairs]
        for ps in pairs:
            self._remember(set(ps))
        return out

    def _remember(self, pairs: set) -> None:
        """One text's pairs join the window; the oldest text leaves it when it is full."""
        self._recent.append(pairs)
        for p in pairs:
            self._counts[p] = self._counts.get(p, 0) + 1
        if len(self._recent) > self.window:
            for p in self._recent.popleft():
                self._counts[p] -= 1
                if not self._counts[p]:
                    del self._counts[p]

    def state_dict(self) -> dict:
        """The window: each remembered text's word pairs, oldest first (plain lists, for a checkpoint)."""
        return {"window": self.window, "recent": [sorted(map(list, ps)) for ps in self._recent]}

    def load_state_dict(self, state: dict) -> None:
        """Go on with a saved window (of the same size: another size would be another reward)."""
        if state["window"] != self.window:
            raise ValueError(f"the checkpoint's stale-phrase window holds {state['window']} texts, this run's "
                             f"{self.window}; resume with --stale-phrase-window {state['window']}")
        self._recent, self._counts = deque(), {}
        for ps in state["recent"]:
            self._remember({tuple(p) for p in ps})


class TimeLimit:
    """`scorer(texts)` that raises a TimeoutError when the call takes longer than `timeout_s` seconds, e.g. a
    reward model on a remote server that hangs, or a GPU model that fell back to CPU.

    The call runs in a daemon thread; on a timeout that thread is left to finish on its own (Python cannot stop
    a thread) and never keeps the process from exiting. `what` names the scorer in the error ("reward model",
    "judge"). Errors of the call itself are raised as they are."""

    def __init__(self, scorer: RewardModel, timeout_s: float, what: str = "reward model") -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 seconds")
        self.scorer, self.timeout_s, self.what = scorer, float(timeout_s), what
        self.__name__ = getattr(scorer, "__name__", type(scorer).__name__)  # error messages name the scorer

    def __call__(self, texts: list[str]) -> Sequence[float]:
        box: dict = {}

        def work() -> None:
            try:
                box["scores"] = self.scorer(texts)
            except BaseException as e:  # raised in the caller's thread below
                box["error"] = e

        thread = threading.Thread(target=work, name=f"{self.what} {self.__name__}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"{self.what} {self.__name__} took longer than {self.timeout_s:g} s to score "
                               f"{len(texts)} texts; make it faster (a GPU, smaller batches) or allow more time "
                               "(the RLHF job's --reward-timeout)")
        if "error" in box:
            raise box["error"]
        return box["scores"]


class KeywordReward:
    """`weight` per occurrence of each keyword (case-insensitive), e.g. a toy "positive words" reward."""

    def __init__(self, keywords: Sequence[str], weight: float = 1.0) -> None:
        if isinstance(keywords, str):
            keywords = [keywords]
        self.keywords, self.weight = [k.lower() for k in keywords], float(weight)

    def __call__(self, texts: list[str]) -> list[float]:
        return [self.weight * sum(t.lower().count(k) for k in self.keywords) for t in texts]


class LengthReward:
    """`scale` times the number of characters of the text."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    def __call__(self, texts: list[str]) -> list[float]:
        return [self.scale * len(t) for t in texts]
