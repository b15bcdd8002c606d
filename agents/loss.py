"""The PPO loss as pure functions of tensors: `ppo_loss` (the clipped policy, value and entropy terms as masked
sums over a given number of steps) and `advantage_moments` (the minibatch statistics advantages are normalised
with, over every rank's steps). `agents.update.update` loops over minibatches around them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents import distributed

LOSS_STATS = ("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac")


@dataclass(frozen=True)
class LossCoefs:
    """The coefficients of `ppo_loss`'s terms (`Args`' fields of the same names, as one iteration uses them)."""

    clip_coef: float
    """the surrogate's clip range (annealed or not)"""
    vf_clip: float | None
    """the value loss's clip range (None: unclipped)"""
    ent_coef: float
    """the entropy bonus's weight"""
    vf_coef: float
    """the value loss's weight"""


def ppo_loss(logprob: torch.Tensor, entropy: torch.Tensor, value: torch.Tensor, old: dict[str, torch.Tensor],
             advantages: torch.Tensor, mask: torch.Tensor | None, count: torch.Tensor | float,
             coefs: LossCoefs) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped PPO objective (Schulman et al. 2017, https://arxiv.org/abs/1707.06347) on a minibatch.

    `logprob`, `entropy`, `value` (B,): the current policy's at the minibatch's steps; `old` holds the rollout's
    `logprobs`, `values` and `returns` there; `advantages` (B,) as the loss uses them (normalised or not). Only
    the steps where `mask` (B,) is True count (None: all), and every term is their sum over `count`, the steps of
    the whole minibatch (all ranks' under torchrun: summing the ranks' gradients then gives the mean over all
    steps), weighted by `coefs`. Returns (loss, the sums over the counted steps of the `LOSS_STATS`, detached)."""
    if mask is not None:  # zero every input at the masked steps: every term below is then 0 there, and NaN or
        # inf there reaches neither the loss nor its gradient (`where`, not `* mask`: 0 * NaN is NaN)
        logprob, entropy, value, advantages = (torch.where(mask, x, 0) for x in (logprob, entropy, value, advantages))
        old = {k: torch.where(mask, old[k], 0) for k in ("logprobs", "values", "returns")}
    clip_coef, vf_clip, ent_coef, vf_coef = coefs.clip_coef, coefs.vf_clip, coefs.ent_coef, coefs.vf_coef
    logratio = logprob - old["logprobs"]
    ratio = logratio.exp()
    pg = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef))
    v_err = (value - old["returns"]) ** 2
    if vf_clip is not None:
        v_clipped = old["values"] + torch.clamp(value - old["values"], -vf_clip, vf_clip)
        v_err = torch.max(v_err, (v_clipped - old["returns"]) ** 2)
    pg_loss, v_loss, entropy_loss = pg.sum() / count, 0.5 * (v_err.sum() / count), entropy.sum() / count
    # without an entropy bonus the entropy stays out of the graph: no backward through the (B, V) softmax for it
    loss = pg_loss - ent_coef * entropy_loss + v_loss * vf_coef if ent_coef else pg_loss + v_loss * vf_coef
    with torch.no_grad():
        sums = torch.stack([pg.sum(), 0.5 * v_err.sum(), entropy.sum(), (-logratio).sum(),
                            ((ratio - 1) - logratio).sum(), ((ratio - 1).abs() > clip_coef).float().sum()])
    return loss, sums.float().cpu()


def advantage_moments(adv: torch.Tensor, mask: torch.Tensor | None,
                      dist: distributed.Dist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, std) of a minibatch's advantages over its counted steps on every rank. Flat minibatches
    (`mask` None) take the unbiased std (CleanRL's `Tensor.std`, its very numbers in one process), episode
    minibatches the population std; fewer steps than that needs have no spread (std 0)."""
    if mask is None and not dist.enabled:
        return torch.tensor(float(adv.numel())), adv.mean(), adv.std() if adv.numel() > 1 else adv.new_zeros(())
    m = torch.ones_like(adv, dtype=torch.bool) if mask is None else mask
    n, s1 = distributed.all_reduce_sum(torch.stack([m.sum().to(adv.dtype), torch.where(m, adv, 0).sum()]), dist)
    mu = s1 / n.clamp(min=1)
    s2 = distributed.all_reduce_sum(torch.where(m, (adv - mu) ** 2, 0).sum(), dist)
    return n, mu, (s2 / (n - int(mask is None)).clamp(min=1)).sqrt()
