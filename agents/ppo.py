"""PPO for any Gymnasium (vector) env with a Discrete action space, CleanRL style, read top to bottom.

    python -m agents.ppo --preset zoo                      # CartPole-v1 with rl-baselines3-zoo's tuning
    python -m agents.ppo --preset cleanrl --seed 2         # CleanRL's ppo.py defaults
    python -m agents.ppo --run-dir runs/a --resume         # continue a killed run from its checkpoint
    torchrun --nproc-per-node 2 -m agents.ppo --preset zoo # data-parallel: num_envs per process (agents.distributed)

Beyond CleanRL: Gymnasium 1.x autoreset, next-step (reset steps masked) or same-step, with truncated episodes
bootstrapped from their final observation; a per-token KL penalty to a reference policy (`infos["ref_logprob"]`,
fixed or adaptive coefficient, Ziegler et al. 2019); minibatches by env column for sequence agents; atomic
checkpoints and `--resume` (also across numbers of processes); a deterministic evaluation.
This file imports only gymnasium, torch, numpy and the stdlib (a test checks it); agents are duck-typed
(protocol in `agents.policies`).
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from agents import distributed
from agents.checkpoint import StopOnCtrlC, open_run, restore, rng_state, save_checkpoint
from agents.evaluate import evaluate
from agents.policies import MLPAgent
from agents.rollout import (
    adaptive_kl_coef,
    autoreset_valid,
    compute_gae,
    env_info,
    env_minibatches,
    explained_variance,
    first_ratio_deviation,
    flat_minibatches,
    kl_penalty_rewards,
    warn_if_negative_kl,
)
from agents.vector import autoreset_mode, obs_dtype, resolve_device, vector_env


@dataclass
class Args:
    preset: Literal["cleanrl", "zoo"] = "cleanrl"
    """preset the CLI takes its defaults from (in Python: `zoo()`, `cleanrl()`); explicit flags override it"""
    exp_name: str = "ppo"
    """the name of this experiment (part of the default run dir)"""
    seed: int = 1
    """seed of the experiment: same seed, same run"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: str = "auto"
    """`cpu`, `cuda`, `cuda:N` or `auto` (cuda if available)"""
    torch_threads: int = 0
    """torch CPU threads (0 = leave torch's setting); the presets use 1, fastest for small MLPs"""
    env_id: str = "CartPole-v1"
    """the id of the environment (when `train` is not given `envs`)"""
    total_timesteps: int = 500_000
    """total timesteps of the experiment"""
    learning_rate: float = 2.5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 4
    """the number of parallel game environments (per process under torchrun: the batch grows with the ranks)"""
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
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization (per minibatch)"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function"""
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
    kl_horizon: int = 10_000
    """horizon (episodes) of the adaptive KL controller"""
    run_dir: str | None = None
    """where TensorBoard logs and checkpoints go (default runs/{exp_name}__{env_id}__{seed}__{time})"""
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


def cleanrl() -> Args:
    """CleanRL's `ppo.py` defaults: 4 envs x 128 steps, 4 minibatches, 4 epochs, 500k steps."""
    return Args(preset="cleanrl", torch_threads=1)


def zoo() -> Args:
    """rl-baselines3-zoo's tuned CartPole-v1 PPO (hyperparams/ppo.yml)."""
    return Args(preset="zoo", torch_threads=1, total_timesteps=100_000, num_envs=8, num_steps=32, num_minibatches=1,
                update_epochs=20, gamma=0.98, gae_lambda=0.8, learning_rate=1e-3, anneal_lr=True,
                anneal_clip=True, ent_coef=0.0, clip_vloss=False,
                vf_coef=1.0)  # = SB3's vf_coef 0.5: SB3's value loss is the MSE, ours 0.5 * MSE


PRESETS = {"cleanrl": cleanrl, "zoo": zoo}


def check_args(args: Args) -> None:
    """Raise ValueError on an inconsistent `Args`, naming the field and the fix."""
    if args.num_envs < 1 or args.num_steps < 1:
        raise ValueError(f"num_envs ({args.num_envs}) and num_steps ({args.num_steps}) must be >= 1")
    batch = args.num_envs * args.num_steps
    if args.num_minibatches < 1 or batch % args.num_minibatches:
        raise ValueError(f"batch size num_envs * num_steps = {batch} is not divisible by num_minibatches = "
                         f"{args.num_minibatches}; pick a divisor of {batch}")
    if args.minibatch_by_env and args.num_envs % args.num_minibatches:
        raise ValueError(f"minibatch_by_env splits the {args.num_envs} envs into num_minibatches = "
                         f"{args.num_minibatches} sets; pick a divisor of num_envs")
    if args.total_timesteps < batch:
        raise ValueError(f"total_timesteps ({args.total_timesteps}) is less than one batch ({batch})")
    if args.kl_target is not None and args.kl_target <= 0 or args.kl_horizon <= 0 or args.kl_coef < 0:
        raise ValueError("need kl_coef >= 0, kl_target > 0 (or None) and kl_horizon > 0")


def train(args: Args, envs: gym.Env | gym.vector.VectorEnv | None = None, agent: nn.Module | None = None,
          hooks: object | None = None) -> dict:
    """Train `agent` (default `MLPAgent`) with PPO on `envs` (default `num_envs` copies of `env_id`).

    Returns a dict with `episode_returns` [(global_step, return)], `sps`, `run_dir`, `global_step`,
    `eval_returns`, `eval_mean`, `kl_coef`, `checkpoint`, `interrupted` (Ctrl-C), `rank` and `world_size`.
    Under torchrun (WORLD_SIZE > 1) it joins the process group itself: `envs` is this rank's, hooks run on rank 0."""
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

    dist, device_name = distributed.setup(args.device, args.dist_timeout)  # single process without torchrun
    own_envs = envs is None
    if own_envs:
        check_args(args)  # before building num_envs copies
    envs = vector_env(envs, args.env_id, args.num_envs)
    same_step = autoreset_mode(envs) == gym.vector.AutoresetMode.SAME_STEP  # else NEXT_STEP
    if same_step and args.kl_coef > 0:  # the last token's ref_logprob would sit in infos["final_info"]
        raise ValueError("the KL penalty (kl_coef > 0) needs a NEXT_STEP autoreset vector env (Gymnasium's default)")
    if envs.num_envs != args.num_envs:
        args = dataclasses.replace(args, num_envs=envs.num_envs)  # the given envs decide
    check_args(args)
    run_dir = Path(args.run_dir or f"runs/{args.exp_name}__{args.env_id}__{args.seed}__{int(time.time())}")
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = open_run(ckpt_path, args.resume, args.num_envs, args.num_steps) if dist.is_main else None
    ckpt = distributed.broadcast_object(ckpt, dist)  # rank 0 reads it (one file system or many)

    seed = dist.seed(args.seed)  # each rank its own stream of envs and sampled actions
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    device = resolve_device(device_name)
    T, E, W = args.num_steps, args.num_envs, dist.world_size
    num_iterations = args.total_timesteps // (T * E * W)
    obs_space = envs.single_observation_space
    if agent is None:
        agent = MLPAgent(obs_space, envs.single_action_space)
    agent = agent.to(device)
    distributed.broadcast_module(agent, dist)  # every rank starts from rank 0's weights
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5,
                                 fused=device.type in ("cpu", "cuda"))  # one kernel per step, not one per tensor
    kl_coef, start_iteration, global_step, episode_returns = args.kl_coef, 0, 0, []
    env_seed = seed
    if ckpt is not None:
        global_step, kl_coef, episode_returns = restore(ckpt, agent, optimizer)  # weights, Adam, RNG states
        start_iteration = global_step // (T * E * W)  # saved with another number of ranks: same global step
        # episodes in progress at the kill are lost: restart the envs, seeded so a resumed run is reproducible
        env_seed = dist.seed(args.seed + 7919 * start_iteration)
        if dist.enabled:  # rank 0's saved RNG state on every rank would repeat its samples
            torch.manual_seed(env_seed)
        dist.is_main and print(f"resumed {ckpt_path} at iteration {start_iteration}, global_step {global_step}")

    writer = SummaryWriter(str(run_dir)) if dist.is_main else distributed.NullWriter()  # rank 0 writes files
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
        f"|{k}|{v}|" for k, v in dataclasses.asdict(args).items()))

    # Rollout storage, (T, E) each: torch on `device` for what the network makes, numpy for env I/O
    obs_type = obs_dtype(obs_space)
    obs = torch.zeros((T, E) + obs_space.shape, dtype=obs_type, device=device)  # (T, E, *obs_shape)
    actions = torch.zeros((T, E), dtype=torch.long, device=device)
    logprobs = torch.zeros((T, E), device=device)
    values = torch.zeros((T, E), device=device)
    final_values = torch.zeros((T, E), device=device)  # SAME_STEP: V(final obs) of episodes ending at t
    rewards = np.zeros((T, E), np.float32)
    terminated, truncated = np.zeros((T, E), bool), np.zeros((T, E), bool)
    ref_logprobs = np.zeros((T, E), np.float32)
    has_ref = False

    next_obs, _ = envs.reset(seed=env_seed)
    prev_done = np.zeros(E, bool)  # the step before ended an episode: this step is an autoreset
    ep_ret, ep_len, ep_kl = np.zeros(E), np.zeros(E, np.int64), np.zeros(E)
    start_time, start_step, result_extra = time.time(), global_step, {"hook_logs": []}

    def state(iteration: int) -> dict:
        return {"agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
                "global_step": global_step, "kl_coef": kl_coef, "rng": rng_state(), "num_envs": E,
                "num_steps": T, "world_size": W, "episode_returns": [list(x) for x in episode_returns],
                "args": dataclasses.asdict(args)}

    iteration, interrupted = start_iteration, False
    with StopOnCtrlC() as ctrl_c:
        for iteration in range(start_iteration + 1, num_iterations + 1):
            frac = 1.0 - (iteration - 1.0) / num_iterations
            lr = frac * args.learning_rate if args.anneal_lr else args.learning_rate
            for group in optimizer.param_groups:
                group["lr"] = lr
            clip = frac * args.clip_coef if args.anneal_clip else args.clip_coef

            # ---- rollout: T vector steps
            prev_done_start, finished_infos, new_returns, iter_lengths, iter_kls = prev_done, [], [], [], []
            for step in range(T):
                global_step += E * W
                obs[step] = torch.as_tensor(next_obs, dtype=obs_type).to(device, non_blocking=True)
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(obs[step])
                actions[step], logprobs[step], values[step] = action, logprob, value.flatten()
                next_obs, reward, term, trunc, infos = envs.step(action.cpu().numpy())
                live = ~prev_done
                rewards[step], terminated[step], truncated[step] = reward, term, trunc
                if "ref_logprob" in infos:
                    has_ref = True
                    ref_logprobs[step] = infos["ref_logprob"]
                    ep_kl += (logprob.cpu().numpy() - ref_logprobs[step]) * live
                has_it = infos.get("_ref_logprob", np.full(E, "ref_logprob" in infos))
                if kl_coef > 0 and not has_it[live].all():  # reset steps may lack it
                    raise ValueError("kl_coef > 0 needs the env to report infos['ref_logprob'] (log p_ref of the "
                                     "action taken) each step; wrap the env with a reference model or set kl_coef=0")
                ep_ret += reward * live  # the env's own reward, not the KL-shaped one
                ep_len += live
                done = term | trunc
                prev_done = done & (not same_step)  # NEXT_STEP: the next step of these envs is a reset
                if same_step and trunc.any():  # the final obs is not the next obs: bootstrap from infos
                    i = np.flatnonzero(trunc)
                    with torch.no_grad():
                        final_obs = torch.as_tensor(np.stack(infos["final_obs"][i]), dtype=obs_type).to(device)
                        final_values[step, i] = agent.get_value(final_obs).flatten()
                for i in np.flatnonzero(done):
                    new_returns.append((global_step, float(ep_ret[i])))
                    iter_lengths.append(int(ep_len[i]))
                    iter_kls.append(float(ep_kl[i]))
                    finished_infos.append(env_info(infos["final_info"] if same_step else infos, i))
                    ep_ret[i], ep_len[i], ep_kl[i] = 0.0, 0, 0.0

            # ---- advantages: masked autoreset steps, KL-shaped rewards, GAE
            with torch.no_grad():
                next_value = agent.get_value(torch.as_tensor(next_obs, dtype=obs_type).to(device)).flatten()
            valid = torch.from_numpy(autoreset_valid((terminated | truncated) & (not same_step), prev_done_start)).to(device)
            env_rewards = torch.from_numpy(rewards).to(device)
            ref = torch.from_numpy(ref_logprobs).to(device)
            shaped = kl_penalty_rewards(env_rewards, logprobs, ref, valid, kl_coef) if kl_coef > 0 else env_rewards
            advantages, returns = compute_gae(
                shaped, values, next_value, torch.from_numpy(terminated).to(device),
                torch.from_numpy(truncated).to(device), valid, args.gamma, args.gae_lambda, args.bootstrap_truncated,
                final_values if same_step else None)

            # ---- update: epochs x minibatches of the clipped surrogate
            stats = _update(agent, optimizer, args, clip, obs, actions, logprobs, values, advantages, returns, valid,
                            dist)
            if hasattr(agent, "reset_cache"):
                agent.reset_cache()  # caches computed with the old weights must not be reused

            # ---- episode statistics of all ranks, KL controller, logging, hooks, checkpoint
            new_returns, iter_lengths, iter_kls = distributed.gather_lists((new_returns, iter_lengths, iter_kls), dist)
            episode_returns += new_returns
            iter_returns = [ret for _, ret in new_returns]
            sps = (global_step - start_step) / (time.time() - start_time)
            stats.update({"charts/learning_rate": lr, "charts/clip_coef": clip, "charts/SPS": sps})
            stats["losses/explained_variance"] = explained_variance(values[valid], returns[valid])
            if iter_returns:
                stats["charts/episodic_return"] = float(np.mean(iter_returns))
                stats["charts/episodic_length"] = float(np.mean(iter_lengths))
            if has_ref and iter_kls:
                kl = float(np.mean(iter_kls))
                stats["charts/kl"], stats["charts/kl_coef"] = kl, kl_coef
                warn_if_negative_kl(iter_kls, iteration)
                if args.kl_target is not None:
                    kl_coef = adaptive_kl_coef(kl_coef, kl, args.kl_target, len(iter_kls), args.kl_horizon)
            for k, v in stats.items():
                writer.add_scalar(k, v, global_step)
            if dist.is_main and hasattr(hooks, "on_iteration"):  # rank 0, with its own rollout (1/W of the batch)
                rollout = {"obs": obs, "actions": actions, "logprobs": logprobs, "rewards": env_rewards,
                           "shaped_rewards": shaped, "valid": valid, "values": values, "advantages": advantages,
                           "dones": torch.from_numpy(terminated | truncated).to(device), "ref_logprobs": ref,
                           "finished_infos": finished_infos, "kl_coef": stats.get("charts/kl_coef", kl_coef),
                           # per finished episode (as finished_infos) its sum of log pi - log p_ref: rank 0's
                           "episode_kls": iter_kls[: len(finished_infos)] if has_ref else None}
                logs = hooks.on_iteration(iteration, global_step, rollout, writer)
                if logs:
                    result_extra["hook_logs"].append({"iteration": iteration, "global_step": global_step, **logs})
                    for k, v in logs.items():
                        if isinstance(v, (int, float)):
                            writer.add_scalar(k, v, global_step)
            if dist.is_main and args.log_every and (iteration % args.log_every == 0 or iteration == num_iterations):
                ret = f"{np.mean(iter_returns):8.2f}" if iter_returns else "     n/a"
                print(f"iter {iteration}/{num_iterations} step {global_step} return {ret} "
                      f"pi {stats['losses/policy_loss']:+.4f} v {stats['losses/value_loss']:.4f} "
                      f"ent {stats['losses/entropy']:.3f} kl {stats['losses/approx_kl']:.4f} "
                      f"clipfrac {stats['losses/clipfrac']:.3f} | {sps:.0f} SPS", flush=True)
            stop = distributed.any_rank(ctrl_c.requested, dist)  # Ctrl-C on any rank stops them all together
            if dist.is_main and (stop or (args.save_every and iteration % args.save_every == 0)):
                save_checkpoint(ckpt_path, state(iteration))
            if stop:
                interrupted = True
                dist.is_main and print(f"saved {ckpt_path} at iteration {iteration}; continue with --resume "
                                       f"--run-dir {run_dir}")
                break

    sps = (global_step - start_step) / max(time.time() - start_time, 1e-9)
    if not interrupted and dist.is_main:
        save_checkpoint(ckpt_path, state(iteration))
    eval_returns: list[float] = []
    if args.eval_episodes > 0 and not interrupted and dist.is_main:
        eval_envs = vector_env(None, args.env_id, args.num_envs) if own_envs else envs  # fresh copies if ours
        eval_returns = evaluate(agent, eval_envs, args.eval_episodes, device, seed=args.seed + 10_000,
                                next_step=own_envs or not same_step)
        if own_envs:
            eval_envs.close()
        writer.add_scalar("charts/eval_return", float(np.mean(eval_returns)), global_step)
        print(f"eval: {np.mean(eval_returns):.2f} +- {np.std(eval_returns):.2f} over {len(eval_returns)} episodes")
    writer.close()
    if own_envs:
        envs.close()
    distributed.cleanup(dist)
    return {"episode_returns": episode_returns, "sps": sps, "run_dir": str(run_dir), "global_step": global_step,
            "iterations": iteration, "eval_returns": eval_returns,
            "eval_mean": float(np.mean(eval_returns)) if eval_returns else None, "kl_coef": kl_coef,
            "checkpoint": str(ckpt_path), "interrupted": interrupted, "rank": dist.rank, "world_size": W,
            **result_extra}


def _update(agent, optimizer, args: Args, clip: float, obs, actions, logprobs, values, advantages, returns,
            valid, dist: distributed.Dist = distributed.SINGLE) -> dict:
    """`update_epochs` passes of minibatch SGD on the clipped PPO objective; returns mean loss statistics.

    Under torchrun each rank runs the same number of minibatches on its own rollout and every step uses the
    gradient averaged over the ranks; the statistics (and the `target_kl` stop) are means over the ranks."""
    T, E = valid.shape
    by_env = args.minibatch_by_env
    b = {"obs": obs.reshape((T * E,) + obs.shape[2:]), "actions": actions.reshape(-1), "logprobs": logprobs.reshape(-1),
         "values": values.reshape(-1), "advantages": advantages.reshape(-1), "returns": returns.reshape(-1)}
    first_dev = float("nan")
    for epoch in range(args.update_epochs):
        # statistics of the last epoch are logged; every epoch's when target_kl may stop early
        track = args.target_kl is not None or epoch == args.update_epochs - 1
        sums, n = torch.zeros(6), 0
        parts = env_minibatches(E, args.num_minibatches) if by_env else flat_minibatches(valid.reshape(-1), args.num_minibatches)
        for mb_i, idx in enumerate(parts):
            if by_env:  # all T steps of the env columns `idx`: (T, E_mb)
                idx = idx.to(obs.device)
                mb_obs, mb_act, mask = obs[:, idx], actions[:, idx], valid[:, idx]
                if hasattr(agent, "evaluate_sequences"):
                    newlogprob, entropy, newvalue = agent.evaluate_sequences(mb_obs, mb_act, mask)
                else:
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                        mb_obs.reshape((-1,) + obs.shape[2:]), mb_act.reshape(-1))
                m = mask.reshape(-1)
                sel = {k: v.reshape(T, E)[:, idx].reshape(-1) for k, v in b.items() if k not in ("obs",)}
                newlogprob, entropy, newvalue = newlogprob.reshape(-1), entropy.reshape(-1), newvalue.reshape(-1)
            elif idx.numel():
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b["obs"][idx], b["actions"][idx])
                m = None
                sel = {k: v[idx] for k, v in b.items() if k != "obs"}
            elif not dist.enabled:  # fewer valid steps than minibatches
                continue
            else:  # ... on this rank only: step with the others (a zero gradient from here)
                optimizer.zero_grad(set_to_none=True)
                distributed.all_reduce_grads(agent.parameters(), dist)
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                continue
            # masked mean: `where`, not `* m`, so garbage (inf, NaN) at masked steps cannot leak in
            mean = (lambda x: x.mean()) if m is None else (lambda x, m=m: torch.where(m, x, 0).sum() / m.sum().clamp(min=1))
            logratio = newlogprob - sel["logprobs"]
            ratio = logratio.exp()
            if epoch == 0 and mb_i == 0:  # before any step the policy is the rollout's: ratio must be 1
                first_dev = first_ratio_deviation(ratio, m)
            mb_adv = sel["advantages"]
            if args.norm_adv:
                mu = mean(mb_adv)
                std = mean((mb_adv - mu) ** 2).sqrt() if m is not None else mb_adv.std()
                mb_adv = (mb_adv - mu) / (std + 1e-8)
            pg_loss = mean(torch.max(-mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - clip, 1 + clip)))
            if args.clip_vloss:
                v_clipped = sel["values"] + torch.clamp(newvalue - sel["values"], -clip, clip)
                v_loss = 0.5 * mean(torch.max((newvalue - sel["returns"]) ** 2, (v_clipped - sel["returns"]) ** 2))
            else:
                v_loss = 0.5 * mean((newvalue - sel["returns"]) ** 2)
            entropy_loss = mean(entropy)
            loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"PPO loss is {loss.item()} (policy {pg_loss.item()}, value {v_loss.item()}): training stopped; "
                    "the last good checkpoint is kept. Check rewards/observations for NaN or inf, lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_grads(agent.parameters(), dist)  # the mean over ranks, before clipping
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            if track:
                with torch.no_grad():
                    sums += torch.stack([pg_loss, v_loss, entropy_loss, mean(-logratio), mean((ratio - 1) - logratio),
                                         mean(((ratio - 1.0).abs() > clip).float())]).float().cpu()
                n += 1
        if track:  # the mean over ranks: the same numbers (and early-stop decision) on every rank
            sums = distributed.all_reduce_mean(sums / max(n, 1), dist)
        if args.target_kl is not None and sums[4] > args.target_kl:
            break
    keys = ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/old_approx_kl",
            "losses/approx_kl", "losses/clipfrac"]
    out = dict(zip(keys, sums.tolist(), strict=True))
    out["debug/first_ratio_max_dev"] = first_dev
    out["debug/epochs"] = epoch + 1
    return out


def parse_args(argv: list[str] | None = None) -> Args:
    """`--preset NAME` picks the defaults (with `--resume`: the run's saved args); other flags override them."""
    import tyro

    from agents.checkpoint import load_checkpoint

    argv = sys.argv[1:] if argv is None else list(argv)
    flags = {}
    for i, a in enumerate(argv):
        if a.startswith("--") and "=" in a:
            flags[a.split("=", 1)[0]] = a.split("=", 1)[1]
        elif a.startswith("--"):
            flags[a] = argv[i + 1] if i + 1 < len(argv) else ""
    name = flags.get("--preset", "cleanrl")
    if name not in PRESETS:
        raise SystemExit(f"unknown --preset {name!r}; choose one of {sorted(PRESETS)}")
    default = PRESETS[name]()
    if "--resume" in flags and "--run-dir" in flags:  # continue with the killed run's settings
        saved = load_checkpoint(Path(flags["--run-dir"]) / "checkpoint.pt").get("args", {})
        default = dataclasses.replace(default, **{k: v for k, v in saved.items() if k in default.__dict__})
    return tyro.cli(Args, default=default, args=argv, description=__doc__, prog="python -m agents.ppo")


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record  # torchrun: a failed rank's traceback

    result = record(train)(parse_args())
    distributed.exit_worker(130 if result["interrupted"] else 0)


if __name__ == "__main__":
    main()
