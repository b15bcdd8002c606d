"""A causal LM cut in two: a frozen trunk (embeddings + the lower blocks) shared by the policy and its
reference, and the upper `k` blocks (+ final norm and head) that PPO trains.

Why: with only the top `k` of `n` blocks trainable, the lower `n - k` blocks compute the same function for the
policy, for the frozen reference (a copy of the policy before training) and in every PPO epoch. `FrozenTrunk`
computes them once per token: during the rollout (KV-cached, one new token per step) it keeps each row's trunk
outputs for its whole observation window; the reference's wrapper reads the same window (the same observation,
so nothing is recomputed); the PPO update looks the windows of its episode segments up by their token ids
(the trunk is a pure function of them) instead of re-running the trunk. Only the top blocks run twice (policy
and reference) and only they are differentiated.

How the cut is made, for any transformers decoder (GPT-2, Llama, Qwen2, GPT-NeoX, ...): two views of the
model's base (`model.base_model`), each a model of the base's own class built on the meta device and given the
base's modules, so they share its weights and run transformers' own forward: the trunk view keeps the first
`n - k` decoder blocks and replaces the final norm by identity; the top view keeps the last `k` blocks and reads
its input as `inputs_embeds` (learned absolute position embeddings, GPT-2's `wpe`, are zeroed there: the trunk
already added them). Construction checks on a small input that top(trunk(x)) equals the whole model, so an
architecture the views do not fit (e.g. one that rescales `inputs_embeds`) fails with a clear error.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import nn

from textenv.lm.cache import CachedLM, attention_mask, position_ids
from textenv.lm.checks import LMError, split_lm

_NORMS = ("norm", "ln_f", "final_layer_norm", "final_norm")
_POSITIONS = ("wpe",)  # learned absolute position embeddings added to inputs_embeds


class _NoPositions(nn.Module):
    """Zero position embeddings: the top view's input already carries them."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=position_ids.device)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(attribute name, blocks) of the decoder-block list of causal LM `model`'s base."""
    base, _ = split_lm(model)
    n = getattr(model.config, "num_hidden_layers", None)
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return name, child
    raise LMError(f"cannot find the {n} decoder blocks of {type(model).__name__}; trainable_layers needs them")


def _view(base: nn.Module, blocks: str, keep: list[nn.Module], norm: bool, positions: bool) -> nn.Module:
    """A model of `base`'s own class that runs only the decoder blocks `keep`: built on the meta device (no
    weights of its own), then given `base`'s modules by attribute assignment, so it shares every weight and runs
    transformers' own forward (masks, rotary or absolute positions, cache). The final norm becomes the identity
    unless `norm`, the learned absolute position embeddings zero unless `positions`. Not registered anywhere: no
    duplicate weights in a state dict."""
    with torch.device("meta"):
        view = type(base)(base.config)
    for name, child in base.named_children():
        setattr(view, name, child)
    setattr(view, blocks, nn.ModuleList(keep))
    if not norm:
        name = next((n for n in _NORMS if isinstance(getattr(base, n, None), nn.Module)), None)
        if name is None:
            raise LMError(f"cannot find the final norm of {type(base).__name__} (looked for {_NORMS})")
        setattr(view, name, nn.Identity())
    if not positions:
        for name in _POSITIONS:
            if isinstance(getattr(base, name, None), nn.Module):
                setattr(view, name, _NoPositions())
    stray = [n for n, t in (*view.named_parameters(), *view.named_buffers()) if t.is_meta]
    if stray:  # a weight held by the base itself, not by one of its modules: the view cannot share it
        raise LMError(f"cannot split {type(base).__name__} into trunk and top blocks (its own tensors {stray}); "
                      "train every block instead (trainable_layers=None)")
    return view


def _keys(rows: torch.Tensor) -> list[bytes]:
    """One hashable key per row of token ids (one device-to-host copy for all rows)."""
    return [row.tobytes() for row in rows.long().cpu().numpy()]


class FrozenTrunk:
    """The frozen lower blocks of a causal LM, with every token's output kept per observation window.

    `window(obs)` -> (B, L, C): the trunk's output at every position of the left-padded rows `obs` (0 at
    padding), advancing a KV cache by one token per row and step. A few streams of observations are followed
    at once (the rollout, which the reference wrapper reads too, and an evaluation), each found by its rows.
    Every row's window is remembered by its token ids (the newest `store_bytes`: ~4,600 rows of 24 tokens x
    576 floats in 256 MB); `lookup(ids)` returns them, recomputing the rows it does not find.
    """

    def __init__(self, model: nn.Module, k: int, pad_token_id: int, streams: int = 3,
                 store_bytes: int = 256 * 2**20, group_lengths: bool = True) -> None:  # fmt: skip
        name, blocks = decoder_blocks(model)
        base, _ = split_lm(model)
        self.model, self.pad_token_id, self.num_streams, self.store_bytes = model, int(pad_token_id), streams, store_bytes
        self.group_lengths = group_lengths  # its KV caches re-encode batches in length groups (`CachedLM`)
        self.view = _view(base, name, list(blocks[: len(blocks) - k]), norm=False, positions=True)
        self.checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose split over this trunk passed
        self.reset()

    def reset(self) -> None:
        """Forget every stream and remembered row."""
        self.streams: list[dict] = []  # {"cache": CachedLM, "obs": (B, L), "window": (B, L, C)}, newest last
        self.known: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # row ids -> (L, C) window, oldest first
        self._size = 0  # bytes of the rows in `known`
        self.recomputed = 0  # rows `lookup` did not find and ran the trunk for

    @torch.no_grad()
    def full(self, ids: torch.Tensor) -> torch.Tensor:
        """Trunk outputs (B, L, C) of left-padded rows by one uncached forward (0 at padding)."""
        mask = attention_mask(ids, self.pad_token_id)
        out = self.view(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        return out.last_hidden_state * mask[..., None]

    @torch.no_grad()
    def window(self, obs: torch.Tensor) -> torch.Tensor:
        obs = obs.long()
        for stream in self.streams:
            if stream["obs"].shape == obs.shape and torch.equal(stream["obs"], obs):
                return stream["window"]  # the same observation again (the reference after the policy)
        stream = self._stream_for(obs)
        cache, old = stream["cache"], stream["window"]
        cont = cache.continuing_rows(obs)
        last = cache.hidden(obs)  # (B, C) trunk output at the newest token
        new = torch.zeros(*obs.shape, last.shape[-1], dtype=last.dtype, device=last.device)
        if old is not None and old.shape == new.shape:
            new[cont, :-1] = old[cont, 1:]
        if cache.prefill_states is not None:  # re-encoded rows: their prefix (all of obs, or obs[:, :-1])
            states, end = cache.prefill_states, cache.prefill_end
            new[cache.prefill_rows, end - states.shape[1] : end] = states
        new[:, -1] = last
        new *= attention_mask(obs, self.pad_token_id)[..., None]
        self._keep(obs, new)  # every step's rows: an episode segment ends at any of them (PPO looks them up)
        stream.update(obs=obs.clone(), window=new)
        self.streams.remove(stream)
        self.streams.append(stream)
        return new

    def _stream_for(self, obs: torch.Tensor) -> dict:
        """The stream `obs` continues (most continuing rows), else a new one (the oldest dropped)."""
        best, most = None, 0
        for stream in self.streams:
            n = int(stream["cache"].continuing_rows(obs).sum())
            if n > most:
                best, most = stream, n
        if best is not None:
            return best
        if len(self.streams) >= self.num_streams:
            self.streams.pop(0)
        cache = CachedLM(self.model, self.pad_token_id, base=self.view, group_lengths=self.group_lengths)
        stream = {"cache": cache, "obs": None, "window": None}
        self.streams.append(stream)
        return stream

    def _keep(self, rows: torch.Tensor, windows: torch.Tensor) -> None:
        """Remember rows' windows by their ids (views of `windows`: no copy), dropping the oldest beyond
        `store_bytes`."""
        row_bytes = windows[0].numel() * windows.element_size()
        for key, win in zip(_keys(rows), windows, strict=True):
            self._size += row_bytes * (self.known.pop(key, None) is None)
            self.known[key] = win
        while self.known and self._size > self.store_bytes:
            _, w = self.known.popitem(last=False)
            self._size -= w.numel() * w.element_size()

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Trunk outputs (N, L, C) of rows `ids` (N, L): remembered windows, the rest by one forward. Windows
        remembered under bf16 autocast and rows recomputed in float32 stack to float32 (type promotion)."""
        ids = ids.long()
        found = [self.known.get(key) for key in _keys(ids)]
        missing = [i for i, w in enumerate(found) if w is None]
        self.recomputed += len(missing)
        if missing:
            fresh = self.full(ids[missing])
            for j, i in enumerate(missing):
                found[i] = fresh[j]
        return torch.stack(found)


class TrunkSplit:
    """Causal LM `model` as a shared `FrozenTrunk` + its own top `k` blocks, final norm and head.

    The policy's split owns the trunk; `sharing(reference_model)` gives the reference's split over the same
    trunk (the reference must equal the policy's initial weights below the cut, which a frozen copy does).
    """

    def __init__(self, model: nn.Module, k: int, pad_token_id: int, trunk: FrozenTrunk | None = None,
                 group_lengths: bool = True) -> None:  # fmt: skip
        name, blocks = decoder_blocks(model)
        if not 1 <= int(k) <= len(blocks):
            raise LMError(f"trainable_layers={k} is out of range for a model of {len(blocks)} blocks; "
                          f"use 1..{len(blocks)} (or leave it unset to train every block)")  # fmt: skip
        base, self.head = split_lm(model)
        self.model, self.k, self.pad_token_id = model, int(k), int(pad_token_id)
        self.trunk = trunk if trunk is not None else FrozenTrunk(model, self.k, pad_token_id, group_lengths=group_lengths)
        self.top = _view(base, name, list(blocks[len(blocks) - self.k :]), norm=True, positions=False)
        self._blocks = name
        if model not in self.trunk.checked:  # once per model: a reference split is made per evaluation
            self._check(base)
            self.trunk.checked.add(model)

    def sharing(self, model: nn.Module) -> TrunkSplit:
        """The split of `model` (e.g. the frozen reference) over this split's trunk."""
        return TrunkSplit(model, self.k, self.pad_token_id, trunk=self.trunk)

    def trainable(self) -> list[nn.Parameter]:
        """The parameters above the cut: the top blocks and the final norm (not the head: tied to the trunk's
        embeddings in most models)."""
        params = list(getattr(self.top, self._blocks).parameters())
        for name in _NORMS:
            norm = getattr(self.top, name, None)
            if isinstance(norm, nn.Module):
                params += list(norm.parameters())
        return params

    def hidden(self, ids: torch.Tensor, width: int) -> torch.Tensor:
        """Final hidden states (B, width, C) of the last `width` positions of left-padded observations `ids`
        (B, L): the trunk's outputs looked up by the whole rows, then the top blocks, with gradients."""
        inputs = self.trunk.lookup(ids)[:, -width:]
        mask = attention_mask(ids, self.pad_token_id)[:, -width:]
        return self.top(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids(mask),
                        use_cache=False).last_hidden_state  # fmt: skip

    def cached(self) -> TopCachedLM:
        return TopCachedLM(self)

    @torch.no_grad()
    def _check(self, base: nn.Module) -> None:
        """top(trunk(x)) must be the whole model on a small left-padded batch."""
        ids = torch.tensor([[self.pad_token_id] * 2 + [1, 2, 3], [4, 5, 6, 7, 8]], device=self.head.weight.device)
        ids = ids.clamp(max=self.head.weight.shape[0] - 1)
        mask = attention_mask(ids, self.pad_token_id)
        whole = base(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        inputs = self.trunk.full(ids)
        cut = self.top(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        err = float((whole - cut)[mask.bool()].abs().max())
        if not err <= 1e-3 * (1.0 + float(whole.abs().max())):
            raise LMError(f"cutting {type(self.model).__name__} below its top {self.k} blocks changes "
                          f"its outputs (max error {err:.2e}): this architecture does not support trainable_layers; "
                          "train every block instead")  # fmt: skip


class TopCachedLM:
    """`CachedLM`'s interface (`hidden`, `step`, `reset`) for a `TrunkSplit`: the shared trunk's windows fed
    to a KV cache over the top blocks."""

    def __init__(self, split: TrunkSplit) -> None:
        self.split, self.head = split, split.head
        self.cache = CachedLM(split.model, split.pad_token_id, base=split.top, group_lengths=split.trunk.group_lengths)

    def reset(self) -> None:
        self.cache.reset()

    def continuing_rows(self, obs: torch.Tensor) -> torch.Tensor:
        return self.cache.continuing_rows(obs)

    @torch.no_grad()
    def hidden(self, obs: torch.Tensor) -> torch.Tensor:
        return self.cache.hidden(obs, embeds=self.split.trunk.window(obs))

    @torch.no_grad()
    def step(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden(obs)
        return self.head(hidden).float(), hidden
