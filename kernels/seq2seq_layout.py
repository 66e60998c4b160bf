"""The packed layout of an encoder-decoder batch, as T5X packs it: a row holds several (input, target)
pairs; the encoder packs the inputs, the decoder packs the targets, pair i being segment i of both.

    encoder  PackedLayout of the inputs    (its cu_seqlens: the encoder's segments)
    decoder  PackedLayout of the targets   (its cu_seqlens: the decoder's; its label rows: the loss's)

Every attention reads one side or both: the encoder's self-attention is block-diagonal over the
encoder's segments, the decoder's causal self-attention over the decoder's, and cross-attention lets
decoder segment i attend to encoder segment i only (queries cut by `decoder.cu_seqlens`, keys by
`encoder.cu_seqlens`). Positions restart at 0 in every segment on both sides, so a relative position
bias never spans two pairs.

    encoder tokens  | a0 a1 a2 a3 | b0 | c0 c1 c2 |         cu = [0, 4, 5, 8]
    decoder tokens  | A0 A1 | B0 B1 B2 | C0 |              cu = [0, 2, 5, 6]
    cross-attention   A* -> a*,  B* -> b0,  C0 -> c*
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from packtune.kernels.packed_layout import PackedLayout


@dataclass(frozen=True)
class Seq2SeqLayout:
    """The encoder's and the decoder's `PackedLayout` of one packed row of pairs."""

    encoder: PackedLayout
    decoder: PackedLayout

    def __post_init__(self) -> None:
        for name, side in (("encoder", self.encoder), ("decoder", self.decoder)):
            if side.cu_seqlens is None:
                raise ValueError(f"Seq2SeqLayout: the {name} layout must be packed (cu_seqlens), not padded")
        if self.encoder.cu_seqlens.numel() != self.decoder.cu_seqlens.numel():
            raise ValueError(f"Seq2SeqLayout: {self.encoder.cu_seqlens.numel() - 1} input segments but "
                             f"{self.decoder.cu_seqlens.numel() - 1} target segments; pair i is segment i "
                             "of both")

    @classmethod
    def packed(cls, input_lengths: np.ndarray, target_lengths: np.ndarray,
               labels: np.ndarray | torch.Tensor | None = None) -> Seq2SeqLayout:
        """One row of pairs: input i has `input_lengths[i]` tokens, target i `target_lengths[i]`;
        `labels` (flat over the decoder's tokens, IGNORE_INDEX where a token has no target) give the
        decoder's label rows."""
        return cls(PackedLayout.packed(input_lengths), PackedLayout.packed(target_lengths, labels))

    @property
    def num_pairs(self) -> int:
        return self.encoder.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Seq2SeqLayout:
        return Seq2SeqLayout(self.encoder.to(device, non_blocking), self.decoder.to(device, non_blocking))
