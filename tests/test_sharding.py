"""PPO with the agent sharded by FSDP2 (`--shard`, agents.sharding) under torchrun on CPU (gloo, 2 processes):
the same numbers as unsharded, one all-gather per unit per rollout, checkpoints that reshard, two "nodes" on one
machine, and failures that behave as unsharded. The tests that launch torchrun are slow; the `__main__` block at the
bottom holds the rank-side code of the cases that need more than the CLI. The checkpoint format itself is tested in
one process, fast."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

CARTPOLE = ["--num-envs", "2", "--num-steps", "32", "--num-minibatches", "2", "--update-epochs", "2",
            "--torch-threads", "1", "--device", "cpu", "--log-every", "1", "--eval-episodes", "0"]


class NaNAfter(gym.Wrapper):
    """CartPole whose rewards turn NaN after 100 steps: the loss of the iteration after the second is NaN."""

    def __init__(self):
        super().__init__(gym.make("CartPole-v1"))
        self.n = 0

    def step(self, action):
        self.n += 1
        obs, rew, term, trunc, info = super().step(action)
        return obs, rew * np.nan if self.n > 100 else rew, term, trunc, info


gym.register("NaNAfter-v0", entry_point=NaNAfter)  # `--env-id tests.test_sharding:NaNAfter-v0`
gym.register("BreaksOnRank1-v0", entry_point="tests.tiny:OnRank1", kwargs={"fault": "raise"})


def gpt_gradients(rows: slice, shard: bool, dist=None) -> dict:
    """Whole gradients of a tiny Llama GPTAgent (top block over a frozen trunk) after one `evaluate_sequences` of
    env columns `rows` of a fixed batch of 2 columns, whose column 0 has no valid step."""
    from agents import sharding
    from agents.gpt_policy import GPTAgent
    from tiny import tiny_llama

    agent = GPTAgent(tiny_llama(20, layers=2), 0, trainable_layers=1)
    if shard:
        sharding.shard_agent(agent, dist)
    g = torch.Generator().manual_seed(0)
    obs, actions = torch.randint(1, 20, (3, 2, 6), generator=g), torch.randint(1, 20, (3, 2), generator=g)
    valid = torch.tensor([[False, True]] * 3)
    logprob, entropy, value = agent.evaluate_sequences(obs[:, rows], actions[:, rows], valid[:, rows])
    (logprob.sum() + entropy.sum() + value.sum()).backward()
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for n, p in agent.named_parameters() if p.requires_grad}
    return grads


# ---- what each rank runs (python tests/test_sharding.py CASE DIR [ARGS], under torchrun) ------------------------


def _count_gathers(out: Path, rank: int) -> None:
    """Count FSDP's all-gathers; after each PPO update write the count at its start and end to out/gathers{rank}."""
    import torch.distributed as tdist

    import agents.ppo

    counts, marks, gather, update = [0], [], tdist.all_gather_single, agents.ppo.update

    def counted(*args, **kwargs):
        counts[0] += 1
        return gather(*args, **kwargs)

    def marked(*args, **kwargs):
        start = counts[0]
        stats = update(*args, **kwargs)
        marks.append((start, counts[0]))
        (out / f"gathers{rank}.json").write_text(json.dumps(marks))
        return stats

    tdist.all_gather_single, agents.ppo.update = counted, marked


def _rank_main(case: str, out: Path, argv: list[str]) -> None:
    from agents import distributed

    if case.startswith("grad"):
        from tiny import (
            update_on,  # here: gymnasium imports this module by name (--env-id), tests/ off the path
        )
  # grad:VALID:flat|env, the agent sharded
        _, valid, minibatches = case.split(":")
        d, _ = distributed.setup("cpu")
        half = 4 // d.world_size
        state, stats = update_on(slice(d.rank * half, (d.rank + 1) * half), d, valid, minibatches == "env", shard=True)
        if d.is_main:
            torch.save({"state": state, "stats": stats}, out / "sharded.pt")
        distributed.cleanup(d)
        distributed.exit_worker(0)
    elif case == "gpt-no-steps":  # rank 0 holds column 0, which has no valid step; rank 1 column 1
        d, _ = distributed.setup("cpu")
        grads = gpt_gradients(slice(d.rank, d.rank + 1), shard=True, dist=d)
        if d.is_main:
            torch.save(grads, out / "grads.pt")
        distributed.cleanup(d)
        distributed.exit_worker(0)
    elif case in ("ppo", "rlhf"):  # python -m agents.ppo|agents.rlhf ARGS, FSDP's all-gathers counted
        import agents.ppo
        import agents.rlhf.job

        _count_gathers(out, int(os.environ["RANK"]))
        if case == "ppo":
            agents.ppo.main(argv)
        sys.argv = ["agents.rlhf", *argv]  # the job's main reads the command line
        agents.rlhf.job.main()
    elif case == "ctrl-c":  # Ctrl-C on rank 0 at the second iteration

        class CtrlC:
            def on_iteration(self, iteration, global_step, rollout, writer):
                if iteration == 2:
                    os.kill(os.getpid(), signal.SIGINT)

        from agents.ppo import parse_args, train

        args = parse_args(argv)
        d, _ = distributed.setup("cpu")
        result = train(args, dist=d, hooks=CtrlC())
        distributed.cleanup(d)
        distributed.exit_worker(130 if result["interrupted"] else 0)


if __name__ == "__main__":
    _rank_main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])


# ---- helpers -------------------------------------------------------------------------------------------------


def ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    return run


def ppo(torchrun, cwd: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun ... -m agents.ppo CARTPOLE ARGV` (through this file's rank-side code, which counts all-gathers)."""
    return torchrun(__file__, "ppo", str(cwd), *CARTPOLE, *argv, cwd=cwd, timeout=timeout)


def weights(run_dir: Path) -> dict:
    """The MLPAgent weights of the run's newest checkpoint, whole or sharded, loaded in this one process."""
    from agents.checkpoint import find_checkpoint, load_checkpoint, restore
    from agents.kl_control import make_kl_controller
    from agents.policies import MLPAgent

    env = gym.make("CartPole-v1")
    agent = MLPAgent(env.observation_space, env.action_space)
    ckpt = load_checkpoint(find_checkpoint(run_dir))
    restore(ckpt, agent, torch.optim.Adam(agent.parameters(), eps=1e-5), make_kl_controller("proportional", 0, None, 1))
    return agent.state_dict()


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def meta(run_dir: Path) -> dict:
    from agents.checkpoint import find_checkpoint, load_checkpoint

    return load_checkpoint(find_checkpoint(run_dir))


# ---- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a torchrun launch
@pytest.mark.filterwarnings("ignore:PPO ratio at the first minibatch")  # logprobs made up: ratios != 1, clipped
@pytest.mark.parametrize("valid, minibatches", [("all", "flat"), ("uneven", "env"), ("one rank empty", "flat")])
def test_sharded_two_ranks_update_like_one_process_with_the_whole_batch(tmp_path, valid, minibatches, torchrun):
    from agents.distributed import Dist
    from tiny import update_on

    ok(torchrun(__file__, f"grad:{valid}:{minibatches}", str(tmp_path), cwd=tmp_path))
    sharded = torch.load(tmp_path / "sharded.pt")
    whole, stats = update_on(slice(0, 4), Dist(), valid, minibatches == "env")
    assert_close(sharded["state"], whole, atol=1e-6)
    assert sharded["stats"]["losses/approx_kl"] == pytest.approx(stats["losses/approx_kl"], abs=1e-6)
    half, _ = update_on(slice(0, 2), Dist(), valid, minibatches == "env")  # what a rank's half alone gives
    assert max((half[k] - whole[k]).abs().max().item() for k in whole) > 1e-4


@pytest.mark.slow  # a torchrun launch
def test_sharded_cartpole_equals_data_parallel_and_checkpoints_reshard(tmp_path, torchrun):
    from agents.ppo import parse_args, train

    run = ["--total-timesteps", "512", "--save-every", "2"]  # 2 ranks x 2 envs x 32 steps: 4 iterations
    ok(ppo(torchrun, tmp_path, "--run-dir", "dp", *run))
    out = ok(ppo(torchrun, tmp_path, "--run-dir", "sh", "--shard", *run)).stdout
    assert "iter 4/4" in out
    assert sorted(p.name for p in (tmp_path / "sh").iterdir() if not p.name.startswith("events")) == ["checkpoint.dcp"]
    dp, sh = meta(tmp_path / "dp"), meta(tmp_path / "sh")
    assert sh["episode_returns"] == dp["episode_returns"] and sh["world_size"] == 2  # the same episodes
    assert_close(weights(tmp_path / "sh"), weights(tmp_path / "dp"))  # 2 ranks' shards loaded in 1 process

    # resumed sharded, from the sharded and from the whole checkpoint: the same run
    shutil.copytree(tmp_path / "sh", tmp_path / "sh1")
    more = ["--total-timesteps", "768", "--resume", "--shard"]
    ok(ppo(torchrun, tmp_path, "--run-dir", "sh", *more))
    ok(ppo(torchrun, tmp_path, "--run-dir", "dp", *more))  # whole -> sharded: its checkpoint.pt is replaced
    assert not (tmp_path / "dp" / "checkpoint.pt").exists() and meta(tmp_path / "dp")["global_step"] == 768
    assert meta(tmp_path / "sh")["episode_returns"] == meta(tmp_path / "dp")["episode_returns"]
    assert_close(weights(tmp_path / "sh"), weights(tmp_path / "dp"))

    # and the sharded checkpoint resumes in one process (its saved settings say --shard: nothing to shard)
    res = train(parse_args(["--run-dir", str(tmp_path / "sh1"), "--resume", "--total-timesteps", "640"]))
    assert (res["world_size"], res["global_step"], res["iterations"]) == (1, 640, 10)
    assert sorted(p.name for p in (tmp_path / "sh1").iterdir() if not p.name.startswith("events")) == ["checkpoint.pt"]


@pytest.mark.slow  # a torchrun launch
def test_the_rollout_gathers_each_unit_once_whatever_its_length(tmp_path, torchrun):
    # MLPAgent: one unit (the agent); 2 minibatches x 2 epochs in each update
    counts = {}
    for steps in ("16", "64"):
        ok(ppo(torchrun, tmp_path, "--run-dir", f"n{steps}", "--num-steps", steps, "--total-timesteps",
               str(3 * 2 * 2 * int(steps)), "--shard"))
        marks = json.loads((tmp_path / "gathers0.json").read_text())
        assert marks == json.loads((tmp_path / "gathers1.json").read_text())  # the ranks gathered together
        rollouts = [start - (marks[i - 1][1] if i else 0) for i, (start, _) in enumerate(marks)]
        updates = [end - start for start, end in marks]
        counts[steps] = (rollouts, updates)
    assert counts["16"] == counts["64"] == ([1, 1, 1], [4, 4, 4]), counts  # 1 unit; 4 minibatch forwards


@pytest.fixture
def llama_folders(tmp_path):
    """A tiny Llama policy of 2 blocks (+ char tokenizer), a tiny reward model and a small data folder."""
    import gzip

    from textenv import char_tokenizer
    from tiny import tiny_classifier, tiny_llama

    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz .")
    tiny_llama(len(tok), bos_token_id=1, eos_token_id=1, pad_token_id=0).save_pretrained(tmp_path / "policy")
    tiny_classifier(len(tok)).save_pretrained(tmp_path / "rm")
    for name in ("policy", "rm"):
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "data").mkdir()
    for split in ("train", "test"):
        with gzip.open(tmp_path / "data" / f"{split}.jsonl.gz", "wt") as f:
            for i in range(20):
                f.write(json.dumps({"text": f"a good film number {i}. loved it", "label": i % 2}) + "\n")
    return tmp_path


def rlhf(torchrun, tmp: Path, run_dir: str, *argv: str) -> subprocess.CompletedProcess:
    """The RLHF job on the tiny Llama: 2 ranks x 4 envs x 9 steps, 3 iterations."""
    return ok(torchrun(__file__, "rlhf", str(tmp), "--policy", str(tmp / "policy"), "--reward-model", str(tmp / "rm"),
                       "--judge", "none", "--data-dir", str(tmp / "data"), "--ppo.run-dir", run_dir,
                       "--max-prompt-tokens", "8", "--ppo.num-envs", "4", "--ppo.num-steps", "9",
                       "--ppo.total-timesteps", "216", "--ppo.num-minibatches", "2", "--ppo.update-epochs", "2",
                       "--eval-prompts", "8", "--ppo.torch-threads", "1", "--ppo.save-every", "0", "--ppo.device",
                       "cpu", "--best-of-n-prompts", "0", *argv, cwd=tmp, timeout=240))


@pytest.mark.slow  # a torchrun launch
@pytest.mark.parametrize("trainable", [None, 1])  # every block, or the top block over a frozen trunk
def test_sharded_rlhf_job_equals_unsharded_and_exports_a_plain_policy(llama_folders, trainable, torchrun):
    from transformers import AutoModelForCausalLM

    tmp, extra = llama_folders, [] if trainable is None else ["--trainable-layers", str(trainable)]
    for steps in ("9", "18"):  # the rollout's all-gathers do not grow with its tokens
        rlhf(torchrun, tmp, f"sh{steps}", "--ppo.shard", "--max-new-tokens", str(int(steps) - 1), "--ppo.num-steps",
             steps, "--ppo.total-timesteps", str(3 * 8 * int(steps)), *extra)
        marks = json.loads((tmp / "gathers0.json").read_text())
        rollouts = [start - (marks[i - 1][1] if i else 0) for i, (start, _) in enumerate(marks)]
        units = 3 if trainable is None else 2  # the trainable blocks and the agent
        assert rollouts == [units] * 3, marks
    rlhf(torchrun, tmp, "dp", "--max-new-tokens", "17", "--ppo.num-steps", "18", "--ppo.total-timesteps", "432", *extra)
    sh, dp = (json.loads((tmp / d / "report.json").read_text()) for d in ("sh18", "dp"))
    for a, b in zip(sh["history"], dp["history"], strict=True):
        assert a["score_mean"] == pytest.approx(b["score_mean"], abs=1e-5)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    assert sh["after"]["reward_mean"] == pytest.approx(dp["after"]["reward_mean"], abs=1e-4)
    exported = [AutoModelForCausalLM.from_pretrained(tmp / d / "policy").state_dict() for d in ("sh18", "dp")]
    assert_close(*exported, atol=1e-5)
    start = AutoModelForCausalLM.from_pretrained(tmp / "policy").state_dict()
    assert max((exported[0][k] - start[k]).abs().max().item() for k in start) > 1e-4  # it trained


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a torchrun launch
def test_two_nodes_on_one_machine_train_as_one_two_rank_job(tmp_path, torchrun):
    from conftest import ROOT

    run = ["--total-timesteps", "256", "--save-every", "2", "--shard"]
    ok(ppo(torchrun, tmp_path, "--run-dir", "one", *run))
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
                               __file__, "ppo", str(tmp_path), *CARTPOLE, "--run-dir", "two", *run],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    outs = [p.communicate(timeout=120) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[1][-2000:] for o in outs]
    assert "iter 2/2" in outs[0][0] and "iter" not in outs[1][0]  # node 0 holds rank 0, which logs
    one, two = meta(tmp_path / "one"), meta(tmp_path / "two")
    assert two["world_size"] == 2 and two["episode_returns"] == one["episode_returns"]
    assert_close(weights(tmp_path / "two"), weights(tmp_path / "one"))


@pytest.mark.slow  # a torchrun launch
def test_a_sharded_rank_without_steps_runs_the_units_and_adds_nothing(tmp_path, torchrun):
    ok(torchrun(__file__, "gpt-no-steps", str(tmp_path), cwd=tmp_path))  # a rank skipping FSDP's collectives hangs
    sharded, alone = torch.load(tmp_path / "grads.pt"), gpt_gradients(slice(1, 2), shard=False)
    assert_close(sharded, alone, atol=1e-6)
    assert max(g.abs().max().item() for g in alone.values()) > 1e-4


@pytest.mark.slow  # a torchrun launch
def test_sharded_failures_behave_as_unsharded(tmp_path, torchrun):
    # a NaN loss stops both jobs alike, the last good checkpoint kept
    runs = {}
    for name, flags in (("nan-dp", []), ("nan-sh", ["--shard"])):
        runs[name] = ppo(torchrun, tmp_path, "--env-id", "tests.test_sharding:NaNAfter-v0", "--total-timesteps",
                         "2048", "--save-every", "1", "--run-dir", name, *flags)
        assert runs[name].returncode != 0 and "PPO loss is nan" in runs[name].stdout + runs[name].stderr
    assert meta(tmp_path / "nan-sh")["iteration"] == meta(tmp_path / "nan-dp")["iteration"] >= 1
    assert (tmp_path / "nan-sh" / "checkpoint.dcp").is_dir() and not (tmp_path / "nan-sh" / "checkpoint.dcp.tmp").exists()

    # Ctrl-C on rank 0: every rank writes its shards of iteration 2 and stops; --resume continues
    run = torchrun(__file__, "ctrl-c", str(tmp_path), *CARTPOLE, "--total-timesteps", "1024", "--run-dir", "c",
                   "--shard", cwd=tmp_path, timeout=120)
    assert run.returncode != 0 and "continue with --resume" in run.stdout, run.stderr[-2000:]
    assert meta(tmp_path / "c")["iteration"] == 2
    resumed = ok(ppo(torchrun, tmp_path, "--run-dir", "c", "--resume", "--total-timesteps", "1024")).stdout
    assert "resumed" in resumed and "iter 8/8" in resumed

    # a rank that raises stops the job, and torchrun names it with its traceback
    run = ppo(torchrun, tmp_path, "--env-id", "tests.test_sharding:BreaksOnRank1-v0", "--total-timesteps", "1024",
              "--run-dir", "b", "--shard", timeout=90)
    out = run.stdout + run.stderr
    assert run.returncode != 0 and "rank 1's env broke on purpose" in out
    assert "rank    : 1" in out or "rank: 1" in out, out[-3000:]


def test_a_sharded_checkpoint_round_trips_and_a_failed_write_keeps_the_previous_one(tmp_path, monkeypatch):
    # the folder format in one process (no process group): what `--resume` reads on any number of ranks
    import torch.distributed.checkpoint as dcp

    from agents import sharding
    from agents.cli import UsageError
    from agents.distributed import SINGLE
    from agents.policies import MLPAgent

    env = gym.make("CartPole-v1")
    agent = MLPAgent(env.observation_space, env.action_space)
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2)
    _, logprob, _, value = agent.get_action_and_value(torch.randn(3, 4))
    (logprob.sum() + value.sum()).backward()  # every parameter gets Adam state, as in a PPO update
    opt.step()
    path = tmp_path / "checkpoint.dcp"
    sharding.save_sharded(path, agent, opt, {"iteration": 1}, SINGLE)
    saved = {k: v.clone() for k, v in agent.state_dict().items()}
    assert sharding.read_meta(path) == {"iteration": 1}

    def full_disk(state, checkpoint_id):
        Path(checkpoint_id).mkdir()
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with torch.no_grad():
        for p in agent.parameters():
            p.add_(1.0)
    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(UsageError, match="No space left.*previous checkpoint is kept"):
        sharding.save_sharded(path, agent, opt, {"iteration": 2}, SINGLE)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["checkpoint.dcp"]  # no temporary folder left
    monkeypatch.undo()

    fresh = MLPAgent(env.observation_space, env.action_space)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    sharding.load_weights({"sharded": str(path)}, fresh, fresh_opt)
    assert_close(fresh.state_dict(), saved, atol=0)  # the first checkpoint, whole
    assert int(fresh_opt.state_dict()["state"][0]["step"]) == 1
