"""Incremental (KV-cached) scoring of token-by-token episodes for a causal LM.

A token-step environment hands its agent a left-padded window of token ids every step. Re-encoding the
whole prefix each step costs O(T) forwards per token; `CachedLM` instead keeps past keys/values per row,
feeds one new token per step, and re-prefills only the rows whose episode just started. The policy
(`agents.gpt_policy.GPTAgent`) and the reference model (`textenv.kl`) both use it.

Conventions (shared with `forward_full`, so cached and recomputed log-probs agree):
- `mask = cumsum(ids != pad) > 0`: a row's real tokens start at its first non-pad id (left padding).
- `position_ids = cumsum(mask) - 1` (clamped at 0): GPT-2 has absolute positions, so padding must not
  shift them.
A prompt that itself starts with the pad id would be read as padding; use a tokenizer whose pad token is
not a text token (the project's tokenizers have a dedicated `<pad>`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache


def attention_mask(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B, T) long mask: 1 from each row's first non-pad token onward."""
    return (torch.cumsum((ids != pad_token_id).long(), dim=1) > 0).long()


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Absolute positions counted over real tokens only: (B, T)."""
    return (torch.cumsum(mask, dim=1) - 1).clamp(min=0)


def split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(trunk, lm_head) of a transformers causal LM, so the head runs only where logits are needed."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        raise TypeError(
            f"{type(model).__name__} is not a transformers causal LM with an output head; "
            "pass e.g. a GPT2LMHeadModel (AutoModelForCausalLM)."
        )
    return base, head


def forward_full(model: nn.Module, ids: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced forward over left-padded rows: (logits (B, T, V) float32, hidden (B, T, C))."""
    base, head = split_lm(model)
    mask = attention_mask(ids, pad_token_id)
    hidden = base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
    return head(hidden).float(), hidden


class CachedLM:
    """Per-row KV cache over a batch of token-step episodes.

    `step(obs)` returns the logits and final hidden state at the last position of every row of `obs`
    (B, L). A row continues from the cache when its obs is the previous obs shifted left by one with one
    new token at the end (one environment step); any other row (a reset, or the first call) is
    re-prefilled from its obs. Call `reset()` when the model's weights change: cached keys were computed
    with the old ones.
    """

    def __init__(self, model: nn.Module, pad_token_id: int) -> None:
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.base, self.head = split_lm(model)
        self.reset()

    def reset(self) -> None:
        """Forget every row: the next `step` re-prefills all of them."""
        self.keys: list[torch.Tensor] | None = None  # per layer (B, H, T, D)
        self.values: list[torch.Tensor] | None = None
        self.mask: torch.Tensor | None = None  # (B, T) long: which cached columns are real for each row
        self.last_obs: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """Number of cached columns (bounded by the longest live row)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def continuing_rows(self, obs: torch.Tensor) -> torch.Tensor:
        """(B,) bool: rows whose obs is the previous one advanced by exactly one token."""
        if self.last_obs is None or self.last_obs.shape != obs.shape:
            return torch.zeros(obs.shape[0], dtype=torch.bool, device=obs.device)
        not_full = self.last_obs[:, 0] == self.pad_token_id
        shifted = (obs[:, :-1] == self.last_obs[:, 1:]).all(dim=1)
        return not_full & shifted

    def step(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, V) float32 and hidden state (B, C) at the last position of each row of `obs` (B, L)."""
        hidden = self.hidden(obs)
        with torch.no_grad():
            return self.head(hidden).float(), hidden

    @torch.no_grad()
    def hidden(self, obs: torch.Tensor) -> torch.Tensor:
        """Final hidden state (B, C) at the last position of each row of `obs` (B, L); advances the cache."""
        obs = obs.long()
        restart = ~self.continuing_rows(obs)
        if self.mask is None or self.mask.shape[0] != obs.shape[0]:
            self._allocate(obs.shape[0], obs.device)
        if restart.any():
            self._prefill(restart.nonzero().squeeze(1), obs[restart, :-1])
        # One batched decode step for every row: its newest token.
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)  # (B, T+1)
        pos = mask.sum(dim=1, keepdim=True) - 1  # (B, 1)
        cache = DynamicCache(ddp_cache_data=list(zip(self.keys, self.values, strict=True))) if self.width else None
        out = self.base(
            input_ids=obs[:, -1:], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True
        )
        new = out.cache
        self.keys = [layer.keys for layer in new.layers]
        self.values = [layer.values for layer in new.layers]
        self.mask = mask
        self.last_obs = obs.clone()
        self._trim()
        return out.last_hidden_state[:, -1]  # (B, C)

    def _allocate(self, batch: int, device: torch.device) -> None:
        self.keys = self.values = None
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=device)

    def _prefill(self, rows: torch.Tensor, prefix: torch.Tensor) -> None:
        """Encode each restarted row's tokens but its last, and write them right-aligned into the cache."""
        pmask = attention_mask(prefix, self.pad_token_id)  # (R, L-1)
        width = int(pmask.sum(dim=1).max())
        if width == 0:  # one-token prompts: nothing to cache, just forget the rows
            self.mask[rows] = 0
            return
        prefix, pmask = prefix[:, -width:], pmask[:, -width:]
        out = self.base(input_ids=prefix, attention_mask=pmask, position_ids=position_ids(pmask), use_cache=True)
        keep = pmask[:, None, :, None].bool()  # zero padded slots so no garbage can leak through 0 * NaN
        new_k = [torch.where(keep, layer.keys, 0.0) for layer in out.cache.layers]  # (R, H, W, D) each
        new_v = [torch.where(keep, layer.values, 0.0) for layer in out.cache.layers]
        if self.keys is None:  # first prefill: allocate the cache at this width
            batch = self.mask.shape[0]
            self.keys = [k.new_zeros(batch, *k.shape[1:]) for k in new_k]
            self.values = [v.new_zeros(batch, *v.shape[1:]) for v in new_v]
            self.mask = torch.zeros(batch, width, dtype=torch.long, device=prefix.device)
        elif width > self.width:  # widen every row on the left with masked zeros
            grow = width - self.width
            self.keys = [torch.nn.functional.pad(k, (0, 0, grow, 0)) for k in self.keys]
            self.values = [torch.nn.functional.pad(v, (0, 0, grow, 0)) for v in self.values]
            self.mask = torch.nn.functional.pad(self.mask, (grow, 0))
        start = self.width - width
        for k, v, nk, nv in zip(self.keys, self.values, new_k, new_v, strict=True):
            k[rows] = 0.0
            v[rows] = 0.0
            k[rows, :, start:] = nk
            v[rows, :, start:] = nv
        self.mask[rows] = 0
        self.mask[rows, start:] = pmask

    def _trim(self) -> None:
        """Drop leading columns that every row has masked, so the cache stays as wide as the longest row."""
        live = self.mask.any(dim=0).nonzero()
        first = int(live[0]) if len(live) else self.width
        if first > 0:
            self.keys = [k[:, :, first:] for k in self.keys]
            self.values = [v[:, :, first:] for v in self.values]
            self.mask = self.mask[:, first:]
