"""What `--shard` saves: per-rank bytes of a policy's weights, gradients and Adam state, unsharded (one process, and
data-parallel over 2 ranks) against sharded over 2 ranks (FSDP2, `agents.sharding`), measured on CPU (gloo), and
the table of what fits on which GPU that the measured bytes per parameter give.

The policy is a `GPTAgent` over a randomly initialised Llama of SmolLM2-135M's shape (30 blocks of 576, 49152
tokens, tied embeddings; built from its config, nothing downloaded), every parameter trainable and, as the
`smollm2` preset trains it, the top 4 blocks over a frozen trunk. Each process takes one PPO-shaped step (a
teacher-forced forward of `evaluate_sequences` over 8 sequences of 32 tokens, backward, Adam) and then counts the
bytes it holds: its parameters (a sharded one's local shard), their gradients and Adam's state. Activations,
KV caches, the reference and the reward model are not counted (they do not depend on `--shard`).

    python benchmarks/sharding_memory.py            # both policies, 1 process, 2 ranks data-parallel, 2 ranks sharded
    python benchmarks/sharding_memory.py --quick    # a 4-block model of the same width
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "SHARDING_MEMORY "
GB = 1e9
SIZES = {"SmolLM2-135M": 0.135e9, "SmolLM2-360M": 0.362e9, "SmolLM2-1.7B": 1.71e9, "7B": 7e9}
GPUS = (24, 40, 80)  # GPU memory, GB


@dataclass
class Args:
    quick: bool = False
    """4 blocks instead of 30 (a smoke run)"""
    worker: str | None = None
    """internal: `<shard 0|1>:<trainable layers or all>` (run under torchrun or alone)"""
    out: str | None = None
    """JSON path (default benchmarks/results/sharding_memory.json)"""


def model(quick: bool):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=4 if quick else 30, num_attention_heads=9,
                                        num_key_value_heads=3, tie_word_embeddings=True, pad_token_id=0))


def nbytes(t) -> int:
    """Bytes this rank holds for tensor `t` (a DTensor's local shard)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def worker(spec: str, quick: bool) -> None:
    import torch

    from agents import distributed, sharding
    from agents.gpt_policy import GPTAgent

    shard, layers = spec.split(":")
    dist, _ = distributed.setup("cpu")
    torch.set_num_threads(1)
    agent = GPTAgent(model(quick), 0, trainable_layers=None if layers == "all" else int(layers))
    distributed.broadcast_module(agent, dist)
    if shard == "1":
        sharding.shard_agent(agent, dist)
    trainable = [p for p in agent.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-5)
    g = torch.Generator().manual_seed(dist.rank)
    obs = torch.randint(1, 49152, (1, 8, 32), generator=g)  # (T=1, E=8, L=32): one step of 8 sequences
    logprob, _, value = agent.evaluate_sequences(obs, torch.randint(1, 49152, (1, 8), generator=g),
                                                 torch.ones(1, 8, dtype=torch.bool))
    (logprob.sum() + value.sum()).backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    counts = {"trainable_params": sum(nbytes(p) for p in trainable),
              "frozen_params": sum(nbytes(p) for p in agent.parameters() if not p.requires_grad),
              "grads": sum(nbytes(p.grad) for p in trainable if p.grad is not None),
              "adam": sum(nbytes(t) for t in state),
              "n_trainable": sum(p.numel() for p in trainable) * (dist.world_size if shard == "1" else 1),
              "n_frozen": sum(p.numel() for p in agent.parameters() if not p.requires_grad)}
    counts["total"] = sum(counts[k] for k in ("trainable_params", "frozen_params", "grads", "adam"))
    every = distributed.gather(counts, dist)
    if dist.is_main:
        print(MARK + json.dumps({"ranks": every}), flush=True)
    distributed.cleanup(dist)
    distributed.exit_worker(0)


def launch(spec: str, nproc: int, quick: bool) -> list[dict]:
    """Every rank's byte counts for `spec` on `nproc` processes (1: no launcher)."""
    me = [str(Path(__file__).resolve()), "--worker", spec] + (["--quick"] if quick else [])
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
           if nproc > 1 else [sys.executable]) + me
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in run.stdout.splitlines() if x.startswith(MARK)), None)
    if run.returncode != 0 or line is None:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    return json.loads(line[len(MARK):])["ranks"]


def fits_table(per_param: dict) -> list[list]:
    """GB per GPU for each policy size: unsharded, and sharded over 2 and 8 GPUs (bf16 compute), from the measured
    bytes per trainable parameter and the bytes a rank holds whole while it rolls out; the frozen reference (float32,
    replicated) beside it. Activations and KV caches come on top."""
    rows = []
    for name, n in SIZES.items():
        whole = n * per_param["unsharded"]  # float32 weights + grads + Adam
        ref = n * 4  # the frozen reference, float32, on every rank
        row = [name, f"{(whole + ref) / GB:.1f}"]
        for ranks in (2, 8):
            rollout = n * 2  # the units gathered whole in bf16 for the rollout
            row.append(f"{(whole / ranks + rollout + ref) / GB:.1f}")
        row.append(", ".join(f"{g}" for g in GPUS if (whole + ref) / GB <= g) or "none")
        row.append(", ".join(f"{g}" for g in GPUS if (whole / 8 + n * 2 + ref) / GB <= g) or "none")
        rows.append(row)
    return rows


def main() -> None:
    import tyro

    args = tyro.cli(Args, description=__doc__)
    if args.worker:
        return worker(args.worker, args.quick)
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import machine_info, print_table, target, write_result

    results, rows, targets = {"machine": machine_info()}, [], []
    for layers in ("all", "4"):
        one = launch(f"0:{layers}", 1, args.quick)[0]
        dp = launch(f"0:{layers}", 2, args.quick)
        sh = launch(f"1:{layers}", 2, args.quick)
        trainable = lambda c: c["trainable_params"] + c["grads"] + c["adam"]  # noqa: E731
        ratio = max(trainable(c) for c in sh) / trainable(one)
        results[layers] = {"one_process": one, "data_parallel_2": dp, "sharded_2": sh,
                           "sharded_over_unsharded_trainable": ratio,
                           "bytes_per_trainable_param_unsharded": trainable(one) / one["n_trainable"]}
        for label, counts in (("1 process", [one]), ("2 ranks, data-parallel", dp), ("2 ranks, --shard", sh)):
            c = max(counts, key=lambda c: c["total"])
            rows.append([layers, label, c["trainable_params"] / GB, c["grads"] / GB, c["adam"] / GB,
                         c["frozen_params"] / GB, c["total"] / GB])
        targets.append(target(f"sharded / unsharded trainable bytes per rank, {layers} blocks trainable", ratio,
                              "<= 0.55 (1/N = 0.5 for N = 2)", ratio <= 0.55))
    print_table(["trainable", "run", "weights GB", "grads GB", "Adam GB", "frozen GB", "total GB per rank"], rows)
    per_param = {"unsharded": results["all"]["bytes_per_trainable_param_unsharded"]}
    table = fits_table(per_param)
    print()
    print_table(["policy", "1 GPU GB", "2 GPUs GB each", "8 GPUs GB each", "fits unsharded (GB)",
                 "fits on 8 (GB)"], table)
    results["fits"] = {"bytes_per_trainable_param": per_param, "rows": table}
    print(f"wrote {write_result('sharding_memory', results, targets, args.quick, args.out)}")


if __name__ == "__main__":
    main()
