"""The update phase of a PPO iteration: `update_epochs` passes of minibatch SGD on `agents.loss.ppo_loss` over the
rollout, with gradients summed over ranks under torchrun (`agents.distributed`, or FSDP's reduce-scatter when the
agent is sharded: `agents.sharding`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from agents import distributed, sharding
from agents.loss import LOSS_STATS, LossCoefs, advantage_moments, ppo_loss
from agents.rollout import Rollout, env_minibatches, first_ratio_deviation, flat_minibatches, score_minibatch

if TYPE_CHECKING:
    from agents.ppo import Args


def update(agent: nn.Module, optimizer: torch.optim.Optimizer, rollout: Rollout, args: Args, clip: float,
           dist: distributed.Dist = distributed.SINGLE) -> dict:
    """`update_epochs` passes of minibatch SGD on `ppo_loss` over `rollout` (with advantages); returns the loss
    statistics of the last epoch run, each a mean over its steps. Then drops the agent's caches (`reset_cache`).

    Under torchrun every rank runs the same number of minibatches on its own rollout; a minibatch's loss is the
    mean over its steps on all ranks and each step uses the sum of the ranks' gradients (a rank without steps
    adds zeros), so every step weighs the same; statistics and the `target_kl` stop are the same on every rank."""
    by_env, trainable = args.minibatch_by_env, [p for p in agent.parameters() if p.requires_grad]
    sharded = sharding.is_sharded(agent)  # FSDP sums the gradients itself
    coefs = LossCoefs(clip, args.clip_coef if args.clip_vloss else None, args.ent_coef,
                      args.advantage_mode.value_coef(args.vf_coef))  # group-relative: no value head to train
    # bf16 autocast (GPTAgent's dtype): the rollout's cached decode and the update's full forward may round apart
    low_precision = getattr(agent, "autocast_dtype", None) is not None
    ratio_tol = 2e-2 if low_precision else 1e-4
    b = {"actions": rollout.actions.reshape(-1), "logprobs": rollout.logprobs.reshape(-1),
         "values": rollout.values.reshape(-1), "advantages": rollout.advantages.reshape(-1),
         "returns": rollout.returns.reshape(-1)}
    first_dev, sums, epochs = float("nan"), torch.zeros(len(LOSS_STATS) + 1), 0
    for epoch in range(args.update_epochs):
        epochs = epoch + 1
        sums = torch.zeros(len(LOSS_STATS) + 1)  # the statistics' sums over the epoch's steps, then their count
        for mb_i, idx in enumerate(minibatches(rollout.valid, args)):
            logprob, entropy, value, mask, sel = score_minibatch(agent, rollout, b, idx, by_env)
            count, mu, std = advantage_moments(sel["advantages"], mask, dist)
            adv = (sel["advantages"] - mu) / (std + 1e-8) if args.norm_adv else sel["advantages"]
            loss, mb_sums = ppo_loss(logprob, entropy, value, sel, adv, mask, count.clamp(min=1), coefs)
            if epoch == 0 and mb_i == 0 and logprob.numel():  # before any step the policy is the rollout's
                first_dev = first_ratio_deviation((logprob - sel["logprobs"]).exp(), mask, ratio_tol,
                                                  low_precision)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"PPO loss is {loss.item()} (policy {mb_sums[0]}, value {mb_sums[1]}): training stopped; the last "
                    "good checkpoint is kept. Check rewards/observations for NaN or inf, lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # False: no step of this minibatch on this rank (never when sharded)
                loss.backward()  # sharded: each unit's gradient summed over ranks and cut to this rank's shard
            if not sharded:
                distributed.all_reduce_grads(trainable, dist)  # the sum over ranks, before clipping
            nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            optimizer.step()
            count_steps = mask.sum().cpu() if mask is not None else torch.tensor(logprob.numel())  # mb_sums: CPU
            sums += torch.cat([mb_sums, count_steps[None]])
        sums = distributed.all_reduce_sum(sums, dist)
        if args.target_kl is not None and sums[4] / sums[-1].clamp(min=1) > args.target_kl:
            break
    out = {f"losses/{k}": v for k, v in zip(LOSS_STATS, (sums[:-1] / sums[-1].clamp(min=1)).tolist(), strict=True)}
    out.update({"debug/first_ratio_max_dev": first_dev, "debug/epochs": epochs})
    if hasattr(agent, "reset_cache"):
        agent.reset_cache()  # caches computed with the old weights must not be reused
    return out


def minibatches(valid: torch.Tensor, args: Args) -> list[torch.Tensor]:
    """One epoch's minibatch indices: sets of env columns (`minibatch_by_env`) or flat indices of valid steps."""
    if args.minibatch_by_env:
        return env_minibatches(valid.shape[1], args.num_minibatches)
    return flat_minibatches(valid.reshape(-1), args.num_minibatches)
