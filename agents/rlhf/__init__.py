"""The RLHF job: a GPT policy tuned by PPO inside TextEnv against a sentiment reward model (`python -m agents.rlhf`).

    config.py   RLHFConfig and its presets
    pieces.py   load what the flags name, check it, build (or reuse) the rest with textenv.build
    job.py      run(): environment, reference, GPTAgent, agents.ppo.train, report
    logger.py   the per-iteration hook: text metrics, samples, progress line
    signals.py  over-optimisation signals: distinct-n, repetition, saturation, the judge's gap; their warnings
    report.py   before/after evaluation; Markdown, JSON and PNG
    baselines.py  best-of-n of the initial policy, the baseline a run must beat
    yardstick.py  real reviews cut to the episodes' lengths, scored like the samples
"""

from agents.rlhf.config import PRESETS, RLHFConfig, embedded, imdb, smollm2
from agents.rlhf.job import main, parse_args, run
from agents.rlhf.pieces import Pieces, cut_queries, prepare

__all__ = ["PRESETS", "Pieces", "RLHFConfig", "cut_queries", "embedded", "imdb", "main", "parse_args", "prepare", "run",
           "smollm2"]
