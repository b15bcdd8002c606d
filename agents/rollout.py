"""One PPO iteration's data and the phase that collects it, `collect_rollout` (the env steps), plus the small
arithmetic it, the logging and the update use (autoreset mask, minibatch indices, ...); `agents.advantages` fills
in the advantages.

Layout: every array is (T, E) = (num_steps, num_envs), step t of env e, in Gymnasium 1.x's next-step autoreset
order: when step t ends an episode (terminated or truncated), the observation returned by that step is the
episode's final observation and becomes obs[t + 1]; step t + 1 then only resets the env (its action is ignored,
its reward is 0). That reset step is not a transition and is masked out (`valid` False).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from agents import distributed
from agents.sharding import is_sharded
from agents.vector import obs_dtype


@dataclass
class Episode:
    """One episode that finished during a rollout (on this rank)."""

    global_step: int
    """the global step (all envs, all ranks) at which it ended"""
    ret: float
    """its return: the sum of the env's rewards (not the KL-shaped ones)"""
    length: int
    """its number of steps"""
    kl: float | None
    """its sum of log pi(a_t|s_t) - log p_ref(a_t|s_t) (None: the env reports no `ref_logprob`)"""
    info: dict
    """the env's info at its last step (e.g. a TextEnv's prompt, completion, score)"""


@dataclass
class Rollout:
    """One iteration's data: (T, E) tensors on the agent's device (obs: (T, E, *obs_shape)) and the episodes."""

    obs: torch.Tensor
    """the observations the actions were taken on"""
    actions: torch.Tensor
    """the sampled actions (long)"""
    logprobs: torch.Tensor
    """log pi_old(a_t|s_t) of the sampled actions"""
    values: torch.Tensor
    """V(s_t) of the rollout's policy"""
    rewards: torch.Tensor
    """the env's rewards (0 at the reset steps)"""
    ref_logprobs: torch.Tensor | None
    """log p_ref(a_t|s_t) from `infos["ref_logprob"]` (None: the env reports none)"""
    valid: torch.Tensor
    """False at next-step autoreset steps (not transitions: never trained on)"""
    terminated: torch.Tensor
    """the step ended its episode in a terminal state"""
    truncated: torch.Tensor
    """the step ended its episode by a limit (bootstrapped unless `bootstrap_truncated` is off)"""
    next_obs: torch.Tensor
    """(E, *obs_shape) the observation after the last step (its value bootstraps the last step)"""
    episodes: list[Episode]
    """the episodes that ended during this rollout, in order of their end"""
    action_masks: torch.Tensor | None = None
    """(T, E, n_actions) bool: the actions allowed at each step, from `infos["action_mask"]` (None: no masks)"""
    shaped_rewards: torch.Tensor | None = None
    """rewards - kl_coef * (logprobs - ref_logprobs) on valid steps (= rewards when KL is off); filled by
    `agents.advantages.compute_advantages`, as are the next two"""
    advantages: torch.Tensor | None = None
    """the advantages of the steps (0 at reset steps)"""
    returns: torch.Tensor | None = None
    """advantages + values, the value targets"""
    groups: np.ndarray | None = None
    """(E,) the group of each env's episode (episodic rollouts of an env that reports `infos["group"]`)"""


@dataclass
class Carry:
    """What one rollout hands the next: the env's last observation and the episodes in progress."""

    next_obs: np.ndarray
    """the observation the next step acts on"""
    prev_done: np.ndarray
    """(E,) the last step ended an episode: the next step of that env is an autoreset"""
    ep_ret: np.ndarray
    """(E,) return so far of each episode in progress"""
    ep_len: np.ndarray
    """(E,) steps so far"""
    ep_kl: np.ndarray
    """(E,) KL to the reference so far"""
    next_mask: np.ndarray | None = None
    """(E, n_actions) bool: the actions allowed on `next_obs` (None: the env reports no `action_mask`)"""
    finished: np.ndarray | None = None
    """(E,) episodic collection: the env's episode has ended, the rest of the rollout ignores it (None: continuing)"""
    groups: np.ndarray | None = None
    """(E,) the group of each env's episode, from the reset's `infos["group"]` (None: the env reports none)"""

    @classmethod
    def start(cls, envs: gym.vector.VectorEnv, seed: int | None, episodic: bool = False) -> Carry:
        """Reset `envs` with `seed`: fresh episodes everywhere. `episodic`: the next rollout collects exactly
        these episodes, one per env, and stops when all have ended."""
        next_obs, infos = envs.reset(seed=seed)
        n = envs.num_envs
        groups = np.asarray(infos["group"]) if "group" in infos else None
        return cls(next_obs, np.zeros(n, bool), np.zeros(n), np.zeros(n, np.int64), np.zeros(n),
                   action_mask_of(infos, n, envs.single_action_space), np.zeros(n, bool) if episodic else None,
                   groups)


def action_mask_of(infos: dict, num_envs: int, action_space: gym.Space) -> np.ndarray | None:
    """(E, n) bool `infos["action_mask"]` with every action allowed for envs that report none; None without masks."""
    if "action_mask" not in infos:
        return None
    mask = np.asarray(infos["action_mask"], dtype=bool).reshape(num_envs, int(action_space.n))
    return np.where(infos.get("_action_mask", np.ones(num_envs, bool))[:, None], mask, True)


def mask_kwargs(agent: object, method: str, mask: torch.Tensor | None) -> dict:
    """`{"action_mask": mask}` for `agent.<method>` when there is a mask, or a clear error if it takes none."""
    if mask is None:
        return {}
    if "action_mask" not in inspect.signature(getattr(agent, method)).parameters:
        raise TypeError(f"the env reports infos['action_mask'] but {type(agent).__name__}.{method} takes no "
                        "`action_mask` keyword, so it would sample masked actions; add the keyword (see "
                        "agents.policies) or build the env without action_mask")
    return {"action_mask": mask}


def collect_rollout(envs: gym.vector.VectorEnv, agent: torch.nn.Module, carry: Carry, num_steps: int,
                    global_step: int, steps_per_step: int, kl_coef: float, device: torch.device) -> Rollout:
    """`num_steps` vector steps of `agent` in `envs` (next-step autoreset), continuing from `carry` (updated).

    `global_step` is the count before this rollout; each vector step adds `steps_per_step` (envs x ranks).
    With kl_coef > 0 every transition needs `infos["ref_logprob"]` (log p_ref of the action taken).
    An episodic `carry` (`Carry.start(..., episodic=True)`) collects each env's one episode and stops when all have
    ended (the rollout is then shorter than `num_steps`); an episode that has not ended by then is an error."""
    T, E = num_steps, envs.num_envs
    obs_space, obs_type = envs.single_observation_space, obs_dtype(envs.single_observation_space)
    obs = torch.zeros((T, E) + obs_space.shape, dtype=obs_type, device=device)
    actions = torch.zeros((T, E), dtype=torch.long, device=device)
    logprobs, values = torch.zeros((T, E), device=device), torch.zeros((T, E), device=device)
    rewards, ref_logprobs = np.zeros((T, E), np.float32), np.zeros((T, E), np.float32)
    terminated, truncated = np.zeros((T, E), bool), np.zeros((T, E), bool)
    prev_done_start, has_ref, episodes = carry.prev_done, False, []
    c, ignored = carry, np.zeros((T, E), bool)  # ignored: steps of envs whose episode ended (episodic)
    masks = None if c.next_mask is None else torch.ones((T, E, envs.single_action_space.n), dtype=torch.bool,
                                                        device=device)
    for step in range(T):
        global_step += steps_per_step
        obs[step] = torch.as_tensor(c.next_obs, dtype=obs_type).to(device, non_blocking=True)
        if masks is not None:
            masks[step] = torch.as_tensor(c.next_mask).to(device)
        with torch.no_grad():
            kw = mask_kwargs(agent, "get_action_and_value", None if masks is None else masks[step])
            action, logprob, _, value = agent.get_action_and_value(obs[step], **kw)
        actions[step], logprobs[step], values[step] = action, logprob, value.flatten()
        c.next_obs, reward, term, trunc, infos = envs.step(action.cpu().numpy())
        c.next_mask = action_mask_of(infos, E, envs.single_action_space)
        ignored[step] = False if c.finished is None else c.finished
        live = ~c.prev_done & ~ignored[step]  # False at the autoreset steps
        rewards[step], terminated[step], truncated[step] = reward, term, trunc
        ref, has_it = step_ref_logprob(infos, live, kl_coef)
        if ref is not None:
            has_ref, ref_logprobs[step] = True, ref
            c.ep_kl += np.where(has_it, logprob.cpu().numpy() - ref, 0.0)
        c.ep_ret += np.where(live, reward, 0.0)  # the env's own reward, not the KL-shaped one
        c.ep_len += live
        c.prev_done = term | trunc  # the next step of these envs is a reset
        for i in np.flatnonzero(c.prev_done & live):
            episodes.append(Episode(global_step, float(c.ep_ret[i]), int(c.ep_len[i]),
                                    float(c.ep_kl[i]) if has_ref else None, env_info(infos, i)))
            c.ep_ret[i], c.ep_len[i], c.ep_kl[i] = 0.0, 0, 0.0
        if c.finished is not None:
            c.finished |= c.prev_done & live
            if c.finished.all():  # every episode ended: the rollout stops here
                T = step + 1
                break
    if c.finished is not None and not c.finished.all():
        raise ValueError(f"episodic collection: {int((~c.finished).sum())} episode(s) did not end within num_steps="
                         f"{T}; raise num_steps to the longest episode's length")
    as_tensor = lambda x: torch.from_numpy(np.ascontiguousarray(x[:T])).to(device)  # noqa: E731
    valid = autoreset_valid(terminated[:T] | truncated[:T], prev_done_start) & ~ignored[:T]
    return Rollout(obs=obs[:T], actions=actions[:T], logprobs=logprobs[:T], values=values[:T],
                   rewards=as_tensor(rewards), ref_logprobs=as_tensor(ref_logprobs) if has_ref else None,
                   valid=torch.from_numpy(valid).to(device), terminated=as_tensor(terminated),
                   truncated=as_tensor(truncated), next_obs=torch.as_tensor(c.next_obs, dtype=obs_type).to(device),
                   episodes=episodes, action_masks=None if masks is None else masks[:T],
                   groups=c.groups)


def step_ref_logprob(infos: dict, live: np.ndarray, kl_coef: float) -> tuple[np.ndarray | None, np.ndarray]:
    """(this step's `infos["ref_logprob"]` at the live steps that report it, 0 elsewhere, or None when the env
    reports none; which steps report it). With kl_coef > 0 every live step must."""
    has_it = infos.get("_ref_logprob", np.full(len(live), "ref_logprob" in infos)) & live  # reset steps may lack it
    if kl_coef > 0 and not has_it[live].all():
        raise ValueError("kl_coef > 0 needs the env to report infos['ref_logprob'] (log p_ref of the "
                         "action taken) each step; wrap the env with a reference model or set kl_coef=0")
    if "ref_logprob" not in infos:
        return None, has_it
    return np.where(has_it, infos["ref_logprob"], 0.0), has_it  # `where`: a NaN at an ignored step stays out


def score_minibatch(agent: torch.nn.Module, r: Rollout, b: dict, idx: torch.Tensor, by_env: bool) -> tuple:
    """The current policy on minibatch `idx` of rollout `r`: (logprob, entropy, value) flat (B,), the valid-step
    mask (None for flat minibatches, which hold valid steps only) and the minibatch's entries of the flat batch `b`.
    `by_env`: `idx` are env columns, scored whole (`agent.evaluate_sequences` when it has one). The rollout's
    action masks go to the agent with the observations. A sharded agent (`agents.sharding`) runs even on no steps:
    every rank's FSDP units must run together."""
    (T, E), masks = r.valid.shape, r.action_masks
    if not by_env and idx.numel() == 0 and not is_sharded(agent):  # no step here (other ranks may have some)
        empty = r.logprobs.new_zeros(0)
        return empty, empty, empty, None, {k: v[idx] for k, v in b.items()}
    if by_env:
        idx = idx.to(r.obs.device)
        mb_obs, mb_act, valid = r.obs[:, idx], r.actions[:, idx], r.valid[:, idx]  # (T, E_mb, ...)
        mb_mask = None if masks is None else masks[:, idx]  # (T, E_mb, n_actions)
        if hasattr(agent, "evaluate_sequences"):
            out = agent.evaluate_sequences(mb_obs, mb_act, valid, **mask_kwargs(agent, "evaluate_sequences", mb_mask))
        else:
            mb_mask = None if mb_mask is None else mb_mask.reshape(-1, mb_mask.shape[-1])
            out = agent.get_action_and_value(mb_obs.reshape((-1,) + r.obs.shape[2:]), mb_act.reshape(-1),
                                             **mask_kwargs(agent, "get_action_and_value", mb_mask))[1:]
        sel = {k: v.reshape(T, E)[:, idx].reshape(-1) for k, v in b.items()}
        return (*(x.reshape(-1) for x in out), valid.reshape(-1), sel)
    flat_obs = r.obs.reshape((T * E,) + r.obs.shape[2:])
    mb_mask = None if masks is None else masks.reshape(T * E, -1)[idx]
    _, logprob, entropy, value = agent.get_action_and_value(flat_obs[idx], b["actions"][idx],
                                                            **mask_kwargs(agent, "get_action_and_value", mb_mask))
    return logprob, entropy, value, None, {k: v[idx] for k, v in b.items()}


def episode_stats(rollout: Rollout, stats: dict, kl_coef: float,
                  dist: distributed.Dist) -> tuple[list, list[float], dict]:
    """The episodes that finished on all ranks: ([(global_step, return)], their KLs to the reference (empty without
    one)) and `stats` with their means, `kl_coef` (the rollout's KL coefficient) and the value function's explained
    variance."""
    eps = [(e.global_step, e.ret, e.length, e.kl) for e in rollout.episodes]
    eps = [x for rank in distributed.gather(eps, dist) for x in rank]
    stats = {**stats, "losses/explained_variance": explained_variance(rollout.values[rollout.valid],
                                                                      rollout.returns[rollout.valid])}
    if eps:
        stats["charts/episodic_return"] = float(np.mean([x[1] for x in eps]))
        stats["charts/episodic_length"] = float(np.mean([x[2] for x in eps]))
    kls = [x[3] for x in eps if x[3] is not None]
    if kls:
        stats["charts/kl"], stats["charts/kl_coef"] = float(np.mean(kls)), kl_coef
    return [(x[0], x[1]) for x in eps], kls, stats


def autoreset_valid(dones: np.ndarray, prev_done: np.ndarray) -> np.ndarray:
    """(T, E) bool, False at the next-step autoreset steps: where the same env's previous step ended an episode.

    dones: (T, E) terminated | truncated of each step; prev_done: (E,) dones of the step before this rollout."""
    before = np.concatenate([prev_done[None], dones[:-1]], axis=0)  # (T, E): done flag of step t - 1
    return ~before


def warn_if_negative_kl(episode_kls: list[float], iteration: int) -> None:
    """Warn when the mean per-episode KL to the reference is negative beyond float noise and sampling error.

    sum_t log pi(a_t|s_t) - log p_ref(a_t|s_t) over sampled actions estimates KL(pi || p_ref) >= 0; a clearly
    negative mean means the actions were not drawn from the distribution whose log-probs PPO sees."""
    kl = float(np.mean(episode_kls))
    sem = float(np.std(episode_kls) / np.sqrt(len(episode_kls)))
    if kl < -1e-3 and kl + 2 * sem < 0:
        warnings.warn(f"iteration {iteration}: measured KL to the reference is negative ({kl:.4f} nats per episode): "
                      "the actions were not sampled from the policy whose logprobs PPO sees (temperature, top-k, "
                      "masking?) or ref_logprob is wrong", stacklevel=3)


def first_ratio_deviation(ratio: torch.Tensor, mask: torch.Tensor | None, tol: float = 1e-4,
                          low_precision: bool = False) -> float:
    """max |ratio - 1| over the (unmasked) entries of the first minibatch, with a warning when it is over `tol`:
    before any step the policy is the rollout's, so the update must score the actions as the rollout did.
    `low_precision` (bf16 autocast): the warning names rounding as the likely cause."""
    dev = ((ratio - 1).abs() if mask is None else torch.where(mask, ratio - 1, 0).abs()).max().item()
    if dev > tol:
        cause = ("bf16 rounding? It differs between the rollout's one-token steps and the update's whole-row "
                 "forward, more the deeper the model (SmolLM2-135M at temperature 0.7: 0.03-0.14 with its top 4 "
                 "blocks trained, up to 0.6 with all 30); --dtype float32 shows whether it is more than rounding"
                 if low_precision else "dropout on? sampling from a different distribution? stale cache?")
        warnings.warn(f"PPO ratio at the first minibatch deviates from 1 by {dev:.2e}: the update does not score "
                      f"actions as the rollout did ({cause})", stacklevel=4)
    return dev


def flat_minibatches(valid: torch.Tensor, num_minibatches: int) -> list[torch.Tensor]:
    """Shuffled flat indices of the valid entries of a (T * E,) mask, split into `num_minibatches` parts."""
    idx = torch.nonzero(valid, as_tuple=False).squeeze(1)
    return list(idx[torch.randperm(idx.numel(), device=idx.device)].tensor_split(num_minibatches))


def env_minibatches(num_envs: int, num_minibatches: int) -> list[torch.Tensor]:
    """Shuffled env columns split into `num_minibatches` sets (all T steps of each column go together)."""
    return list(torch.randperm(num_envs).tensor_split(num_minibatches))


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor) -> float:
    """1 - Var[y_true - y_pred] / Var[y_true]: 1 is a perfect value function, 0 no better than a constant."""
    var_y = y_true.var().item() if y_true.numel() > 1 else float("nan")
    return float("nan") if var_y == 0 else 1 - (y_true - y_pred).var().item() / var_y


def env_info(infos: dict, i: int) -> dict:
    """Env `i`'s entries of a vector env's `infos` dict (Gymnasium's `_key` masks respected, nested dicts too)."""
    out = {}
    for k, v in infos.items():
        if k.startswith("_") or (f"_{k}" in infos and not infos[f"_{k}"][i]):
            continue
        out[k] = env_info(v, i) if isinstance(v, dict) else v[i]
    return out
