"""Label log-probs from logits, per token or summed per sequence: TRL's `selective_log_softmax` (and
the segment sums preference losses take) in one pass over each row, with no [N x V] tensor of its own.

For row i with label y_i (rows labelled `ignore_index` contribute 0):

    z_i     = softcap * tanh(x_i / softcap)               (z_i = x_i without softcap)
    logp_i  = z_i[y_i] - logsumexp(z_i)                   = -cross_entropy(z_i, y_i)
    logp_s  = sum of logp_i over the rows i of segment s   (segment_ids[i] = s)

Backward gets g_s = dL/dlogp_s per segment, of any sign; row i takes g_i = g_{segment_ids[i]} and

    dL/dx_i = g_i * (onehot(y_i) - softmax(z_i))          (times 1 - (z_i / softcap)^2 through the cap)

which is the cross-entropy gradient of row i with row weight -g_i. So this op is
`masked_cross_entropy(reduction="none")` negated: the row kernel (Triton, the C++ op, torch ops)
writes the gradient of row i for g_i = 1 during the forward pass, and backward scales each row by
its g_i in place. Eager `log_softmax(x).gather(y)` instead keeps log_softmax's [N x V] output, and
its backward makes two more (the gather's scattered gradient, log_softmax's gradient).

`inplace_backward=True` writes that gradient over the logits themselves (as Liger-Kernel's
cross-entropy does), so the op needs no [N x V] buffer at all: for logits nobody reads afterwards,
e.g. `lm_head(hidden)`'s output, whose backward needs hidden and the weight, not the logits. A
backward that would need the overwritten values (another op saved the logits) is refused by
autograd's version check rather than computed wrongly. `linear_logprobs` (from hidden states and
the lm_head) goes further and never forms the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from packtune.kernels import _dispatch
from packtune.kernels.cross_entropy import masked_cross_entropy
from packtune.kernels.packed_layout import IGNORE_INDEX, PackedLayout

_dispatch.register_op("logprobs", ("triton", "cpu", "torch"))


def logprobs(logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor | None = None,
             num_segments: int | None = None, *, softcap: float | None = None,
             ignore_index: int = IGNORE_INDEX, return_counts: bool = False, inplace_backward: bool = False,
             backend: str | None = None):
    """log p(label) of each row of `logits` [..., V], or their sums per segment; fp32, differentiable
    in the logits.

    labels [...] (`ignore_index`: no target, log-prob 0). Without `segment_ids`: per-token log-probs
    shaped like labels. With `segment_ids` [...] (the segment of each row, read only on label rows)
    and `num_segments` S: the per-segment sums [S], and with `return_counts` also the label rows per
    segment (int64 [S]). `inplace_backward=True` overwrites `logits` with the gradient (module
    docstring; the Triton and C++ backends, when the logits require grad): their values are gone
    after the call. The torch backend, the reference, always computes out of place.
    """
    backend = _dispatch.resolve_backend("logprobs", logits.device.type, backend)
    return per_segment(
        lambda: -masked_cross_entropy(logits, labels, reduction="none", softcap=softcap,
                                      ignore_index=ignore_index, inplace_backward=inplace_backward,
                                      backend=backend),
        labels, segment_ids, num_segments, ignore_index, return_counts, logits.device)


def per_segment(token_logprobs: Callable[[], torch.Tensor], labels: torch.Tensor,
                segment_ids: torch.Tensor | None, num_segments: int | None, ignore_index: int,
                return_counts: bool, device: torch.device):
    """What `logprobs` and `linear_logprobs` return: the per-token log-probs `token_logprobs()`
    computes, or, given `segment_ids`, their sums per segment (and the label rows per segment with
    `return_counts`). The segments are checked before the kernel runs."""
    if segment_ids is None:
        if num_segments is not None or return_counts:
            raise ValueError("num_segments and return_counts need segment_ids")
        return token_logprobs()
    valid, seg = segment_index(labels, segment_ids, num_segments, ignore_index, device)
    sums = segment_sum(token_logprobs().reshape(-1), seg, num_segments)
    return (sums, label_counts(valid, seg, num_segments)) if return_counts else sums


def logprobs_ref(logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor | None = None,
                 num_segments: int | None = None, *, softcap: float | None = None,
                 ignore_index: int = IGNORE_INDEX, return_counts: bool = False):
    """The specification and eager baseline, as TRL's `selective_log_softmax`: log_softmax (float64 for
    float64 logits, else float32: low-precision logits upcast first), gather, then the segment sum."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype).reshape(-1, logits.shape[-1])
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
    return (sums, label_counts(valid, seg, num_segments)) if return_counts else sums


def segment_index(labels: torch.Tensor, segment_ids: torch.Tensor, num_segments: int | None,
                  ignore_index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Differentiable per-segment sums, deterministic on every device: on CUDA index_put with
    accumulate=True (sorts the indices, then each segment's run is summed in a fixed order; CUDA's
    index_add adds with atomics, in any order), elsewhere index_add (a serial loop on CPU)."""
    zeros = values.new_zeros(num_segments)
    if values.device.type == "cuda":
        return zeros.index_put((seg,), values, accumulate=True)
    return zeros.index_add(0, seg, values)


def label_counts(valid: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Label rows per segment (int64 [S]), without a host sync (bincount's size would need one)."""
    return torch.zeros(num_segments, dtype=torch.int64, device=seg.device).index_add_(0, seg, valid.long())


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
