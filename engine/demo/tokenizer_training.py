"""Train a small sentencepiece tokenizer, laid out like Llama's, on generated text.

Llama's conventions are kept so the result drops into the same code paths as a real Llama
tokenizer (and loads in transformers as a `LlamaTokenizer`): unk 0, bos 1, eos 2, byte fallback
for characters never seen, digits split one per token, no text normalisation, whitespace kept.
A pad piece (id 3) is added because padding-based trainers (the TRL baseline) need one, and
"\n" is a piece of its own, so a newline never merges with the token before or after it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm


def train_tokenizer(texts: Iterable[str], path: str | Path, vocab_size: int, *,
                    model_type: str = "unigram", max_sentences: int = 200_000, seed: int = 0) -> Path:
    """Train on `texts` (one sample each; newlines allowed) and write the `.model` file to `path`.

    `vocab_size` is an upper bound: a corpus with fewer distinct pieces gets a smaller
    vocabulary instead of an error (`hard_vocab_limit=False`), so the model's embedding can be
    sized from the result (`SentencePieceProcessor.vocab_size()`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # sentencepiece reads one sentence per item and refuses items with newlines only in the
    # legacy text-file path; the iterator path takes them, and byte fallback covers "\n".
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    logging.getLogger("sentencepiece").setLevel(logging.ERROR)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path
