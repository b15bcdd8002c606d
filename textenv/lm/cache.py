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
from transformers import Cache, CacheLayerMixin

from textenv.lm.checks import split_lm


def attention_mask(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B, T) long mask: 1 from each row's first non-pad token onward."""
    return (torch.cumsum((ids != pad_token_id).long(), dim=1) > 0).long()


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Absolute positions counted over real tokens only: (B, T)."""
    return (torch.cumsum(mask, dim=1) - 1).clamp(min=0)


def length_groups(lengths: torch.Tensor, max_groups: int = 3, min_saving: float = 0.1) -> list[torch.Tensor]:
    """Row indices split into at most `max_groups` groups by length so that sum(len(group) x its longest row)
    is smallest (exact over the distinct lengths); one group unless that saves `min_saving` of the padded cost
    (each forward has a fixed cost too)."""
    values, counts = torch.unique(lengths.cpu(), return_counts=True)  # sorted distinct lengths
    v, c = values.tolist(), counts.tolist()
    n = len(v)
    prefix = [0]
    for x in c:
        prefix.append(prefix[-1] + x)
    # best[g][j]: cheapest cost of the first j distinct lengths in g groups; cut[g][j]: where the last group starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[g - 1][i] + (prefix[j] - prefix[i]) * v[j - 1]
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    g = min(range(1, max_groups + 1), key=lambda k: best[k][n])
    if best[g][n] > (1 - min_saving) * best[1][n]:
        g = 1
    bounds, j = [], n
    for k in range(g, 0, -1):
        bounds.append((cut[k][j], j))
        j = cut[k][j]
    groups = []
    for i, j in reversed(bounds):
        lo, hi = v[i], v[j - 1]
        groups.append(((lengths >= lo) & (lengths <= hi)).nonzero().squeeze(1))
    return groups


def forward_full(model: nn.Module, ids: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced forward over left-padded rows: (logits (B, T, V) float32, hidden (B, T, C))."""
    base, head = split_lm(model)
    mask = attention_mask(ids, pad_token_id)
    hidden = base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
    return head(hidden).float(), hidden


class BufferLayer(CacheLayerMixin):
    """One layer's keys/values as the live columns [start, end) of preallocated (B, H, capacity, D) buffers.

    Built on transformers' public cache-layer protocol (`CacheLayerMixin`, the abstract base of every layer
    of a `Cache`; it implements all of the protocol's abstract methods itself, so a protocol change fails at
    construction, and a test checks it). `update` writes the new columns in place instead of `torch.cat`-ing
    the whole cache every step (`DynamicLayer`'s way: O(width) copies per token).
    """

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int, end: int) -> None:
        super().__init__()
        self.kbuf, self.vbuf, self.start, self.end = keys, values, start, end
        self.lazy_initialization(keys, values)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = self.kbuf.device, True
        self.keys, self.values = self.kbuf[:, :, self.start : self.end], self.vbuf[:, :, self.start : self.end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new columns after the live ones; return all live keys/values (B, H, width, D)."""
        end = self.end + key_states.shape[-2]
        self.kbuf[:, :, self.end : end] = key_states
        self.vbuf[:, :, self.end : end] = value_states
        self.end = end
        self.lazy_initialization(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for the attention mask: every live column plus the new ones."""
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.kbuf.shape[-2] - self.start


class CachedLM:
    """Per-row KV cache over a batch of token-step episodes.

    `step(obs)` returns the logits and final hidden state at the last position of every row of `obs`
    (B, L). A row continues from the cache when its obs is the previous obs shifted left by one with one
    new token at the end (one environment step); any other row (a reset, or the first call) is
    re-prefilled from its obs. Call `reset()` when the model's weights change: cached keys were computed
    with the old ones.

    Keys and values live in preallocated per-layer buffers (B, H, capacity, D) whose live columns are
    [start, end): a step writes one column at `end`, dropping columns every row has masked moves `start`,
    and the block is moved back to the left only when it reaches the buffer's end.
    """

    def __init__(self, model: nn.Module, pad_token_id: int, base: nn.Module | None = None,
                 group_lengths: bool = True) -> None:  # fmt: skip
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.group_lengths = group_lengths  # re-encode a whole batch in groups of similar length (False: one
        # forward padded to its longest row, slower; kept for benchmarks' before numbers)
        self.base, self.head = split_lm(model)
        if base is not None:  # a view of the model's trunk that runs only some of its blocks (textenv.lm.trunk)
            self.base = base
        self.reset()

    def reset(self) -> None:
        """Forget every row: the next `step` re-prefills all of them."""
        self.kbuf: list[torch.Tensor] | None = None  # per layer (B, H, capacity, D)
        self.vbuf: list[torch.Tensor] | None = None
        self.mbuf: torch.Tensor | None = None  # (B, capacity) long: which columns are real for each row
        self.start = self.end = self.capacity = 0
        self.last_obs: torch.Tensor | None = None
        self.live: list[int] = []  # the model's cache layers this cache holds (all, unless a split model's view)
        self.num_layers = 0
        self.slot: list[int] = []
        self.prefill_rows: torch.Tensor | None = None
        self.prefill_states: torch.Tensor | None = None
        self.prefill_end = 0

    @property
    def width(self) -> int:
        """Number of cached columns (bounded by the longest live row)."""
        return self.end - self.start

    @property
    def mask(self) -> torch.Tensor | None:
        """(B, width) long: which cached columns are real for each row."""
        return None if self.mbuf is None else self.mbuf[:, self.start : self.end]

    @property
    def keys(self) -> list[torch.Tensor] | None:
        """Per layer (B, H, width, D): the live cached keys."""
        return None if self.kbuf is None else [k[:, :, self.start : self.end] for k in self.kbuf]

    @property
    def values(self) -> list[torch.Tensor] | None:
        return None if self.vbuf is None else [v[:, :, self.start : self.end] for v in self.vbuf]

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
    def hidden(self, obs: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden state (B, C) at the last position of each row of `obs` (B, L); advances the cache.

        `embeds` (B, L, C), if given, are the model's inputs for every position of `obs` in place of its token
        embeddings (the upper blocks of a split model read the frozen trunk's outputs; `textenv.lm.trunk`).
        After the call, `prefill_rows` / `prefill_states` (R, W, C) hold the rows that were (re-)encoded and
        their hidden states at every position of the encoded prefix, whose last column is `prefill_end` - 1."""
        obs = obs.long()
        restart = ~self.continuing_rows(obs)
        if self.mbuf is None or self.mbuf.shape[0] != obs.shape[0]:
            self.reset()
        if bool(restart.all()):  # first call, or every episode restarted at once: one forward over whole rows
            self.start = self.end = 0
            self.capacity = 2 * obs.shape[1]  # room to slide: the live block moves back left every ~L steps
            self._prefill(torch.arange(obs.shape[0], device=obs.device), obs, embeds, grouped=True)
            self.prefill_end = obs.shape[1]
            self.last_obs = obs.clone()
            return self.prefill_hidden
        self.prefill_rows, self.prefill_states, self.prefill_end = restart.nonzero().squeeze(1), None, obs.shape[1] - 1
        if bool(restart.any()):
            self._prefill(self.prefill_rows, obs[restart, :-1], None if embeds is None else embeds[restart, :-1])
        if self.end == self.mbuf.shape[1]:  # buffer full on the right: move the live block back to column 0
            self._move(0)
        # One batched decode step for every row: its newest token.
        self.mbuf[:, self.end] = 1
        mask = self.mbuf[:, self.start : self.end + 1]  # (B, T+1)
        pos = mask.sum(dim=1, keepdim=True) - 1  # (B, 1)
        buffers = [BufferLayer(k, v, self.start, self.end) for k, v in zip(self.kbuf, self.vbuf, strict=True)]
        layers = [buffers[j] for j in self.slot]
        out = self._forward(obs[:, -1:], None if embeds is None else embeds[:, -1:], attention_mask=mask,
                            position_ids=pos, cache=Cache(layers=layers), use_cache=True)  # fmt: skip
        self.end += 1
        self.last_obs = obs.clone()
        self._trim(obs.shape[1])
        return out.last_hidden_state[:, -1]  # (B, C)

    def _forward(self, ids: torch.Tensor, embeds: torch.Tensor | None, **kwargs):
        """The trunk on token ids, or on input embeddings when given."""
        if embeds is None:
            return self.base(input_ids=ids, **kwargs)
        return self.base(inputs_embeds=embeds, **kwargs)

    def _prefill(self, rows: torch.Tensor, prefix: torch.Tensor, embeds: torch.Tensor | None = None,
                 grouped: bool = False) -> None:  # fmt: skip
        """Encode the restarted rows' `prefix` tokens and write their keys/values right-aligned in the cache;
        `self.prefill_hidden` is the hidden state at each prefix's last position (None for empty prefixes).
        `grouped`: one forward per group of rows of similar length (`length_groups`), each cropped to its
        longest row, instead of one forward padded to the longest of all (re-encoding a whole batch that is
        mid-episode, e.g. after a policy update, where rows' lengths spread over the whole window)."""
        self.prefill_hidden: torch.Tensor | None = None
        self.prefill_rows, self.prefill_states = rows, None
        pmask = attention_mask(prefix, self.pad_token_id)  # (R, L')
        lengths = pmask.sum(dim=1)
        width = int(lengths.max())
        if width == 0:  # one-token prompts: nothing to cache, just forget the rows
            self.mbuf[rows, self.start : self.end] = 0
            return
        groups = length_groups(lengths) if grouped and self.group_lengths else [torch.arange(len(rows))]
        states = None
        for group in groups:
            w = int(lengths[group].max())
            ids, gmask = prefix[group, -w:], pmask[group, -w:]
            out = self._forward(ids, None if embeds is None else embeds[group, -w:], attention_mask=gmask,
                                position_ids=position_ids(gmask), use_cache=True)  # fmt: skip
            if states is None:
                self._layout(out.cache.layers, width, len(rows) if self.mbuf is None else self.mbuf.shape[0])
                states = out.last_hidden_state.new_zeros(len(rows), width, out.last_hidden_state.shape[-1])
            keep = gmask[:, None, :, None].bool()  # zero padded slots so no garbage can leak through 0 * NaN
            col, at = self.end - w, rows[group]
            for j, i in enumerate(self.live):
                self.kbuf[j][at, :, col : self.end] = torch.where(keep, out.cache.layers[i].keys, 0.0)
                self.vbuf[j][at, :, col : self.end] = torch.where(keep, out.cache.layers[i].values, 0.0)
            self.mbuf[at, self.start : self.end] = 0
            self.mbuf[at, col : self.end] = gmask
            states[group, width - w :] = out.last_hidden_state
        self.prefill_states = states  # (R, W, C), right-aligned
        self.prefill_hidden = states[:, -1]  # (R, C)

    def _layout(self, layers: list, width: int, batch: int) -> None:
        """Before the first prefill's keys are written: note which of the model's cache `layers` this cache
        holds, allocate the buffers (from those layers' shapes) if there are none, and widen the live block on
        the left to at least `width` columns."""
        # A split model's view runs only some of the model's blocks: only their cache layers are filled.
        self.num_layers = len(layers)
        self.live = [i for i, layer in enumerate(layers) if getattr(layer, "keys", None) is not None]
        # each of the model's cache layers -> its buffer (layers outside the view get a placeholder: buffer 0)
        self.slot = [self.live.index(i) if i in self.live else 0 for i in range(self.num_layers)]
        if self.kbuf is None:  # allocate from the shapes the model produced
            capacity, ks = max(self.capacity, 2 * width), [layers[i].keys for i in self.live]
            # each buffer in its own tensors' dtype: under autocast keys and values can differ (Llama's rotary
            # embedding turns bf16 keys float32; the values stay bf16)
            self.kbuf = [k.new_zeros(batch, k.shape[1], capacity, k.shape[3]) for k in ks]
            self.vbuf = [v.new_zeros(batch, v.shape[1], capacity, v.shape[3])
                         for v in (layers[i].values for i in self.live)]  # fmt: skip
            self.mbuf = torch.zeros(batch, capacity, dtype=torch.long, device=ks[0].device)
            self.start = self.end = 0
        grow = width - self.width
        if grow > 0:  # widen every row on the left with masked columns
            if self.start < grow:
                self._move(grow)
            self.start -= grow
            self.mbuf[:, self.start : self.start + grow] = 0

    def _move(self, first: int) -> None:
        """Place the live columns at [first, first + width), growing the buffers if they do not fit with a
        free column after them."""
        width, capacity = self.width, self.mbuf.shape[1]
        if first + width + 1 > capacity:
            capacity = 2 * (first + width + 1)
            grown = [b.new_zeros(*b.shape[:2], capacity, b.shape[3]) for b in self.kbuf + self.vbuf]
            mbuf = self.mbuf.new_zeros(self.mbuf.shape[0], capacity)
        else:
            grown, mbuf = self.kbuf + self.vbuf, self.mbuf
        for new, old in zip(grown, self.kbuf + self.vbuf, strict=True):
            new[:, :, first : first + width] = old[:, :, self.start : self.end].clone()  # clone: ranges may overlap
        mbuf[:, first : first + width] = self.mbuf[:, self.start : self.end].clone()
        n = len(self.kbuf)
        self.kbuf, self.vbuf, self.mbuf = grown[:n], grown[n:], mbuf
        self.start, self.end = first, first + width

    def _trim(self, window: int) -> None:
        """Keep at most `window` (the obs width) columns: a row's real tokens fill the newest columns and number
        at most `window`, so older columns are masked for every row. No device sync, unlike finding the first
        column any row uses."""
        self.start = max(self.start, self.end - window)
