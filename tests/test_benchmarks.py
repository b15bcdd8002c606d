"""benchmarks/ppo_iteration.py at a tiny size: its phase split adds up to the iteration it times."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def ppo_iteration():
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import `_common` by its bare name
    try:
        import ppo_iteration

        yield ppo_iteration
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_ppo_iteration_split_adds_up(ppo_iteration, tmp_path):
    args = ppo_iteration.Args(preset="tiny", batch=4, prompt_tokens=2, new_tokens=4, min_tokens=2, epochs=1,
                              warmup=1, rounds=2, texts=200, threads=1, out=str(tmp_path / "ppo_iteration.json"))
    ppo_iteration.main(args)
    results = json.loads((tmp_path / "ppo_iteration.json").read_text())["results"]
    for case in ("fixed", "realistic"):
        rec = results[case]
        for r in rec["per_round"]:
            parts = [r[k] for k in ppo_iteration.PHASES]
            assert math.isclose(sum(parts), r["total"], rel_tol=1e-9, abs_tol=1e-12)
            assert min(parts) > -1e-3  # `rollout: other` is a remainder: timer noise only
            assert all(r[k] > 0 for k in ("rollout: policy", "rollout: env", "rollout: reference", "update"))
        assert math.isclose(sum(rec["mean_split_s"].values()), rec["mean_s"], rel_tol=1e-9)
        assert rec["ratio_to_floor"] > 0
    assert results["fixed"]["tokens_per_iteration"] == 4 * 4  # 4 episodes x 4 tokens; the reset step is not one
    assert results["realistic"]["tokens_per_iteration"] <= 4 * 4
    assert results["floor"]["median_s"] > 0
    assert len(results["train_check_s_per_iteration"]) == args.warmup + args.rounds - 2
