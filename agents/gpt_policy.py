"""GPTAgent: a causal language model as a PPO actor-critic over TextEnv observations.

The actor is the LM's next-token distribution at the last position of the (left-padded) observation; the
critic is a linear value head on the same trunk's final hidden state (shared trunk, as in Ziegler et al.
2019). It speaks the agent protocol of `agents.ppo` (see `agents.policies`), so the generic PPO trains it
like any other agent.

Three things keep it correct and fast (../shared/DESIGN.md, "Making token-by-token RL fast"):
- Rollout (`get_action_and_value(obs)` under `no_grad`) goes through `textenv.lm.CachedLM`: one new
  token per env step from cached keys/values; only rows whose episode just reset are re-prefilled.
- The update (`evaluate_sequences`) cuts every env column into episode segments and runs ONE teacher-forced
  forward over all of them: a step's observation is a prefix of its segment's last observation.
- The policy samples from exactly the distribution it trains: plain categorical over softmax(logits / T) at its
  `temperature` T (1 by default), no top-k/top-p (drawn by inverting the CDF: `torch.multinomial` costs more
  than a decode step on CPU), dropout off for good (else the PPO ratio is not 1 at the first minibatch). T is
  part of the policy: the stored and recomputed log-probs and the entropy are all at T, and the KL reference
  (`textenv.kl.RefLogprob(temperature=T)`) must score at the same T.
- Caches never outlive the weights. The contract: whoever changes the weights in place calls `reset_cache()`
  (`agents.ppo` does after each update; `watch(optimizer)` makes an optimizer do it after every step).
  `load_state_dict` drops the caches by itself (a public post-hook), and so does `.to()`/`.half()` (a cached
  step first checks that the parameters' device and dtype are still those the cache was built with).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from agents.policies import check_action_mask, entropy_of, masked_log_softmax
from agents.sharding import is_sharded
from textenv.lm import (
    CachedLM,
    LMError,
    TrunkSplit,
    attention_mask,
    check_lm_vocab,
    length_groups,
    position_ids,
    split_lm,
)
from textenv.lm.trunk import decoder_blocks

VALUE_INIT_STD = 0.01  # the value head's initial weights: small, so the values start near 0
_DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of the categorical `probs` (B, V) by inverting its CDF: the same distribution as
    `torch.multinomial(probs, 1)` (to float32 rounding of the CDF), much faster on CPU, where multinomial
    draws an exponential variate for every vocabulary entry."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand_like(cdf[:, -1:]) * cdf[:, -1:]  # (B, 1), uniform in [0, total)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)  # first cdf > u


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability of `model` (modules and config fields) to 0."""
    for module in model.modules():
        if isinstance(module, _DROPOUTS):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in (
        "attn_pdrop",
        "resid_pdrop",
        "embd_pdrop",
        "summary_first_dropout",
        "dropout",
        "attention_dropout",
    ):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


class GPTAgent(nn.Module):
    """Actor-critic over a transformers causal LM (e.g. `GPT2LMHeadModel`) with a value head on its trunk.

    Args:
        model: the policy LM; its dropout is switched off and it stays in eval mode even under `.train()`.
        pad_token_id: the env's pad id (left padding; `mask = cumsum(obs != pad) > 0`).
        vocab_size: the tokenizer's vocabulary size (= the env's action space). A model with a smaller
            output vocabulary is rejected; a larger one (e.g. padded to a multiple of 64) is cut to it.
        device: where to put the agent (default: where the model already is).
        dtype: "float32" (default) or "bf16": bf16 autocast for the transformer, float32 master weights,
            log-probs and values.
        trainable_layers: train only the top k decoder blocks (+ final norm and the value head); the rest of
            the model (embeddings, lower blocks, the usually tied LM head) is a frozen trunk whose outputs the
            rollout computes once per token and the update and the reference reuse (`textenv.lm.trunk`). None:
            train every parameter.
        group_lengths: run rows of similar length in separate forwards, each cropped to its longest row (the
            update's episode pieces, a KV cache re-encoding a mid-episode batch); False: one forward padded to the
            longest row (slower, the same numbers; benchmarks use it for their before numbers).
        temperature: the policy is softmax(logits / temperature) in every method (sampling, log-probs, entropy,
            `act`); 1 leaves the logits untouched, bit for bit.

    `positions` counts the token positions the update's forwards ran: real ones and with their padding.
    """

    def __init__(
        self,
        model: nn.Module,
        pad_token_id: int,
        vocab_size: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        trainable_layers: int | None = None,
        *,
        group_lengths: bool = True,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not (isinstance(temperature, int | float) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature {temperature!r} must be a positive number (1: the LM's own distribution)")
        self.temperature = float(temperature)
        _, head = split_lm(model)
        model_vocab = check_lm_vocab(model, vocab_size or 0, "the policy")
        hidden_size = head.weight.shape[1]
        if not 0 <= int(pad_token_id) < model_vocab:
            raise ValueError(
                f"pad_token_id {pad_token_id} is outside the model vocabulary [0, {model_vocab})."
            )
        key = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use 'float32' or 'bf16'.")
        self.autocast_dtype = _DTYPES[key]
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = int(vocab_size) if vocab_size is not None else int(model_vocab)
        disable_dropout(model)
        self.lm = model.eval()
        self.group_lengths, self.positions = group_lengths, {"real": 0, "padded": 0}
        self.split = None if trainable_layers is None else TrunkSplit(model, trainable_layers, pad_token_id,
                                                                      group_lengths=group_lengths)
        if self.split is not None:
            model.requires_grad_(False)
            for p in self.split.trainable():
                p.requires_grad_(True)
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=VALUE_INIT_STD)
        nn.init.zeros_(self.value_head.bias)
        self.to(device if device is not None else head.weight.device)
        self.register_load_state_dict_post_hook(_loaded)  # new weights: the caches hold the old ones' keys
        self.reset_cache()

    # --- plumbing ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def train(self, mode: bool = True) -> GPTAgent:
        """PPO calls `.train()`; the LM stays in eval mode so no dropout can ever switch on."""
        super().train(mode)
        self.lm.eval()
        return self

    def reset_cache(self) -> None:
        """Forget cached keys/values; call it after changing the weights in place (PPO does after each update)."""
        if self.split is not None:
            self._rollout, self._eval = self.split.cached(), self.split.cached()
        else:
            self._rollout, self._eval = (CachedLM(self.lm, self.pad_token_id, group_lengths=self.group_lengths)
                                         for _ in range(2))
        self._memo: tuple | None = None  # (cache name, obs, hidden) of the last cached step
        self._placement = self._where()

    def reference(self, model: nn.Module) -> nn.Module | TrunkSplit:
        """What `textenv.kl.RefLogprob` should score with for the frozen reference `model` (a copy of this
        agent's LM before training): `model` itself, or with `trainable_layers` its split over this agent's
        frozen trunk, so the reference runs only its top blocks."""
        return model if self.split is None else self.split.sharing(model)

    @property
    def sharded(self) -> bool:
        """Sharded by `agents.sharding` (FSDP): the update then runs each minibatch in one forward."""
        return is_sharded(self)

    def shard_units(self) -> list[nn.Module]:
        """What `agents.sharding` shards one by one: the trainable decoder blocks (the agent itself takes the rest)."""
        try:
            blocks = decoder_blocks(self.lm)[1]
        except LMError:
            return []
        return [b for b in blocks if any(p.requires_grad for p in b.parameters())]

    def watch(self, optimizer: torch.optim.Optimizer) -> torch.utils.hooks.RemovableHandle:
        """Make every `optimizer.step()` drop the caches (for training loops that do not call `reset_cache`)."""
        return optimizer.register_step_post_hook(lambda *_: self.reset_cache())

    def _where(self) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of the weights; `.to()` / `.half()` change them, and with them the cached keys'."""
        weight = self.lm.get_output_embeddings().weight
        return weight.device, weight.dtype

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _ids(self, obs: torch.Tensor) -> torch.Tensor:
        """Token ids as long on the agent's device (PPO stores observations as float32)."""
        return torch.as_tensor(obs, device=self.device).long()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the env's vocabulary from final hidden states (..., C), divided by the temperature."""
        head = self.lm.get_output_embeddings()
        weight = head.weight[: self.vocab_size]
        bias = head.bias[: self.vocab_size] if getattr(head, "bias", None) is not None else None
        with torch.autocast(self.device.type, enabled=False):  # bf16 logits would blur the PPO ratio
            logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
        return logits if self.temperature == 1.0 else logits / self.temperature

    def _value(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):
            return self.value_head(hidden.to(self.value_head.weight.dtype)).float().squeeze(-1)

    def _trunk(self, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Final hidden states (B, W, C) of rows cropped to the longest real row; returns (hidden, W)."""
        mask = attention_mask(ids, self.pad_token_id)
        width = int(mask.sum(dim=1).max())
        if self.split is not None:  # frozen trunk looked up by the whole rows, top blocks differentiated
            with self._autocast():
                return self.split.hidden(ids, width), width
        ids, mask = ids[:, -width:], mask[:, -width:]  # (B, W)
        with self._autocast():
            base, _ = split_lm(self.lm)
            out = base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
        return out.last_hidden_state, width

    def _last_hidden(self, ids: torch.Tensor, cache: str | None) -> torch.Tensor:
        """Hidden state (B, C) at each row's last position: KV-cached ("rollout"/"eval") under no_grad, else
        a full forward."""
        if cache is None or torch.is_grad_enabled():
            return self._trunk(ids)[0][:, -1]
        if self._where() != self._placement:  # moved or cast since the caches were built
            self.reset_cache()
        memo = self._memo
        if memo is not None and memo[0] == cache and memo[1].shape == ids.shape and torch.equal(memo[1], ids):
            return memo[2]  # same obs again (get_value, then get_action_and_value): nothing new to encode
        with self._autocast():
            hidden = (self._rollout if cache == "rollout" else self._eval).hidden(ids)
        self._memo = (cache, ids.clone(), hidden)
        return hidden

    @staticmethod
    def _stats(logits: torch.Tensor, action: torch.Tensor | None, mask: object = None) -> tuple[torch.Tensor, ...]:
        """(action, log-prob, entropy) of the categorical over `logits` (..., V), restricted to `mask` (bool, like
        logits; disallowed logits get probability 0) when given; samples when action is None. Masking writes into
        `logits`: pass a tensor of this call's own."""
        mask = None if mask is None else check_action_mask(mask, logits)
        if mask is not None:
            # `logits` are this call's own. A mask bans a few of a large vocabulary (no repeated n-gram): write the
            # lowest float into the banned logits in place, not -inf and not through a masked copy. Their
            # probability is 0 either way and the allowed log-probs are the same bits; p log p is 0 x finite, so
            # the entropy needs no mask; and the gradient that reaches a banned logit is 0 exactly (p = 0), so the
            # write stays outside autograd. Two passes over the (..., V) floats fewer than masked_log_softmax.
            with torch.no_grad():
                logits.index_put_((~mask).nonzero(as_tuple=True), logits.new_tensor(torch.finfo(logits.dtype).min))
        logp = logits.log_softmax(-1)  # (..., V)
        probs = logp.exp()
        if action is None:
            action = sample_categorical(probs)
            if mask is not None:  # float rounding at the CDF's end must not pick a masked token
                action = torch.where(mask.gather(-1, action[:, None])[:, 0], action, probs.argmax(-1))
        return action, logp.gather(-1, action.unsqueeze(-1)).squeeze(-1), entropy_of(logp, None, probs)

    # --- agent protocol ----------------------------------------------------------------------------------
    def get_value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s) for a batch of observations (B, L) -> (B,)."""
        return self._value(self._last_hidden(self._ids(obs), "rollout"))

    def get_action_and_value(
        self, obs: torch.Tensor, action: torch.Tensor | None = None, action_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(action, log pi(action|obs), entropy, value), each (B,). Samples when `action` is None; with
        `action_mask` (bool (B, V)) only among the allowed tokens, and log-probs are over those.

        With `action=None` under `no_grad` (the rollout) the KV cache is used; otherwise a full teacher-forced
        forward cropped to the longest real row.
        """
        ids = self._ids(obs)
        hidden = self._last_hidden(ids, "rollout" if action is None else None)  # (B, C)
        if action is not None:
            action = torch.as_tensor(action, device=self.device).long()
        # pure sampling from softmax(logits / temperature)
        action, logprob, entropy = self._stats(self._logits(hidden), action, action_mask)
        return action, logprob, entropy, self._value(hidden)

    def act(self, obs: torch.Tensor, deterministic: bool = True, action_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy (or sampled) next allowed token for evaluation; its own KV cache, so it does not disturb rollouts."""
        logits = self._logits(self._last_hidden(self._ids(obs), "eval"))
        if action_mask is not None:
            mask = check_action_mask(action_mask, logits)
            return masked_log_softmax(logits, mask).argmax(-1) if deterministic else self._stats(logits, None, mask)[0]
        if deterministic:
            return logits.argmax(dim=-1)
        return sample_categorical(torch.softmax(logits, dim=-1))

    def evaluate_sequences(
        self, obs: torch.Tensor, actions: torch.Tensor, valid: torch.Tensor, action_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logprob, entropy, value), each (T, E), from one forward over the episode segments of obs (T, E, L).

        Step t continues step t-1 of its column when both are valid and obs[t] is obs[t-1] shifted left by
        one with actions[t-1] appended. A segment's steps are all prefixes of its last observation, so the
        hidden state at position W-1-k of that observation belongs to the step k steps before the segment's
        end. Invalid steps are not computed and come back as 0. `action_mask` (T, E, V) restricts each step's
        distribution as in `get_action_and_value`.
        """
        ids = self._ids(obs)  # (T, E, L)
        T, E, L = ids.shape
        actions = torch.as_tensor(actions, device=self.device).long()
        valid = torch.as_tensor(valid, device=self.device).bool()
        cont = torch.zeros(T, E, dtype=torch.bool, device=self.device)  # (T, E): continues step t-1
        cont[1:] = (
            valid[1:]
            & valid[:-1]
            & (ids[:-1, :, 0] == self.pad_token_id)  # the window was not full: nothing fell off the left
            & (ids[1:, :, :-1] == ids[:-1, :, 1:]).all(dim=-1)
            & (ids[1:, :, -1] == actions[:-1])
        )
        # Flatten column-major (E, T) so each column's steps are contiguous.
        v = valid.T.reshape(-1)
        starts = v & ~cont.T.reshape(-1)
        ends = v & ~torch.cat([cont[1:], cont[:1] & False]).T.reshape(-1)
        steps = v.nonzero().squeeze(1)  # (S,) flat index of every valid step
        zeros = torch.zeros(T * E, device=self.device)
        if steps.numel() == 0:  # nothing to score; keep a graph so the caller's backward() still works
            zeros = zeros + (self._zero_graph(ids[0, :1]) if self.sharded else
                             0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad))
            return tuple(zeros.view(E, T).T.clone() for _ in range(3))  # not views: FSDP warns of those
        segment = (torch.cumsum(starts.long(), 0) - 1)[steps]  # (S,) segment of each valid step
        seg_end = ends.nonzero().squeeze(1)  # (N,) flat index of each segment's last step
        back = seg_end[segment] - steps  # (S,) steps between a step and its segment's end
        h = self._segment_hidden(ids.transpose(0, 1).reshape(E * T, L)[seg_end], segment, back)  # (S, C)
        mask = None if action_mask is None else torch.as_tensor(action_mask, device=self.device).transpose(0, 1)
        mask = None if mask is None else mask.reshape(E * T, -1)[steps]  # (S, V)
        _, logprob, entropy = self._stats(self._logits(h), actions.T.reshape(-1)[steps], mask)
        value = self._value(h)
        outs = []
        for x in (logprob, entropy, value):
            full = zeros.clone()
            full[steps] = x
            outs.append(full.view(E, T).T.clone())  # (T, E), not a view (FSDP hooks a module's outputs)
        return outs[0], outs[1], outs[2]

    def _zero_graph(self, ids: torch.Tensor) -> torch.Tensor:
        """0, computed through every trainable weight as a minibatch is (one row `ids` (1, L)): a sharded agent's
        rank without steps still runs each FSDP unit, and gives each weight a gradient, as the other ranks do."""
        hidden = self._trunk(ids)[0][:, -1]
        return 0.0 * (self._logits(hidden).sum() + self._value(hidden).sum())

    def _segment_hidden(self, rows: torch.Tensor, segment: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """Hidden state (S, C) at each step's last observed token, from the segments' last observations `rows`
        (N, L): one forward per group of segments of similar length, each cropped to its longest row, so short
        segments (episodes cut by EOS or by the rollout's end) do not pay for the longest one's padding."""
        lengths = attention_mask(rows, self.pad_token_id).sum(dim=1)  # (N,)
        hidden_parts, step_parts = [], []
        one = not self.group_lengths or self.sharded  # sharded: every rank runs each block once per minibatch
        groups = [torch.arange(len(rows), device=rows.device)] if one else length_groups(lengths)
        for group in groups:
            hidden, width = self._trunk(rows[group])  # (n, W, C)
            self.positions["real"] += int(lengths[group].sum())
            self.positions["padded"] += len(group) * width
            local = torch.full_like(lengths, -1)
            local[group] = torch.arange(len(group), device=rows.device)
            steps = (local[segment] >= 0).nonzero().squeeze(1)  # the steps whose segment is in this group
            hidden_parts.append(hidden[local[segment[steps]], width - 1 - back[steps]])
            step_parts.append(steps)
        order = torch.cat(step_parts).argsort()
        return torch.cat(hidden_parts)[order]


def _loaded(agent: GPTAgent, incompatible_keys) -> None:
    """`load_state_dict` post-hook: the loaded weights make every cached key stale."""
    agent.reset_cache()
