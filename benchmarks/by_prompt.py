"""Blind readings split by what the prompt already says: how much of the reader's "not positive" is the prompt's.

An RLHF episode continues the first 2-8 tokens of a real review. Some openings already commit the review to a
verdict ("This movie was pointless"); RL can only answer those with praise that contradicts them, which a reader
does not call a positive review. `prepare` gathers the prompts of some blind readings (`blind_reading.py` folders and
the run JSON each was prepared from), shuffled, into a folder for a reader who sees only them: `prompts.tsv` and
`INSTRUCTIONS.md` to hand over, and `key.json` (each ID's run JSON and sample index: the prompts are not kept
apart from the runs that hold them). The reader writes `labels.tsv` (neg / pos / none), a second `labels_reader2.tsv`.
`split` joins those labels with blind readings and prints, per prompt label, the share of prompts and the reader's
positive and all-three rates of the before and after texts.

    python benchmarks/by_prompt.py prepare /tmp/prompts --runs smollm2_ws30_seed1=rlhf_smollm2_ws30.json ...
    python benchmarks/by_prompt.py split benchmarks/results/blind_reading/prompts \\
        --runs smollm2_ws30_seed1=rlhf_smollm2_ws30.json smollm2_ws30_seed2=rlhf_smollm2_ws30_seed2.json
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro
from _common import RESULTS_DIR, print_table, write_result

LABELS = ("neg", "none", "pos")
INSTRUCTIONS = """You are a careful reader. prompts.tsv has one line per text: ID<TAB>TEXT. Each text is the first few words of a
movie review, cut off mid-sentence. For every line decide one label: does this opening, on its own, already
commit the review to an opinion?
- "neg" if the words already say something negative about the film / show / its makers or the experience
  (e.g. "This movie was pointless", "The worst film", "This lame Harold Lloyd film").
- "pos" if they already say something positive (e.g. "A wonderful little film", "I loved").
- "none" if they do not (yet) express an opinion either way (e.g. "I was really", "Back in the 5th century").
Read every line yourself; do not use any automatic classifier, keyword rule, sentiment library or script to decide.
Write labels.tsv, one line per ID in ID order: ID<TAB>label, no header.
"""


@dataclass
class Args:
    step: tyro.conf.Positional[Literal["prepare", "split"]]
    """`prepare`: write the readings' prompts for a reader; `split`: break the readings down by the prompts' labels"""
    folder: tyro.conf.Positional[str]
    """`prepare`: where prompts.tsv, INSTRUCTIONS.md and key.json go; `split`: that folder, with labels*.tsv
    (ID, neg / pos / none) beside key.json"""
    runs: tuple[str, ...]
    """READING=RUN.json pairs: a folder under benchmarks/results/blind_reading/ and the run JSON it was prepared from"""
    seed: int = 0
    """`prepare`: the shuffle seed"""
    out: str | None = None
    """`split`: JSON path (default benchmarks/results/by_prompt.json)"""


def read_tsv(path: Path) -> list[list[str]]:
    return [line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if line.strip()]


def normal(prompt: str) -> str:
    return " ".join(prompt.split())


def samples_of(run: str) -> list[dict]:
    """The held-out samples (prompt, before, after, ...) of a run JSON under benchmarks/results/."""
    return json.loads((RESULTS_DIR / run).read_text())["results"]["samples"]


def runs_of(pairs: tuple[str, ...]) -> list[tuple[str, str, list[dict]]]:
    """(reading folder name, run JSON name, the run's samples) of each READING=RUN.json pair."""
    out = []
    for pair in pairs:
        reading, _, run = pair.partition("=")
        if not run or not (RESULTS_DIR / "blind_reading" / reading / "key.json").is_file():
            raise SystemExit(f"--runs {pair}: give READING=RUN.json, a blind_reading folder and its run's JSON")
        out.append((reading, run, samples_of(run)))
    return out


def prepare(a: Args) -> None:
    """The readings' prompts (each once, sorted, then shuffled) for a reader, and the key to find them again."""
    where: dict[str, list] = {}
    for reading, run, samples in runs_of(a.runs):
        for _, i in json.loads((RESULTS_DIR / "blind_reading" / reading / "key.json").read_text()).values():
            where.setdefault(normal(samples[i]["prompt"]), [run, i])
    prompts = sorted(where)
    random.Random(a.seed).shuffle(prompts)
    out = Path(a.folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.tsv").write_text("".join(f"{k}\t{p}\n" for k, p in enumerate(prompts)))
    (out / "key.json").write_text(json.dumps({k: where[p] for k, p in enumerate(prompts)}))
    (out / "INSTRUCTIONS.md").write_text(INSTRUCTIONS)
    print(f"{len(prompts)} prompts in {out}/prompts.tsv; give the reader prompts.tsv and INSTRUCTIONS.md only")


def prompt_labels(folder: Path) -> dict[str, list[str]]:
    """prompt text -> its label from each prompt reader (the labels*.tsv files in name order), the prompts found
    through key.json in the runs that hold them."""
    runs: dict[str, list[dict]] = {}
    prompts = {}
    for k, (run, i) in json.loads((folder / "key.json").read_text()).items():
        if run not in runs:
            runs[run] = samples_of(run)
        prompts[k] = normal(runs[run][i]["prompt"])
    readers = sorted(folder.glob("labels*.tsv"))
    if not readers:
        raise SystemExit(f"{folder}: no labels*.tsv; have a reader label the prompts `prepare` wrote first")
    out: dict[str, list[str]] = defaultdict(list)
    for path in readers:
        for k, label in read_tsv(path):
            if label not in LABELS:
                raise SystemExit(f"{path}: label {label!r} for ID {k}; use one of {LABELS}")
            out[prompts[k]].append(label)
    return out


def rates(reading: Path, samples: list[dict], by_prompt: dict[str, list[str]]) -> dict:
    """{prompt label: {"n": prompts, "<before|after>_<positive|all_three>_<reader>": rate}} of one blind reading,
    the prompt label taken from the first prompt reader."""
    key = json.loads((reading / "key.json").read_text())
    counts = {label: defaultdict(Counter) for label in LABELS}  # label -> (before|after, reader) -> counts
    for r, path in enumerate(sorted(reading.glob("labels*.tsv"))):
        for k, sentiment, topic, fluent in read_tsv(path):
            which, i = key[k]
            prompt = normal(samples[i]["prompt"])
            if prompt not in by_prompt:
                raise SystemExit(f"{reading.name}: prompt {prompt!r} has no label; `prepare` with this reading too")
            counts[by_prompt[prompt][0]][which, r].update(n=1, positive=sentiment == "pos",
                                                          all_three=sentiment == "pos" and topic == "y" and fluent == "y")
    return {label: {"n": by[("after", 0)]["n"]} | {f"{which}_{stat}_{r}": c[stat] / c["n"] for (which, r), c in by.items()
                                                  for stat in ("positive", "all_three")}
            for label, by in counts.items()}


def agreement(by_prompt: dict[str, list[str]]) -> float | None:
    both = [v for v in by_prompt.values() if len(v) >= 2]
    return sum(v[0] == v[1] for v in both) / len(both) if both else None


def split(a: Args) -> None:
    by_prompt = prompt_labels(Path(a.folder))
    results, rows = {"prompt_readers_agree": agreement(by_prompt), "runs": {}}, []
    for reading, _, samples in runs_of(a.runs):
        r = rates(RESULTS_DIR / "blind_reading" / reading, samples, by_prompt)
        results["runs"][reading] = r
        total = sum(v["n"] for v in r.values())
        for label in LABELS:
            v = r[label]
            after = " / ".join(f"{v[k]:.2f}" for k in sorted(v) if k.startswith("after_positive"))
            three = " / ".join(f"{v[k]:.2f}" for k in sorted(v) if k.startswith("after_all_three"))
            rows.append([reading, label, f"{v['n']} ({v['n'] / total:.0%})", f"{v.get('before_positive_0', 0):.2f}",
                         after, three])
    print_table(["reading", "prompt says", "prompts", "before positive", "after positive (readers)",
                 "after all three (readers)"], rows)
    print(f"prompt readers agree on {results['prompt_readers_agree']:.0%} of the prompts"
          if results["prompt_readers_agree"] is not None else "one prompt reader")
    print(f"wrote {write_result('by_prompt', results, [], quick=False, out=a.out)}")


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__)
    prepare(args) if args.step == "prepare" else split(args)
