"""agents.ppo: GAE and autoreset arithmetic, KL shaping, minibatching by env, checkpoints, CLI, learning."""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.advantages import compute_gae
from agents.checkpoint import load_checkpoint, save_checkpoint
from agents.cli import UsageError
from agents.distributed import Dist
from agents.policies import MLPAgent
from agents.ppo import Args, num_iterations, parse_args, train, zoo
from agents.rollout import Rollout, autoreset_valid
from tiny import FixedLength

ROOT = Path(__file__).resolve().parents[1]


def small(tmp_path: Path, name: str = "run", **kw) -> Args:
    """A few-second CartPole configuration: 4 envs x 32 steps, 8 iterations."""
    base = dict(num_envs=4, num_steps=32, total_timesteps=1024, num_minibatches=4, update_epochs=2,
                eval_episodes=0, log_every=0, save_every=0, torch_threads=1, device="cpu",
                run_dir=str(tmp_path / name))
    base.update(kw)
    return Args(**base)


class Hook:
    """Records what PPO passes to `hooks.on_iteration`; optionally runs `action(iteration)`."""

    def __init__(self, action=None):
        self.rollouts, self.kl_coefs, self.action = [], [], action

    def on_iteration(self, iteration, global_step, rollout, writer, kl_coef):
        assert isinstance(rollout, Rollout) and rollout.advantages is not None
        self.rollouts.append(rollout)  # each iteration's tensors are its own (no buffer reused)
        self.kl_coefs.append(kl_coef)  # the coefficient the rollout's rewards were shaped with
        if self.action:
            self.action(iteration)
        return {"test/iteration": iteration}


# ---- arithmetic -----------------------------------------------------------------------------------------


def test_gae_hand_computed_termination_and_truncation():
    # env 0: steps 0-1 then terminated at 1; step 2 is the autoreset; steps 3-4, truncated at 4; step 5 reset.
    # env 1: no episode end; bootstraps from next_value.
    f = torch.tensor
    rewards = f([[1.0, 1], [2, 1], [0, 1], [3, 1], [4, 1], [0, 1]])
    values = f([[0.5, 0], [0.6, 0], [0.7, 0], [0.8, 0], [0.9, 0], [1.0, 0]])
    terminated = f([[0, 0], [1, 0], [0, 0], [0, 0], [0, 0], [0, 0]]).bool()
    truncated = f([[0, 0], [0, 0], [0, 0], [0, 0], [1, 0], [0, 0]]).bool()
    valid = f([[1, 1], [1, 1], [0, 1], [1, 1], [1, 1], [0, 1]]).bool()
    next_value = f([1.1, 2.0])
    adv, ret = compute_gae(rewards, values, next_value, terminated, truncated, valid, gamma=0.9, gae_lambda=0.5)
    # by hand, gamma * lambda = 0.45:
    # t4 truncated: 4 + 0.9 * V(final obs = obs[5]) 1.0 - 0.9 = 4.0;  t3: 3 + 0.9 * 0.9 - 0.8 + 0.45 * 4.0 = 4.81
    # t1 terminated: 2 - 0.6 = 1.4;  t0: 1 + 0.9 * 0.6 - 0.5 + 0.45 * 1.4 = 1.67;  resets t2, t5: 0
    torch.testing.assert_close(adv[:, 0], f([1.67, 1.4, 0.0, 4.81, 4.0, 0.0]))
    # env 1: t5 = 1 + 0.9 * 2.0 = 2.8; t4 = 1 + 0.45 * 2.8 = 2.26
    torch.testing.assert_close(adv[4:, 1], f([2.26, 2.8]))
    torch.testing.assert_close(ret, adv + values)
    # without bootstrapping truncations (RLHF), t4 = 4 - 0.9 = 3.1 and t3 = 3.01 + 0.45 * 3.1 = 4.405
    adv2, _ = compute_gae(rewards, values, next_value, terminated | truncated, truncated, valid, 0.9, 0.5)
    torch.testing.assert_close(adv2[:, 0], f([1.67, 1.4, 0.0, 4.405, 3.1, 0.0]))


def test_autoreset_valid_masks_the_step_after_each_episode_end():
    dones = np.array([[0, 1], [1, 0], [0, 0], [0, 1]], bool)  # (T=4, E=2)
    valid = autoreset_valid(dones, prev_done=np.array([True, False]))
    assert valid.tolist() == [[False, True], [True, False], [False, True], [True, True]]


# ---- the training loop -----------------------------------------------------------------------------------


def project_source(module: str) -> Path | None:
    """The file of `module` if it is one of this project's (agents, textenv), else None."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return path if module.split(".")[0] in ("agents", "textenv") and path.is_file() else None


def imported_by(name: str) -> set[str]:
    """The modules `import name` runs, read from the source: import statements outside function bodies (which run
    only when called) and outside `if TYPE_CHECKING:`, followed through this project's packages and their parents."""
    seen, todo = set(), [name]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo += [mod.rsplit(".", i)[0] for i in range(1, mod.count(".") + 1)]  # parent packages run first
        if (path := project_source(mod)) is None:
            continue
        nodes = list(ast.parse(path.read_text()).body)
        while nodes:
            node = nodes.pop()
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from package import module` imports it too
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                         if project_source(f"{node.module}.{a.name}")]
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                nodes += node.orelse
            elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                nodes += ast.iter_child_nodes(node)
    return seen


def test_importing_ppo_imports_neither_transformers_nor_textenv():
    # CartPole PPO stands alone; the slow test below checks the same in a fresh interpreter
    assert {"agents", "torch", "gymnasium"} <= imported_by("agents.ppo")  # it reads the imports
    bad = sorted(m for m in imported_by("agents.ppo") if m.split(".")[0] in ("transformers", "textenv"))
    assert not bad, bad


@pytest.mark.slow  # a fresh interpreter, the one place to see what an import pulls in: a subprocess
def test_importing_ppo_in_a_fresh_interpreter_imports_neither_transformers_nor_textenv():
    code = ("import sys, agents.ppo; bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'textenv')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_cli_help_and_presets(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "zoo" in out and "cleanrl" in out and "--total-timesteps" in out
    args = parse_args(["zoo", "--seed", "3", "--num-envs", "4"])
    assert (args.seed, args.num_envs, args.update_epochs, args.gamma) == (3, 4, 20, 0.98)
    assert parse_args([]).num_envs == 4 and parse_args(["zoo"]).num_envs == 8
    assert parse_args(["--seed", "5"]) == dataclasses.replace(parse_args(["cleanrl"]), seed=5)  # cleanrl: the default
    assert num_iterations(zoo()) == 100_000 // 256 and num_iterations(zoo(), world_size=2) == 100_000 // 512


def test_cli_user_errors_are_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    # `python -m agents.ppo ...` in this process, through its `main` (tests/test_user_errors.py runs the real command)
    from agents.ppo import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--num-envs", "0"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "num_envs (0)" in lines[0] and list(tmp_path.iterdir()) == [], err  # nothing written
    with pytest.raises(SystemExit) as exit_:  # a missing checkpoint
        main(["--run-dir", str(tmp_path / "none"), "--resume"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "no checkpoint" in lines[0], lines


def test_autoreset_transitions_are_masked_and_never_trained_on(tmp_path):
    class Spy(MLPAgent):
        def __init__(self, *a):
            super().__init__(*a)
            self.trained_obs = []

        def get_action_and_value(self, obs, action=None):
            if action is not None:
                self.trained_obs.append(obs.detach().clone())
            return super().get_action_and_value(obs, action)

    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1") for _ in range(4)])
    agent, hook = Spy(envs.single_observation_space, envs.single_action_space), Hook()
    train(small(tmp_path, update_epochs=1), envs=envs, agent=agent, hooks=hook)
    n_valid = sum(int(r.valid.sum()) for r in hook.rollouts)
    n_invalid = sum(int((~r.valid).sum()) for r in hook.rollouts)
    assert n_invalid > 20  # CartPole episodes under a random policy are short: many resets
    assert sum(len(o) for o in agent.trained_obs) == n_valid
    # the masked steps hold the final (out-of-bounds) observation of a terminated episode: never trained on
    out_of_bounds = lambda o: (o[:, 0].abs() > 2.4) | (o[:, 2].abs() > 0.2095)  # noqa: E731
    assert not any(out_of_bounds(o).any() for o in agent.trained_obs)
    assert any(out_of_bounds(r.obs[~r.valid]).any() for r in hook.rollouts)
    # episode returns come from PPO's own counting: CartPole's return is the episode length
    for r in hook.rollouts:
        assert torch.all(r.rewards[~r.valid] == 0) and torch.all(r.advantages[~r.valid] == 0)
        assert [e.ret for e in r.episodes] == [float(e.length) for e in r.episodes] and r.ref_logprobs is None


def test_same_seed_gives_identical_returns_and_another_seed_does_not(tmp_path):
    a = train(small(tmp_path, "a", seed=7))["episode_returns"]
    b = train(small(tmp_path, "b", seed=7))["episode_returns"]
    c = train(small(tmp_path, "c", seed=8))["episode_returns"]
    assert len(a) > 30 and a == b and a != c


@pytest.mark.slow
def test_zoo_preset_learns_cartpole(tmp_path):
    args = dataclasses.replace(zoo(), total_timesteps=25_600, run_dir=str(tmp_path / "zoo"), log_every=0,
                               eval_episodes=2, device="cpu")
    result = train(args)
    last = [r for _, r in result["episode_returns"][-10:]]
    # a random policy averages ~22 (sd ~12): a mean of 100 over 10 episodes cannot happen by chance; seeds 1-6
    # reach 127-335 at 20k steps, so the bound leaves room for another machine's float rounding
    assert np.mean(last) > 100, last
    assert result["eval_mean"] > 100 and result["global_step"] == 25_600


def test_resume_continues_a_killed_run_from_its_checkpoint(tmp_path):
    def crash(iteration):
        if iteration == 5:
            raise RuntimeError("killed")

    args = small(tmp_path, "r", save_every=2)
    full = train(small(tmp_path, "full"))
    with pytest.raises(RuntimeError, match="killed"):
        train(args, hooks=Hook(crash))
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert (ckpt["iteration"], ckpt["global_step"]) == (4, 4 * 128)
    cli = parse_args(["--run-dir", str(tmp_path / "r"), "--resume"])  # the CLI resumes with the run's settings
    assert (cli.resume, cli.num_steps, cli.total_timesteps, cli.save_every) == (True, 32, 1024, 2)
    cli = parse_args(["zoo", "--run-dir", str(tmp_path / "r"), "--resume", "--total-timesteps", "2048"])
    assert (cli.num_steps, cli.total_timesteps, cli.update_epochs) == (32, 2048, 2)  # explicit flags still win
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "checkpoint.pt").write_bytes((tmp_path / "r" / "checkpoint.pt").read_bytes())
    hook = Hook()
    resumed = train(dataclasses.replace(args, resume=True), hooks=hook)
    again = train(dataclasses.replace(args, resume=True, run_dir=str(tmp_path / "r2")))
    assert hook.kl_coefs == [0.0] * 4  # iterations 5..8 only
    assert resumed["global_step"] == full["global_step"] == 1024
    # the returns before the checkpoint are those of the uninterrupted run; the resumed part is reproducible
    before = [x for x in full["episode_returns"] if x[0] <= 512]
    assert resumed["episode_returns"][: len(before)] == before
    assert resumed["episode_returns"] == again["episode_returns"]


def test_a_callers_process_group_is_used_and_left_up(tmp_path):
    import torch.distributed as tdist

    from agents import distributed

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        dist, _ = distributed.setup("cpu")  # joins the group made above
        assert not dist.owns_group  # ... which is not setup's to end; the caller owns it and passes it on:
        dist = dataclasses.replace(dist, owns_group=True)  # `cleanup(dist)` would now end it
        result = train(small(tmp_path, "grp", total_timesteps=128), dist=dist)
        assert tdist.is_initialized() and result["global_step"] == 128  # train did not tear the group down
    finally:
        tdist.destroy_process_group()


def test_under_torchrun_train_needs_the_entry_points_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: alone, each rank would write the same files
    with pytest.raises(UsageError, match="without a process group"):
        train(small(tmp_path, "alone"))
    assert not (tmp_path / "alone").exists()


def test_bad_resume_and_existing_run_dir_give_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="no checkpoint"):
        train(small(tmp_path, "none", resume=True))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="corrupt"):
        train(small(tmp_path, "bad", resume=True))
    with pytest.raises(UsageError, match="--resume"):  # a new run must not overwrite a saved one
        train(small(tmp_path, "bad"))
    assert (bad / "checkpoint.pt").read_bytes() == b"not a checkpoint"


def test_bad_args_and_spaces_give_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="num_minibatches"):
        train(small(tmp_path, num_minibatches=3))
    with pytest.raises(UsageError, match="num_envs"):
        train(small(tmp_path, num_envs=0))
    with pytest.raises(UsageError, match="Discrete"):
        train(small(tmp_path), envs=gym.vector.SyncVectorEnv([lambda: gym.make("Pendulum-v1")] * 4))
    disabled = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 4,
                                        autoreset_mode=gym.vector.AutoresetMode.DISABLED)
    with pytest.raises(ValueError, match="NEXT_STEP"):
        train(small(tmp_path), envs=disabled)


def test_an_unwritable_run_folder_is_one_error_line(tmp_path, capsys):
    from agents.ppo import main

    (tmp_path / "a_file").write_text("")  # a folder under a file cannot be made, even by root
    with pytest.raises(SystemExit) as exit_:
        main(["--run-dir", str(tmp_path / "a_file" / "run")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: cannot write the run folder {tmp_path / 'a_file' / 'run'}"), lines


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    train(small(tmp_path, "full", save_every=1))
    path = tmp_path / "full" / "checkpoint.pt"
    before = path.read_bytes()

    def disk_full(obj, f):  # half a file written, then the disk is full
        Path(f).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UsageError, match="No space left on device.*previous checkpoint is kept as it was"):
        save_checkpoint(path, {"x": 1})
    assert path.read_bytes() == before and not path.with_name("checkpoint.pt.tmp").exists()
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] >= 1


class NaNReward(gym.vector.VectorWrapper):
    """Rewards become NaN after `after` vector steps."""

    def __init__(self, env, after):
        super().__init__(env)
        self.n, self.after = 0, after

    def step(self, actions):
        obs, rew, term, trunc, info = self.env.step(actions)
        self.n += 1
        return obs, rew * np.nan if self.n > self.after else rew, term, trunc, info


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    envs = NaNReward(gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 4), after=3 * 32 + 5)
    with pytest.raises(FloatingPointError, match=r"PPO loss is nan \(policy .+, value .+\).*last good checkpoint is kept"):
        train(small(tmp_path, "nan", save_every=1), envs=envs)
    ckpt = load_checkpoint(tmp_path / "nan" / "checkpoint.pt")
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["agent"].values())


def test_ctrl_c_saves_a_checkpoint_and_returns(tmp_path):
    result = train(small(tmp_path, "int"), hooks=Hook(lambda it: it == 2 and os.kill(os.getpid(), signal.SIGINT)))
    assert result["interrupted"] and result["iterations"] == 2
    assert load_checkpoint(tmp_path / "int" / "checkpoint.pt")["iteration"] == 2


# ---- what the text policies need: KL penalty, minibatches by env column, ratio check ---------------------


def fixed_envs(n=4, mode=gym.vector.AutoresetMode.NEXT_STEP, **kw):
    return gym.vector.SyncVectorEnv([lambda: FixedLength(**kw) for _ in range(n)], autoreset_mode=mode)


def test_same_step_autoreset_env_is_refused_with_the_fix(tmp_path):
    # a vector env steps all its envs at once, so no wrapper can hold one env back for next-step's reset step
    with pytest.raises(ValueError, match="SAME_STEP.*autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP"):
        train(small(tmp_path, "same"), envs=fixed_envs(mode=gym.vector.AutoresetMode.SAME_STEP))
    hook = Hook()  # the fix the message names: the same env with next-step autoreset trains
    result = train(small(tmp_path, "next", num_steps=10, total_timesteps=80, num_minibatches=2, eval_episodes=4),
                   envs=fixed_envs(), hooks=hook, dist=Dist())
    assert [ret for _, ret in result["episode_returns"]] == [1.0] * 16  # episodes of 4 steps + 1 reset step
    assert result["eval_returns"] == [1.0] * 4 and sum(len(r.episodes) for r in hook.rollouts) == 16


def test_kl_penalty_shapes_rewards_per_token(tmp_path):
    hook = Hook()
    result = train(small(tmp_path, "kl", kl_coef=0.1, num_steps=10, total_timesteps=80, num_minibatches=2),
                   envs=fixed_envs(), hooks=hook)
    for r in hook.rollouts:
        expected = r.rewards - 0.1 * (r.logprobs - r.ref_logprobs) * r.valid
        torch.testing.assert_close(r.shaped_rewards, expected)
        assert torch.all(r.shaped_rewards[r.valid] != r.rewards[r.valid])
    # episode returns are the env's rewards (1 per 4-step episode), not the shaped ones
    assert {ret for _, ret in result["episode_returns"]} == {1.0}
    assert result["kl_coef"] == 0.1
    # per finished episode its KL sum: the first rollout's first 4 episodes are envs 0..3 over steps 0..3
    r = hook.rollouts[0]
    kls = [e.kl for e in r.episodes]
    assert len(kls) == 8 and [e.length for e in r.episodes] == [4] * 8  # episodes end at steps 3 and 8
    assert [e.global_step for e in r.episodes] == [16] * 4 + [36] * 4
    per_token = (r.logprobs - r.ref_logprobs).double()
    np.testing.assert_allclose(kls[:4], per_token[:4].sum(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(kls[4:], per_token[5:9].sum(0).numpy(), rtol=1e-5)


def test_adaptive_kl_coef_follows_the_measured_kl(tmp_path):
    hook = Hook()
    # KL per episode ~ 4 tokens x 0.5 nats = 2 > target 0.5: the coefficient grows each iteration by 1 + 0.2 n / H
    train(small(tmp_path, "akl", kl_coef=0.1, kl_target=0.5, kl_horizon=100, num_steps=10, total_timesteps=120,
                num_minibatches=2), envs=fixed_envs(), hooks=hook)
    coefs = hook.kl_coefs
    n_eps = [len(r.episodes) for r in hook.rollouts]
    assert coefs[0] == 0.1
    for k in range(1, len(coefs)):
        assert coefs[k] == pytest.approx(coefs[k - 1] * (1 + 0.2 * n_eps[k - 1] / 100))
    with pytest.warns(UserWarning, match="negative"):
        train(small(tmp_path, "neg", kl_coef=0.1, num_steps=10, total_timesteps=80, num_minibatches=2),
              envs=fixed_envs(offset=-1.0))
    with pytest.raises(ValueError, match="ref_logprob"):
        train(small(tmp_path, "noref", kl_coef=0.1))


def test_minibatch_by_env_calls_evaluate_sequences_with_env_columns(tmp_path):
    class SeqAgent(MLPAgent):
        def __init__(self, *a):
            super().__init__(*a)
            self.shapes, self.resets = [], 0

        def evaluate_sequences(self, obs, actions, valid):
            self.shapes.append((tuple(obs.shape), tuple(actions.shape), tuple(valid.shape), valid.dtype))
            T, E = actions.shape
            _, logprob, entropy, value = self.get_action_and_value(obs.reshape(T * E, -1), actions.reshape(-1))
            return logprob.reshape(T, E), entropy.reshape(T, E), value.reshape(T, E)

        def reset_cache(self):
            self.resets += 1

    envs = fixed_envs(n=4)
    agent = SeqAgent(envs.single_observation_space, envs.single_action_space)
    train(small(tmp_path, "seq", minibatch_by_env=True, num_steps=10, total_timesteps=80, num_minibatches=2,
                update_epochs=3), envs=envs, agent=agent)
    assert agent.shapes == [((10, 2, 3), (10, 2), (10, 2), torch.bool)] * (2 * 3 * 2)
    assert agent.resets == 2  # after each update phase


def test_first_minibatch_ratio_check_catches_dropout(tmp_path):
    class Dropout(MLPAgent):
        def get_action_and_value(self, obs, action=None):
            return super().get_action_and_value(torch.nn.functional.dropout(obs, 0.5, training=True), action)

    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 4)
    with pytest.warns(UserWarning, match="ratio"):
        train(small(tmp_path, "drop", total_timesteps=256), envs=envs,
              agent=Dropout(envs.single_observation_space, envs.single_action_space))


# ---- the loss and the update's edge cases ------------------------------------------------------------------


def test_ppo_loss_hand_computed():
    from agents.loss import LossCoefs, ppo_loss

    f, nan = torch.tensor, float("nan")
    old = {"logprobs": f([0.0, 0.0, 0.0, 0.0]), "values": f([0.0, 2.5, 0.0, 0.0]), "returns": f([2.0, 2.0, 1.0, 0.0])}
    logprob = f([math.log(1.5), math.log(0.5), 0.0, nan], requires_grad=True)  # step 3 is masked: garbage there
    value = f([1.0, 2.0, 0.0, 100.0], requires_grad=True)
    entropy = f([1.0, 2.0, 3.0, nan])
    adv, mask = f([1.0, -1.0, 2.0, -2.0]), f([True, True, True, False])
    loss, sums = ppo_loss(logprob, entropy, value, old, adv, mask, 3.0,
                          LossCoefs(clip_coef=0.2, vf_clip=0.2, ent_coef=0.01, vf_coef=0.5))
    # ratios 1.5, 0.5, 1: policy terms max(-A r, -A clip(r)) = -1.2, 0.8, -2 -> mean -0.8
    # values: clipped to 0.2 and 2.3: max((1-2)^2, (0.2-2)^2) = 3.24, max(0, 0.09) = 0.09, 1 -> 0.5 * 4.33 / 3
    v_loss = 0.5 * (3.24 + 0.09 + 1.0) / 3
    assert loss.item() == pytest.approx(-0.8 - 0.01 * 2.0 + 0.5 * v_loss, abs=1e-6)
    kl = (0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))
    expected = [-0.8 * 3, v_loss * 3, 6.0, -(math.log(1.5) + math.log(0.5)), kl, 2.0]  # sums over the 3 steps
    assert sums.tolist() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert value.grad[0] == 0.0 and value.grad[1] == 0.0  # past the value clip: no gradient
    assert value.grad[2] == pytest.approx(0.5 * 0.5 * 2 * (0.0 - 1.0) / 3)  # vf_coef * 0.5 * d(v - R)^2 / 3
    assert value.grad[3] == 0.0 and logprob.grad[3] == 0.0  # masked
    unclipped, _ = ppo_loss(logprob, entropy, value, old, adv, mask, 3.0, LossCoefs(0.2, None, 0.0, 1.0))
    assert unclipped.item() == pytest.approx(-0.8 + 0.5 * (1.0 + 0.0 + 1.0) / 3, abs=1e-6)


def fixed_rollout(agent, valid, advantages=None, returns=None, T: int = 8, E: int = 4):
    """A rollout of CartPole-shaped random observations, scored by `agent` (so the first ratio is 1)."""
    g = torch.Generator().manual_seed(0)
    obs, actions = torch.randn(T, E, 4, generator=g), torch.randint(0, 2, (T, E), generator=g)
    with torch.no_grad():
        _, logprobs, _, values = agent.get_action_and_value(obs.reshape(T * E, 4), actions.reshape(-1))
    values, zeros = values.reshape(T, E), torch.zeros(T, E)
    return Rollout(obs=obs, actions=actions, logprobs=logprobs.reshape(T, E), values=values, rewards=zeros,
                   ref_logprobs=None, valid=valid, terminated=zeros.bool(), truncated=zeros.bool(), next_obs=obs[-1],
                   episodes=[], shaped_rewards=zeros,
                   advantages=torch.randn(T, E, generator=g) if advantages is None else advantages,
                   returns=values if returns is None else returns)


def test_value_clip_keeps_its_range_when_the_policy_clip_anneals():
    from agents.ppo import update

    torch.manual_seed(0)
    agent = MLPAgent(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))
    valid = torch.ones(8, 4, dtype=torch.bool)
    r = fixed_rollout(agent, valid, advantages=torch.zeros(8, 4))
    r.returns = r.values + 1.0  # the critic should move up, by at most the value clip (0.2)
    opt = torch.optim.SGD(agent.critic.parameters(), lr=0.02)  # no momentum: no gradient, no move
    args = Args(num_minibatches=1, update_epochs=40, clip_coef=0.2, clip_vloss=True, ent_coef=0.0, norm_adv=False,
                max_grad_norm=100.0)
    update(agent, opt, r, args, clip=0.0)  # the annealed policy clip at the end of a run
    with torch.no_grad():
        moved = (agent.get_value(r.obs.reshape(32, 4)).reshape(8, 4) - r.values).mean().item()
    assert 0.1 < moved < 0.3, moved  # a value clip of 0 would have stopped the critic after its first step


def test_a_minibatch_of_one_valid_step_trains_without_nan():
    from agents.ppo import update

    torch.manual_seed(0)
    agent = MLPAgent(gym.spaces.Box(-1, 1, (4,)), gym.spaces.Discrete(2))
    valid = torch.zeros(8, 4, dtype=torch.bool)
    valid[3, 1] = True  # one transition in the whole rollout: its advantage has no spread to normalise by
    stats = update(agent, torch.optim.Adam(agent.parameters(), lr=1e-3), fixed_rollout(agent, valid),
                   Args(num_minibatches=1, update_epochs=2), clip=0.2)
    assert all(math.isfinite(v) for v in stats.values()) and stats["losses/policy_loss"] == 0.0


@pytest.mark.parametrize("bad, message", [
    (dict(update_epochs=0), "update_epochs"),
    (dict(kl_coef=0.0, kl_target=1.0), "kl_target=1.0 adapts kl_coef, which is 0"),
])
def test_settings_that_would_train_silently_wrong_are_refused(tmp_path, bad, message):
    with pytest.raises(UsageError, match=message):
        train(small(tmp_path, **bad), envs=fixed_envs())


def test_torch_threads_0_is_one_rule_in_ppo_and_rlhf(tmp_path, monkeypatch):
    """`--torch-threads 0` (agents.ppo) and `--ppo.torch-threads 0` (agents.rlhf) both mean automatic: torch's own
    thread count, or 1 when the machine is already busy (load average >= cores)."""
    import agents.vector
    from agents.rlhf import Pieces, RLHFConfig, run
    from agents.rlhf.config import rlhf_ppo
    from textenv import KeywordReward, char_tokenizer

    def rlhf_run(threads: int) -> None:  # stops right after the threads are set: the tokenizer has no EOS
        tok = char_tokenizer("ab")
        tok.eos_token = None
        cfg = RLHFConfig(ppo=rlhf_ppo(torch_threads=threads, run_dir=str(tmp_path / "rlhf")))
        with pytest.raises(UsageError, match="no EOS"):
            run(cfg, Pieces(tok, None, KeywordReward("a"), ["a"], ["a"]))

    before = torch.get_num_threads()
    try:
        for busy, expected in ((False, 2), (True, 1)):
            monkeypatch.setattr("os.getloadavg", lambda busy=busy: (64.0 if busy else 0.0,) * 3)
            for start in (lambda b=busy: train(small(tmp_path, f"ppo{b}", torch_threads=0, total_timesteps=128)),
                          lambda: rlhf_run(0)):
                monkeypatch.setattr(agents.vector, "_AUTO_THREADS", None)  # a fresh process
                torch.set_num_threads(2)
                start()
                assert torch.get_num_threads() == expected
        rlhf_run(3)  # a count is applied as given
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
