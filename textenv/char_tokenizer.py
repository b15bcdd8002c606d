"""A tiny character-level tokenizer for tests and toy tasks: no downloads, a few dozen ids.

It is a plain transformers fast tokenizer (built from a `tokenizers` WordLevel model over single
characters), so it works anywhere a transformers tokenizer does: `encode`/`decode`, `batch_decode`,
padding, `save_pretrained` + `AutoTokenizer.from_pretrained`.

>>> tok = char_tokenizer("ab")
>>> tok.encode("abba"), tok.decode([3, 4, 1], skip_special_tokens=True)
([3, 4, 4, 3], 'ab')
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def char_tokenizer(alphabet: str = string.printable) -> PreTrainedTokenizerFast:
    """A char-level tokenizer: ids 0, 1, 2 are `<pad>`, `<eos>`, `<unk>`, then one id per character of
    `alphabet` in the order given (duplicates dropped). Characters outside the alphabet map to `<unk>`."""
    chars = list(dict.fromkeys(alphabet))
    if not chars:
        raise ValueError("char_tokenizer got an empty alphabet; pass the characters to encode, e.g. 'abc'.")
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Oniguruma's (?m) lets "." match newlines too: every character is its own token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters without the WordLevel default spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
