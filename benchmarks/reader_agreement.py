"""How well each offline signal tracks a blind reader: the report's numbers against a person's labels, text by text.

A blind reading (`../shared/tools/blind_reading.py`: texts shuffled, the reader not told which system wrote which)
labels each text positive / negative / neutral, on-topic, fluent. This scores the same texts with the offline
signals the report can compute, and says for each how well it predicts the reader's label:

- P(positive) by the reward model and by the held-out judge, against "positive";
- perplexity under the original LM (lower is more fluent), against "fluent";
- the share of the text's words that repeat an earlier one (`textenv.rewards.repeated_word_share`, what
  `--repeated-words-penalty` costs; lower is more fluent), against "fluent";
- the share of the text's words that name a film or its making (`agents.rlhf.signals.FILM_WORDS`), against
  "on-topic".

For each: ROC AUC (0.5 = no better than chance; the probability that a text the reader labelled yes scores above one
labelled no) and the accuracy at the signal's own threshold (0.5 for probabilities).

    python benchmarks/reader_agreement.py benchmarks/results/blind_reading/smollm2_seed1 \
        benchmarks/results/blind_reading/smollm2_seed2 --results benchmarks/results/rlhf_smollm2.json
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from _common import print_table, write_result


@dataclass
class Args:
    readings: tyro.conf.Positional[tuple[str, ...]]
    """blind-reading folders, each with texts.tsv, key.json and labels.tsv"""
    results: str = "benchmarks/results/rlhf_smollm2.json"
    """a run's results JSON: where its reward model, judge and original LM were built (their folders)"""
    out: str | None = None
    """JSON path (default benchmarks/results/reader_agreement.json)"""


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by ranks (ties get their mean rank); NaN when one class is empty."""
    pos, neg = labels.sum(), (~labels).sum()
    if not pos or not neg:
        return float("nan")
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for v in np.unique(scores):  # mean rank of ties
        tie = scores == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


@torch.no_grad()
def perplexities(folder: str, texts: list[str]) -> np.ndarray:
    """Each text's perplexity under the causal LM in `folder` (all tokens after the first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, lm = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    for t in texts:
        ids = torch.tensor([tok.encode(t, add_special_tokens=False)])
        logp = lm(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(math.exp(-float(logp.mean())))
    return np.array(out)


def read(folder: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(texts, the reader's labels as bool arrays: positive, on_topic, fluent), in ID order."""
    texts = dict(line.split("\t", 1) for line in (folder / "texts.tsv").read_text().splitlines() if line.strip())
    rows = [line.split("\t") for line in (folder / "labels.tsv").read_text().splitlines() if line.strip()]
    ids = [r[0] for r in rows]
    labels = {"positive": np.array([r[1] == "pos" for r in rows]), "on_topic": np.array([r[2] == "y" for r in rows]),
              "fluent": np.array([r[3] == "y" for r in rows])}
    return [texts[i] for i in ids], labels


def main(a: Args) -> None:
    from agents.rlhf.pieces import load_classifier, load_judge
    from agents.rlhf.signals import film_word_share
    from textenv.rewards import repeated_word_share

    built = json.loads(Path(a.results).read_text())["results"]["built_from"]
    texts, labels = [], {"positive": [], "on_topic": [], "fluent": []}
    for folder in a.readings:
        t, lab = read(Path(folder))
        texts += t
        for k in labels:
            labels[k].append(lab[k])
    labels = {k: np.concatenate(v) for k, v in labels.items()}
    cpu = torch.device("cpu")
    signals = {
        "reward model P(positive)": (np.array(load_classifier(built["built"]["reward"], cpu, "reward model")[1](texts)),
                                     "positive", 0.5),
        "judge P(positive)": (np.array(load_judge(built["built"]["judge"], cpu)(texts)), "positive", 0.5),
        "minus perplexity under the original LM": (-perplexities(built["policy"], texts), "fluent", None),
        "minus the share of repeated words": (-np.array([repeated_word_share(t) for t in texts]), "fluent", None),
        "share of film words": (np.array([film_word_share(t) for t in texts]), "on_topic", 0.0),
    }
    rows = []
    for name, (score, label, threshold) in signals.items():
        y = labels[label]
        acc = None if threshold is None else float(((score > threshold) == y).mean())
        rows.append({"signal": name, "reader_label": label, "auc": auc(score, y), "accuracy_at_threshold": acc,
                     "threshold": threshold, "reader_yes_rate": float(y.mean())})
    print_table(["signal", "reader label", "AUC", "accuracy", "reader yes"],
                [[r["signal"], r["reader_label"], r["auc"], r["accuracy_at_threshold"], r["reader_yes_rate"]]
                 for r in rows])
    path = write_result("reader_agreement", {"readings": list(a.readings), "texts": len(texts), "rows": rows},
                        [], quick=False, out=a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
