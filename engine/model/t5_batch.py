"""A packed T5 batch: one row of (input, target) pairs as the model and the fused loss read it.

The decoder's input for a target is the target shifted right behind the decoder start token, and the
label at each decoder position is the target token there (transformers' `_shift_right` per pair):

    target           t0  t1  t2  eos
    decoder input    <s> t0  t1  t2        (<s>: decoder_start_token_id, T5's pad token)
    label            t0  t1  t2  eos

so the labels need no further shift and every decoder token has one (`layout.decoder.label_rows` is
every row). The loss of a row is then

    linear_cross_entropy(model.hidden_states(batch.input_ids, batch.decoder_input_ids, batch.layout),
                         model.lm_head, batch.labels, layout=batch.layout.decoder, reduction=...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from packtune.kernels.seq2seq_layout import Seq2SeqLayout


@dataclass(frozen=True)
class T5Batch:
    input_ids: torch.Tensor
    """The inputs back to back `[Te]` (int64)."""
    decoder_input_ids: torch.Tensor
    """Each target shifted right behind the decoder start token, back to back `[Td]` (int64)."""
    labels: torch.Tensor
    """The targets back to back `[Td]` (int64): the label of each decoder position."""
    layout: Seq2SeqLayout

    def to(self, device: torch.device | str, non_blocking: bool = True) -> T5Batch:
        move = lambda t: t.to(device, non_blocking=non_blocking)
        return T5Batch(move(self.input_ids), move(self.decoder_input_ids), move(self.labels),
                       self.layout.to(device, non_blocking))


def pack_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], decoder_start_token_id: int) -> T5Batch:
    """One packed row of `pairs` of (input ids, target ids), each side at least one token (T5 appends
    EOS to both)."""
    if not pairs:
        raise ValueError("pack_pairs: no pairs to pack")
    for i, (source, target) in enumerate(pairs):
        if len(source) == 0 or len(target) == 0:
            raise ValueError(f"pack_pairs: pair {i} has an empty {'input' if len(source) == 0 else 'target'}")
    inputs = np.concatenate([np.asarray(s, dtype=np.int64) for s, _ in pairs])
    labels = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in pairs])
    start = decoder_start_token_id
    shifted = np.concatenate([np.asarray([start, *t[:-1]], dtype=np.int64) for _, t in pairs])
    layout = Seq2SeqLayout.packed([len(s) for s, _ in pairs], [len(t) for _, t in pairs], labels)
    return T5Batch(torch.from_numpy(inputs), torch.from_numpy(shifted), torch.from_numpy(labels), layout)
