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
from packtune.kernels.logprobs import logprobs_ref, per_segment
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
    backend = _dispatch.resolve_backend("linear_logprobs", hidden.device.type, backend)
    return per_segment(
        lambda: -linear_cross_entropy(hidden, weight, labels, reduction="none", softcap=softcap,
                                      ignore_index=ignore_index, layout=layout, backend=backend,
                                      chunk_size=chunk_size),
        labels, segment_ids, num_segments, ignore_index, return_counts, hidden.device)


def linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        segment_ids: torch.Tensor | None = None, num_segments: int | None = None, *,
                        softcap: float | None = None, ignore_index: int = IGNORE_INDEX,
                        return_counts: bool = False):
    """The specification (and eager baseline): materialised logits `F.linear(hidden, weight)`, then
    `logprobs_ref` (log_softmax in float64 for float64 inputs, else float32, as TRL does; gather;
    segment sum)."""
    return logprobs_ref(F.linear(hidden, weight), labels, segment_ids, num_segments, softcap=softcap,
                        ignore_index=ignore_index, return_counts=return_counts)
