"""Offline models on real IMDb: small GPT (perplexity vs a unigram baseline, samples), reward model from
scratch (test accuracy within a 10-minute training budget), held-out judge; wall time of every stage.

    python benchmarks/models.py            # full run: ~25-35 min on 2 CPU cores
    python benchmarks/models.py --quick    # a couple of minutes, smoke only

It runs exactly what `python -m textenv.build all imdb` runs (the "imdb" preset),
rebuilding every artefact (`force=True`) into a scratch folder, and reads each stage's `build.json`.
Reward model: all of IMDb train (25,000 reviews); judge: the first half of IMDb test (seeded, class by class);
both scored on the second half of IMDb test (12,500 reviews), which neither trains on.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import IMDB_DIR, print_table, target, write_result  # noqa: E402

from textenv.build.pipeline import Artifacts, BuildArgs, build, preset  # noqa: E402

IMDB = IMDB_DIR


@dataclass
class Args:
    """Benchmark settings."""

    data_dir: str = str(IMDB)
    """IMDb copy (JSON Lines folder or aclImdb/)"""
    quick: bool = False
    """minutes-long smoke run (short budgets, 4,000 test reviews); its JSON says quick: true"""
    out: str | None = None
    """result JSON path (default benchmarks/results/models.json)"""
    work_dir: str | None = None
    """where artefacts are built (default: a temporary folder)"""
    gpt_model: str = "small"
    """GPT size (textenv.build.pretrain.SIZES) or a hub name / local path"""
    gpt_minutes: float = 10.0
    """GPT pretraining budget"""
    reward_minutes: float = 10.0
    """reward-model training budget"""
    test_limit: int | None = None
    """test reviews scored (None: all 25,000)"""


def build_config(args: Args) -> BuildArgs:
    """The "imdb" preset with this run's data, budgets and work folder, forced to rebuild every artefact."""
    base = preset("imdb")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="textenv-models-"))
    return dataclasses.replace(
        base, data_dir=args.data_dir, out_dir=str(work), force=True, test_limit=args.test_limit,
        gpt=dataclasses.replace(base.gpt, model=args.gpt_model, max_minutes=args.gpt_minutes,
                                tensorboard=False),
        reward=dataclasses.replace(base.reward, max_minutes=args.reward_minutes),
        judge=dataclasses.replace(base.judge, epochs=2 if args.quick else base.judge.epochs))


def reward_judge_agreement(args: Args, cfg: BuildArgs, paths: Artifacts) -> float:
    """Share of the scored test reviews that the reward model and the judge put in the same class."""
    # the same test reviews for both classifiers (they never shared training data)
    from textenv.build.pipeline import eval_split
    from textenv.build.reward_train import predict

    test = eval_split(args.data_dir, args.test_limit)[1]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(paths.reward)
    rm_pos = predict(model, AutoTokenizer.from_pretrained(paths.reward), test.texts, cfg.reward.max_length,
                     cfg.reward.head_fraction) > 0.5
    judge_pos = [p > 0.5 for p in paths.load_judge()(test.texts)]
    return sum(int(a) == int(b) for a, b in zip(rm_pos.tolist(), judge_pos, strict=True)) / len(test)


def model_results(rec: dict[str, dict], cfg: BuildArgs, agreement: float, stages: dict[str, float],
                  total: float) -> dict:
    """The JSON results: each model's metrics, the agreement, every stage's seconds and the configs."""
    gpt, rm, judge = rec["gpt"]["metrics"], rec["reward"]["metrics"], rec["judge"]["metrics"]
    return {
        "gpt": {k: gpt[k] for k in ("model", "params", "steps", "train_tokens", "tokens_per_s",
                                    "train_seconds", "heldout_perplexity", "unigram_perplexity", "samples",
                                    "samples_top_k50")},
        "reward": {k: rm[k] for k in ("params", "steps", "epochs_done", "train_texts", "test_texts",
                                      "test_accuracy", "train_seconds", "eval_seconds")},
        "judge": judge,
        "reward_judge_agreement": agreement,
        "tokenizer_vocab": rec["tokenizer"]["metrics"]["vocab_size"],
        "stage_seconds": stages | {"total": round(total, 1)},
        "configs": {"gpt": dataclasses.asdict(cfg.gpt), "reward": dataclasses.asdict(cfg.reward),
                    "judge": dataclasses.asdict(cfg.judge), "tokenizer": dataclasses.asdict(cfg.tokenizer)},
        "torch_threads": __import__("torch").get_num_threads(),
    }


def print_summary(rec: dict[str, dict], agreement: float, stages: dict[str, float]) -> None:
    """Print each stage's headline metric beside its reference and seconds, then the GPT's samples."""
    gpt, rm, judge = rec["gpt"]["metrics"], rec["reward"]["metrics"], rec["judge"]["metrics"]
    print()
    print_table(["stage", "what", "project", "reference", "seconds"], [
        ["tokenizer", "BPE vocab", rec["tokenizer"]["metrics"]["vocab_size"], "-", stages["tokenizer"]],
        ["pretrain", "held-out perplexity", gpt["heldout_perplexity"],
         f"unigram {gpt['unigram_perplexity']:.1f}", stages["gpt"]],
        ["pretrain", "tokens/s", gpt["tokens_per_s"], "-", gpt["train_seconds"]],
        ["reward", "test accuracy", rm["test_accuracy"], "target 0.85", stages["reward"]],
        ["judge", "test accuracy", judge["test_accuracy"], "-", stages["judge"]],
        ["both", "reward/judge agreement", agreement, "-", "-"],
    ])
    for s, s_k in zip(gpt["samples"], gpt.get("samples_top_k50", gpt["samples"]), strict=True):
        print(f"sample (pure): {s}\nsample (top-50): {s_k}")


def model_targets(rec: dict[str, dict]) -> list[dict]:
    """The targets: reward-model test accuracy within its budget, GPT perplexity under the unigram one."""
    gpt, rm = rec["gpt"]["metrics"], rec["reward"]["metrics"]
    return [
        target("reward_test_accuracy", rm["test_accuracy"], ">= 0.85 with <= 600 s training",
               rm["test_accuracy"] >= 0.85 and rm["train_seconds"] <= 600 + 30),
        target("gpt_perplexity_vs_unigram", gpt["heldout_perplexity"] / gpt["unigram_perplexity"], "< 1.0",
               gpt["heldout_perplexity"] < gpt["unigram_perplexity"]),
    ]


def main(args: Args) -> dict:
    """Build every artefact, score the reward model against the judge, print the table, write the JSON."""
    if not Path(args.data_dir).is_dir():
        sys.exit(f"IMDb not found at {args.data_dir}; pass --data-dir (see ../shared/data/imdb/README.md)")
    if args.quick:
        args = dataclasses.replace(args, gpt_minutes=1.0, reward_minutes=1.5,
                                   test_limit=args.test_limit or 4000)  # fmt: skip
    cfg = build_config(args)
    t0 = time.time()
    paths = build(cfg)
    total = time.time() - t0
    rec = {k: json.loads((Path(p) / "build.json").read_text()) for k, p in dataclasses.asdict(paths).items()}
    agreement = reward_judge_agreement(args, cfg, paths)

    stages = {k: round(v["seconds"], 1) for k, v in rec.items()}
    results = model_results(rec, cfg, agreement, stages, total)
    print_summary(rec, agreement, stages)
    targets = model_targets(rec)
    path = write_result("models", results, targets, args.quick, args.out)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
