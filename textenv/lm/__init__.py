"""The language-model machinery both sides use: the environment's reference model (`textenv.kl`) and the policy
(`agents.gpt_policy`).

    cache.py    CachedLM: a per-row KV cache over token-step episodes (left padding, position ids, length groups)
    trunk.py    TrunkSplit: a causal LM cut into a frozen trunk, shared by policy and reference, and its top blocks
    checks.py   check_lm_vocab, split_lm, LMError: a model that does not fit its use fails with a clear error
"""

from textenv.lm.cache import BufferLayer, CachedLM, attention_mask, forward_full, length_groups, position_ids
from textenv.lm.checks import LMError, check_lm_vocab, split_lm
from textenv.lm.trunk import FrozenTrunk, TrunkSplit

__all__ = ["BufferLayer", "CachedLM", "FrozenTrunk", "LMError", "TrunkSplit", "attention_mask", "check_lm_vocab",
           "forward_full", "length_groups", "position_ids", "split_lm"]
