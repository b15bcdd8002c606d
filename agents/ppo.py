"""PPO for any Gymnasium (vector) env with a Discrete action space, CleanRL style, read top to bottom.

    python -m agents.ppo                                # CleanRL's ppo.py defaults (the `cleanrl` preset)
    python -m agents.ppo zoo --seed 2                   # CartPole-v1 with rl-baselines3-zoo's tuning
    python -m agents.ppo --run-dir runs/a --resume      # continue a killed run with its saved settings
    torchrun --nproc-per-node 2 -m agents.ppo zoo       # data-parallel: num_envs per process (agents.distributed)
    torchrun --nproc-per-node 2 -m agents.ppo --shard   # the agent sharded over the processes (agents.sharding)

Each iteration runs in phases: `collect_rollout` (T steps of every env, next-step autoreset steps masked;
`agents.rollout`), `compute_advantages` (a per-token KL penalty to a reference policy from `infos["ref_logprob"]`,
fixed or adaptive coefficient as Ziegler et al. 2019; GAE with truncated episodes bootstrapped from their final
observation, or a group-relative baseline; `agents.advantages`), `update` (epochs of minibatches, by env column for
sequence agents; gradients averaged over ranks; `agents.update`), then logging (`agents.progress`), hooks and atomic
checkpoints (`--resume`, also across numbers of processes); a deterministic evaluation at the end.
This file imports only gymnasium, torch, numpy and the stdlib (a test checks it); agents are duck-typed
(protocol in `agents.policies`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from agents import distributed, sharding
from agents.advantages import ADVANTAGE_MODES, AdvantageMode, compute_advantages
from agents.checkpoint import StopOnCtrlC, checkpoint_path, open_run, seed_everything, writable_dir
from agents.cli import UsageError, check_fields, parse_cli, run_cli
from agents.evaluate import final_evaluation
from agents.kl_control import make_kl_controller
from agents.policies import MLPAgent
from agents.progress import log_iteration, open_writer, progress_line
from agents.rollout import Carry, Rollout, collect_rollout, episode_stats, warn_if_negative_kl
from agents.run import Run, note_last_checkpoint, resume_run, save_run
from agents.update import update
from agents.vector import check_device, check_groups, env_name, resolve_device, set_torch_threads, vector_env


@dataclass
class Args:
    exp_name: str = "ppo"
    """the name of this experiment (part of the default run dir)"""
    seed: int = 1
    """seed of the experiment: same seed, same run"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """`cpu`, `cuda`, `cuda:N` or `auto` (cuda if available)"""
    torch_threads: int = 0
    """torch CPU threads; 0: automatic, torch's own count or 1 when the machine is already busy (load average >=
    cores), one rule in agents.ppo and agents.rlhf; the agents.ppo presets use 1, fastest for small MLPs"""
    env_id: str = "CartPole-v1"
    """the id of the environment (when `train` is not given `envs`)"""
    total_timesteps: int = 500_000
    """total timesteps of the experiment"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 4
    """the number of parallel game environments (per process under torchrun: the batch grows with the ranks); envs
    passed to `train` must hold this many (the batch and the checkpoint's resume check are counted from it)"""
    num_steps: int = 128
    """the number of steps to run in each environment per policy rollout"""
    anneal_lr: bool = True
    """toggle learning rate annealing (linear to 0)"""
    anneal_clip: bool = False
    """toggle clip coefficient annealing (linear to 0, as SB3's `lin_0.2`)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    advantages: Literal["gae", "rloo", "grpo"] = "gae"
    """`gae` (with the value head), or group-relative with no value head trained: each episode's return against
    the other episodes answering its prompt, `rloo` (their mean) or `grpo` (the group's mean and std); needs an
    env that reports `infos["group"]` at reset, and collects episodes whole: each iteration resets every env and
    runs until their episodes end, at most `num_steps` steps"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization (per minibatch)"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function (clipped by clip_coef, never annealed)"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function (the value loss is 0.5 * MSE, as CleanRL's)"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """stop the update epochs early when approx KL exceeds this (None = never)"""
    minibatch_by_env: bool = False
    """minibatches are sets of env columns with all their steps (calls `agent.evaluate_sequences` if present)"""
    bootstrap_truncated: bool = True
    """bootstrap truncated episodes from the value of their final observation (False: treat as terminal)"""
    kl_coef: float = 0.0
    """per-token KL penalty coefficient to the reference policy in `infos["ref_logprob"]` (0 = off)"""
    kl_target: float | None = None
    """target KL per episode (nats) of the adaptive coefficient (None = fixed `kl_coef`)"""
    kl_controller: Literal["proportional", "pid"] = "proportional"
    """adaptive KL controller (agents.kl_control): Ziegler et al.'s `proportional` or a `pid` Lagrangian"""
    kl_horizon: int = 10_000
    """horizon (episodes) of the proportional KL controller"""
    run_dir: str | None = None
    """where TensorBoard logs and checkpoints go (default runs/{exp_name}__{env}__{seed}__{time}, env: `env_id`, or
    the id of the envs passed to `train`, else their class)"""
    save_every: int = 50
    """write a checkpoint every N iterations (and at the end; 0 = only at the end)"""
    resume: bool = False
    """continue the run in `run_dir` from its checkpoint"""
    eval_episodes: int = 10
    """deterministic evaluation episodes of the final policy (0 = none)"""
    log_every: int = 1
    """print a progress line every N iterations (0 = never)"""
    dist_timeout: float = 600.0
    """torchrun only: seconds a collective waits for a silent rank before the job fails"""
    shard: bool = False
    """torchrun only: shard the agent's trainable weights, gradients and Adam state over the ranks with FSDP2
    (agents.sharding; checkpoints become folders that resume on any number of ranks); one process: ignored"""

    @property
    def advantage_mode(self) -> AdvantageMode:
        """`advantages` as the object that owns what it decides (`agents.advantages`)."""
        return ADVANTAGE_MODES[self.advantages]


def cleanrl() -> Args:
    """CleanRL's `ppo.py` defaults: 4 envs x 128 steps, 4 minibatches, 4 epochs, 500k steps."""
    return Args(torch_threads=1)


def zoo() -> Args:
    """rl-baselines3-zoo's tuned CartPole-v1 PPO (hyperparams/ppo.yml)."""
    return Args(torch_threads=1, total_timesteps=100_000, num_envs=8, num_steps=32, num_minibatches=1,
                update_epochs=20, gamma=0.98, gae_lambda=0.8, learning_rate=1e-3, anneal_lr=True,
                anneal_clip=True, ent_coef=0.0, clip_vloss=False,
                vf_coef=1.0)  # = SB3's vf_coef 0.5: SB3's value loss is the MSE, ours 0.5 * MSE


PRESETS = {"cleanrl": cleanrl, "zoo": zoo}  # the CLI's subcommands


def check_args(args: Args) -> None:
    """Raise `UsageError` (a ValueError) on an `Args` that cannot train, naming the field and the fix: a value of the
    wrong type or outside its choices (`check_fields`) or range (`_RANGES`), or fields that disagree."""
    check_fields(args)
    for name, (ok, allowed) in _RANGES.items():
        if not ok(getattr(args, name)):
            raise UsageError(f"{name} = {getattr(args, name)!r} is out of range: it must be {allowed}")
    if args.num_envs < 1 or args.num_steps < 1:
        raise UsageError(f"num_envs ({args.num_envs}) and num_steps ({args.num_steps}) must be >= 1")
    batch = args.num_envs * args.num_steps
    if args.num_minibatches < 1 or batch % args.num_minibatches:
        raise UsageError(f"batch size num_envs * num_steps = {batch} is not divisible by num_minibatches = "
                         f"{args.num_minibatches}; pick a divisor of {batch}")
    if args.minibatch_by_env and args.num_envs % args.num_minibatches:
        raise UsageError(f"minibatch_by_env splits the {args.num_envs} envs into num_minibatches = "
                         f"{args.num_minibatches} sets; pick a divisor of num_envs")
    if args.total_timesteps < batch:
        raise UsageError(f"total_timesteps ({args.total_timesteps}) is less than one batch ({batch})")
    if args.update_epochs < 1:
        raise UsageError(f"update_epochs ({args.update_epochs}) must be >= 1: each iteration trains on its rollout")
    if args.kl_target is not None and args.kl_target <= 0 or args.kl_horizon <= 0 or args.kl_coef < 0:
        raise UsageError("need kl_coef >= 0, kl_target > 0 (or None) and kl_horizon > 0")
    if args.kl_target is not None and args.kl_coef == 0:  # both controllers scale the coefficient: 0 stays 0
        raise UsageError(f"kl_target={args.kl_target} adapts kl_coef, which is 0 (no penalty) and would stay 0; "
                         "set kl_coef > 0 as its starting value (e.g. 0.2) or drop kl_target")
    if args.resume and not args.run_dir:
        raise UsageError("resume continues the run in run_dir: pass that run's run_dir (--run-dir) too")
    check_device(args.device)


_RANGES = {  # field: (test, the allowed range in words); NaN fails every test
    "seed": (lambda v: v >= 0, ">= 0 (numpy and Gymnasium refuse negative seeds)"),
    "torch_threads": (lambda v: v >= 0, ">= 0 (0: automatic)"),
    "learning_rate": (lambda v: 0 < v < math.inf, "> 0 and finite"),
    "gamma": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "gae_lambda": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "clip_coef": (lambda v: 0 < v < math.inf, "> 0 and finite"),
    "ent_coef": (math.isfinite, "finite"),
    "vf_coef": (lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "max_grad_norm": (lambda v: 0 < v <= math.inf, "> 0 (inf: no clipping)"),
    "target_kl": (lambda v: v is None or v > 0, "> 0 or None"),
    "save_every": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "eval_episodes": (lambda v: v >= 0, ">= 0 (0: none)"),
    "log_every": (lambda v: v >= 0, ">= 0 (0: never)"),
    "dist_timeout": (lambda v: v > 0, "> 0 seconds"),
}


def num_iterations(args: Args, world_size: int = 1) -> int:
    """PPO iterations of a run: total_timesteps over the steps of one iteration of all ranks."""
    return args.total_timesteps // (args.num_steps * args.num_envs * world_size)


def train(args: Args, envs: gym.Env | gym.vector.VectorEnv | None = None, agent: nn.Module | None = None,
          hooks: object | None = None, dist: distributed.Dist | None = None) -> dict:
    """Train `agent` (default `MLPAgent`) with PPO on `envs` (default `num_envs` copies of `env_id`).

    Returns a dict with `episode_returns` [(global_step, return)], `sps`, `run_dir`, `global_step`, `iterations`,
    `eval_returns`, `eval_mean`, `kl_coef`, `checkpoint`, `interrupted` (Ctrl-C), `rank`, `world_size`, `hook_logs`.
    `hooks.on_iteration(iteration, global_step, rollout: Rollout, writer) -> dict | None` runs on rank 0 (with
    `kl_coef=`, the coefficient the rollout's rewards were shaped with, when it takes that keyword).
    Under torchrun pass the process group the entry point set up (`distributed.setup`; `main` does)."""
    own_envs = envs is None
    r = _setup(args, envs, agent, distributed.given(dist), hooks)
    args, dist, agent, optimizer, kl_ctl = r.args, r.dist, r.agent, r.optimizer, r.kl_ctl
    mode = args.advantage_mode  # gae, rloo or grpo: how envs start a rollout, the estimator, the value loss's weight
    T, E, W = args.num_steps, args.num_envs, dist.world_size
    start_time, start_step, hook_logs, interrupted = time.time(), r.global_step, [], False
    start = iteration = r.global_step // (T * E * W)  # resumed with another number of ranks: the same global step
    with StopOnCtrlC() as ctrl_c, note_last_checkpoint(r):
        for iteration in range(start + 1, r.n_iterations + 1):
            frac = 1.0 - (iteration - 1.0) / r.n_iterations
            clip = frac * args.clip_coef if args.anneal_clip else args.clip_coef
            for group in optimizer.param_groups:
                group["lr"] = frac * args.learning_rate if args.anneal_lr else args.learning_rate

            r.carry = mode.next_carry(r.envs, r.carry, dist.seed(args.seed + 7919 * iteration))  # grouped: fresh
            kl_coef = kl_ctl.coef  # this iteration's: the controller moves it once the iteration's KL is known
            with sharding.gathered(agent):  # sharded: whole weights for the rollout, one all-gather per unit
                rollout = collect_rollout(r.envs, agent, r.carry, T, r.global_step, E * W, kl_coef, r.device)
                compute_advantages(rollout, agent, kl_coef, args.gamma, args.gae_lambda, args.bootstrap_truncated, mode)
            r.global_step += T * E * W  # num_steps per env, also when an episodic rollout stopped sooner
            stats = update(agent, optimizer, rollout, args, clip, dist)

            # ---- episode statistics of all ranks, KL controller, logging, hooks, checkpoint
            sps = (r.global_step - start_step) / (time.time() - start_time)
            stats = _iteration_stats(r, rollout, stats, iteration, {"charts/clip_coef": clip, "charts/SPS": sps})
            hook_logs += log_iteration(r.writer, stats, hooks if dist.is_main else None, iteration, r.global_step,
                                       rollout, kl_coef)
            if dist.is_main and args.log_every and (iteration % args.log_every == 0 or iteration == r.n_iterations):
                print(progress_line(iteration, r.n_iterations, r.global_step, stats), flush=True)
            interrupted = distributed.any_rank(ctrl_c.requested, dist)  # Ctrl-C on any rank stops them all
            last = iteration == r.n_iterations or args.save_every and iteration % args.save_every == 0
            if interrupted or last:
                save_run(r, hooks, iteration)  # rank 0, or every rank's shards
            if interrupted:
                dist.is_main and print(f"saved {r.ckpt_path} at iteration {iteration}; continue with --resume "
                                       f"--run-dir {r.ckpt_path.parent}")
                break

    sps = (r.global_step - start_step) / max(time.time() - start_time, 1e-9)
    run_eval = args.eval_episodes > 0 and not interrupted
    with sharding.gathered(agent, enabled=run_eval):  # every rank gathers, rank 0 evaluates
        eval_returns = final_evaluation(agent, None if own_envs else r.envs, args, r.device, r.writer,
                                        r.global_step) if run_eval and dist.is_main else []
    r.writer.close()
    if own_envs:
        r.envs.close()
    return {"episode_returns": r.episode_returns, "sps": sps, "run_dir": str(r.ckpt_path.parent),
            "global_step": r.global_step, "iterations": iteration, "eval_returns": eval_returns,
            "eval_mean": float(np.mean(eval_returns)) if eval_returns else None, "kl_coef": kl_ctl.coef,
            "checkpoint": str(r.ckpt_path), "interrupted": interrupted, "rank": dist.rank, "world_size": W,
            "hook_logs": hook_logs}


def _setup(args: Args, envs: gym.Env | gym.vector.VectorEnv | None, agent: nn.Module | None,
           dist: distributed.Dist, hooks: object | None = None) -> Run:
    """Check the settings, build the envs, seed, build the agent, Adam and the KL controller, resume from the run's
    checkpoint (and the hooks' state, when they have `load_state_dict`) when asked, open rank 0's TensorBoard
    writer and start the envs."""
    check_args(args)  # before building num_envs copies
    envs = vector_env(envs, args.env_id, args.num_envs)
    if envs.num_envs != args.num_envs:  # Args is the run's record: its batch, its checkpoint, its resume check
        raise UsageError(f"num_envs = {args.num_envs} but the envs passed to train hold {envs.num_envs}; set "
                         f"num_envs={envs.num_envs} (it sets the batch, num_envs * num_steps, and what --resume checks)")
    check_groups(envs, args.advantage_mode, dist.seed(args.seed))  # before anything is written
    run_dir = Path(args.run_dir or f"runs/{args.exp_name}__{env_name(envs)}__{args.seed}__{int(time.time())}")
    shard = args.shard and dist.enabled
    if args.shard and not dist.enabled and not args.resume:
        print("--shard: one process, nothing to shard; training unsharded")
    ckpt_path = checkpoint_path(run_dir, sharded=shard)
    if dist.is_main:
        writable_dir(run_dir)
    ckpt = open_run(ckpt_path, args.resume, args.num_envs, args.num_steps) if dist.is_main else None
    ckpt = distributed.broadcast_object(ckpt, dist)  # rank 0 reads it (one file system or many)

    seed_everything(dist.seed(args.seed), args.torch_deterministic)  # each rank its own stream
    set_torch_threads(args.torch_threads)
    device = resolve_device(distributed.rank_device(args.device, dist))
    agent = (MLPAgent(envs.single_observation_space, envs.single_action_space) if agent is None else agent).to(device)
    distributed.broadcast_module(agent, dist)  # every rank starts from rank 0's weights
    if shard:
        sharding.shard_agent(agent, dist)  # each rank keeps 1/N of the trainable weights (and so of Adam's state)
    trainable = [p for p in agent.parameters() if p.requires_grad]  # e.g. GPTAgent's top blocks only
    optimizer = torch.optim.Adam(trainable, lr=args.learning_rate, eps=1e-5,
                                 fused=device.type in ("cpu", "cuda"))  # one kernel per step, not one per tensor
    kl_ctl = make_kl_controller(args.kl_controller, args.kl_coef, args.kl_target, args.kl_horizon)
    global_step, episode_returns, env_seed = resume_run(ckpt, agent, optimizer, kl_ctl, args, dist, ckpt_path)
    if ckpt is not None and "hooks" in ckpt and hasattr(hooks, "load_state_dict"):
        hooks.load_state_dict(ckpt["hooks"])  # e.g. the RLHF logger's history: the report covers the whole run
    saved_at = ckpt["iteration"] if ckpt is not None else None
    return Run(args, dist, device, envs, agent, optimizer, kl_ctl, open_writer(run_dir, args, dist), ckpt_path,
                num_iterations(args, dist.world_size), global_step, episode_returns, Carry.start(envs, env_seed),
                saved_at)


def _iteration_stats(r: Run, rollout: Rollout, stats: dict, iteration: int, extra: dict) -> dict:
    """The update's `stats` with the episodes that finished on all ranks (their returns join the run's), the
    learning rate and `extra`; the KL controller sees this iteration's mean KL per episode."""
    new_returns, kls, stats = episode_stats(rollout, stats, r.kl_ctl.coef, r.dist)
    r.episode_returns += new_returns
    stats.update({"charts/learning_rate": r.optimizer.param_groups[0]["lr"], **extra})
    if kls:  # nats per response, over all ranks' episodes
        warn_if_negative_kl(kls, iteration)
        r.kl_ctl.update(float(np.mean(kls)), len(kls))
    return stats


def parse_args(argv: list[str] | None = None) -> Args:
    """The CLI: a preset subcommand (`cleanrl`, the default, or `zoo`) and flags that override its values.

    With `--resume --run-dir X` the run's saved settings are the defaults instead (explicit flags still win)."""
    import tyro

    from agents.checkpoint import WHOLE, find_checkpoint, load_checkpoint

    def parse(defaults: dict[str, Args]) -> Args:
        descriptions = {name: (PRESETS[name].__doc__ or "").split("\n")[0] for name in defaults}
        presets = tyro.extras.subcommand_type_from_defaults(defaults, descriptions)
        return parse_cli(presets, default=defaults["cleanrl"], args=argv, prog="python -m agents.ppo",
                         description=__doc__, config=(tyro.conf.CascadeSubcommandArgs,))  # flags w/o a subcommand

    args = parse({name: make() for name, make in PRESETS.items()})
    if not (args.resume and args.run_dir):
        return args
    saved = load_checkpoint(find_checkpoint(args.run_dir) or Path(args.run_dir) / WHOLE).get("args", {})
    fields = {f.name for f in dataclasses.fields(Args)}
    run = dataclasses.replace(Args(), **{k: v for k, v in saved.items() if k in fields})  # continue with its settings
    return parse({name: run for name in PRESETS})


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record  # torchrun: a failed rank's traceback

    def job() -> dict:
        args = parse_args(argv)
        dist, _ = distributed.setup(args.device, args.dist_timeout)  # torchrun: the job's one process group
        result = record(train)(args, dist=dist)
        distributed.cleanup(dist)
        return result

    result = run_cli(job)
    distributed.exit_worker(130 if result["interrupted"] else 0)


if __name__ == "__main__":
    main()
