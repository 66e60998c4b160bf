"""Label log-probs straight from hidden states and the lm_head, per token or summed per sequence,
without N x V logits: what preference optimisation (DPO, IPO, ORPO, SimPO) is built on.

For row i with label y_i (rows labelled `ignore_index` contribute 0):

    z_i     = softcap * tanh(h_i @ W.T / softcap)         (z_i = h_i @ W.T without softcap)
    logp_i  = z_i[y_i] - logsumexp(z_i)                   = -cross_entropy(z_i, y_i)
    logp_s  = sum of logp_i over the rows i of segment s   (segment_ids[i] = s)

Backward gets g_s = dL/dlogp_s per segment, of any sign (DPO pushes chosen up and rejected down);
row i takes g_i = g_{segment_ids[i]} (the index_add's backward) and

    dL/dz_i   = g_i * (onehot(y_i) - softmax(z_i))     (times 1 - (z_i / softcap)^2 through the cap)
    dHidden_i = dL/dz_i @ W          dW = sum_i dL/dz_i.T @ h_i   (fp32 accumulation)

which is the cross-entropy gradient of row i with row weight -g_i. So this op is
`linear_cross_entropy(reduction="none")` negated, and reuses its chunk loop and row kernels rather
than copying them: only label rows go through the matmuls, in chunks of `default_chunk_size` rows;
the forward keeps no logits (per chunk: logits, then the CE row kernel's loss = -logp); backward
recomputes each chunk's logits and runs the row kernel with -g_i as its row weight, which writes
dL/dz over the logits in one fp32 pass, then dX = dL/dz @ W and dW += dL/dz.T @ h. Backends are the
CE row kernel's: Triton, the C++ op packtune::cross_entropy_fwd_ (OpenMP) and torch ops.

Deterministic: chunks run in a fixed order, and the segment sums avoid CUDA's atomic index_add.

The cost is four matmuls over the label rows (the forward's, and backward's recompute, dX and dW)
against eager's three over all rows: the gradients g_s are unknown until the loss has seen every
log-prob, so the forward cannot form dL/dz the way linear CE does. With a frozen lm_head (LoRA,
QLoRA: no dW wanted) it can form dHidden_i / g_i, a gradient of row i alone, and does: backward
then only multiplies each row by its g_i, and the cost is two matmuls, as eager's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packtune.kernels import _dispatch
from packtune.kernels.linear_cross_entropy import linear_cross_entropy
from packtune.kernels.packed_layout import IGNORE_INDEX, PackedLayout

_dispatch.register_op("linear_logprobs", ("triton", "cpu", "torch"))


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor | torch.nn.Module, labels: torch.Tensor,
                    segment_ids: torch.Tensor | None = None, num_segments: int | None = None, *,
                    softcap: float | None = None, ignore_index: int = IGNORE_INDEX,
                    return_counts: bool = False, layout: PackedLayout | None = None,
                    backend: str | None = None, chunk_size: int | None = None):
    """log p(label) of each row of `hidden @ weight.T`, or their sums per segment; fp32, differentiable
    in hidden and weight.

    hidden [..., H]; weight [V, H] or the lm_head module (FSDP2-sharded or not; its bias is used);
    labels [...] (`ignore_index`: no target, log-prob 0). Without `segment_ids`: per-token log-probs
    shaped like labels. With `segment_ids` [...] (like labels; the segment of each row, read only on
    label rows) and `num_segments` S: the per-segment sums [S] (0 for a segment without label rows),
    and with `return_counts` also the label rows per segment (int64 [S], for per-token averages).
    `layout`: the batch's PackedLayout, whose label rows spare the device a search (and a GPU sync).
    """
    if segment_ids is None and (num_segments is not None or return_counts):
        raise ValueError("num_segments and return_counts need segment_ids")
    if segment_ids is not None:
        valid, seg = _segment_index(labels, segment_ids, num_segments, ignore_index, hidden.device)
    backend = _dispatch.resolve_backend("linear_logprobs", hidden.device.type, backend)
    token_logp = -linear_cross_entropy(hidden, weight, labels, reduction="none", softcap=softcap,
                                       ignore_index=ignore_index, layout=layout, backend=backend,
                                       chunk_size=chunk_size)
    if segment_ids is None:
        return token_logp
    sums = _segment_sum(token_logp.reshape(-1), seg, num_segments)
    if not return_counts:
        return sums
    return sums, _counts(valid, seg, num_segments)


def _segment_index(labels, segment_ids, num_segments, ignore_index, device):
    """The label-row mask and each row's segment as an index_add index (ignored rows sent to 0, where
    they add their log-prob 0); a label row's segment outside [0, S) is an error."""
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"num_segments={num_segments!r} must be a positive int (the number of segments)")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    if segment_ids.numel() != labels.numel():
        raise ValueError(f"segment_ids {tuple(segment_ids.shape)} and labels {tuple(labels.shape)} disagree: "
                         "expected one segment id per row")
    flat = labels.reshape(-1).to(device, non_blocking=True)
    seg = segment_ids.reshape(-1).to(device, torch.int64, non_blocking=True)
    valid = flat != ignore_index
    bad = valid & ((seg < 0) | (seg >= num_segments))
    if device.type == "cpu":
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"segment id {int(seg[i])} at row {i} (a label row) is outside "
                             f"[0, {num_segments})")
    else:  # no host sync: a device-side assert fails the step at the next sync
        torch._assert_async(~bad.any(), f"packtune: a label row's segment id is outside [0, {num_segments})")
    return valid, torch.where(valid, seg, 0)


def _segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Differentiable per-segment sums, deterministic on every device: on CUDA index_put with
    accumulate=True (sorts the indices, then each segment's run is summed in a fixed order; CUDA's
    index_add adds with atomics, in any order), elsewhere index_add (a serial loop on CPU)."""
    zeros = values.new_zeros(num_segments)
    if values.device.type == "cuda":
        return zeros.index_put((seg,), values, accumulate=True)
    return zeros.index_add(0, seg, values)


def layout_segments(layout: PackedLayout) -> tuple[torch.Tensor, int]:
    """(segment_ids, num_segments) with one segment per sample of `layout`: the sample index of every
    token, on the layout's device, computed without a host sync."""
    if layout.cu_seqlens is None:  # padded: a row per sample
        rows, width = layout.positions.shape
        ids = torch.arange(rows, device=layout.positions.device)[:, None].expand(rows, width)
        return ids.reshape(-1), rows
    cu = layout.cu_seqlens.long()
    n = cu.numel() - 1
    ids = torch.repeat_interleave(torch.arange(n, device=cu.device), cu.diff(), output_size=layout.num_tokens)
    return ids, n


def linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        segment_ids: torch.Tensor | None = None, num_segments: int | None = None, *,
                        softcap: float | None = None, ignore_index: int = IGNORE_INDEX,
                        return_counts: bool = False):
    """The specification (and eager baseline): materialised logits, log_softmax, gather, segment sum.
    Float64 for float64 inputs, else float32 (low-precision logits upcast first, as TRL does)."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = F.linear(hidden, weight).to(dtype).reshape(-1, weight.shape[0])
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    logp = z.log_softmax(-1).gather(1, torch.where(valid, flat, 0)[:, None])[:, 0]
    logp = torch.where(valid, logp, 0.0)
    if segment_ids is None:
        return logp.view(labels.shape)
    seg = torch.where(valid, segment_ids.reshape(-1).long(), 0)
    sums = logp.new_zeros(num_segments).index_add(0, seg, logp)
    if not return_counts:
        return sums
    return sums, _counts(valid, seg, num_segments)


def _counts(valid: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Label rows per segment (int64 [S]), without a host sync (bincount's size would need one)."""
    return torch.zeros(num_segments, dtype=torch.int64, device=seg.device).index_add_(0, seg, valid.long())
