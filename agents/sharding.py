"""The policy sharded over the ranks with PyTorch FSDP2 (`--shard` under torchrun): each rank holds 1/N of the
trainable weights, their gradients and Adam's state, instead of all of them.

    torchrun --nproc-per-node 2 -m agents.ppo zoo --shard
    torchrun --nproc-per-node 8 -m agents.rlhf smollm2 --ppo.shard

What is sharded: every trainable parameter. `fully_shard` wraps each unit the agent names (`agent.shard_units()`:
GPTAgent's trainable decoder blocks) and then the agent itself, which takes the rest (final norm, value head, and
with every block trainable the embeddings and the tied LM head). What is replicated, and why:
- the frozen trunk (`trainable_layers`: embeddings and lower blocks) is left out (`ignored_params`): it has no
  gradients or Adam state (a quarter of a trainable weight's 16 bytes in float32 Adam), and the rollout computes it
  once per token inside each rank's env steps, where a collective per token would cost more than the memory saves;
- the frozen reference (the KL anchor) lives in the env, which scores each rank's episodes on its own: it is not
  the agent's and FSDP never sees it.

Where the weights are whole: `gathered(agent)` all-gathers every unit once and keeps them whole until it exits. PPO
holds it around the rollout and the advantages (one all-gather per unit per iteration, whatever the number of
tokens; the KV-cached token-by-token rollout then runs with no collective at all, so ranks may take different
numbers of steps) and around the final evaluation. The update runs as FSDP means: each minibatch's forward
all-gathers a unit before it runs and frees it after, the backward gathers it again and reduce-scatters its
gradient. FSDP needs every rank to run each unit the same number of times per minibatch: a GPTAgent runs each
minibatch in one forward when sharded (no length groups), and a rank without steps in a minibatch still runs the
agent on an empty or zero-weighted batch.

Gradients are summed over ranks (each rank's loss is already its share of the mean over every rank's steps, as
unsharded: `agents.update`), in float32. On CUDA with bf16 the units compute in bf16 (`MixedPrecisionPolicy`,
float32 master weights and reduction); on CPU in float32. Checkpoints are `torch.distributed.checkpoint` folders
(`save_sharded`, `load_weights`) that load on any number of ranks, sharded or not, and `full_state_dict` gathers
the whole policy on rank 0 (the RLHF job's `policy/` folder).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from agents import distributed

METHODS = ("get_value", "get_action_and_value", "evaluate_sequences", "act")  # what PPO calls instead of forward
META = "meta.pt"  # the non-tensor part of a sharded checkpoint, beside the shards


def is_sharded(module: nn.Module) -> bool:
    """True if `module` was sharded by `shard_agent`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def units(agent: nn.Module) -> list[nn.Module]:
    """The FSDP modules of a sharded agent, the agent (the root) last."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in agent.modules() if isinstance(m, FSDPModule) and m is not agent] + [agent]


def mixed_precision(device: torch.device) -> bool:
    """bf16 compute with float32 master weights and reduction where the device has bf16 (CUDA), else float32."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def shard_agent(agent: nn.Module, dist: distributed.Dist) -> nn.Module:
    """Shard `agent`'s trainable parameters over the ranks of `dist` in place (its class becomes an FSDP one); call
    after every rank holds the same weights (`distributed.broadcast_module`) and before building the optimizer."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    device = next(agent.parameters()).device
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision(device) else MixedPrecisionPolicy())
    frozen = {p for p in agent.parameters() if not p.requires_grad}
    shard_units = getattr(agent, "shard_units", lambda: [])()
    for unit in shard_units:
        fully_shard(unit, mp_policy=mp)
    fully_shard(agent, mp_policy=mp, ignored_params=frozen)
    for name in METHODS:
        if callable(getattr(agent, name, None)):
            register_fsdp_forward_method(agent, name)  # FSDP's hooks run around them as around forward
    for unit in units(agent):
        unit.set_gradient_divide_factor(1.0)  # a sum: the losses are shares of the mean over all ranks
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return agent


@contextlib.contextmanager
def gathered(agent: nn.Module, enabled: bool = True) -> Iterator[None]:
    """The whole weights on every rank while the block runs (one all-gather per unit, on entry), then sharded
    again. Every rank must enter it; inside, the agent runs with no collective. Not sharded: does nothing."""
    if not (enabled and is_sharded(agent)):
        yield
        return
    inner = units(agent)[:-1]
    for unit in inner:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units(agent):
        unit.unshard()
    try:
        yield
    finally:
        for unit in units(agent):
            unit.reshard()
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)


def state_dicts(agent: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"agent", "optimizer"}: the weights and Adam's state keyed by parameter name, as this rank holds them
    (its shards when sharded, whole tensors otherwise): what `torch.distributed.checkpoint` saves and loads."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"agent": get_model_state_dict(agent), "optimizer": get_optimizer_state_dict(agent, optimizer)}


def save_sharded(path: Path, agent: nn.Module, optimizer: torch.optim.Optimizer, meta: dict | None,
                 dist: distributed.Dist) -> None:
    """Every rank's shards of the weights and Adam into the folder `path`, with rank 0's `meta` (the run's counters,
    RNG, args) beside them, written whole or not at all: into `<path>.tmp`, moved over `path` by rank 0
    (`agents.checkpoint.written`). Every rank calls it."""
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp

    from agents.checkpoint import checkpoint_write, written

    state = state_dicts(agent, optimizer)

    def write(tmp: Path) -> None:
        if dist.enabled:
            tdist.barrier()  # rank 0 cleared the leftovers: the others may start writing
        with _quiet():
            dcp.save(state, checkpoint_id=tmp)
        if dist.is_main:
            torch.save(meta, tmp / META)

    with checkpoint_write(path):  # a failure on any rank fails every rank's save: the previous one is kept
        if dist.is_main:
            written(path, write)
        else:
            write(path.with_name(path.name + ".tmp"))
    if dist.enabled:
        tdist.barrier()  # no rank goes on (or reads it) before it is in place


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without a process group torch.distributed.checkpoint warns that it assumes one process: it is meant to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def read_meta(path: Path) -> dict:
    """The non-tensor part of the sharded checkpoint folder `path`."""
    return torch.load(Path(path) / META, map_location="cpu", weights_only=True)


def load_weights(ckpt: dict, agent: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint's weights and Adam state into `agent`/`optimizer`, sharded or not, whichever way it was
    saved: a sharded folder (`ckpt["sharded"]`, read by every rank, resharded to this job's ranks) or the whole
    tensors of an unsharded run (`ckpt["agent"]`, `ckpt["optimizer"]`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if "sharded" in ckpt:
        state = state_dicts(agent, optimizer)
        with _quiet():
            dcp.load(state, checkpoint_id=ckpt["sharded"])
        set_model_state_dict(agent, state["agent"])
        set_optimizer_state_dict(agent, optimizer, state["optimizer"])
    elif is_sharded(agent):  # a whole checkpoint into a sharded agent: every rank keeps its shards of it
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(agent, ckpt["agent"], options=full)
        set_optimizer_state_dict(agent, optimizer, by_name(agent, ckpt["optimizer"]), options=full)
    else:
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])


def by_name(agent: nn.Module, optim_state: dict) -> dict:
    """A `torch.optim` state dict keyed by parameter index (the optimizer was built on the agent's trainable
    parameters, in order) keyed by parameter name instead, as `set_optimizer_state_dict` reads it."""
    names = [n for n, p in agent.named_parameters() if p.requires_grad]
    return {"state": {names[i]: s for i, s in optim_state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]]}


def full_state_dict(agent: nn.Module) -> dict:
    """The whole weights (on CPU) on rank 0 and {} on the others, gathered from the shards; every rank calls it.
    Not sharded: the agent's own state dict."""
    if not is_sharded(agent):
        return agent.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(agent, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded(agent: nn.Module, make: Callable[[], nn.Module], dist: distributed.Dist) -> nn.Module | None:
    """A plain copy of the sharded `agent` on rank 0 (`make()` builds one like it; it gets the gathered weights),
    None on the others; every rank calls it. Not sharded: `agent` itself."""
    if not is_sharded(agent):
        return agent
    full = full_state_dict(agent)
    if not dist.is_main:
        return None
    plain = make()
    plain.load_state_dict(full)
    return plain
