"""GPT-2-architecture language-model pretraining (nanoGPT-style loop on `transformers.GPT2LMHeadModel`).

Texts are tokenized, each followed by EOS, and packed into one token stream; a step trains on
`batch_size` random windows of `block_size` tokens. AdamW, linear warmup then cosine decay, gradient
clipping, bf16 autocast on CUDA. Every `eval_every` steps: held-out perplexity; at the end also a unigram
baseline's perplexity on the same tokens (what "knowing only word frequencies" scores) and a few samples.
A checkpoint (`<out>/checkpoint/`) every `save_every` steps makes the run resumable; the final model is
saved with `save_pretrained` (safetensors) together with its tokenizer and `metrics.json`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
)

# name -> (n_layer, n_embd, n_head)
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 64, 2),  # tests: seconds
    "mini": (4, 128, 4),  # the embedded corpus: a couple of minutes on 2 busy CPU cores
    "small": (4, 256, 4),  # 2 CPU cores: ~4M parameters with a 4k vocabulary
    "gpt2": (12, 768, 12),  # GPT-2 124M, for a GPU
}


@dataclass
class PretrainConfig:
    """Settings of one pretraining run."""

    model: str = "small"
    """a size from SIZES (trained from scratch) or a hub name / local path (continued with from_pretrained)"""
    block_size: int = 128
    """tokens per training window; also n_positions of a from-scratch model"""
    batch_size: int = 16
    """windows per step"""
    max_steps: int = 1500
    """optimizer steps"""
    lr: float = 1e-3
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of `lr` (cosine decay)"""
    warmup_steps: int = 100
    """linear warmup steps"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only, not biases/LayerNorm)"""
    grad_clip: float = 1.0
    """max gradient norm"""
    dropout: float = 0.0
    """dropout of a from-scratch model (0 keeps the frozen reference deterministic either way)"""
    eval_every: int = 250
    """steps between held-out evaluations"""
    eval_windows: int = 256
    """held-out windows per evaluation"""
    log_every: int = 50
    """steps between progress lines"""
    save_every: int = 500
    """steps between resumable checkpoints (0: never)"""
    max_minutes: float | None = None
    """stop early (cleanly, with a saved model) after this much training time"""
    n_samples: int = 4
    """sample generations printed at the end"""
    seed: int = 0
    """torch seed (init and batch order)"""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda" """
    tensorboard: bool = True
    """write TensorBoard scalars to <out>/tb"""


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; anything else as torch.device. The model factory's one device
    rule (reward_train uses it too); agents.vector has the same rule for the agents side, which textenv
    cannot import (agents -> textenv, never back)."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def load_lm(name_or_path: str, tokenizer: PreTrainedTokenizerBase | None = None, block_size: int = 128,
            dropout: float = 0.0) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A fresh model of size `name_or_path` for `tokenizer`, or a saved one (hub name / local dir) with its tokenizer."""
    if name_or_path in SIZES:
        if tokenizer is None:
            raise ValueError(f"model size '{name_or_path}' is trained from scratch and needs a tokenizer; "
                             "train one with textenv.build.bpe.train_bpe")
        n_layer, n_embd, n_head = SIZES[name_or_path]
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                         n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
        return GPT2LMHeadModel(cfg), tokenizer
    model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=False)
    tok = tokenizer or AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    if tok.pad_token is None:  # GPT-2's hub tokenizer has none; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise ValueError(f"tokenizer has {len(tok)} tokens but {name_or_path} embeds only "
                         f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer")
    return model, tok


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """All texts tokenized, each followed by EOS, concatenated: (N,) long."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(texts), 1000):
        for row in tokenizer(texts[start:start + 1000], add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on `train`, on `heldout` tokens."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[heldout].mean().item())


def lr_at(step: int, cfg: PretrainConfig, time_frac: float = 0.0) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps` (or, with a time budget,
    at the budget's end if that comes first: `time_frac` is the share of `max_minutes` used)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, max(time_frac, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) over held-out windows (W, T)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)  # (B, T)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x).logits.float()  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        total, n = total + loss.item(), n + x[:, 1:].numel()
    model.train(was_training)
    return total / max(1, n)


@torch.no_grad()
def sample_texts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int = 40,
           device: torch.device | None = None, seed: int = 0, top_k: int = 0) -> list[str]:
    """Sampled continuations of `prompts` (temperature 1; `top_k=0` is pure sampling, as RLHF rollouts use),
    decoded with the prompt."""
    device = device or next(model.parameters()).device
    torch.manual_seed(seed)
    model.eval()
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        room = getattr(model.config, "n_positions", 1024) - ids.shape[1]
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k, top_p=1.0,
                             max_new_tokens=max(1, min(max_new_tokens, room)),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    return out


def pretrain(cfg: PretrainConfig, train_texts: list[str], heldout_texts: list[str], out_dir: str | Path,
             tokenizer: PreTrainedTokenizerBase | None = None, sample_prompts: list[str] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Train (or resume) a causal LM on `train_texts`; save it, its tokenizer and `metrics.json` to `out_dir`.

    Returns the metrics: held-out loss/perplexity, unigram perplexity, tokens/s, wall time, samples.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_lm(cfg.model, tokenizer, cfg.block_size, cfg.dropout)
    block = min(cfg.block_size, getattr(model.config, "n_positions", cfg.block_size))
    model.to(device).train()
    t0 = time.time()
    train_ids, held = _token_data(tokenizer, train_texts, heldout_texts, block, cfg.eval_windows)
    log(f"pretrain {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{len(train_ids):,} train / {held.numel():,} held-out tokens, vocab {len(tokenizer)}, device {device}")

    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = ckpt_dir(out)
    step, history = _restore(ckpt, model, opt, gen, log)
    writer = _tensorboard(out / "tb") if cfg.tensorboard else None
    tokens_seen, t_train, t_last = 0, 0.0, time.time()
    while step < cfg.max_steps:
        time_frac = t_train / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, time_frac)
        starts = torch.randint(0, len(train_ids) - block, (cfg.batch_size,), generator=gen)
        x = torch.stack([train_ids[s:s + block] for s in starts.tolist()]).to(device)  # (B, T)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        now = time.time()
        t_train, t_last = t_train + now - t_last, now
        _log_step(cfg, step, loss.item(), opt.param_groups[0]["lr"], tokens_seen / max(t_train, 1e-9), t_train,
                  writer, log)
        stop = cfg.max_minutes is not None and t_train > 60 * cfg.max_minutes
        if step % cfg.eval_every == 0 or step == cfg.max_steps or stop:
            held_loss = heldout_loss(model, held, cfg.batch_size * 2, device)
            history.append({"step": step, "train_loss": loss.item(), "heldout_loss": held_loss})
            log(f"step {step}: held-out loss {held_loss:.3f}, perplexity {math.exp(held_loss):.1f}")
            if writer is not None:
                writer.add_scalar("eval/heldout_perplexity", math.exp(held_loss), step)
            t_last = time.time()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps and not stop:
            _save_checkpoint(ckpt, model, opt, gen, step, history)
            t_last = time.time()
        if stop:
            log(f"stopping at step {step}: max_minutes={cfg.max_minutes} reached")
            break
    run = {"step": step, "history": history, "tokens_seen": tokens_seen, "t_train": t_train, "t0": t0}
    data = _Data(train_ids, held, heldout_texts, sample_prompts)
    return _finish(model, tokenizer, cfg, out, data, run, writer, log)


def _tensorboard(folder: Path):
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

    return SummaryWriter(str(folder))


def _log_step(cfg: PretrainConfig, step: int, loss: float, lr: float, tokens_per_s: float, t_train: float, writer,
              log: Callable[[str], None]) -> None:
    """TensorBoard scalars of a step, and every `log_every` steps a progress line with throughput."""
    if writer is not None:
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/lr", lr, step)
    if step % cfg.log_every == 0 or step == cfg.max_steps:
        log(f"step {step}/{cfg.max_steps} | loss {loss:.3f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s | {t_train:.0f}s")


def _token_data(tokenizer: PreTrainedTokenizerBase, train_texts: list[str], heldout_texts: list[str], block: int,
                eval_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the training token stream, non-overlapping held-out windows (W, block)), or a clear error on too little."""
    train_ids, held_ids = token_stream(tokenizer, train_texts), token_stream(tokenizer, heldout_texts)
    if len(train_ids) <= block + 1 or len(held_ids) <= block:
        raise ValueError(f"too little text for block_size={block}: {len(train_ids)} training and {len(held_ids)} "
                         "held-out tokens; pass more texts or a smaller block_size")
    n_win = min(eval_windows, len(held_ids) // block)
    return train_ids, held_ids[: n_win * block].view(n_win, block)


def _restore(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
             log: Callable[[str], None]) -> tuple[int, list]:
    """(step, history) of an interrupted run's checkpoint, its model, optimizer and data order restored; (0, [])
    without one."""
    if not (ckpt / "state.pt").exists():
        return 0, []
    model.load_state_dict(type(model).from_pretrained(ckpt).state_dict())
    state = torch.load(ckpt / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    log(f"resumed from {ckpt} at step {int(state['step'])}")
    return int(state["step"]), json.loads(state["history"])


def _save_checkpoint(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                     step: int, history: list) -> None:
    model.save_pretrained(ckpt)
    torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step,
                "history": json.dumps(history)}, ckpt / "state.pt")


@dataclass
class _Data:
    """What `pretrain` trained and evaluated on, and the texts its samples start from."""

    train_ids: torch.Tensor
    """(N,) the training token stream"""
    held: torch.Tensor
    """(W, block) the held-out windows"""
    heldout_texts: list[str]
    sample_prompts: list[str] | None
    """the samples' prompts (None: the openings of the held-out texts)"""


def _finish(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: PretrainConfig, out: Path, data: _Data,
            run: dict, writer, log: Callable[[str], None]) -> dict:
    """Samples and metrics of the trained model; save model, tokenizer and `metrics.json`, drop the checkpoint."""
    device, history, step = next(model.parameters()).device, run["history"], run["step"]
    train_ids, held, heldout_texts, sample_prompts = data.train_ids, data.held, data.heldout_texts, data.sample_prompts
    held_loss = history[-1]["heldout_loss"] if history else heldout_loss(model, held, cfg.batch_size * 2, device)
    prompts = (sample_prompts or [t[:20] for t in heldout_texts])[: cfg.n_samples]
    samples = sample_texts(model, tokenizer, prompts, device=device, seed=cfg.seed)
    samples_top_k = sample_texts(model, tokenizer, prompts, device=device, seed=cfg.seed + 1, top_k=50)
    for s, s_k in zip(samples, samples_top_k, strict=True):
        log(f"  sample (pure): {s!r}\n  sample (top-50): {s_k!r}")
    metrics = {
        "model": cfg.model, "params": sum(p.numel() for p in model.parameters()), "steps": step,
        "heldout_loss": held_loss, "heldout_perplexity": math.exp(held_loss),
        "unigram_perplexity": unigram_perplexity(train_ids, held[:, 1:].reshape(-1), len(tokenizer)),
        "train_tokens": run["tokens_seen"], "tokens_per_s": run["tokens_seen"] / max(run["t_train"], 1e-9),
        "train_seconds": run["t_train"], "wall_seconds": time.time() - run["t0"], "history": history,
        "samples": samples, "samples_top_k50": samples_top_k, "config": asdict(cfg), "device": str(device),
    }
    log(f"held-out perplexity {metrics['heldout_perplexity']:.1f} vs unigram {metrics['unigram_perplexity']:.1f}")
    if writer is not None:
        writer.add_text("samples", "\n\n".join(samples), step)
        writer.close()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(ckpt_dir(out), ignore_errors=True)
    return metrics


def ckpt_dir(out: Path) -> Path:
    """Where `pretrain` keeps an interrupted run's checkpoint inside `out`."""
    return out / "checkpoint"
