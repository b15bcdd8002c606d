"""Checks that a model fits its use: a transformers causal LM with an output head whose vocabulary covers the
tokenizer's. The policy (`agents.gpt_policy`), the reference (`textenv.kl`) and the RLHF job all use these."""

from __future__ import annotations

from torch import nn


class LMError(ValueError):
    """A model that does not fit its use (not a causal LM, or a vocabulary smaller than the tokenizer's)."""

    user_error = True  # a user's mistake: the CLIs print it as one line, without a traceback


def check_lm_vocab(model: nn.Module, vocab_size: int, where: str = "the model") -> int:
    """The output vocabulary of causal LM `model`, checked to cover a tokenizer's `vocab_size` ids.

    The one vocabulary check of the project (policy, reference model, RLHF pieces): a larger vocabulary (e.g.
    padded to a multiple of 64) is fine, the extra ids are never actions; a smaller one could never emit (or
    score) the tokenizer's last ids. `where` names the model in the error (e.g. "the reference model").
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise LMError(
            f"{where} is a {type(model).__name__}, not a transformers causal LM with an output head; pass one "
            "(e.g. AutoModelForCausalLM.from_pretrained(path) or a GPT2LMHeadModel)"
        )
    n = int(head.weight.shape[0])
    if n < vocab_size:
        raise LMError(
            f"{where} ({type(model).__name__}) has a vocabulary of {n} tokens, smaller than its tokenizer's "
            f"{vocab_size}: it could never emit or score the last ids; use the tokenizer the model was trained "
            f"with (same or padded vocabulary), or call model.resize_token_embeddings({vocab_size}) and fine-tune"
        )
    return n


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
