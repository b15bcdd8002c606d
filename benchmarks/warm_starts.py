"""Warm starts before any RL: what each candidate start of the `smollm2` preset writes, side by side.

The reader's fluency after RL has never gone clearly above the start's, so the start is measured first. For each
candidate (`--layers`: how many of SmolLM2's 30 decoder blocks the warm start fine-tunes, the rest of its work
fixed) the warm start is built or reused (`textenv.build`, cached), and samples one response per held-out prompt at
the preset's temperature through the report's env, with the same seed for every candidate. A row gives the warm
start's held-out perplexity on review openings, its build time, and the report's measures of the samples (reward
model and judge positive rates, distinct-2, identical responses, perplexity under the original LM, the share that
names a film), beside real held-out reviews cut to the same lengths.

`samples` pairs the first candidate's text ("before") with the second's ("after") per prompt, so
`../shared/tools/blind_reading.py prepare` reads them blind, shuffled together.

    python benchmarks/warm_starts.py                      # 4 blocks (the earlier preset) against all 30 (the preset)
    python benchmarks/warm_starts.py --layers 4 12 --prompts 64 --out /tmp/w.json
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import tyro
from _common import IMDB_DIR, print_table, target, write_result
from temperature import KEYS  # the same measures of the samples as the temperature table

from agents.rlhf import prepare
from agents.rlhf.config import smollm2
from agents.rlhf.job import held_out
from agents.rlhf.report import Samples, evaluate_held_out
from agents.rlhf.yardstick import yardstick
from agents.vector import resolve_device


@dataclass
class Args:
    layers: tuple[int, ...] = (4, 30)
    """candidates: decoder blocks each warm start fine-tunes (the first is "before" in `samples`, the second
    "after")"""
    temperature: float | None = None
    """sampling temperature (None: the preset's)"""
    prompts: int = 256
    """held-out prompts (one response each per candidate)"""
    seed: int = 1
    """the prompts' and the sampling's seed"""
    data_dir: str = str(IMDB_DIR)
    """IMDb as gzipped JSON Lines"""
    out: str | None = None
    """JSON path (default benchmarks/results/warm_starts.json)"""


def measure(cfg, layers: int) -> tuple[dict, Samples, dict]:
    """Build or reuse the warm start that tunes `layers` blocks; its row, its samples, and real reviews' measures
    at the same lengths."""
    cfg = dataclasses.replace(cfg, warm_start_layers=layers)
    pieces = prepare(cfg, resolve_device("cpu"))
    t0, evaluation = time.time(), held_out(cfg, pieces)
    metrics, samples = evaluate_held_out(pieces.policy, pieces.policy, evaluation)
    built = pieces.info["warm_start"]
    row = {"layers": layers, **{k: metrics.get(k) for k in KEYS}, "names_a_film": metrics["on_topic_rate"],
           "heldout_perplexity": built["heldout_perplexity_after"], "build_seconds": built["build_seconds"],
           "warm_start": built["path"], "sample_seconds": time.time() - t0}
    return row, samples, yardstick(evaluation, samples)


def main(a: Args) -> None:
    if len(a.layers) < 2:
        raise SystemExit(f"--layers {a.layers}: name at least two candidates to compare")
    cfg = smollm2()
    cfg = dataclasses.replace(cfg, data_dir=a.data_dir, eval_prompts=a.prompts,
                              temperature=a.temperature or cfg.temperature,
                              ppo=dataclasses.replace(cfg.ppo, seed=a.seed))
    measured = [measure(cfg, k) for k in a.layers]
    rows, real = [m[0] for m in measured], measured[0][2]
    cols = ["layers", "heldout_perplexity", *KEYS, "names_a_film"]
    print_table(cols, [[r[c] for c in cols] for r in rows] + [["real reviews", None, *(real.get(k) for k in KEYS), None]])
    d2 = real["distinct_2"]
    targets = [target(f"distinct_2_ratio_to_real_layers{r['layers']}", r["distinct_2"] / d2, ">= 0.8",
                      r["distinct_2"] >= 0.8 * d2) for r in rows]
    first, second = measured[0][1], measured[1][1]
    samples = [{"prompt": p, "before": b, "after": f}
               for p, b, f in zip(first.prompts, first.completions, second.completions, strict=True)]
    path = write_result("warm_starts", {"rows": rows, "real_reviews": real, "prompts": a.prompts,
                                        "temperature": cfg.temperature, "samples": samples}, targets, quick=False,
                        out=a.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
