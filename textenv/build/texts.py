"""`Texts`: one split of a labelled (or unlabelled) text data set, as the build steps pass it around."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Texts:
    """A split: `texts[i]` has label `labels[i]` (0 negative, 1 positive), or `labels is None` (unlabelled)."""

    texts: list[str]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: Sequence[int]) -> Texts:
        """The records at positions `idx`, in that order."""
        labels = None if self.labels is None else [self.labels[i] for i in idx]
        return Texts([self.texts[i] for i in idx], labels)

    def head(self, n: int | None) -> Texts:
        """The first `n` records (all when `n` is None)."""
        return self if n is None else self.take(range(min(n, len(self))))

    def halves(self) -> tuple[Texts, Texts]:
        """Two disjoint halves, each with the same label balance (split class by class)."""
        if self.labels is None:
            mid = len(self) // 2
            return self.take(range(mid)), self.take(range(mid, len(self)))
        a: list[int] = []
        b: list[int] = []
        for lab in (0, 1):
            idx = [i for i, y in enumerate(self.labels) if y == lab]
            a += idx[: len(idx) // 2]
            b += idx[len(idx) // 2 :]
        return self.take(sorted(a)), self.take(sorted(b))
