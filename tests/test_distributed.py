"""agents.ppo under torchrun (CPU, gloo, 2 processes): averaged gradients, learning, rank-0 files, failures.

Each test launches `torchrun --nproc-per-node 2` on this file (the `__main__` block at the bottom holds the
rank-side code) or on `-m agents.ppo` through conftest's `torchrun` fixture, with a deadline so a hang fails
instead of blocking the suite.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch


def cartpole_args(run_dir: Path, **kw):
    from agents.ppo import Args

    base = dict(num_envs=2, num_steps=32, total_timesteps=512, num_minibatches=2, update_epochs=2, eval_episodes=0,
                log_every=0, save_every=0, torch_threads=1, device="cpu", run_dir=str(run_dir))
    return Args(**{**base, **kw})


# ---- what each rank runs (python tests/test_distributed.py CASE DIR, under torchrun) ------------------------


# `python -m agents.ppo --env-id tests.test_distributed:HangsOnRank1-v0`: gymnasium imports this module first
gym.register("HangsOnRank1-v0", entry_point="tests.tiny:OnRank1", kwargs={"fault": "hang"})


def _rank_main(case: str, out: Path) -> None:
    from agents import distributed
    from agents.ppo import train

    if case.startswith("grad"):
        from tiny import (
            update_on,  # here: gymnasium imports this module by name (--env-id), tests/ off the path
        )
  # grad:VALID:flat|env
        _, valid, minibatches = case.split(":")
        d, _ = distributed.setup("cpu")
        half = 4 // d.world_size
        state, stats = update_on(slice(d.rank * half, (d.rank + 1) * half), d, valid, minibatches == "env")
        torch.save({"state": state, "stats": stats}, out / f"rank{d.rank}.pt")
        distributed.cleanup(d)
        distributed.exit_worker(0)
    elif case in ("raise", "exit"):  # rank 1's env breaks at its 5th step; rank 0 is fine

        class Breaks(gym.Wrapper):
            n = 0

            def step(self, action):
                Breaks.n += 1
                if Breaks.n == 5 and os.environ["RANK"] == "1":
                    if case == "exit":
                        os._exit(3)  # dies without a word, as when the OOM killer strikes
                    raise RuntimeError("rank 1's env broke on purpose")
                return super().step(action)

        envs = gym.vector.SyncVectorEnv([lambda: Breaks(gym.make("CartPole-v1"))] * 2)
        d, _ = distributed.setup("cpu")
        train(cartpole_args(out / "run", total_timesteps=100_000), envs=envs, dist=d)


if __name__ == "__main__":
    _rank_main(sys.argv[1], Path(sys.argv[2]))


# ---- the tests --------------------------------------------------------------------------------------------


@pytest.mark.slow  # torchrun launches
@pytest.mark.filterwarnings("ignore:PPO ratio at the first minibatch")  # logprobs made up: ratios != 1, clipped
@pytest.mark.parametrize("valid, minibatches", [("all", "flat"), ("uneven", "flat"), ("uneven", "env"),
                                                ("one rank empty", "flat")])
def test_two_ranks_with_half_the_batch_each_update_like_one_process_with_all_of_it(tmp_path, valid, minibatches,
                                                                                     torchrun):
    # every step weighs the same whichever rank holds it: each rank's loss is its share of the mean over all
    # ranks' steps, and the advantages are normalised over all of them
    from agents.distributed import Dist
    from tiny import update_on

    run = torchrun(__file__, f"grad:{valid}:{minibatches}", str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    full_state, full_stats = update_on(slice(0, 4), Dist(), valid, minibatches == "env")
    for r in ranks:
        for k, v in full_state.items():
            torch.testing.assert_close(r["state"][k], v, atol=1e-6, rtol=1e-5)
        assert r["stats"]["losses/approx_kl"] == pytest.approx(full_stats["losses/approx_kl"], abs=1e-6)
        assert r["stats"]["losses/value_loss"] == pytest.approx(full_stats["losses/value_loss"], rel=1e-5)
    from agents.policies import MLPAgent

    torch.manual_seed(0)
    init = MLPAgent(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2)).state_dict()
    moved = max((full_state[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3  # the check above compares real steps, not untouched weights
    # and half the batch alone (no averaging) would have given something else
    half_state, _ = update_on(slice(0, 2), Dist(), valid, minibatches == "env")
    assert max((half_state[k] - full_state[k]).abs().max().item() for k in init) > 1e-4


@pytest.mark.slow
def test_only_rank_0_writes_files_and_checkpoints_resume_across_world_sizes(tmp_path, torchrun):
    from agents.checkpoint import load_checkpoint
    from agents.ppo import train

    # 2 ranks x 2 envs x 32 steps = 128 steps per iteration; 4 iterations
    run = torchrun("-m", "agents.ppo", "--num-envs", "2", "--num-steps", "32", "--total-timesteps", "512",
                   "--num-minibatches", "2", "--run-dir", "d", "--eval-episodes", "2", "--save-every", "1",
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # nothing else (no runs/ of another rank)
    files = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert len(files) == 2 and files[0] == "checkpoint.pt" and files[1].startswith("events.out.tfevents"), files
    assert run.stdout.count("eval:") == 1 and run.stdout.count("iter 4/4") == 1  # rank 0 logs and evaluates
    ckpt = load_checkpoint(tmp_path / "d" / "checkpoint.pt")
    assert (ckpt["global_step"], ckpt["world_size"], ckpt["num_envs"]) == (512, 2, 2)

    # the 2-rank checkpoint resumes in one process: same global step, this run's iteration size (64 steps)
    hook_iters = []

    class Hook:
        def on_iteration(self, iteration, global_step, rollout, writer):
            hook_iters.append((iteration, global_step))

    res = train(cartpole_args(tmp_path / "d", total_timesteps=768, resume=True), hooks=Hook())
    assert hook_iters == [(9, 576), (10, 640), (11, 704), (12, 768)] and res["world_size"] == 1

    # and a 1-process checkpoint resumes under torchrun
    train(cartpole_args(tmp_path / "s", total_timesteps=256))
    run = torchrun("-m", "agents.ppo", "--num-envs", "2", "--num-steps", "32", "--total-timesteps", "512",
                   "--num-minibatches", "2", "--run-dir", "s", "--resume", "--eval-episodes", "0", "--log-every", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("resumed") == 1 and "iter 4/4 step 512" in run.stdout
    assert load_checkpoint(tmp_path / "s" / "checkpoint.pt")["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("case", ["raise", "exit"])
def test_a_failing_rank_stops_the_whole_job_quickly_with_a_clear_error(tmp_path, case, torchrun):
    t0 = time.time()
    run = torchrun(__file__, case, str(tmp_path), cwd=tmp_path, timeout=90)  # a hang fails with TimeoutExpired
    assert run.returncode != 0
    assert time.time() - t0 < 60
    out = run.stdout + run.stderr
    assert "ChildFailedError" in out or "failed" in out.lower()
    assert "rank    : 1" in out or "rank: 1" in out, out[-3000:]  # torchrun names the failed rank
    if case == "raise":
        assert "rank 1's env broke on purpose" in out  # ... and its traceback
    else:
        assert "exitcode  : 3" in out or "exitcode: 3" in out, out[-3000:]


@pytest.mark.slow
def test_a_hung_rank_is_stopped_by_dist_timeout(tmp_path, torchrun):
    t0 = time.time()
    run = torchrun("-m", "agents.ppo", "--env-id", "tests.test_distributed:HangsOnRank1-v0", "--dist-timeout", "5",
                   "--num-envs", "2", "--total-timesteps", "100000", "--run-dir", "h", "--eval-episodes", "0",
                   cwd=tmp_path, timeout=90)  # without the timeout rank 0 would wait in the all-reduce for 600 s
    out = run.stdout + run.stderr
    assert run.returncode != 0 and time.time() - t0 < 60, out[-3000:]
    assert "rank    : 0" in out or "rank: 0" in out, out[-3000:]  # rank 0 gave up waiting, and torchrun says so
    assert "Timed out waiting 5000ms" in out, out[-3000:]  # gloo's words for --dist-timeout 5


@pytest.mark.slow
def test_two_rank_cartpole_learns(tmp_path, torchrun):
    from agents.checkpoint import load_checkpoint

    # the zoo preset's batch (8 envs x 32 steps) as 2 ranks x 4 envs
    run = torchrun("-m", "agents.ppo", "zoo", "--num-envs", "4", "--total-timesteps", "25600",
                   "--run-dir", "z", "--eval-episodes", "4", "--log-every", "50", cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("iter 100/100") == 1, run.stdout[-2000:]
    # the returns of both ranks' last 10 episodes, from the checkpoint: the progress line's `return` is `n/a`
    # when an iteration finishes no episode, so nothing is parsed from it
    ckpt = load_checkpoint(tmp_path / "z" / "checkpoint.pt")
    last = [ret for _, ret in ckpt["episode_returns"][-10:]]
    evals = float(run.stdout.split("eval:")[1].split()[0])  # always a number (eval_episodes > 0)
    assert ckpt["global_step"] == 25_600 and np.mean(last) > 100 and evals > 100, (last, run.stdout[-2000:])


def test_single_process_needs_no_launcher_and_reports_world_size_1(tmp_path):
    from agents.ppo import train

    res = train(dataclasses.replace(cartpole_args(tmp_path / "one"), total_timesteps=128))
    assert (res["rank"], res["world_size"], res["global_step"]) == (0, 1, 128)
    assert np.isfinite(res["sps"])
