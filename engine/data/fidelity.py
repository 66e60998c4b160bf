"""Proof, per dataset, that packtune's ids are the model's own: the first records are encoded again
by the reference and compared token for token before training starts.

The reference is transformers' `apply_chat_template` for a chat template (when transformers is
installed), and for a built-in template with a `tokenizer.json` the tokenizer's own encoding of the
whole rendered text in one piece. Records whose text holds a control-token string are left out: there
packtune keeps the string as text on purpose, where the reference would emit the control token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from packtune.data.encoding import Rendered
from packtune.data.tokenizer import HFTokenizer, Tokenizer
from packtune.errors import DataError

SAMPLES_CHECKED = 8


@functools.cache
def _fast_tokenizer(path: str):
    """The tokenizer.json as it is (special tokens matched everywhere)."""
    import tokenizers

    return tokenizers.Tokenizer.from_file(path)


@functools.cache
def _auto_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def reference_ids(
    tokenizer: Tokenizer, tokenizer_path: str | Path, messages: list[dict] | None, rendered: Rendered
) -> list[int] | None:
    """The reference encoding of one sample, or None when this setup has no reference."""
    if messages is not None:
        try:
            import transformers  # noqa: F401
        except ImportError:
            return None
        folder = Path(tokenizer_path)
        folder = folder if folder.is_dir() else folder.parent
        return list(_auto_tokenizer(str(folder)).apply_chat_template(messages, tokenize=True)["input_ids"])
    if isinstance(tokenizer, HFTokenizer):
        bos = [tokenizer.bos_id] if rendered.leading_bos else []
        return bos + _fast_tokenizer(str(tokenizer.path)).encode(rendered.text, add_special_tokens=False).ids
    return None


def check_samples(
    tokenizer: Tokenizer,
    tokenizer_path: str | Path,
    samples: Sequence[tuple[str, list[dict] | None, Rendered, list[int]]],
    has_control: callable,
) -> int:
    """Compare (where, chat messages or None, rendered, ids) samples with the reference; the number
    compared. A difference is a DataError naming the record and the first differing token."""
    checked = 0
    for where, messages, rendered, ids in samples:
        if any(has_control(rendered.text[lo:hi]) for lo, hi in rendered.data):
            continue
        expected = reference_ids(tokenizer, tokenizer_path, messages, rendered)
        if expected is None:
            return checked
        if expected != ids:
            raise DataError(
                f"{where}: {_first_difference(tokenizer, ids, expected, messages is not None)}", "fidelity"
            )
        checked += 1
    return checked


def _first_difference(tokenizer: Tokenizer, ids: list[int], expected: list[int], chat: bool) -> str:
    k = next(
        (k for k, (a, b) in enumerate(zip(ids, expected, strict=False)) if a != b),
        min(len(ids), len(expected)),
    )

    def token(seq: list[int]) -> str:
        return f"{seq[k]} ({tokenizer.decode_batch([seq[k : k + 1]])[0]!r})" if k < len(seq) else "none"

    reference = "apply_chat_template" if chat else "the whole text encoded in one piece"
    return f"packtune's token {k} is {token(ids)} but the reference ({reference}) has {token(expected)}"
