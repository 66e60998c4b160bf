"""The model's tokenizer, loaded from its own files: a sentencepiece `.model` or a `tokenizer.json`.

Two facts about a tokenizer matter for exact chat-format training, and both are read, never guessed:
- its special tokens: BOS and EOS from `tokenizer_config.json` / `special_tokens_map.json` beside the
  tokenizer (a sentencepiece model's own ids when neither file exists), the end-of-turn ids from
  `generation_config.json`, and the control tokens (tokenizer.json's `special` added tokens,
  sentencepiece's control pieces) that only a template may produce;
- how it encodes text that does not start the sample. A conversation is encoded as chunks of text
  between control tokens, exactly as the tokenizer itself splits a string at its special tokens.
  Text at the start of a sample gets the tokenizer's start-of-text treatment (sentencepiece's dummy
  prefix "▁"); a chunk after a control token does not, as in a `tokenizer.json` whose Metaspace
  prepends only at offset 0. `encode_chunks(texts, first=False)` uses a second copy of the tokenizer
  with that prefix switched off, so a chunk encodes as it does inside the whole string.

`encode_chunks` returns each token's character span in its chunk, so the loss mask is placed by
characters of the rendered text, never by encoding pieces separately.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from packtune.errors import DataError

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

Encoded = tuple[list[int], list[tuple[int, int]] | None]
"""Token ids of a chunk and each token's [start, end) character span in that chunk."""

# A serialized sentencepiece ModelProto with one more `normalizer_spec` (field 3) holding
# `add_dummy_prefix = false` (its field 3) appended: protobuf merges a repeated embedded message
# into the first, so this is the same model without the dummy prefix.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


class Tokenizer:
    """The operations the data pipeline needs from a tokenizer."""

    path: Path
    files: tuple[Path, ...]
    bos: str | None
    """The BOS token's text (None when the tokenizer's config names none)."""
    eos: str | None
    bos_id: int | None
    eos_id: int | None
    end_of_turn_ids: tuple[int, ...]
    """generation_config.json's eos ids (chat models list their end-of-turn token there), else EOS."""
    controls: dict[str, int]
    """Control-token text -> id: what a template may produce and record text never does."""
    unk_id: int | None
    vocab_size: int

    def encode_chunks(self, texts: Sequence[str], first: bool) -> list[Encoded]:
        """Each text as it encodes after a control token (`first=False`) or at the start of a sample;
        spans are None where the tokenizer's normalizer rewrote the text."""
        raise NotImplementedError

    def encode_text(self, text: str) -> list[int]:
        """`text` as plain text at the start of a sample (control-token strings stay text)."""
        return self.encode_chunks([text], first=True)[0][0]

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

    def _read_configs(self, folder: Path) -> None:
        """BOS/EOS and end-of-turn ids from the config files in `folder`; the files join the fingerprint."""
        found = {n: folder / n for n in CONFIG_FILES if (folder / n).is_file()}
        self.files = (*self.files, *found.values())
        read = lambda name: _read_json(found[name]) if name in found else {}  # noqa: E731
        special = {**read("special_tokens_map.json"), **read("tokenizer_config.json")}  # the latter wins
        for key in ("bos", "eos"):
            if f"{key}_token" in special:
                setattr(self, key, _token_text(special[f"{key}_token"]))
            text = getattr(self, key)
            setattr(self, f"{key}_id", self.token_id(text) if text else None)
            if text and getattr(self, f"{key}_id") is None:
                raise DataError(
                    f"tokenizer {self.path}: its {key}_token {text!r} is not in the vocabulary", "tokenizer"
                )
        eot = read("generation_config.json").get("eos_token_id", self.eos_id)
        self.end_of_turn_ids = tuple([eot] if isinstance(eot, int) else eot or ())
        for text, i in (("bos", self.bos_id), ("eos", self.eos_id)):
            if i is not None:
                self.controls.setdefault(getattr(self, text), i)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, threads: int = 1) -> None:
        import sentencepiece

        self.path, self.files, self.threads = path, (path,), threads
        proto = path.read_bytes()
        self.sp, self.sp_rest = sentencepiece.SentencePieceProcessor(), sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
            self.sp_rest.LoadFromSerializedProto(proto + _NO_DUMMY_PREFIX)
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer {path}: not a valid sentencepiece model ({e})", "tokenizer") from None
        sp = self.sp
        self.vocab_size = sp.GetPieceSize()
        self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
        self.bos = sp.IdToPiece(sp.bos_id()) if sp.bos_id() >= 0 else None
        self.eos = sp.IdToPiece(sp.eos_id()) if sp.eos_id() >= 0 else None
        self.controls = {sp.IdToPiece(i): i for i in range(self.vocab_size) if sp.IsControl(i)}
        self.surface = [sp.IdToPiece(i).replace("\u2581", " ") for i in range(self.vocab_size)]
        self.byte_piece = np.array([sp.IsByte(i) for i in range(self.vocab_size)])
        self.dummy_prefix = sp.Encode("a") != self.sp_rest.Encode("a")
        self._read_configs(path.parent)

    def encode_chunks(self, texts: Sequence[str], first: bool) -> list[Encoded]:
        sp = self.sp if first else self.sp_rest
        encoded = sp.Encode(list(texts), num_threads=self.threads)
        return [(ids, self._spans(ids, text, first)) for ids, text in zip(encoded, texts, strict=True)]

    def _spans(self, ids: list[int], text: str, first: bool) -> list[tuple[int, int]] | None:
        """Character spans from the pieces' surfaces (sentencepiece's own offsets need protobuf);
        None when the pieces do not spell `text` (a normalizer rewrote it)."""
        if not self.byte_piece[ids].any():  # the common case, without a per-token loop
            pieces = [self.surface[i] for i in ids]
            if pieces and first and self.dummy_prefix and pieces[0].startswith(" "):
                pieces[0] = pieces[0][1:]  # the dummy prefix stands for no character of the text
            if "".join(pieces) != text:
                return None
            ends = np.cumsum(np.fromiter(map(len, pieces), np.int64, len(pieces)))
            return list(zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist(), strict=True))
        spans: list[tuple[int, int]] = []
        pos, pending, surfaces = 0, b"", []
        for k, i in enumerate(ids):
            if self.byte_piece[i]:  # <0xNN>: a character's bytes share its span
                pending += bytes([int(self.surface[i][3:5], 16)])
                spans.append((pos, pos))
                try:
                    char = pending.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                spans[-len(pending) :] = [(pos, pos + len(char))] * len(pending)
                surfaces.append(char)
                pos, pending = pos + len(char), b""
                continue
            piece = self.surface[i]
            if k == 0 and first and self.dummy_prefix and piece.startswith(" "):
                piece = piece[1:]  # the dummy prefix stands for no character of the text
            spans.append((pos, pos + len(piece)))
            surfaces.append(piece)
            pos += len(piece)
        return spans if "".join(surfaces) == text else None

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self.sp.Decode(ids if isinstance(ids, list) else list(ids), num_threads=self.threads)

    def token_id(self, piece: str) -> int | None:
        i = self.sp.PieceToId(piece)
        return i if i != self.sp.unk_id() and self.sp.IdToPiece(i) == piece else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`; special tokens come from the config files beside it."""

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
            spec = json.loads(path.read_text(encoding="utf-8"))
            self.tok = self.tok_first = self.tok_rest = tokenizers.Tokenizer.from_str(json.dumps(spec))
            text_spec = _text_only(spec)
            if text_spec is not spec:
                self.tok_first = self.tok_rest = tokenizers.Tokenizer.from_str(json.dumps(text_spec))
            if _no_prepend(text_spec.get("pre_tokenizer")):  # in place: after tok_first is built
                self.tok_rest = tokenizers.Tokenizer.from_str(json.dumps(text_spec))
        except Exception as e:  # json and the Rust side raise generic errors for every parse error
            raise DataError(f"tokenizer {path}: not a valid tokenizer.json ({e})", "tokenizer") from None
        # Record text is data: special-token strings inside it are encoded as text. Control tokens are
        # placed by the encoder between chunks, so no chunk ever needs one. `tok` holds the ids (decoding,
        # token_id); `tok_first` and `tok_rest` encode text (a chunk at a sample's start, the others).
        for t in {id(t): t for t in (self.tok, self.tok_first, self.tok_rest)}.values():
            t.encode_special_tokens = True
        self.path, self.files = path, (path,)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        added = self.tok.get_added_tokens_decoder()
        self.controls = {t.content: i for i, t in added.items() if t.special}
        model = spec.get("model") or {}
        unk = model.get("unk_token") if isinstance(model, dict) else None
        self.unk_id = self.tok.token_to_id(unk) if isinstance(unk, str) else None
        self.bos = self.eos = None
        self._read_configs(path.parent)

    def encode_chunks(self, texts: Sequence[str], first: bool) -> list[Encoded]:
        tok = self.tok_first if first else self.tok_rest
        return [(e.ids, e.offsets) for e in tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode_batch(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return self.tok.decode_batch([list(i) for i in ids], skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


def _text_only(spec: dict) -> dict:
    """`spec` for encoding text: a Unigram model's copies of the special tokens made unmatchable (a
    copy of `spec`), or `spec` itself when it has none.

    A Unigram tokenizer.json converted from sentencepiece (T5, FLAN-T5, mT5) keeps `</s>`, `<pad>` and
    the `<extra_id_N>` sentinels in the model's own vocabulary too, with score 0, the best there is:
    even with the added tokens' matching off, the model reads a record's text "</s>" as EOS.
    sentencepiece never matches its control pieces from text; here each gets a string with a space
    and a NUL, which no pre-tokenized word holds, keeping its place (so every other id stays)."""
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type") != "Unigram":
        return spec
    special = {t.get("content") for t in spec.get("added_tokens") or [] if t.get("special")}
    if not any(entry and entry[0] in special for entry in model.get("vocab") or []):
        return spec
    text = copy.deepcopy(spec)
    for entry in text["model"]["vocab"]:
        if entry and entry[0] in special:
            entry[0] = f"\x00 {entry[0]}"
    return text


def _no_prepend(pre_tokenizer: dict | None) -> bool:
    """Switch a Metaspace that prepends "▁" at offset 0 only (`prepend_scheme = "first"`) to never
    prepending, in place; True when there was one."""
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any([_no_prepend(p) for p in pre_tokenizer.get("pretokenizers", [])])
    if pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme") == "first":
        pre_tokenizer["prepend_scheme"] = "never"
        return True
    return False


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})", "tokenizer") from None
    return value if isinstance(value, dict) else {}


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def load_tokenizer(path: str | Path, threads: int = 1) -> Tokenizer:
    """A sentencepiece `.model`, a `tokenizer.json`, or a model directory holding one."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.model", "spiece.model", "tokenizer.json"):  # spiece.model: T5's
            if (path / name).exists():
                path = path / name
                break
        else:
            raise DataError(
                f"tokenizer: {path} holds none of tokenizer.model, spiece.model, tokenizer.json", "tokenizer"
            )
    if not path.exists():
        raise DataError(f"tokenizer file {path} does not exist", "tokenizer")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path, threads)


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
