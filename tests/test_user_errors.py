"""A user's mistake is one `error: ...` line on stderr and exit status 2, before anything slow starts and with
nothing written (README, "What runs"); a library function given an impossible argument raises a ValueError that
names the argument and its range. The CLIs run in this process through their `main`, one as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import textenv
from agents.cli import UsageError, run_cli, tyro_message
from agents.ppo import Args, check_args, main, train
from agents.rlhf.baselines import best_of_n, kl_bound, pick_best

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(capsys, exit_: pytest.ExceptionInfo, *fragments: str) -> str:
    """Assert exit status 2 and a stderr of exactly one line, `error: ...` holding every fragment; returns it."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def tiny(tmp_path: Path, **kw) -> Args:
    """One iteration of 4 envs x 4 steps on CPU, nothing logged or evaluated."""
    base = dict(num_envs=4, num_steps=4, total_timesteps=16, num_minibatches=1, update_epochs=1, eval_episodes=0,
                log_every=0, save_every=0, torch_threads=1, device="cpu", run_dir=str(tmp_path / "run"))
    return Args(**{**base, **kw})


def text_envs(num_envs: int = 4, **kw) -> gym.vector.VectorEnv:
    tok = textenv.char_tokenizer("abcd")
    return gym.make_vec("TextEnv-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", tokenizer=tok,
                        reward_model=textenv.EndsWithReward("d"), prompts=["a", "b"], max_prompt_tokens=1,
                        max_new_tokens=3, **kw)


# ---- 1. a flag value tyro rejects ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragments", [
    (["--advantages", "bogus"], ["'--advantages'", "'bogus'", "'gae', 'rloo', 'grpo'"]),
    (["zoo", "--num-envs", "abc"], ["--num-envs", "'abc'"]),
    (["--no-such-flag", "3"], ["--no-such-flag"]),
])
def test_ppo_cli_flag_tyro_rejects_is_one_line(argv, fragments, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    one_error_line(capsys, exit_, *fragments, "--help")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, fragments", [
    (["embedded", "--ppo.advantages", "bogus"], ["'--ppo.advantages'", "'bogus'"]),
    (["embedded", "--ppo.num-envs", "abc"], ["--ppo.num-envs", "'abc'"]),
])
def test_rlhf_cli_flag_tyro_rejects_is_one_line(argv, fragments, tmp_path, monkeypatch, capsys):
    from agents.rlhf.job import main as rlhf_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["agents.rlhf", *argv])
    with pytest.raises(SystemExit) as exit_:
        rlhf_main()
    one_error_line(capsys, exit_, *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, fragments", [
    (["--tokenizer.vocab-size", "abc"], ["--tokenizer.vocab-size", "'abc'", "python -m textenv.build --help"]),
    (["no-such-step"], ["'no-such-step'"]),
])
def test_build_cli_flag_tyro_rejects_is_one_line(argv, fragments, tmp_path, monkeypatch, capsys):
    from textenv.build.pipeline import main as build_main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        build_main([*argv, "--out-dir", str(tmp_path / "cache")])
    one_error_line(capsys, exit_, *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a subprocess: the slow set's rule
def test_ppo_cli_as_a_user_runs_it(tmp_path):
    # tyro writes to the real stderr of a fresh interpreter: the one subprocess of this file
    out = subprocess.run([sys.executable, "-m", "agents.ppo", "--advantages", "bogus"], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "'--advantages'" in lines[0] and out.stdout == "" and list(tmp_path.iterdir()) == []


def test_tyro_message_without_a_box_keeps_the_error_text():
    assert tyro_message("usage: p [-h]\np: error: argument --x: invalid int value: 'y'\n") == \
        "argument --x: invalid int value: 'y'"


# ---- 2. a group-relative baseline on an env without groups -----------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--num-steps", "16"]])
def test_group_advantages_on_cartpole_are_refused_before_the_run_folder(extra, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--advantages", "rloo", *extra])
    one_error_line(capsys, exit_, "advantages='rloo'", "CartPole-v1", "no groups", "group_size")
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, no TensorBoard file


def test_group_advantages_need_groups_of_two(tmp_path, capsys):
    for envs, fragment in [(text_envs(), "no groups"), (text_envs(group_size=1), "no groups")]:
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: train(tiny(tmp_path, advantages="grpo"), envs=envs))  # noqa: B023
        one_error_line(capsys, exit_, "advantages='grpo'", fragment)
    assert not (tmp_path / "run").exists()
    from agents.advantages import RLOO
    from agents.vector import check_groups

    check_groups(text_envs(group_size=2), RLOO, seed=0)  # groups of two: accepted


# ---- 3. Args that cannot train ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, fragment", [
    (dict(advantages="bogus"), "advantages = 'bogus' is not one of ('gae', 'rloo', 'grpo')"),
    (dict(kl_controller="pi"), "kl_controller = 'pi'"),
    (dict(total_timesteps=1e6), "total_timesteps = 1000000.0 is a float; it must be int"),
    (dict(learning_rate=-1e-3), "learning_rate = -0.001 is out of range"),
    (dict(gamma=1.5), "gamma = 1.5 is out of range: it must be in [0, 1]"),
    (dict(gae_lambda=float("nan")), "gae_lambda = nan"),
    (dict(clip_coef=0.0), "clip_coef = 0.0"),
    (dict(max_grad_norm=0.0), "max_grad_norm = 0.0"),
    (dict(seed=-1), "seed = -1"),
    (dict(target_kl=0.0), "target_kl = 0.0"),
    (dict(device="gpu"), "device 'gpu'"),
    (dict(resume=True, run_dir=None), "pass that run's run_dir"),
])
def test_args_that_cannot_train_are_refused(bad, fragment):
    with pytest.raises(UsageError) as exc:
        check_args(Args(**bad))
    assert fragment in str(exc.value), str(exc.value)


def test_train_refuses_an_unknown_advantages_mode_before_writing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: train(tiny(tmp_path, advantages="bogus"), envs=text_envs()))
    one_error_line(capsys, exit_, "advantages = 'bogus'")
    assert not (tmp_path / "run").exists()


# ---- 4. best-of-n arguments ------------------------------------------------------------------------------------


def test_best_of_n_arguments_out_of_range_name_the_range():
    scores = np.arange(8.0).reshape(2, 4)  # 2 prompts x 4 samples
    for ns, allowed in [((0,), "in [1, 4]"), ((-1,), "in [1, 4]"), ((8,), "in [1, 4]"), ((), "at least one n")]:
        with pytest.raises(ValueError, match=r"ns: best-of-n needs at least one n, integers, and every n") as exc:
            pick_best(scores, scores > 0, None, ns)
        assert allowed in str(exc.value)
    for n in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"kl_bound: n = {n} must be an integer >= 1"):
            kl_bound(n)
    with pytest.raises(ValueError, match=r"every n >= 1; got \(\)"):
        best_of_n(None, None, None, ns=())
    assert kl_bound(np.int64(1)) == 0.0 and [r["n"] for r in pick_best(scores, scores > 0, None, (4, 1))] == [1, 4]


# ---- 5. envs agents.ppo cannot train on ------------------------------------------------------------------------


def test_continuous_actions_and_unknown_env_ids_are_one_line(tmp_path, monkeypatch, capsys):
    box = gym.vector.SyncVectorEnv([lambda: gym.make("Pendulum-v1")] * 4)
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: train(tiny(tmp_path), envs=box))
    one_error_line(capsys, exit_, "Discrete action spaces only", "Pendulum-v1", "Box")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--env-id", "NoSuchEnv-v0"])
    one_error_line(capsys, exit_, "env_id 'NoSuchEnv-v0'", "doesn't exist")
    assert list(tmp_path.iterdir()) == []


# ---- 6. the envs passed to train -------------------------------------------------------------------------------


def test_num_envs_must_match_the_envs_passed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: train(tiny(tmp_path, num_envs=8, num_steps=2), envs=text_envs(4)))
    one_error_line(capsys, exit_, "num_envs = 8 but the envs passed to train hold 4", "num_envs=4")
    assert not (tmp_path / "run").exists()


def test_the_run_folder_is_named_after_the_envs_passed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train(tiny(tmp_path, run_dir=None), envs=text_envs())
    assert Path(result["run_dir"]).name.startswith("ppo__TextEnv-v0__1__"), result["run_dir"]
    from agents.vector import env_name

    assert env_name(textenv.TextVectorEnv(2, tokenizer=textenv.char_tokenizer("ab"), prompts=["a"],
                                          reward_model=textenv.EndsWithReward("b"))) == "TextVectorEnv"
