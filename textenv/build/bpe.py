"""Byte-level BPE tokenizer (GPT-2 style) trained with HF `tokenizers`, wrapped as `PreTrainedTokenizerFast`.

Byte level means every string round-trips exactly (no unknown token). Special tokens:
`<|endoftext|>` (EOS, also BOS), `<pad>` and `<cls>` (first token of every reward-model input,
the position DistilBERT's classification head reads).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS, PAD, CLS = "<|endoftext|>", "<pad>", "<cls>"


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
              out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (specials and the 256 bytes included) on `texts`.

    The result is a left-padding causal-LM tokenizer; `out_dir` saves it with `save_pretrained`.
    """
    if vocab_size < 260:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
                         "3 special tokens; use at least 260")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS, PAD, CLS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = wrap(tok)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def wrap(tok: Tokenizer, classifier: bool = False, max_length: int = 1024) -> PreTrainedTokenizerFast:
    """`PreTrainedTokenizerFast` around a raw tokenizer: causal-LM style, or `classifier=True` for the reward model
    (`<cls>` prepended, right padding, no token_type_ids, truncation at `max_length`)."""
    tok = Tokenizer.from_str(tok.to_str())  # a copy; the post-processor below must not leak into the caller's
    if classifier:
        tok.post_processor = processors.TemplateProcessing(single=f"{CLS} $A", pair=f"{CLS} $A $B",
                                                           special_tokens=[(CLS, tok.token_to_id(CLS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, cls_token=CLS, unk_token=None,
        padding_side="right" if classifier else "left", model_max_length=max_length,
        clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"])
    return fast


def classifier_tokenizer(fast: PreTrainedTokenizerFast, max_length: int = 512) -> PreTrainedTokenizerFast:
    """The reward-model twin of a `train_bpe` tokenizer: same vocabulary, `<cls>` first, right padding."""
    if fast.convert_tokens_to_ids(CLS) in (None, fast.unk_token_id):
        raise ValueError(f"tokenizer has no {CLS} token; train it with textenv.build.bpe.train_bpe")
    return wrap(fast.backend_tokenizer, classifier=True, max_length=max_length)
