"""Action masks: which token ids the policy may emit next.

An action mask is any callable `mask(prefix_ids, turn_ids) -> allowed`: `prefix_ids` are the real tokens
before the policy's current turn (the prompt; in multi-turn episodes also earlier turns and inserted text),
`turn_ids` the policy's tokens of the current turn so far. `allowed` is a sequence of allowed token ids or a
boolean array over the vocabulary. `TextEnv(action_mask=...)` turns it into `info["action_mask"]`, a bool
array of shape (vocab_size,), on every `reset` and `step`.

Built-ins: `BannedTokens`, `AllowedTokens`, `RegexMask` (short structured outputs), `NoRepeatNgram` (no
n-gram of tokens twice in a text, transformers' `no_repeat_ngram_size`), `NoRepeatWord` (no word of 4+ letters
twice in a turn) and `AllMasks` (what all of several masks allow). `RegexMask` uses the
`regex` package's partial matching (`regex.fullmatch(pattern, text, partial=True)` is true while `text` can
still grow into a match). `regex` is already installed with transformers, so this adds no dependency. The
constrained-decoding packages on PyPI were considered: `outlines-core` compiles a token-level index from a
regex (fast for large vocabularies) but is a compiled Rust wheel that needs its own vocabulary object;
`interegular` is pure Python but parses only a subset of regex syntax and leaves the token walk to the caller.
For short outputs one partial match per candidate token, cached per turn prefix, is cheap enough.

Memory: one mask is `vocab_size` bytes; a vector env reports (num_envs, vocab_size) per step and `agents.ppo`
keeps (num_steps, num_envs, vocab_size) for the update: 128 x 64 x 49,152 is 400 MB. `pack`/`unpack` store
masks as bits (8x smaller) where that matters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ActionMask = Callable[[list[int], list[int]], Any]


def check_mask(allowed: Any, vocab_size: int, who: object = "action_mask") -> np.ndarray:
    """`allowed` (token ids or a bool array over the vocabulary) as a bool array (vocab_size,), or a clear error."""
    name = getattr(who, "__name__", type(who).__name__) if not isinstance(who, str) else who
    arr = np.asarray(allowed)
    if arr.dtype == np.bool_:
        if arr.shape != (vocab_size,):
            raise ValueError(f"{name} returned a boolean mask of shape {arr.shape}; it must cover the whole "
                             f"vocabulary, shape ({vocab_size},) (or return a list of allowed token ids).")
        mask = arr.copy()
    else:
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{name} returned {type(allowed).__name__} of dtype {arr.dtype}; return a list of "
                            f"allowed token ids or a boolean array of shape ({vocab_size},).")
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"{name} allowed token id {int(arr[(arr < 0) | (arr >= vocab_size)][0])}, outside "
                             f"the vocabulary [0, {vocab_size}); return ids in range.")
        mask = np.zeros(vocab_size, dtype=np.bool_)
        mask[arr.astype(np.int64)] = True
    if not mask.any():
        raise ValueError(f"{name} allows no token at this step, so no action is possible; make it always allow "
                         "at least one token (e.g. EOS once the output is complete).")
    return mask


def check_allowed(a: int, mask: np.ndarray | None) -> None:
    """Raise if token `a` is masked out by `mask` (None: no mask)."""
    if mask is not None and not mask[a]:
        allowed = np.flatnonzero(mask)
        raise ValueError(f"action {a} is masked out at this step ({len(allowed)} of {len(mask)} tokens allowed, e.g. "
                         f"{allowed[:5].tolist()}); sample only from info['action_mask'] (or env.action_masks()).")


def pack(masks: np.ndarray) -> np.ndarray:
    """Bool masks (..., V) as uint8 bits (..., ceil(V / 8)): 8x less memory for large vocabularies."""
    return np.packbits(masks, axis=-1)


def unpack(bits: np.ndarray, vocab_size: int) -> np.ndarray:
    """The inverse of `pack`: bool (..., vocab_size)."""
    return np.unpackbits(bits, axis=-1, count=vocab_size).astype(np.bool_)


class BannedTokens:
    """Every token but `ids` (e.g. ban the pad and unk tokens, or EOS for a fixed-length output)."""

    def __init__(self, ids: Sequence[int], vocab_size: int) -> None:
        banned = np.zeros(vocab_size, dtype=np.bool_)
        if len(ids):
            banned = check_mask(np.asarray(list(ids), dtype=np.int64), vocab_size, "BannedTokens")
        self.mask = ~banned
        if not self.mask.any():
            raise ValueError("BannedTokens bans the whole vocabulary; leave at least one token allowed.")

    def __call__(self, prefix_ids: list[int], turn_ids: list[int]) -> np.ndarray:
        return self.mask


class AllowedTokens:
    """Only `ids` (a restricted vocabulary, e.g. digits and EOS)."""

    def __init__(self, ids: Sequence[int], vocab_size: int) -> None:
        self.mask = check_mask(np.asarray(list(ids), dtype=np.int64), vocab_size, "AllowedTokens")

    def __call__(self, prefix_ids: list[int], turn_ids: list[int]) -> np.ndarray:
        return self.mask


class RegexMask:
    """Each turn's text must match `pattern` in full: a token is allowed when the turn's text with it can still
    grow into a match; EOS (and every `stop` id) is allowed exactly when the text already matches.

    Tokens are decoded one at a time (`tokenizer.decode([id])`, special tokens as ""), which is exact for
    char-level and most BPE tokenizers but not for byte pieces of a multi-byte character. Cost: one partial
    match per vocabulary entry per new turn prefix (cached), so keep it to short outputs and small vocabularies.
    """

    def __init__(self, pattern: str, tokenizer: Any, stop: Sequence[int] = ()) -> None:
        import regex

        try:
            self.pattern = regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"RegexMask pattern {pattern!r} is not a valid regular expression: {e}") from None
        self.eos = int(tokenizer.eos_token_id)
        self.stop = sorted({self.eos, *map(int, stop)})
        special = set(getattr(tokenizer, "all_special_ids", [])) | set(self.stop)
        self.pieces = [None if i in special else tokenizer.decode([i]) for i in range(len(tokenizer))]
        self.vocab_size = len(self.pieces)
        self._decode = tokenizer.decode
        self._cache: dict[str, np.ndarray] = {}
        if not self.pattern.fullmatch("", partial=True):
            raise ValueError(f"RegexMask pattern {pattern!r} can never match; check the pattern.")

    def __call__(self, prefix_ids: list[int], turn_ids: list[int]) -> np.ndarray:
        text = self._decode(list(turn_ids), skip_special_tokens=True)
        mask = self._cache.get(text)
        if mask is None:
            mask = np.zeros(self.vocab_size, dtype=np.bool_)
            for i, piece in enumerate(self.pieces):
                if piece:  # empty pieces (special tokens) would allow themselves forever
                    mask[i] = self.pattern.fullmatch(text + piece, partial=True) is not None
            if self.pattern.fullmatch(text) is not None:  # complete: the turn may end here
                mask[self.stop] = True
            self._cache[text] = mask
        return mask


class NoRepeatNgram:
    """No n-gram of tokens twice in one text: bans each token that would complete an n-gram the text (prompt and
    turn so far) already holds, as transformers' `no_repeat_ngram_size` does in `generate`. Against degenerate
    repetition ("It's a great movie. It's a great movie."), part of the policy's distribution like its temperature:
    the policy samples, and `textenv.kl.RefLogprob` scores the reference, over the same allowed tokens."""

    def __init__(self, n: int, vocab_size: int) -> None:
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"NoRepeatNgram n={n!r}: give the n-gram length as a positive integer (3 bans a third "
                             "token after any two tokens that already occurred together)")
        self.n, self.vocab_size = n, int(vocab_size)

    def __call__(self, prefix_ids: list[int], turn_ids: list[int]) -> np.ndarray:
        tokens, n = [*prefix_ids, *turn_ids], self.n
        last = tokens[len(tokens) - n + 1:]  # the n - 1 tokens a new one would complete an n-gram with
        banned = [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == last]
        mask = np.ones(self.vocab_size, dtype=np.bool_)
        mask[banned] = False
        return mask


def word_starts(tokenizer: Any) -> list[str | None]:
    """Per token id, the word it starts, lowercased ("great" for " Great"), or None: a token starts a word when its
    piece carries the tokenizer's word-boundary marker (byte-level BPE's "Ġ", SentencePiece's "▁") or, for other
    tokenizers, decodes to a leading space; the rest of the piece is the word's start (" entertain" of
    "entertaining")."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if any(isinstance(p, str) and p[:1] in ("Ġ", "▁") for p in pieces):
        return [p[1:].lower() if isinstance(p, str) and p[:1] in ("Ġ", "▁") else None for p in pieces]
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    return [t[1:].lower() if t.startswith(" ") else None for t in texts]


class NoRepeatWord:
    """No word of `min_letters` letters or more started twice in one turn: once the turn holds " great", every
    token that starts the word "great" again (" great", " Great") is banned. Word starts come from `word_starts`;
    only alphabetic ones count, so "a", "the" and numbers repeat freely, and the prompt's words (a film's name) may
    be said again. Against praise a classifier pays for twice ("a great movie. It is a great film"), which n-grams
    of tokens miss once the words around it change. transformers' `generate` has no equivalent."""

    def __init__(self, tokenizer: Any, min_letters: int = 4) -> None:
        if not (isinstance(min_letters, int) and min_letters >= 1):
            raise ValueError(f"NoRepeatWord min_letters={min_letters!r}: give the shortest word it bans repeating as "
                             "a positive number of letters (4 lets 'the' and 'was' repeat, not 'great')")
        self.vocab_size = len(tokenizer)
        words = word_starts(tokenizer)
        self.word_of = [w if w and w.isalpha() and len(w) >= min_letters else None for w in words]
        ids: dict[str, list[int]] = {}
        for i, w in enumerate(self.word_of):
            if w is not None:
                ids.setdefault(w, []).append(i)
        self.ids_of = {w: np.asarray(v, dtype=np.int64) for w, v in ids.items()}

    def __call__(self, prefix_ids: list[int], turn_ids: list[int]) -> np.ndarray:
        mask = np.ones(self.vocab_size, dtype=np.bool_)
        for w in {self.word_of[t] for t in turn_ids} - {None}:
            mask[self.ids_of[w]] = False
        return mask


class AllMasks:
    """A token is allowed when every one of `masks` allows it (e.g. `NoRepeatNgram` and `NoRepeatWord` together)."""

    def __init__(self, vocab_size: int, *masks: ActionMask) -> None:
        if not masks:
            raise ValueError("AllMasks needs at least one mask to combine.")
        self.vocab_size, self.masks = int(vocab_size), masks

    def __call__(self, prefix_ids: list[int], turn_ids: list[int]) -> np.ndarray:
        out = np.ones(self.vocab_size, dtype=np.bool_)
        for m in self.masks:
            out &= check_mask(m(prefix_ids, turn_ids), self.vocab_size, m)
        if not out.any():
            raise ValueError(f"AllMasks: {', '.join(type(m).__name__ for m in self.masks)} together allow no token at "
                             "this step, so no action is possible; loosen one of them.")
        return out
