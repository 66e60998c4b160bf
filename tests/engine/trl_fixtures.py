"""A tokenizer built in memory, for the TRL trainer tests."""

from __future__ import annotations


def word_tokenizer(vocab: int):
    """Whitespace-separated words w0..w{vocab-1}, built in memory (nothing downloaded): w0 is the
    padding (and unknown) token, w1 EOS. TRL's trainers want a tokenizer with a pad token."""
    import tokenizers
    import transformers

    model = tokenizers.models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")
    words = tokenizers.Tokenizer(model)
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0", eos_token="w1")
