"""Warm start: a pretrained LM fine-tuned on the task's text (language modelling, no labels) before RL.

The seed's recipe starts PPO from GPT-2 fine-tuned on IMDb reviews (`lvwerra/gpt2-imdb`) and uses that model as
the KL reference too; every anchor (the DPO paper's IMDb run, RL4LMs) starts RL from a model already tuned on the
task's text. An instruct model asked to continue a review opening writes about something else, and no KL setting
fixes that. So this step trains the LM to continue review openings: the first `window` tokens of each training
review, both polarities (the labels are never read: the sentiment must come from RL).

The top `trainable_layers` decoder blocks (and the final norm) train, over the frozen trunk of
`textenv.lm.TrunkSplit`; by default all 30 of SmolLM2-135M's. Tuning only the top 4 (what the RL job trains) takes
0.6x the time and leaves the instruct model's drift in: a blind reader called 65% of its samples on-topic and 70-75%
fluent, against 91% and 90% after tuning every block (benchmarks/README.md, "Warm starts, read before RL").

The amount of work is fixed (`max_texts` openings, `epochs` passes, so `epochs x max_texts / batch_size` steps):
the same seed gives the same model on any machine, however busy. `max_minutes` is an optional guard; when it cuts
the run, it says so loudly and the metrics record it. A progress bar shows the steps; the held-out loss of the
openings of test reviews is reported before and after. The result is a plain transformers folder (model +
tokenizer); `textenv.build` caches it in `<out-dir>/warmstart-<hash>/`, keyed by these settings, the base model and
the data's contents.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class WarmStartConfig:
    """Settings of the warm start (language-model fine-tuning on review openings)."""

    trainable_layers: int = 30
    """train the top k decoder blocks and the final norm, the rest frozen; 30: every block of SmolLM2-135M"""
    window: int = 64
    """tokens per training row: the opening of a review (shorter reviews are skipped)"""
    max_texts: int = 2560
    """training reviews used at most (their openings: window x max_texts tokens); with `epochs` and `batch_size` this
    fixes the work: 160 steps by default, about 15 minutes on 2 idle CPU cores with every block trained"""
    eval_texts: int = 200
    """held-out (test) review openings the loss is reported on"""
    batch_size: int = 16
    """rows per step"""
    lr: float = 1e-4
    """AdamW learning rate (linear warmup over 20 steps, then constant)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    epochs: float = 1.0
    """passes over the rows"""
    max_minutes: float | None = None
    """a guard, off by default: stop after this much training time, saying so loudly (the model then depends on the
    machine's speed, so the same seed no longer gives the same model)"""
    seed: int = 0
    """row order"""


def openings(tokenizer, texts: list[str], window: int, limit: int) -> torch.Tensor:
    """(N, window) token ids: the first `window` tokens of each text that has that many, at most `limit` rows."""
    rows = []
    for text in texts:
        ids = tokenizer.encode(text[: 12 * window], add_special_tokens=False)  # the head is enough to encode
        if len(ids) >= window:
            rows.append(ids[:window])
        if len(rows) == limit:
            break
    if not rows:
        raise ValueError(f"no text has {window} tokens; lower the window")
    return torch.tensor(rows, dtype=torch.long)


def lm_loss(split, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the rows (N, W) through the split's frozen trunk and trainable top."""
    logits = split.head(split.hidden(rows, rows.shape[1])[:, :-1]).float()  # (N, W-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(split, rows: torch.Tensor, batch_size: int) -> float:
    losses = [float(lm_loss(split, rows[i : i + batch_size])) * len(rows[i : i + batch_size])
              for i in range(0, len(rows), batch_size)]
    return sum(losses) / len(rows)


def warm_start(cfg: WarmStartConfig, base: str | Path, train_texts: list[str], eval_texts: list[str],
               out_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Fine-tune the causal LM in folder `base` on the openings of `train_texts`; save it with its tokenizer into
    `out_dir`; return the metrics (held-out loss and perplexity before and after, tokens, time)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from textenv.lm import TrunkSplit

    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    model.eval().requires_grad_(False)  # eval: no dropout; only the top blocks get gradients
    split = TrunkSplit(model, cfg.trainable_layers, tok.pad_token_id)
    params = split.trainable()
    for p in params:
        p.requires_grad_(True)
    rows = openings(tok, train_texts, cfg.window, cfg.max_texts)
    held = openings(tok, eval_texts, cfg.window, cfg.eval_texts)
    before = heldout_loss(split, held, cfg.batch_size)
    log(f"warm start: {len(rows)} openings of {cfg.window} tokens, top {cfg.trainable_layers} blocks, "
        f"held-out loss {before:.3f} (perplexity {math.exp(before):.1f})")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    steps = max(1, int(cfg.epochs * len(rows)) // cfg.batch_size)
    order = torch.cat([torch.randperm(len(rows), generator=g) for _ in range(math.ceil(cfg.epochs) or 1)])
    t0, step = time.time(), 0
    bar = tqdm(range(steps), desc="warm start", unit="step", mininterval=5.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 20)
        loss = lm_loss(split, rows[order[step * cfg.batch_size : (step + 1) * cfg.batch_size]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{(step + 1) * cfg.batch_size * cfg.window / (time.time() - t0):.0f}")
        if cfg.max_minutes is not None and time.time() - t0 > 60 * cfg.max_minutes:
            log(f"WARNING: warm start cut at step {step + 1} of {steps} by the time guard max_minutes="
                f"{cfg.max_minutes}: this model depends on the machine's speed; drop the guard for a run fixed by work")
            break
    bar.close()
    seconds = time.time() - t0
    after = heldout_loss(split, held, cfg.batch_size)
    log(f"warm start: held-out loss {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.1f} -> "
        f"{math.exp(after):.1f}) in {seconds:.0f}s")
    model.requires_grad_(True)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"heldout_loss_before": before, "heldout_loss_after": after, "heldout_perplexity_before": math.exp(before),
            "heldout_perplexity_after": math.exp(after), "steps": step + 1, "planned_steps": steps, "cut_by_time": step + 1 < steps, "rows": len(rows),
            "tokens": (step + 1) * cfg.batch_size * cfg.window, "train_seconds": seconds, "base": str(base),
            "config": asdict(cfg)}
