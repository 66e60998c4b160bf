"""Segment-by-segment tokenization with a structural loss mask, checked by decoding.

Each segment of a rendered conversation is encoded on its own and the ids are concatenated, so
the prompt/answer boundary is exact by construction (no search for a response key, no re-encoding
of prompt+answer). Encoding a piece of text in the middle of a sample must not get the dummy-space
prefix that sentencepiece adds at the start of a text, so a segment after the first is encoded
behind a fixed prefix ("\\n") whose ids are then cut off, as torchtune does.

Every text segment must decode back to its own text; if it does not (unknown characters without
byte fallback, a normalizer that rewrites text), the row fails with its location and segment
instead of being masked or dropped silently.

Tokenizers: a sentencepiece `.model` (core dependency) or a Hugging Face `tokenizer.json` through
the optional `tokenizers` package. Both encode whole batches in native threads.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from packtune.data.errors import DataError
from packtune.data.templates import Segment

PREFIX = "\n"


class Tokenizer:
    """The few operations the data pipeline needs from a tokenizer."""

    path: Path
    files: tuple[Path, ...]
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        raise NotImplementedError

    def token_id(self, piece: str) -> int | None:
        """The id of `piece` if it is one token of the vocabulary, else None."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for f in self.files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, threads: int = 1) -> None:
        import sentencepiece

        self.path, self.files, self.threads = path, (path,), threads
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer {path}: not a valid sentencepiece model ({e})", "tokenizer") from None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.vocab_size = self.sp.GetPieceSize()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.Encode(list(texts), num_threads=self.threads)

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self.sp.Decode(ids if isinstance(ids, list) else list(ids), num_threads=self.threads)

    def token_id(self, piece: str) -> int | None:
        i = self.sp.PieceToId(piece)
        return i if i != self.sp.unk_id() and self.sp.IdToPiece(i) == piece else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`; BOS/EOS come from a `tokenizer_config.json` beside it."""

    BOS_GUESSES = ("<|begin_of_text|>", "<s>", "<bos>")
    EOS_GUESSES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")

    def __init__(self, path: Path) -> None:
        try:
            import tokenizers
        except ImportError:
            raise DataError(
                f"tokenizer {path}: reading tokenizer.json needs the `tokenizers` package "
                "(pip install tokenizers)",
                "tokenizer",
            ) from None
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a generic Exception for every parse error
            raise DataError(f"tokenizer {path}: not a valid tokenizer.json ({e})", "tokenizer") from None
        self.path = path
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        self.files = (path, config_path) if config_path.exists() else (path,)
        self.bos_id = self._special(config.get("bos_token"), self.BOS_GUESSES)
        self.eos_id = self._special(config.get("eos_token"), self.EOS_GUESSES)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def _special(self, configured: object, guesses: tuple[str, ...]) -> int | None:
        if isinstance(configured, dict):
            configured = configured.get("content")
        for piece in [configured] if isinstance(configured, str) else list(guesses):
            i = self.tok.token_to_id(piece)
            if i is not None:
                return i
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self.tok.decode_batch([list(i) for i in ids], skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


def load_tokenizer(path: str | Path, threads: int = 1) -> Tokenizer:
    """A sentencepiece `.model`, a `tokenizer.json`, or a model directory holding either."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise DataError(
                f"tokenizer: {path} holds neither tokenizer.model nor tokenizer.json", "tokenizer"
            )
    if not path.exists():
        raise DataError(f"tokenizer file {path} does not exist", "tokenizer")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path, threads)


class SegmentEncoder:
    """Turns rendered rows into (ids, trainable mask), one batched encode per chunk of rows."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.prefix_ids = tokenizer.encode_batch([PREFIX])[0]
        self.prefix_text = tokenizer.decode_batch([self.prefix_ids])[0]
        self.special: dict[str, int | None] = {"{bos}": tokenizer.bos_id, "{eos}": tokenizer.eos_id}

    def _special_id(self, seg: Segment) -> int | None:
        if seg.text not in self.special:
            self.special[seg.text] = self.tok.token_id(seg.text)
        return self.special[seg.text]

    def encode_rows(
        self, rows: Sequence[list[Segment]], wheres: Sequence[str]
    ) -> list[tuple[list[int], list[bool]] | DataError]:
        """Per row: (ids, mask where True marks a token the model learns to produce), or the
        DataError describing why that row cannot be tokenized exactly."""
        texts, plan = [], []
        for segments in rows:
            items, first = [], True
            for k, seg in enumerate(segments):
                if seg.special and seg.text in ("{bos}", "{eos}") and self.special[seg.text] is None:
                    name = "BOS" if seg.text == "{bos}" else "EOS"
                    raise DataError(
                        f"tokenizer {self.tok.path} has no {name} token, which the template uses", "tokenizer"
                    )
                sid = self._special_id(seg) if seg.special else None
                if sid is not None:
                    items.append((k, sid))
                    continue
                texts.append(seg.text if first else PREFIX + seg.text)
                items.append((k, -1 if first else -2))
                first = False
            plan.append(items)
        encoded = self.tok.encode_batch(texts) if texts else []
        n_prefix = len(self.prefix_ids)
        pieces, to_decode, expected = [], [], []
        pos = 0
        for segments, items in zip(rows, plan, strict=False):
            row_pieces = []  # (segment index, ids or None when the prefix merged, index into to_decode)
            for k, kind in items:
                if kind >= 0:
                    row_pieces.append((k, [kind], None))
                    continue
                ids = encoded[pos]
                pos += 1
                if kind == -2:
                    if ids[:n_prefix] != self.prefix_ids:
                        row_pieces.append((k, None, None))
                        continue
                    ids = ids[n_prefix:]
                    to_decode.append(self.prefix_ids + ids)
                    expected.append(self.prefix_text + segments[k].text)
                else:
                    to_decode.append(ids)
                    expected.append(segments[k].text)
                row_pieces.append((k, ids, len(to_decode) - 1))
            pieces.append(row_pieces)
        decoded = self.tok.decode_batch(to_decode) if to_decode else []
        results: list[tuple[list[int], list[bool]] | DataError] = []
        for segments, row_pieces, where in zip(rows, pieces, wheres, strict=False):
            error = None
            ids_all: list[int] = []
            mask_all: list[bool] = []
            for k, ids, check in row_pieces:
                seg = segments[k]
                if ids is None:
                    error = self._mismatch(where, k, seg, "its first token merges with the text before it")
                    break
                if check is not None and decoded[check] != expected[check]:
                    skip = len(expected[check]) - len(seg.text)
                    error = self._mismatch(where, k, seg, _first_difference(seg.text, decoded[check][skip:]))
                    break
                ids_all.extend(ids)
                mask_all.extend([seg.trainable] * len(ids))
            results.append(error or (ids_all, mask_all))
        return results

    def _mismatch(self, where: str, k: int, seg: Segment, why: str) -> DataError:
        kind = "trained" if seg.trainable else "prompt"
        return DataError(
            f"{where}: segment {k} ({seg.role}, {kind}) does not round-trip "
            f"through tokenizer {self.tok.path.name}: {why}. The tokenizer cannot represent this "
            "text exactly (unknown characters without byte fallback, or a normalizer that "
            "rewrites it); fix the row or set data.skip_bad_rows = true",
            "tokenization_mismatch",
        )


def _first_difference(text: str, decoded: str) -> str:
    i = next(
        (j for j, (a, b) in enumerate(zip(text, decoded, strict=False)) if a != b),
        min(len(text), len(decoded)),
    )
    lo = max(0, i - 20)
    return f"at character {i} the text {text[lo : i + 20]!r} decodes as {decoded[lo : i + 20]!r}"


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
