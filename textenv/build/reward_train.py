"""Sentiment reward model: a DistilBERT-architecture sequence classifier (label 1 = POSITIVE).

Two ways in, one loop:
- from scratch (`model="scratch"`): a byte-level BPE trained on the training texts and a small
  `DistilBertForSequenceClassification` from `DistilBertConfig`; a larger learning rate than fine-tuning.
- from a hub name or local folder (`RewardConfig.seed_recipe()` is the seed's recipe: AdamW lr 5e-5,
  batch 10, 3 epochs on `distilbert-base-uncased`), fine-tuned with its own tokenizer.

Texts shaped like what it will score: a reward model that scores 20-word episodes but trained only on whole reviews
learns that the absence of negative words is praise. With `train_windows` > 0 it also trains on that many windows of
`window_words` words (half of them review openings, half from anywhere in a review, each with its review's label),
beside `whole_texts` whole reviews, and reports its accuracy on test review openings of `eval_window_words` words
(positive and negative reviews apart) as well as on whole reviews. `length_buckets` batches texts of similar length
together, so a window does not pay for a whole review's padding.

Long reviews are cut to `max_length` tokens keeping the first `head_fraction` of them from the start and
the rest from the end (reviews tend to state the verdict last; Sun et al. 2019, "How to Fine-Tune BERT
for Text Classification?", found head+tail truncation best on IMDb). The output folder holds the model,
its tokenizer and `metrics.json`, so `textenv.rewards.HFRewardModel.from_pretrained(folder)` loads it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PreTrainedTokenizerBase,
)

from textenv.build.bpe import classifier_tokenizer, train_bpe
from textenv.build.pretrain import resolve_device
from textenv.build.texts import Texts

ID2LABEL = {0: "NEGATIVE", 1: "POSITIVE"}
LABEL2ID = {v: k for k, v in ID2LABEL.items()}


@dataclass
class RewardConfig:
    """Settings of one reward-model run (defaults: small, from scratch)."""

    model: str = "scratch"
    """"scratch" (DistilBERT architecture from the sizes below), "minilm" (all-MiniLM-L6-v2, fetched once from the
    package registry by `textenv.build.minilm`), or a hub name / local path to fine-tune"""
    vocab_size: int = 8192
    """BPE vocabulary trained on the training texts (scratch only)"""
    dim: int = 128
    """hidden width (scratch only)"""
    n_layers: int = 2
    """transformer blocks (scratch only)"""
    n_heads: int = 2
    """attention heads (scratch only)"""
    hidden_dim: int = 512
    """feed-forward width (scratch only)"""
    dropout: float = 0.1
    """dropout in the transformer and before the classifier (scratch only)"""
    max_length: int = 256
    """tokens per input, special tokens included"""
    head_fraction: float = 0.5
    """share of the tokens of a too-long text kept from its start; the rest come from its end"""
    lr: float = 1e-3
    """peak learning rate (linear warmup, then linear decay to 0)"""
    batch_size: int = 32
    """texts per step"""
    epochs: float = 2.0
    """passes over the training texts (fractions allowed)"""
    warmup_ratio: float = 0.06
    """share of steps spent warming up"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    max_minutes: float | None = None
    """training time budget; the schedule follows max(step share, time share) and stops at the budget"""
    eval_batch_size: int = 128
    """texts per evaluation step"""
    seed: int = 0
    """torch seed (init, dropout, batch order, windows)"""
    train_windows: int = 0
    """also train on this many word windows cut from the training reviews (0: whole reviews only)"""
    window_words: tuple[int, int] = (6, 24)
    """(min, max) words per training window"""
    whole_texts: int | None = None
    """whole training reviews kept beside the windows (None: all)"""
    eval_texts: int | None = None
    """score at most this many test texts (whole and as openings; None: all)"""
    eval_window_words: int = 20
    """also report accuracy on the openings of this many words of the test reviews (0: not)"""
    length_buckets: bool = False
    """batch texts of similar length together (shuffled in chunks of 50 batches); False: plain shuffled batches"""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda" """

    @staticmethod
    def seed_recipe(model: str = "distilbert-base-uncased") -> RewardConfig:
        """The seed's fine-tuning recipe: AdamW lr 5e-5, batch 10, 3 epochs, 512 tokens."""
        return RewardConfig(model=model, lr=5e-5, batch_size=10, epochs=3.0, max_length=512, warmup_ratio=0.0)


def _specials(tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special ids a tokenizer puts before and after a text (`<cls>` / `[CLS] ... [SEP]`)."""
    full = tok("x")["input_ids"]
    core = tok("x", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(core) + 1):
        if full[i:i + len(core)] == core:
            return full[:i], full[i + len(core):]
    return [], []


def encode(tok: PreTrainedTokenizerBase, texts: list[str], max_length: int, head_fraction: float = 0.5) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens, head+tail truncated to `max_length`."""
    pre, post = _specials(tok)
    room = max_length - len(pre) - len(post)
    head = int(round(room * head_fraction))
    out = []
    for ids in tok(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        if len(ids) > room:
            ids = ids[:head] + (ids[len(ids) - (room - head):] if room > head else [])
        out.append(pre + ids + post)
    return out


def _batch(rows: list[list[int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T), right-padded
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def build_classifier(cfg: RewardConfig, train_texts: list[str]) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A fresh DistilBERT-architecture classifier + BPE tokenizer, or a saved model (hub name / folder)."""
    if cfg.model == "scratch":
        tok = classifier_tokenizer(train_bpe(train_texts, cfg.vocab_size), max_length=512)
        config = DistilBertConfig(
            vocab_size=len(tok), max_position_embeddings=512, dim=cfg.dim, n_layers=cfg.n_layers,
            n_heads=cfg.n_heads, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout, attention_dropout=cfg.dropout,
            seq_classif_dropout=cfg.dropout, num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID,
            pad_token_id=tok.pad_token_id)
        return DistilBertForSequenceClassification(config), tok
    tok = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=False)
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model, num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


@torch.no_grad()
def predict(model: torch.nn.Module, tok: PreTrainedTokenizerBase, texts: list[str], max_length: int = 256,
            head_fraction: float = 0.5, batch_size: int = 128) -> torch.Tensor:
    """Positive-class probabilities (N,) with the same head+tail truncation as training."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = encode(tok, texts, max_length, head_fraction)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
    probs = torch.empty(len(rows))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        logits = model(**_batch([rows[i] for i in idx], tok.pad_token_id, device)).logits.float()  # (B, 2)
        probs[idx] = logits.softmax(-1)[:, 1].cpu()
    model.train(was_training)
    return probs


def accuracy(model: torch.nn.Module, tok: PreTrainedTokenizerBase, data: Texts, cfg: RewardConfig) -> float:
    """Share of `data` whose predicted label (probability > 0.5) matches."""
    probs = predict(model, tok, data.texts, cfg.max_length, cfg.head_fraction, cfg.eval_batch_size)
    return float(((probs > 0.5).long() == torch.tensor(data.labels)).float().mean())


def opening_rates(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict:
    """Accuracy and the positive rate among positive and among negative texts of P(positive) `scores`."""
    p, y = np.asarray(scores, dtype=float) > threshold, np.asarray(labels) == 1
    return {"accuracy": float((p == y).mean()), "positive_rate_of_positive": float(p[y].mean()),
            "positive_rate_of_negative": float(p[~y].mean())}


def openings(texts: Sequence[str], words: int) -> list[str]:
    """The first `words` words of each text."""
    return [" ".join(t.split()[:words]) for t in texts]


def windows(data: Texts, n: int, words: tuple[int, int], seed: int) -> Texts:
    """`n` windows of words[0]..words[1] words cut from the reviews of `data` in turn, each labelled as its review:
    half of them the review's opening, half starting anywhere in it."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        j = i % len(data)
        split = data.texts[j].split()
        k = int(rng.integers(words[0], words[1] + 1))
        start = 0 if rng.random() < 0.5 else int(rng.integers(0, max(1, len(split) - k + 1)))
        texts.append(" ".join(split[start : start + k]))
        labels.append(data.labels[j])
    return Texts(texts, labels)


def batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator, buckets: bool) -> list[torch.Tensor]:
    """One epoch's batches of indices: shuffled; with `buckets`, sorted by length within chunks of 50 batches
    (so each batch pads little) and the batches shuffled again."""
    perm = torch.randperm(len(lengths), generator=gen)
    if not buckets:
        return list(perm.split(batch_size))
    chunk, out = 50 * batch_size, []
    for c in perm.split(chunk):
        out += list(c[torch.tensor([lengths[i] for i in c.tolist()]).argsort(stable=True)].split(batch_size))
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def training_texts(cfg: RewardConfig, train: Texts) -> Texts:
    """What the classifier trains on: the whole reviews (`whole_texts` of them), plus `train_windows` windows."""
    whole = train.head(cfg.whole_texts)
    if not cfg.train_windows:
        return whole
    cut = windows(train, cfg.train_windows, cfg.window_words, cfg.seed)
    return Texts(whole.texts + cut.texts, whole.labels + cut.labels)


def evaluate(model: torch.nn.Module, tok: Any, test: Texts, cfg: RewardConfig, log: Callable[[str], None]) -> dict:
    """The trained model on the first `cfg.eval_texts` test reviews: whole-review accuracy, and (with
    `eval_window_words`) its rates on their openings of that many words, what an RL episode looks like to it."""
    t_eval = time.time()
    test = test.head(cfg.eval_texts)
    metrics = {"test_texts": len(test), "test_accuracy": accuracy(model, tok, test, cfg)}
    if cfg.eval_window_words:
        probs = predict(model, tok, openings(test.texts, cfg.eval_window_words), cfg.max_length, cfg.head_fraction,
                        cfg.eval_batch_size)
        rates = opening_rates(probs.tolist(), test.labels)
        log(f"reward model on test openings of {cfg.eval_window_words} words: accuracy {rates['accuracy']:.3f}, "
            f"positive {rates['positive_rate_of_positive']:.3f} of positive and "
            f"{rates['positive_rate_of_negative']:.3f} of negative reviews")
        metrics[f"openings_{cfg.eval_window_words}_words"] = rates
    return {**metrics, "eval_seconds": time.time() - t_eval}


def train_reward(cfg: RewardConfig, train: Texts, test: Texts, out_dir: str | Path,
                 log: Callable[[str], None] = print) -> dict:
    """Train a sentiment classifier on `train`, report accuracy on `test`, save model+tokenizer to `out_dir`."""
    if train.labels is None or test.labels is None:
        raise ValueError("the reward model needs labelled texts; load the 'train' and 'test' splits, not 'unsup'")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, tok = build_classifier(cfg, train.texts)
    model.to(device).train()
    train = training_texts(cfg, train)
    rows = encode(tok, train.texts, cfg.max_length, cfg.head_fraction)
    labels = torch.tensor(train.labels)
    lengths = [len(r) for r in rows]
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = max(1, int(steps_per_epoch * cfg.epochs))
    warmup = int(total * cfg.warmup_ratio)
    log(f"reward model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{len(rows)} train texts, {total} steps, device {device} (setup {time.time() - t0:.0f}s)")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_start, step, seen, losses = time.time(), 0, 0, []
    budget = None if cfg.max_minutes is None else 60 * cfg.max_minutes
    done = False
    while not done:
        for idx in batches(lengths, cfg.batch_size, gen, cfg.length_buckets):
            elapsed = time.time() - t_start
            frac = max(step / total, elapsed / budget if budget else 0.0)
            if frac >= 1.0:
                done = True
                break
            lr = cfg.lr * min((step + 1) / warmup if warmup else 1.0, 1.0 - frac)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = _batch([rows[i] for i in idx.tolist()], tok.pad_token_id, device)
            loss = model(**batch, labels=labels[idx].to(device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step, seen = step + 1, seen + len(idx)
            losses.append(loss.item())
            if step % max(1, total // 20) == 0:
                log(f"step {step}/{total} | loss {sum(losses[-50:]) / len(losses[-50:]):.3f} | lr {lr:.2e} | "
                    f"{seen / (time.time() - t_start):.1f} texts/s | {time.time() - t_start:.0f}s")
    train_seconds = time.time() - t_start
    metrics = {"model": cfg.model, "params": sum(p.numel() for p in model.parameters()), "steps": step,
               "epochs_done": seen / len(rows), "train_texts": len(rows),
               "final_train_loss": sum(losses[-50:]) / max(1, len(losses[-50:])), "train_seconds": train_seconds,
               **evaluate(model, tok, test, cfg, log), "wall_seconds": time.time() - t0, "config": asdict(cfg),
               "device": str(device)}
    log(f"reward model test accuracy {metrics['test_accuracy']:.4f} ({metrics['test_texts']} texts) after "
        f"{train_seconds:.0f}s of training")
    out = Path(out_dir)
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
