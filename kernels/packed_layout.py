"""The packed-layout contract: where samples start, each token's position, which tokens have a
target, and how many targets there are, defined once, on the host, from the sample lengths.

A packed row holds samples back to back with no padding. Everything downstream (varlen
attention, rotary embedding, the fused loss, the FLOPs count) reads one `PackedLayout`, built
by `PackedLayout.packed(seq_lens, labels)` before the step and moved to the device once
(`non_blocking`), so no kernel derives these facts again and the training step never syncs:

    cu_seqlens   int32 [n + 1]  sample offsets; sample i is tokens cu_seqlens[i] .. cu_seqlens[i+1]-1
    max_seqlen   int            the longest sample (host int: the attention grid size)
    positions    int64 [T]      position of each token within its sample (0, 1, ... per sample)
    label_rows   int64 [R]      flat indices of the tokens that have a target (label != IGNORE_INDEX)
    num_label_rows  int         R, the label-token count (host int)
                                (both None for a layout built without labels: kernels find them)
    attended_length float       token-weighted mean length each token attends over (attention FLOPs)

A row may also say which keys each segment attends to when they are not its own tokens
(`keys`, a `GatheredKeys`): prefix sharing packs a prompt once and lets two responses attend to it
(packtune.preference), so a response's segment attends to the prompt's keys and its own.

`PackedLayout.padded(seq_lens, labels)` describes the padded counterpart (`[B, L]` rows, each
one sample left-aligned): `cu_seqlens` is None, positions are `[B, L]` and `real` (bool `[B, L]`)
marks the slots that hold a token (what a mixture-of-experts router's statistics count).

Labels follow one convention, `shift_labels`: the label at t is token t + 1 of the same sample
where that token is trained, IGNORE_INDEX elsewhere and on every sample's last token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

IGNORE_INDEX = -100
"""The label of a token that has no target (as in PyTorch's and Hugging Face's losses)."""


def shift_labels(labels: np.ndarray | torch.Tensor, sample_ends: np.ndarray | torch.Tensor):
    """Next-token labels of concatenated samples, on the host (numpy) or the device (torch).

    `labels` `[T]` are unshifted (Hugging Face's convention: the token itself where it is
    trained, IGNORE_INDEX elsewhere); `sample_ends` the index of each sample's last token. The
    result at t is `labels[t + 1]`, IGNORE_INDEX at each sample's last token (whose next token
    belongs to another sample).
    """
    if isinstance(labels, torch.Tensor):
        shifted = torch.cat([labels[1:], labels.new_full((1,), IGNORE_INDEX)])
    else:
        shifted = np.append(np.asarray(labels, dtype=np.int64)[1:], IGNORE_INDEX)
    shifted[sample_ends] = IGNORE_INDEX
    return shifted


def attended_length(seq_lens: np.ndarray) -> float:
    """Token-weighted mean length each token attends over: sum(n^2) / sum(n)."""
    lengths = np.asarray(seq_lens, dtype=np.float64)
    return float((lengths * lengths).sum() / max(lengths.sum(), 1.0))


@dataclass(frozen=True)
class GatheredKeys:
    """The keys of each query segment, gathered from the row: query segment i (`cu_seqlens[i]` ..
    `cu_seqlens[i+1]` of the layout) attends to the rows `index[k]` for k in `cu_seqlens_k[i]` ..
    `cu_seqlens_k[i+1]` of the same packed row, in that order, causally aligned to the bottom right:
    the segment's queries are its last keys (query j of lq sees keys 0 .. j + lk - lq), as in
    flash-attn's varlen attention with separate query and key offsets."""

    index: torch.Tensor
    """int64 [Tk]: the row of each gathered key."""
    cu_seqlens_k: torch.Tensor
    """int32 [n + 1]: each query segment's gathered keys."""
    max_seqlen_k: int
    """The longest key segment (host int)."""
    multiplicity: torch.Tensor | None = None
    """float32 [T]: how many segments each row token is a key of, i.e. how many samples it stands for
    (a prompt two segments share: 2), for per-token sums that must count it once per sample (a
    mixture of experts' router load); None: once each."""

    def to(self, device: torch.device | str, non_blocking: bool = True) -> GatheredKeys:
        return replace(self, index=_moved(self.index, device, non_blocking),
                       cu_seqlens_k=_moved(self.cu_seqlens_k, device, non_blocking),
                       multiplicity=_moved(self.multiplicity, device, non_blocking))


def _moved(t: torch.Tensor | None, device: torch.device | str, non_blocking: bool) -> torch.Tensor | None:
    """`t` on `device`; host -> CUDA copies go through pinned memory, without which `non_blocking=True`
    copies synchronously."""
    if t is None:
        return None
    pin = non_blocking and torch.device(device).type == "cuda" and t.device.type == "cpu"
    return (t.pin_memory() if pin else t).to(device, non_blocking=non_blocking)


@dataclass(frozen=True)
class PackedLayout:
    """The four facts of a packed (or padded) batch; see the module docstring."""

    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    positions: torch.Tensor
    label_rows: torch.Tensor | None
    num_label_rows: int | None
    attended_length: float
    keys: GatheredKeys | None = None
    """The keys each segment attends to, when not its own tokens (prefix sharing); None: its own."""
    real: torch.Tensor | None = None
    """Padded rows: which slots hold a token (`[B, L]` bool); None: every slot (a packed row)."""

    @classmethod
    def packed(cls, seq_lens: np.ndarray, labels: np.ndarray | torch.Tensor | None = None) -> PackedLayout:
        """One row of samples of lengths `seq_lens`; `labels` (shifted, flat) give the label rows
        (None: not known here)."""
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        if len(seq_lens) == 0 or seq_lens.min() < 1:
            raise ValueError(f"a packed row needs samples of at least one token, got {seq_lens.tolist()}")
        cu = np.zeros(len(seq_lens) + 1, dtype=np.int32)
        np.cumsum(seq_lens, out=cu[1:])
        positions = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), seq_lens)
        rows = _label_rows(labels, int(cu[-1]))
        return cls(torch.from_numpy(cu), int(seq_lens.max()), torch.from_numpy(positions),
                   rows, None if rows is None else len(rows), attended_length(seq_lens))

    @classmethod
    def padded(cls, seq_lens: np.ndarray, labels: np.ndarray | torch.Tensor | None = None,
               width: int | None = None) -> PackedLayout:
        """`len(seq_lens)` rows right-padded to `width` (default: the longest); `labels` `[B, width]`."""
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        width = int(seq_lens.max()) if width is None else width
        positions = np.broadcast_to(np.arange(width, dtype=np.int64), (len(seq_lens), width)).copy()
        rows = _label_rows(labels, len(seq_lens) * width)
        real = torch.from_numpy(positions < seq_lens[:, None])
        return cls(None, width, torch.from_numpy(positions), rows, None if rows is None else len(rows),
                   attended_length(seq_lens), real=real)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, labels: torch.Tensor | None = None) -> PackedLayout:
        """The layout of a row given its sample offsets (host tensors; device ones are copied to the
        host, one sync: callers that can, build the layout from lengths with the batch)."""
        cu = cu_seqlens.detach().to("cpu", torch.int64).numpy()
        flat = None if labels is None else labels.detach().reshape(-1).cpu()
        return cls.packed(np.diff(cu), flat)

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedLayout:
        """The same layout with its tensors on `device` (the host ints stay); host -> CUDA copies go
        through pinned memory, without which `non_blocking=True` copies synchronously."""
        move = lambda t: _moved(t, device, non_blocking)
        keys = None if self.keys is None else self.keys.to(device, non_blocking)
        return replace(self, cu_seqlens=move(self.cu_seqlens), positions=move(self.positions),
                       label_rows=move(self.label_rows), keys=keys, real=move(self.real))


def _label_rows(labels: np.ndarray | torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    if labels is None:
        return None
    flat = labels.reshape(-1) if isinstance(labels, np.ndarray) else labels.reshape(-1).numpy()
    if flat.size != num_tokens:
        raise ValueError(f"labels have {flat.size} entries for {num_tokens} tokens")
    return torch.from_numpy(np.flatnonzero(flat != IGNORE_INDEX).astype(np.int64))
