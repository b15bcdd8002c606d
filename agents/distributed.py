"""Data-parallel PPO plumbing on torch.distributed, in the manner of CleanRL's `ppo_atari_multigpu.py`.

    torchrun --nproc-per-node 2 -m agents.ppo zoo                     # 2 processes on one machine
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 4 --master-addr HOST --master-port 29500 -m agents.ppo ...

An entry point (`agents.ppo.main`, `agents.rlhf.main`) calls `setup()` once, passes the `Dist` down
(`agents.ppo.train(dist=...)`) and `cleanup`s at the end: with no launcher (no `WORLD_SIZE` > 1 in the environment) it returns a
single-process `Dist` and nothing else changes. Under `torchrun` every rank runs its own vector env of `num_envs`
envs seeded `seed + rank * SEED_STRIDE` and its own rollout; ranks start from rank 0's weights, average their
gradients with one all-reduce per minibatch (summed: each rank's loss is its share of the mean over all ranks' steps;
before clipping and the optimizer step, so every rank takes the same
step and the weights stay identical), decide `target_kl` early stops and Ctrl-C together, and gather their
episode statistics. Rank 0 alone writes TensorBoard logs and checkpoints and runs the evaluation.

The gradients are all-reduced explicitly instead of through DistributedDataParallel: DDP hooks `forward`, and PPO
calls custom methods (`get_action_and_value`, `evaluate_sequences`) that DDP would not see.
Failures: a rank that raises exits non-zero; torchrun then stops the other ranks and exits non-zero itself. A rank
that hangs or a peer lost without torchrun noticing ends the collectives after `timeout_s` (`--dist-timeout`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist

SEED_STRIDE = 1_000_003  # rank r's seeds are seed + r * SEED_STRIDE: streams that never meet for sane seeds


@dataclass(frozen=True)
class Dist:
    """Where this process stands: `rank` of `world_size` (1 = plain single process), `local_rank` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # `setup` created the process group (and `cleanup` ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, saves and evaluates."""
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """This rank's seed for `seed` (rank 0 keeps it: a 1-process run is rank 0 of a 1-rank job)."""
        return seed + self.rank * SEED_STRIDE


SINGLE = Dist()  # a plain single-process run


def env_world_size() -> int:
    """`WORLD_SIZE` as torchrun sets it (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "auto", timeout_s: float = 600.0) -> tuple[Dist, str]:
    """Join the process group torchrun describes in the environment (gloo on CPU; on CUDA, NCCL for CUDA
    tensors and gloo for CPU ones).

    Returns (Dist, device): under torchrun with CUDA, `auto`/`cuda` become `cuda:LOCAL_RANK` (one GPU per rank).
    Already initialised (e.g. by the caller, to build models on rank 0 first): reused as it is."""
    if env_world_size() <= 1 and not tdist.is_initialized():
        return Dist(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = not tdist.is_initialized()
    d = Dist(int(os.environ.get("RANK", "0")), env_world_size(), local_rank, owns)
    device = rank_device(device, d)
    if owns:
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(device))
        # NCCL carries CUDA tensors only: gloo beside it for CPU ones (PPO's loss statistics, the Ctrl-C flag)
        tdist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(tdist.get_rank(), tdist.get_world_size(), local_rank, owns), device


def given(d: Dist | None) -> Dist:
    """The process group an entry point set up and passed down, or a single process; under torchrun without one,
    an error naming the fix (every rank would otherwise run alone, each writing the same files)."""
    if d is not None:
        return d
    if env_world_size() > 1:
        from agents.cli import UsageError

        raise UsageError("running under torchrun (WORLD_SIZE > 1) without a process group: call "
                         "`dist, _ = agents.distributed.setup(device)` once and pass `dist=dist` down")
    return SINGLE


def rank_device(device: str, d: Dist) -> str:
    """This rank's device for `device`: under a multi-process job with CUDA, `auto`/`cuda` -> `cuda:LOCAL_RANK`
    (one GPU per rank); otherwise `device` unchanged (`auto` is resolved later by `agents.vector.resolve_device`)."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return f"cuda:{d.local_rank}" if d.enabled and cuda and device in ("auto", "cuda") else device


def broadcast_module(module: torch.nn.Module, d: Dist) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical starting weights whatever the seeds)."""
    if d.enabled:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                tdist.broadcast(t.data, src=0)


def all_reduce_grads(params: Iterable[torch.nn.Parameter], d: Dist) -> None:
    """Replace each gradient by its sum over the ranks, in one flat all-reduce (a missing grad counts as 0).

    Call between `backward()` and gradient clipping: every rank then clips and steps on the same gradient. A sum,
    not a mean: each rank's loss is already its share of the mean over every rank's steps (`agents.ppo.update`)."""
    if not d.enabled:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
        offset += n


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of `x` over the ranks (a copy; `x` itself untouched). Single process: `x`."""
    if not d.enabled:
        return x
    y = x.clone()
    tdist.all_reduce(y, op=tdist.ReduceOp.SUM)
    return y


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank if `flag` is True on any rank (one tiny all-reduce)."""
    if not d.enabled:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if tdist.get_backend() == "nccl" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: object, d: Dist) -> list:
    """Every rank's `obj` (any picklable value), in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world_size
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, d: Dist) -> object:
    """Rank 0's `obj` on every rank (e.g. a checkpoint only rank 0 read)."""
    if not d.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def rank_zero_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first while the others wait at a barrier, then the others run it: build or download
    into a shared cache once (the others then find it built). Single process: just runs the block."""
    if d.enabled and not d.is_main:
        tdist.barrier()
    yield
    if d.enabled and d.is_main:
        tdist.barrier()


def cleanup(d: Dist) -> None:
    """Leave the process group if `setup` created it (a caller's own group stays up for the caller)."""
    if d.owns_group and tdist.is_initialized():
        tdist.barrier()  # no rank tears its connections down while a peer still talks (gloo aborts at exit then)
        tdist.destroy_process_group()


def exit_worker(code: int = 0) -> None:
    """End a torchrun worker now, after a clean shutdown (`cleanup`): flush stdio and `os._exit(code)`.

    Now and then (~1 in 20 runs here, torch 2.13) a gloo rank aborts while the interpreter tears down after the
    job is done ("terminate called without an active exception", SIGABRT), and torchrun reports the whole job
    failed; skipping the teardown avoids it. Without torchrun: a plain `sys.exit(code)`."""
    if env_world_size() <= 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class NullWriter:
    """The TensorBoard writer of ranks other than 0: accepts every call, writes nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
