"""The reward models and the judge on what they will score: IMDb test review openings of an episode's length, and
whole reviews, positive and negative reviews apart.

An RL episode is a 2-8 token query plus a 4-16 token response: 20 words or fewer. A classifier that is 86% right on
whole reviews can still call a third of real negative openings positive at that length: it pays for the absence of
negative words, which off-topic text also has. This scores each model on the same texts of the test split's second
half (which none of them trains on) cut to the first 10, 20 and 40 words, and whole:

- `scratch`: the imdb preset's earlier reward model, a small DistilBERT trained from scratch (`SCRATCH`; `--scratch`
  scores a folder already built),
- `minilm`: all-MiniLM-L6-v2 fine-tuned on word windows and whole reviews (the imdb and smollm2 presets'),
- `judge`: the held-out n-gram judge,
- and any reward-model folder named by `--also` (e.g. a MiniLM build trained on more windows), by its folder name.

    python benchmarks/reward_models.py           # builds (or reuses) the three into artifacts/, then scores them
    python benchmarks/reward_models.py --models minilm judge --also artifacts/reward-<hash>  # two of them and one more
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro
from _common import IMDB_DIR, print_table, target, write_result

from textenv.build.pipeline import build, eval_split, preset
from textenv.build.reward_train import RewardConfig, opening_rates, openings

# the imdb preset's reward model before it became the fine-tuned MiniLM: a 1-layer, 64-wide DistilBERT from scratch
SCRATCH = RewardConfig(vocab_size=8192, dim=64, n_layers=1, n_heads=2, hidden_dim=256, max_length=256, lr=2e-3,
                       batch_size=32, epochs=3.0, max_minutes=10.0)


@dataclass
class Args:
    texts: int = 2000
    """test texts scored (the first of the test split's second half, both labels)"""
    words: tuple[int, ...] = (10, 20, 40)
    """opening lengths in words"""
    data_dir: str = str(IMDB_DIR)
    """IMDb as gzipped JSON Lines"""
    scratch: str | None = None
    """an already built scratch reward model folder to score (default: build SCRATCH into artifacts/)"""
    models: tuple[Literal["scratch", "minilm", "judge"], ...] = ("scratch", "minilm", "judge")
    """which of the three to build (or reuse) and score"""
    also: tuple[str, ...] = ()
    """more reward-model folders (already built, each with its build.json) to score beside the three"""
    out: str | None = None
    """JSON path (default benchmarks/results/reward_models.json)"""


def scorers(data_dir: str, scratch: str | None, models: tuple[str, ...], also: tuple[str, ...] = ()) -> dict:
    """name -> (P(positive) scorer, its build record) of `models`, each built or reused from artifacts/, and of the
    folders `also`, named by their folder name."""
    import torch

    from agents.rlhf.pieces import load_classifier, load_judge

    for folder in also:  # before any build
        if not (Path(folder) / "build.json").is_file():
            raise SystemExit(f"--also {folder}: no build.json there; name a folder `python -m textenv.build reward` wrote")
    args = preset("imdb", data_dir=data_dir)
    paths = {}
    if "scratch" in models:
        paths["scratch"] = Path(scratch) if scratch else build(dataclasses.replace(args, reward=SCRATCH), "reward").reward
    if "minilm" in models:
        paths["minilm"] = build(args, "reward").reward
    if "judge" in models:
        paths["judge"] = build(args, "judge").judge
    paths |= {Path(folder).name: Path(folder) for folder in also}
    cpu = torch.device("cpu")
    fns = {k: load_judge(str(p), cpu) if k == "judge" else load_classifier(str(p), cpu, "reward model")[1]
           for k, p in paths.items()}
    return {k: (fns[k], json.loads((Path(p) / "build.json").read_text())) for k, p in paths.items()}


def main(a: Args) -> None:
    texts = eval_split(a.data_dir)[1].head(a.texts)
    rows, results = [], {}
    for name, (fn, record) in scorers(a.data_dir, a.scratch, a.models, a.also).items():
        results[name] = {"build_seconds": record["seconds"], "config": record["key"].get("cfg"), "rates": {}}
        for words in (*a.words, None):
            t0 = time.time()
            cut = texts.texts if words is None else openings(texts.texts, words)
            r = opening_rates(fn(cut), texts.labels) | {"seconds": time.time() - t0}
            results[name]["rates"]["whole" if words is None else f"{words}_words"] = r
            rows.append([name, "whole" if words is None else f"first {words} words", r["accuracy"],
                         r["positive_rate_of_positive"], r["positive_rate_of_negative"]])
    print_table(["model", "texts", "accuracy", "positive | positive review", "positive | negative review"], rows)
    targets = []
    for name, r in results.items():
        if name not in ("scratch", "judge"):  # the MiniLM builds: each step <= 25 minutes once
            targets.append(target(f"{name}_build_minutes", r["build_seconds"] / 60, "<= 25", r["build_seconds"] <= 25 * 60))
    if {"minilm", "scratch"} <= results.keys():
        m, s = (results[k]["rates"]["20_words"]["positive_rate_of_negative"] for k in ("minilm", "scratch"))
        targets.append(target("minilm_20_word_negatives_called_positive_vs_scratch", m - s, "< 0", m < s))
    path = write_result("reward_models", {"texts": len(texts), "models": results}, targets, quick=False, out=a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
