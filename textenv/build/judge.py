"""Held-out sentiment judge: a hashed word n-gram logistic regression, used only for evaluation.

It differs from the reward model on purpose: bag-of-n-grams features instead of a transformer, its own
seed, and (in `textenv.build`) the first half of the test split, which the reward model never sees.
When RLHF exploits a quirk of the reward model (reward hacking), the reward climbs while the judge's
score does not: the gap is the signal.

Features: lower-cased words (and `!`/`?`) and their n-grams up to `ngram`, hashed (CRC32, stable across
runs and machines) into `n_features` buckets, binary, L2-normalised. Model: one weight per bucket plus a
bias (an `EmbeddingBag` of width 1), trained with AdamW on the logistic loss. Saved as
`judge.safetensors` (weights) + `judge.json` (config and metrics).

Why not scikit-learn's HashingVectorizer + LogisticRegression (the same model): it would add scikit-learn and
SciPy to the dependencies for one small model, its estimators save by pickle (the arrays would need a writer of
their own anyway), and its features hash differently (MurmurHash3, signed), so every judge score measured so far
would move. The torch version is a few dozen lines and loads from safetensors.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from textenv.build.texts import Texts

_WORD = re.compile(r"[a-z0-9']+|[!?]")


@dataclass
class JudgeConfig:
    """Settings of the judge."""

    n_features: int = 2**18
    """hash buckets"""
    ngram: int = 2
    """longest n-gram (1: words only)"""
    epochs: int = 6
    """passes over the training texts"""
    lr: float = 0.05
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    batch_size: int = 64
    """texts per step"""
    seed: int = 1
    """a different seed from the reward model's"""


class Judge:
    """`judge(texts) -> list[float]`: probability that each text is positive."""

    def __init__(self, cfg: JudgeConfig | None = None) -> None:
        self.cfg = cfg or JudgeConfig()
        self.weight = torch.nn.EmbeddingBag(self.cfg.n_features, 1, mode="sum")
        torch.nn.init.zeros_(self.weight.weight)
        self.bias = torch.nn.Parameter(torch.zeros(1))
        self.metrics: dict = {}

    def features(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, offsets, weights) for `EmbeddingBag`: each text's distinct hashed n-grams, weight 1/sqrt(count)."""
        ids: list[int] = []
        offsets: list[int] = []
        weights: list[float] = []
        for text in texts:
            words = _WORD.findall(text.lower())
            grams = {" ".join(words[i:i + n]) for n in range(1, self.cfg.ngram + 1) for i in range(len(words) - n + 1)}
            buckets = sorted({zlib.crc32(g.encode()) % self.cfg.n_features for g in grams})  # sorted: a set's
            # order follows the per-process string hash (PYTHONHASHSEED), and the sum's rounding would follow it
            offsets.append(len(ids))
            ids.extend(buckets)
            weights.extend([1.0 / max(1, len(buckets)) ** 0.5] * len(buckets))
        return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long), torch.tensor(weights)

    def logits(self, texts: list[str]) -> torch.Tensor:
        """Log-odds of positive, (N,)."""
        ids, offsets, w = self.features(texts)
        return self.weight(ids, offsets, per_sample_weights=w).squeeze(-1) + self.bias  # (N,)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[float]:
        return torch.sigmoid(self.logits(list(texts))).tolist()

    def accuracy(self, data: Texts) -> float:
        """Share of `data` classified correctly (probability > 0.5)."""
        probs = torch.tensor(self(data.texts))
        return float(((probs > 0.5).long() == torch.tensor(data.labels)).float().mean())

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.weight.detach().contiguous(), "bias": self.bias.detach()},
                  str(out / "judge.safetensors"))
        (out / "judge.json").write_text(json.dumps({"config": asdict(self.cfg), "metrics": self.metrics}, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> Judge:
        """Load a judge saved by `save` (safetensors weights, JSON config)."""
        path = Path(path)
        if not (path / "judge.json").is_file() or not (path / "judge.safetensors").is_file():
            raise FileNotFoundError(f"{path} holds no judge (judge.json + judge.safetensors); build one with "
                                    "`python -m textenv.build judge`")
        meta = json.loads((path / "judge.json").read_text())
        judge = cls(JudgeConfig(**meta["config"]))
        tensors = load_file(str(path / "judge.safetensors"))
        with torch.no_grad():
            judge.weight.weight.copy_(tensors["weight"])
            judge.bias.copy_(tensors["bias"])
        judge.metrics = meta.get("metrics", {})
        return judge


def train_judge(cfg: JudgeConfig, train: Texts, test: Texts, out_dir: str | Path | None = None,
                log: Callable[[str], None] = print) -> Judge:
    """Fit the judge on `train`, record its accuracy on `test` in `judge.metrics`, save to `out_dir` if given."""
    if train.labels is None or test.labels is None:
        raise ValueError("the judge needs labelled texts; load the 'train' and 'test' splits, not 'unsup'")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    judge = Judge(cfg)
    params = [judge.weight.weight, judge.bias]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    labels = torch.tensor(train.labels, dtype=torch.float)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.epochs * ((len(train) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    for epoch in range(cfg.epochs):
        total = 0.0
        for idx in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
            logits = judge.logits([train.texts[i] for i in idx.tolist()])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"judge epoch {epoch + 1}/{cfg.epochs}: loss {total / len(train):.4f}")
    judge.metrics = {"train_texts": len(train), "test_texts": len(test), "test_accuracy": judge.accuracy(test),
                     "train_accuracy": judge.accuracy(train), "wall_seconds": time.time() - t0}
    log(f"judge test accuracy {judge.metrics['test_accuracy']:.4f} ({len(test)} texts)")
    if out_dir is not None:
        judge.save(out_dir)
    return judge
