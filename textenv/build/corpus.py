"""The embedded default corpus: short labelled movie-review-style texts made from the project's own words.

`corpus_data/reviews.json` holds word lists (subjects, people, aspects, positive and negative adjectives,
verb phrases, closers, ...) and sentence templates, all written for this project. `generate()` fills
the templates with a seeded RNG: each record is one or two sentences of the same polarity (label 1 =
positive, 0 = negative), the two labels in equal numbers, every text distinct. Nothing comes from IMDb.

Slots: `{subject}`, `{person}`, `{aspect}`, `{aspect2}`, `{genre}`, `{time}` are shared by both labels;
`{adj}`, `{adj2}`, `{a_adj}` ("a"/"an" + adjective), `{adv}`, `{verb}`, `{feel}`, `{person_verb}`,
`{closer}`, `{opener}`, `{score}` come from the label's own lists. A capitalised slot name
(`{Subject}`) capitalises the value.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from importlib import resources

from textenv.build.texts import Texts

VERSION = 1  # bump when generate() changes its output, so cached artefacts are rebuilt
N_RECORDS = 8000
TEST_FRACTION = 0.2
SEED = 1234
_SLOT = re.compile(r"\{(\w+)\}")


@functools.lru_cache(maxsize=1)
def _raw() -> str:
    return resources.files("textenv.build").joinpath("corpus_data/reviews.json").read_text(encoding="utf-8")


def lexicon() -> dict:
    """The word lists and templates (`corpus_data/reviews.json`)."""
    import json

    return json.loads(_raw())


def _fill(template: str, words: dict, polar: dict, rng: random.Random) -> str:
    picked: dict[str, str] = {}

    def value(name: str) -> str:
        key = name.lower()
        if key not in picked:
            if key in ("adj2", "aspect2"):
                base = key[:-1]
                pool = [w for w in (polar if base == "adj" else words)[base + ("" if base == "adj" else "s")]
                        if w != value(base)]
                picked[key] = rng.choice(pool)
            elif key == "a_adj":
                adj = value("adj")
                picked[key] = ("an " if adj[0] in "aeiou" else "a ") + adj
            elif key in polar:
                picked[key] = rng.choice(polar[key])
            else:
                picked[key] = rng.choice(words[key + "s"] if key + "s" in words else words[key])
        v = picked[key]
        return v[0].upper() + v[1:] if name[0].isupper() else v

    return _SLOT.sub(lambda m: value(m.group(1)), template)


def generate(n: int = N_RECORDS, seed: int = SEED) -> Texts:
    """`n` distinct labelled texts (n // 2 of each label), in a seeded random order."""
    words = lexicon()
    words["persons"] = words["people"]
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    for label, key in ((1, "positive"), (0, "negative")):
        polar = words[key]
        want = n // 2 + (n % 2 if label == 1 else 0)
        count, tries = 0, 0
        while count < want:
            tries += 1
            if tries > 50 * want:
                raise RuntimeError(f"the templates cannot make {want} distinct {key} texts; add words or templates")
            k = 1 if rng.random() < 0.6 else 2
            text = " ".join(_fill(rng.choice(words["templates"]), words, polar, rng) for _ in range(k))
            if text not in seen:
                seen.add(text)
                out.append((text, label))
                count += 1
    rng.shuffle(out)
    return Texts([t for t, _ in out], [y for _, y in out])


@functools.lru_cache(maxsize=4)
def _splits(n: int, seed: int) -> tuple[Texts, Texts]:
    data = generate(n, seed)
    n_test = int(len(data) * TEST_FRACTION)
    return data.take(range(n_test, len(data))), data.take(range(n_test))


def corpus_split(split: str = "train", n: int = N_RECORDS, seed: int = SEED) -> Texts:
    """The "train" (80%) or "test" (20%) part of `generate(n, seed)`."""
    train, test = _splits(n, seed)
    if split not in ("train", "test"):
        raise ValueError(f"the embedded corpus has splits 'train' and 'test', not '{split}'")
    return Texts(list((train if split == "train" else test).texts),
                 list((train if split == "train" else test).labels or []))


def prompts() -> list[str]:
    """Neutral review openings (no sentiment words) for RLHF episodes on the embedded corpus."""
    return list(lexicon()["prompts"])


def corpus_fingerprint() -> str:
    """Hash of the word lists, templates and generator settings."""
    return hashlib.sha256(f"{_raw()}|{VERSION}|{N_RECORDS}|{SEED}|{TEST_FRACTION}".encode()).hexdigest()[:16]
