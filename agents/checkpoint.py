"""Atomic PPO checkpoints that load with `torch.load(weights_only=True)`: tensors, numbers, strings, lists.

A missing, corrupt or incompatible checkpoint is the user's to fix: `agents.cli.UsageError` (a ValueError)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from agents.cli import UsageError


def rng_state() -> dict:
    """The python, numpy and torch (and CUDA) RNG states as weights-only-loadable values.

    Written out rather than saved as the libraries return them: `torch.load(weights_only=True)` refuses numpy
    arrays (numpy's state) unless numpy's reconstructors are allow-listed process-wide, and pickling them is what
    weights-only loading is there to avoid; a tensor, ints and lists load everywhere."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "python": [version, list(py_state), gauss_next],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state`."""
    version, py_state, gauss_next = state["python"]
    random.setstate((version, tuple(py_state), gauss_next))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # resumed on fewer GPUs than saved: those there are
        for i, gpu_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, i)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; cuDNN deterministic or not."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic


WHOLE, SHARDED = "checkpoint.pt", "checkpoint.dcp"  # a run's checkpoint: one file, or a sharded run's folder


def checkpoint_path(run_dir: str | Path, sharded: bool) -> Path:
    """Where a run in `run_dir` writes its checkpoint: `checkpoint.pt`, or with a sharded agent the folder
    `checkpoint.dcp` (`agents.sharding.save_sharded`)."""
    return Path(run_dir) / (SHARDED if sharded else WHOLE)


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's newest checkpoint, whole or sharded (a run resumed the other way wrote the other kind), or None."""
    found = [p for p in (Path(run_dir) / WHOLE, Path(run_dir) / SHARDED) if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def run_state(iteration: int, global_step: int, kl_control: object, episode_returns: list, args: object,
              world_size: int) -> dict:
    """What a PPO checkpoint holds besides the weights and Adam's state: RNG states, counters, the returns so far
    and the run's args."""
    return {"iteration": iteration, "global_step": global_step, "kl_coef": kl_control.coef,
            "kl_control": kl_control.state_dict(), "rng": rng_state(), "num_envs": args.num_envs,
            "num_steps": args.num_steps, "world_size": world_size,
            "episode_returns": [list(x) for x in episode_returns], "args": dataclasses.asdict(args)}


def writable_dir(path: str | Path, what: str = "run folder") -> Path:
    """`path` created if need be and checked writable by writing a probe file, or a UsageError naming it."""
    path = Path(path)
    probe = path / ".write-check"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write the {what} {path} ({e.strerror or e}); point it at a folder you can write "
                         "to (e.g. --run-dir runs/mine)") from None
    return path


def check_creatable(path: str | Path, what: str = "run folder") -> None:
    """A UsageError naming `path` when it could not be made or written, checked without writing anything (for
    a check made before slow work starts): it is a file, or its nearest existing ancestor is a file or a folder
    this process may not write. `writable_dir` probes for real once the folder is wanted."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    problem = ("is a file" if not existing.is_dir() else
               "is not writable" if not os.access(existing, os.W_OK | os.X_OK) else None)
    if problem:
        at = "" if existing == path else f": {existing} {problem}"
        raise UsageError(f"cannot write the {what} {path}{at or ' (' + problem + ')'}; point it at a folder you can "
                         "write to (e.g. --run-dir runs/mine)")


def written(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` into a temporary file or folder beside `path`, then moved over `path`: a failure or a kill half
    way (a full disk) leaves the old `path`, or none, never half of one; the temporary one is removed on failure.
    Every result of a run goes through it: checkpoints, the report's files, the saved policy.

    A file is replaced in one `os.replace`. A folder (`save_pretrained`) cannot be renamed over another, so the
    old one is moved aside first and removed after: a kill between the two renames leaves the old folder whole
    under `<name>.old` and none at `path`, never a mixed one; the next write puts it back first."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if old.is_dir() and not path.exists():  # a write killed between the two renames: the old folder goes back
        os.replace(old, path)
    for leftover in (tmp, old) if old.is_dir() else (tmp,):
        remove(leftover)
    try:
        write(tmp)
        aside = tmp.is_dir() and path.exists()
        if aside:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if aside:
                os.replace(old, path)
            raise
    except BaseException:
        remove(tmp)
        raise
    if old.is_dir():
        shutil.rmtree(old)


def remove(path: Path) -> None:
    """Remove the file or folder `path` (nothing there: nothing to do)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to `path` atomically: a temporary file, then `os.replace` (a kill never leaves half a file).
    A failed write (a full disk, a folder gone read-only) removes the temporary file, keeps the previous
    checkpoint as it was and raises a UsageError that says so."""
    path = Path(path)
    with checkpoint_write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        written(path, lambda tmp: torch.save(state, tmp))


@contextlib.contextmanager
def checkpoint_write(path: Path) -> Iterator[None]:
    """A checkpoint write that fails (a full disk, a folder gone read-only; torch's zip writer reports a short write
    as a RuntimeError, torch.distributed.checkpoint as a CheckpointException) becomes a UsageError saying whether
    the previous checkpoint is kept."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (OSError, RuntimeError, CheckpointException) as e:
        kept = "the previous checkpoint is kept as it was" if path.exists() else "no earlier checkpoint exists"
        raise UsageError(f"could not write checkpoint {path} ({getattr(e, 'strerror', None) or e}); {kept}. "
                         "Free disk space or fix the folder's permissions, then continue with --resume") from None


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by `save_checkpoint` (a file) or `agents.sharding.save_sharded` (a folder: its
    counters and settings, and `"sharded"`, the folder whose shards `restore` reads), with a clear error when it is
    missing or unreadable."""
    path = Path(path)
    if not path.exists():
        raise UsageError(
            f"no checkpoint at {path}: --resume continues the run in --run-dir; point --run-dir at a run "
            "that saved a checkpoint (save_every > 0) or drop --resume to start a new run"
        )
    try:
        if path.is_dir():
            from agents.sharding import read_meta

            state = {**read_meta(path), "sharded": str(path)}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(
            f"checkpoint {path} is corrupt or not a PPO checkpoint ({type(e).__name__}: {e}); "
            "delete it or point --run-dir at another run"
        ) from e
    weights = {"sharded"} if isinstance(state, dict) and "sharded" in state else {"agent", "optimizer"}
    missing = {*weights, "global_step", "iteration", "rng"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise UsageError(f"checkpoint {path} lacks {sorted(missing)}; it was not written by agents.ppo")
    return state


def restore(ckpt: dict, agent: torch.nn.Module, optimizer: torch.optim.Optimizer, kl_control: object) -> tuple[int, list]:
    """Load a checkpoint's weights, optimizer, RNG and KL-controller states (and drop the agent's caches, computed
    with other weights); returns (global_step, episode_returns)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from agents.sharding import load_weights

    try:
        load_weights(ckpt, agent, optimizer)  # whole or sharded, into an agent sharded or not
    except (RuntimeError, ValueError, KeyError, CheckpointException) as e:  # a network of another shape
        first = str(e).strip().splitlines()[-1].strip()[:300]
        env_id = (ckpt.get("args") or {}).get("env_id")
        trained_on = f", trained on {env_id}" if env_id else ""
        raise UsageError(f"the checkpoint holds another network's weights ({first}){trained_on}; resume with the "
                         "settings it was trained with (env, model) or point --run-dir at another run") from None
    set_rng_state(ckpt["rng"])
    if hasattr(agent, "reset_cache"):
        agent.reset_cache()
    kl_control.load_state_dict(ckpt.get("kl_control") or {"coef": ckpt["kl_coef"]})
    return ckpt["global_step"], [tuple(x) for x in ckpt["episode_returns"]]


def open_run(path: str | Path, resume: bool, num_envs: int, num_steps: int) -> dict | None:
    """The checkpoint to resume in `path`'s folder (None for a new run), or a clear error: `--resume` with no or a
    corrupt checkpoint, a new run over an existing one, or other rollout shapes (num_envs per process, num_steps).
    `path` is where this run writes; it resumes from the folder's newest checkpoint, whole or sharded."""
    path = Path(path)
    found = find_checkpoint(path.parent)
    if not resume:
        if found is not None:
            raise UsageError(f"{found} exists: pass --resume to continue that run, or another --run-dir")
        return None
    ckpt = load_checkpoint(found or path)
    if (ckpt["num_envs"], ckpt["num_steps"]) != (num_envs, num_steps):
        raise UsageError(f"checkpoint has num_envs, num_steps = {ckpt['num_envs'], ckpt['num_steps']}, the args "
                         f"{num_envs, num_steps}: resume with the run's settings")
    return ckpt


class StopOnCtrlC:
    """Ctrl-C sets a flag: the loop finishes its iteration, saves a checkpoint and returns. Twice: stop now."""

    def __init__(self) -> None:
        self.requested, self._old = False, None

    def __enter__(self) -> StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this iteration and saving a checkpoint (Ctrl-C again to stop now)", flush=True)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
