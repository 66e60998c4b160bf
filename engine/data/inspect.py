"""`packtune data inspect CONFIG [--records N]`: the first records of the first source as the model sees them.

Each sample is printed token by token with the trained tokens marked (green on a terminal,
[[brackets]] otherwise), then the ids on both sides of every prompt/answer boundary, the
end-of-turn token and whether it is trained, and the trained share.
"""

from __future__ import annotations

import sys
from typing import TextIO

from packtune.config import Config
from packtune.data.chat_format import make_chat_format
from packtune.data.formats import decode_record, location, to_conversation
from packtune.data.sources import OpenSource, resolve_sources
from packtune.data.tokenizer import load_tokenizer
from packtune.errors import DataError

GREEN, RESET = "\033[32m", "\033[0m"


def inspect_records(cfg: Config, n_records: int = 3, out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up per call: a default bound at import outlives a replaced stdout
    data = cfg.data
    tokenizer_path = cfg.tokenizer
    tok = load_tokenizer(tokenizer_path)
    fmt = make_chat_format(data.template, tokenizer_path, tok, data.train_on, data.rewritten_history)
    colour = out.isatty()
    eot = list(tok.end_of_turn_ids)
    print(f"template: {fmt.resolved}; BOS {tok.bos_id}, EOS {tok.eos_id}, end of turn {eot}", file=out)
    spec = resolve_sources(data)[0]
    source = OpenSource(spec, data.skip_bad_records)
    for number, raw in next(source.chunks(n_records, 0, data.mix_seed), (1, []))[1]:
        where = location(spec["path"], number, source.unit)
        try:
            record = decode_record(where, raw)
            samples = fmt.render(to_conversation(record, source.format, source.fields, where), where)
        except DataError as e:
            print(f"\n{where}: {e}", file=out)
            continue
        for result in fmt.encoder.encode_samples(samples, [where] * len(samples)):
            print(f"\n── {where} ──", file=out)
            if isinstance(result, DataError):
                print(f"error: {result}", file=out)
                continue
            print(_marked(tok, result.ids, result.mask, colour), file=out)
            _summary(tok, result.ids, result.mask, out)


def _marked(tok, ids: list[int], mask: list[bool], colour: bool) -> str:
    pieces, k = [], 0
    while k < len(ids):
        end = k
        while end < len(ids) and mask[end] == mask[k]:
            end += 1
        text = tok.decode_batch([ids[k:end]])[0]
        if mask[k]:
            text = f"{GREEN}{text}{RESET}" if colour else f"[[{text}]]"
        pieces.append(text)
        k = end
    return "".join(pieces)


def _summary(tok, ids: list[int], mask: list[bool], out: TextIO) -> None:
    for k in range(1, len(ids)):
        if mask[k] != mask[k - 1]:
            what = "answer starts" if mask[k] else "answer ends"
            pair = tok.decode_batch([[ids[k - 1]], [ids[k]]])
            print(f"  {what} at token {k}: ids {ids[k - 1]} {pair[0]!r} | {ids[k]} {pair[1]!r}", file=out)
    ends = [k for k, i in enumerate(ids) if i in tok.end_of_turn_ids]
    for k in ends:
        print(f"  end of turn {ids[k]} at token {k}: {'trained' if mask[k] else 'not trained'}", file=out)
    print(f"  {len(ids)} tokens, {sum(mask)} trained ({100 * sum(mask) / max(len(ids), 1):.1f}%)", file=out)
