"""A packed T5 batch: one row of (input, target) pairs as the model, the fused loss and the Trainer read it.

The decoder's input for a target is the target shifted right behind the decoder start token, and the
label at each decoder position is the target token there (transformers' `_shift_right` per pair):

    target           t0  t1  t2  eos
    decoder input    <s> t0  t1  t2        (<s>: decoder_start_token_id, T5's pad token)
    label            t0  t1  t2  eos

so the labels need no further shift and every decoder token has one (`layout.decoder.label_rows` is
every row). The loss of a row is then

    linear_cross_entropy(model.hidden_states(batch.input_ids, batch.decoder_input_ids, batch.layout),
                         model.lm_head, batch.labels, layout=batch.layout.decoder, reduction=...)

which `Seq2SeqLoss` computes from `loss(batch.input_ids, batch.labels, batch.layout,
**batch.loss_inputs())`, as `CausalLMLoss` does from a decoder's `PackedBatch` (the Trainer reads both
alike: `loss_inputs`, `normalizers`, `num_tokens`, `num_label_tokens`, `num_items`, `loss_weights`,
`flops`).
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
    num_items: int = 0
    """This row's share of the loss normalizer: target tokens, or pairs (`loss_weighting` sample/turn)."""
    loss_weights: torch.Tensor | None = None
    """fp32 weight per decoder token, None for token weighting."""

    @classmethod
    def from_arrays(cls, inputs: np.ndarray, targets: np.ndarray, input_lengths: np.ndarray,
                    target_lengths: np.ndarray, decoder_start_token_id: int, num_items: int | None = None,
                    loss_weights: np.ndarray | None = None) -> T5Batch:
        """One row from the pairs' concatenated input and target ids and their lengths (host arrays;
        `num_items` None: the target tokens)."""
        targets = np.asarray(targets, dtype=np.int64)
        starts = np.cumsum(target_lengths) - np.asarray(target_lengths)
        shifted = np.roll(targets, 1)
        shifted[starts] = decoder_start_token_id
        layout = Seq2SeqLayout.packed(input_lengths, target_lengths, targets)
        return cls(torch.from_numpy(np.asarray(inputs, dtype=np.int64)), torch.from_numpy(shifted),
                   torch.from_numpy(targets), layout, len(targets) if num_items is None else num_items,
                   None if loss_weights is None else torch.from_numpy(loss_weights))

    @property
    def num_tokens(self) -> int:
        """Real tokens of the row, both sides."""
        return self.input_ids.numel() + self.decoder_input_ids.numel()

    @property
    def num_label_tokens(self) -> int:
        return self.layout.decoder.num_label_rows

    def normalizers(self) -> tuple[int, ...]:
        """The step's loss normalizers this row adds to (the Trainer sums them over the step's batches
        and ranks and passes them to the loss as `num_items`): its loss items."""
        return (self.num_items,)

    def loss_inputs(self) -> dict:
        """What `Seq2SeqLoss` (engine/seq2seq_loss.py) reads besides ids, labels, layout and weights: the
        decoder's input."""
        return {"decoder_input_ids": self.decoder_input_ids}

    def flops(self, args) -> float:
        """Training FLOPs of the row's pairs (`families.t5.pair_flops`); a host-side batch."""
        from packtune.model.families.t5 import pair_flops

        sides = (np.diff(side.cu_seqlens.numpy()) for side in (self.layout.encoder, self.layout.decoder))
        return float(sum(pair_flops(args, int(i), int(t)) for i, t in zip(*sides, strict=True)))

    def to(self, device: torch.device | str, non_blocking: bool = True) -> T5Batch:
        pin = non_blocking and torch.device(device).type == "cuda"
        move = lambda t: None if t is None else (t.pin_memory() if pin and t.device.type == "cpu" else t).to(
            device, non_blocking=non_blocking)
        return T5Batch(move(self.input_ids), move(self.decoder_input_ids), move(self.labels),
                       self.layout.to(device, non_blocking), self.num_items, move(self.loss_weights))


def pack_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], decoder_start_token_id: int) -> T5Batch:
    """One packed row of `pairs` of (input ids, target ids), each side at least one token (T5 appends
    EOS to both)."""
    if not pairs:
        raise ValueError("pack_pairs: no pairs to pack")
    for i, (source, target) in enumerate(pairs):
        if len(source) == 0 or len(target) == 0:
            raise ValueError(f"pack_pairs: pair {i} has an empty {'input' if len(source) == 0 else 'target'}")
    inputs = np.concatenate([np.asarray(s, dtype=np.int64) for s, _ in pairs])
    targets = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in pairs])
    return T5Batch.from_arrays(inputs, targets, np.array([len(s) for s, _ in pairs]),
                               np.array([len(t) for _, t in pairs]), decoder_start_token_id)
