"""The promises of docs/reliability.md that no other test file holds: a second Ctrl-C, a foreign checkpoint, a
folder result moved into place whole, a read-only complete cache, a real SIGKILL of `agents.ppo`."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from agents.checkpoint import load_checkpoint, written
from agents.cli import UsageError
from agents.ppo import Args, train

ROOT = Path(__file__).resolve().parents[1]


def cartpole(tmp_path: Path, name: str, **kw) -> Args:
    """A few-second CartPole run: 4 envs x 32 steps, 4 iterations, a checkpoint every iteration."""
    base = dict(num_envs=4, num_steps=32, total_timesteps=512, num_minibatches=4, update_epochs=1, eval_episodes=0,
                log_every=0, save_every=1, torch_threads=1, device="cpu", run_dir=str(tmp_path / name))
    return Args(**{**base, **kw})


class Signals:
    """A hook that sends this process SIGINT `times` times during `iteration`'s hook call."""

    def __init__(self, iteration: int, times: int):
        self.iteration, self.times = iteration, times

    def on_iteration(self, iteration, global_step, rollout, writer):
        if iteration == self.iteration:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    before = signal.getsignal(signal.SIGINT)  # Python's default; SIG_IGN when launched in the background by a script
    once = train(cartpole(tmp_path, "once"), hooks=Signals(iteration=2, times=1))  # the first: finish, save, return
    assert once["interrupted"] and load_checkpoint(tmp_path / "once" / "checkpoint.pt")["iteration"] == 2
    with pytest.raises(KeyboardInterrupt):  # the second, before iteration 2 is saved: stop now
        train(cartpole(tmp_path, "twice"), hooks=Signals(iteration=2, times=2))
    ckpt = load_checkpoint(tmp_path / "twice" / "checkpoint.pt")
    assert ckpt["iteration"] == 1 and all(torch.isfinite(v).all() for v in ckpt["agent"].values())
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


def test_a_foreign_checkpoint_is_one_error_and_left_as_it_was(tmp_path):
    train(cartpole(tmp_path, "run", total_timesteps=128))
    path = tmp_path / "run" / "checkpoint.pt"
    saved = path.read_bytes()
    acrobot = gym.vector.SyncVectorEnv([lambda: gym.make("Acrobot-v1")] * 4)  # 6 observations, 3 actions
    with pytest.raises(UsageError, match=r"another network's weights \(size mismatch.*trained on CartPole-v1; resume "
                                         r"with the settings it was trained with"):
        train(cartpole(tmp_path, "run", total_timesteps=256, env_id="Acrobot-v1", resume=True), envs=acrobot)
    assert path.read_bytes() == saved


def test_a_folder_result_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """`written` on a folder (the saved policy): a write that fails half way, a failed rename and a kill between
    the two renames each leave the previous folder whole and nothing else."""
    policy = tmp_path / "policy"

    def save(text: str, fail: bool = False):
        def write(tmp: Path):
            tmp.mkdir()
            (tmp / "config.json").write_text(text)
            (tmp / "model.safetensors").write_text(text[: len(text) // 2])
            if fail:
                raise OSError(errno.ENOSPC, "No space left on device")
            (tmp / "model.safetensors").write_text(text)
        return write

    def contents():
        return {p.name: p.read_text() for p in policy.iterdir()}, sorted(p.name for p in tmp_path.iterdir())

    written(policy, save("first"))
    first = contents()
    assert first == ({"config.json": "first", "model.safetensors": "first"}, ["policy"])
    with pytest.raises(OSError, match="No space left"):
        written(policy, save("second", fail=True))
    assert contents() == first

    real_replace = os.replace

    def replace(src, dst):  # the new folder cannot be moved into place
        if Path(src).name == "policy.tmp":
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="I/O error"):
        written(policy, save("third"))
    monkeypatch.undo()
    assert contents() == first
    real_replace(policy, tmp_path / "policy.old")  # killed after moving the old folder aside
    with pytest.raises(OSError, match="No space left"):
        written(policy, save("fourth", fail=True))
    assert contents() == first  # the next write put the old folder back first
    written(policy, save("fifth"))
    assert contents() == ({"config.json": "fifth", "model.safetensors": "fifth"}, ["policy"])


class ReadOnly:
    """Every write under `root` fails as on a read-only file system (EROFS), for this process: an audit hook sees
    each open for writing, mkdir, rename, remove and rmtree, whoever calls them (root ignores file modes)."""

    root: Path | None = None
    _installed = False
    _writes = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "os.chmod"}

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        if cls.root is None or not (event in cls._writes or event == "open" and cls._writing(args)):
            return
        for arg in args[:2] if event == "os.rename" else args[:1]:  # a rename's source and destination
            path = Path(os.fsdecode(arg)) if isinstance(arg, str | bytes | os.PathLike) else None  # not an fd
            if path is not None and path.absolute().is_relative_to(cls.root):
                raise OSError(errno.EROFS, "Read-only file system", str(path))

    @staticmethod
    def _writing(args: tuple) -> bool:
        mode, flags = args[1], args[2]
        return any(c in (mode or "") for c in "wax+") or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    def __init__(self, root: Path):
        if not ReadOnly._installed:
            sys.addaudithook(ReadOnly.hook)
            ReadOnly._installed = True
        self.path = root.absolute()

    def __enter__(self):
        ReadOnly.root = self.path

    def __exit__(self, *exc):
        ReadOnly.root = None


def test_a_complete_read_only_cache_is_reused_and_a_build_into_it_is_one_error(tmp_path, capsys):
    from textenv.build.pipeline import main

    cache = tmp_path / "cache"
    argv = ["tokenizer", "--out-dir", str(cache), "--tokenizer.vocab-size", "300", "--train-limit", "200"]
    built = main(argv)
    with ReadOnly(cache):
        with pytest.raises(OSError, match="Read-only"):  # the simulation holds
            (cache / "probe").write_text("")
        assert main(argv) == built  # complete: reused, nothing written
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:  # another vocabulary must be built: one error line naming the cache
            main([*argv[:-3], "301", *argv[-2:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: cannot write the artefact cache {cache}")
    assert sorted(p.name for p in cache.iterdir()) == [built.tokenizer.name]


@pytest.mark.slow  # two CLI processes
def test_a_killed_ppo_run_resumes_to_the_returns_of_an_uninterrupted_one(tmp_path):
    """`python -m agents.ppo` killed with SIGKILL once a checkpoint exists; `--resume` ends the run with the
    returns of the uninterrupted run up to that checkpoint, and the same global step."""
    flags = ["--num-envs", "4", "--num-steps", "32", "--total-timesteps", "4096", "--save-every", "1",
             "--eval-episodes", "0", "--torch-threads", "1", "--log-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args, **kw):
        return subprocess.run([sys.executable, "-m", "agents.ppo", *flags, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, **kw)

    full = cli("--run-dir", "full")
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "agents.ppo", *flags, "--run-dir", "killed"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = load_checkpoint(ckpt)
    assert proc.returncode == -signal.SIGKILL and at["global_step"] < 4096  # killed mid-run, not at its end
    resumed = cli("--run-dir", "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole, after = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(ckpt)
    assert after["global_step"] == whole["global_step"] == 4096
    before = [x for x in whole["episode_returns"] if x[0] <= at["global_step"]]
    assert after["episode_returns"][: len(before)] == before
