"""The reward models and the judge on what they will score: IMDb test review openings of an episode's length, and
whole reviews, positive and negative reviews apart.

An RL episode is a 2-8 token query plus a 4-16 token response: 20 words or fewer. A classifier that is 86% right on
whole reviews can still call a third of real negative openings positive at that length: it pays for the absence of
negative words, which off-topic text also has. This scores each model on the same texts of the test split's second
half (which none of them trains on) cut to the first 10, 20 and 40 words, and whole:

- `scratch`: the imdb preset's earlier reward model, a small DistilBERT trained from scratch (`SCRATCH`; `--scratch`
  scores a folder already built),
- `minilm`: all-MiniLM-L6-v2 fine-tuned on word windows and whole reviews (the imdb and smollm2 presets'),
- `judge`: the held-out n-gram judge.

    python benchmarks/reward_models.py           # builds (or reuses) the three into artifacts/, then scores them
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

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
    out: str | None = None
    """JSON path (default benchmarks/results/reward_models.json)"""


def scorers(data_dir: str, scratch: str | None) -> dict:
    """name -> (P(positive) scorer, its build record), each built or reused from artifacts/."""
    import torch

    from agents.rlhf.pieces import load_classifier, load_judge

    args = preset("imdb", data_dir=data_dir)
    paths = {"scratch": Path(scratch) if scratch else build(dataclasses.replace(args, reward=SCRATCH), "reward").reward,
             "minilm": build(args, "reward").reward, "judge": build(args, "judge").judge}
    cpu = torch.device("cpu")
    fns = {"scratch": load_classifier(str(paths["scratch"]), cpu, "reward model")[1],
           "minilm": load_classifier(str(paths["minilm"]), cpu, "reward model")[1],
           "judge": load_judge(str(paths["judge"]), cpu)}
    return {k: (fns[k], json.loads((Path(p) / "build.json").read_text())) for k, p in paths.items()}


def main(a: Args) -> None:
    texts = eval_split(a.data_dir)[1].head(a.texts)
    rows, results = [], {}
    for name, (fn, record) in scorers(a.data_dir, a.scratch).items():
        results[name] = {"build_seconds": record["seconds"], "config": record["key"].get("cfg"), "rates": {}}
        for words in (*a.words, None):
            t0 = time.time()
            cut = texts.texts if words is None else openings(texts.texts, words)
            r = opening_rates(fn(cut), texts.labels) | {"seconds": time.time() - t0}
            results[name]["rates"]["whole" if words is None else f"{words}_words"] = r
            rows.append([name, "whole" if words is None else f"first {words} words", r["accuracy"],
                         r["positive_rate_of_positive"], r["positive_rate_of_negative"]])
    print_table(["model", "texts", "accuracy", "positive | positive review", "positive | negative review"], rows)
    m, s = results["minilm"]["rates"], results["scratch"]["rates"]
    targets = [target("minilm_build_minutes", results["minilm"]["build_seconds"] / 60, "<= 25",
                      results["minilm"]["build_seconds"] <= 25 * 60),
               target("minilm_20_word_negatives_called_positive_vs_scratch",
                      m["20_words"]["positive_rate_of_negative"] - s["20_words"]["positive_rate_of_negative"], "< 0",
                      m["20_words"]["positive_rate_of_negative"] < s["20_words"]["positive_rate_of_negative"])]
    path = write_result("reward_models", {"texts": len(texts), "models": results}, targets, quick=False, out=a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
