"""Does it learn: `agents.ppo` with a tiny GPTAgent (from scratch) improves its success rate on the calculator tool
and on the guessing game (textenv.tasks) within 16k env steps (~30 s of PPO each on 2 CPU cores). The numbers of
longer runs are in benchmarks/results/tools.json (`python benchmarks/tools.py`)."""

from __future__ import annotations

import pytest

from agents.worked_examples import run


@pytest.mark.slow
@pytest.mark.parametrize("task, gain", [("calculator", 0.15), ("guessing", 0.1)])
def test_ppo_improves_on_the_worked_examples(task, gain):
    r = run(task, steps=16_384, episodes=200, seed=0)
    print(task, r)  # calculator 0.005 -> 0.29, guessing 0.365 -> 0.58 (stderr ~0.035-0.05)
    assert r["after"] > r["before"] + gain, r
