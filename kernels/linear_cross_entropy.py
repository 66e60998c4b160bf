"""Fused linear + masked cross-entropy: loss(hidden @ weight.T + bias, labels) without N x V logits.

Only label rows (label != ignore_index) go through the matmuls: in SFT the prompt rows carry no
loss, so their logits are never formed and their FLOPs are skipped. The label rows are gathered
in chunks of `chunk_size` rows, and per chunk:

    logits = h_c @ W.T (+ b)               [C, V] in the input dtype
    fused CE kernel, in place              logits -> dloss/dlogits (already * weight / denominator)
    dX[rows_c] = dlogits @ W               ignored rows keep dX = 0
    dW += dlogits.T @ h_c, db += sum(dlogits)    accumulated in fp32, in chunk order

so peak memory is dW (fp32) + dX + one chunk of logits, and the result is deterministic (a fixed
chunk order, no atomics). Chunks are sized per device (`default_chunk_size`): on the CPU a logits
chunk about the size of the hidden states; on a GPU a logits budget of `GPU_LOGITS_BYTES` (1024
to 4096 rows: 4096 at Llama-3's V = 128256 in bf16), so each chunk's matmuls are large. The dW
product never forms a [V, H] temporary in the input dtype: on CUDA one cuBLAS addmm reads bf16 /
fp16 operands and accumulates into the fp32 dW in place (`out_dtype=float32`, `out=dW`); on the
CPU (or a torch without that addmm overload) the product goes in slabs of `DW_SLAB_ROWS`
vocabulary rows. fp16 inputs get their
1/denominator in backward (see `defer_scale` in cross_entropy.py), so loss-scaled fp16 gradients
do not underflow. Per-row `weights` (None: all ones) scale each row's loss and dlogits
inside the CE kernel. Backward is a scale of dX, dW, db by grad_output; for reduction="none"
the per-row grad_output is only known in backward, so there the forward only computes the
losses and backward recomputes the chunks with the grad_output folded in. Unless dX is the only
gradient wanted (a frozen lm_head, as under LoRA and QLoRA): each row's dX is its own
grad_output times a gradient the forward can form, so the forward forms it (no recompute) and
backward scales each row, two matmuls per chunk instead of three.

The label-row index: given a `PackedLayout` (packtune.kernels.packed_layout), its `label_rows`,
built on the host with the batch, so the chunk loop is sized without touching the device. A
standalone call without a layout finds them itself: on CPU `nonzero` (reading a CPU tensor is
free); on GPU a stable sort puts label rows first without a host sync, and the one sync is
reading their count (under torch.compile all rows are processed instead, keeping shapes static).

FSDP2: pass the lm_head module or its weight. A DTensor weight (an FSDP2-sharded parameter, e.g.
an lm_head used outside its module's forward, where FSDP has not unsharded it) is gathered with
`full_tensor(grad_placements=[Partial()])` and cast to the hidden states' dtype (the compute
dtype; the sharded parameter is the fp32 master weight under mixed precision). Partial matters:
each rank's full dW covers only its own rows' loss, and marking it partial makes the backward
sum the ranks' contributions while it reduce-scatters (a plain `full_tensor()` would hand each
shard only its own rank's gradient).
"""

from __future__ import annotations

import torch

from packtune.kernels import _dispatch
from packtune.kernels.cross_entropy import (
    _mark_consumed,
    _row_scale,
    cross_entropy_rows,
    defer_scale,
    masked_cross_entropy_ref,
)
from packtune.kernels.loss_inputs import check_label_range, check_options, flat_weights
from packtune.kernels.packed_layout import PackedLayout

_dispatch.register_op("linear_cross_entropy", ("triton", "cpu", "torch"))

GPU_LOGITS_BYTES = 1 << 30
"""A GPU chunk's logits buffer stays within this budget (then 1024 <= rows <= 4096, a power of two)."""
DW_SLAB_ROWS = 4096
"""On the CPU, dW += dlogits.T @ h goes in slabs of this many vocabulary rows (bounds the temporary)."""
ADDMM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()
"""Whether this torch has addmm(..., out_dtype, out=): low-precision operands, an fp32 output (CUDA)."""


def default_chunk_size(n: int, hidden: int, vocab: int, device: torch.device | str = "cpu",
                       itemsize: int = 4) -> int:
    """Rows per chunk. CPU: a logits chunk about the size of the hidden states (so the loss adds about
    one X to the dX + dW it must return anyway), at least 128 rows: each chunk's dW += product
    reads and writes all of dW, and thinner chunks made that product measurably slower there.
    GPU: the most rows whose logits fit `GPU_LOGITS_BYTES`, a power of two in [1024, 4096], so the
    three matmuls per chunk are large enough to run near the tensor cores' peak."""
    if torch.device(device).type == "cuda":
        rows = max(1, GPU_LOGITS_BYTES // (vocab * itemsize))
        return min(4096, max(1024, 1 << (rows.bit_length() - 1)))
    return max(128, -(-n * hidden // vocab))


def _accumulate_grad_w(grad_w: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (fp32 [V, H]) += dlogits.T @ h, with no [V, H] temporary in the input dtype."""
    if dlogits.dtype == torch.float32:
        grad_w.addmm_(dlogits.t(), h)
    elif grad_w.device.type == "cuda" and ADDMM_OUT_DTYPE:  # cuBLAS: bf16/fp16 in, fp32 accumulate and out
        torch.addmm(grad_w, dlogits.t(), h, out_dtype=torch.float32, out=grad_w)
    else:
        for start in range(0, grad_w.shape[0], DW_SLAB_ROWS):
            grad_w[start:start + DW_SLAB_ROWS].add_(dlogits[:, start:start + DW_SLAB_ROWS].t() @ h)


def _label_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    valid = labels != ignore_index
    if labels.device.type == "cpu":
        return valid.nonzero()[:, 0]
    if torch.compiler.is_compiling():
        return torch.arange(labels.numel(), device=labels.device)
    order = torch.argsort((~valid).to(torch.int8), stable=True)
    return order[: int(valid.sum())]


def _chunked_pass(x, weight, bias, labels, weights, rows, scale, backend, options, chunk_size, row_grad=None,
                  needs=(True, True, True)):
    """Losses and lse per row (losses times `weights` when given); with any of `needs` (dX, dW, db)
    also those gradients, each label row's gradient multiplied by `row_grad` when given (the CE kernel
    applies it with the weights, in fp32; the losses returned then carry it too)."""
    n, v = x.shape[0], weight.shape[0]
    loss = torch.zeros(n, dtype=torch.float32, device=x.device)
    lse = torch.zeros(n, dtype=torch.float32, device=x.device)
    grad_x = torch.zeros_like(x) if needs[0] else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if needs[1] else None
    grad_b = torch.zeros(v, dtype=torch.float32, device=x.device) if needs[2] and bias is not None else None
    compute_grad = any(needs)
    buffer = x.new_empty(min(chunk_size, rows.numel()), v)  # one logits buffer, reused by every chunk
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start:start + chunk_size]
        h = x.index_select(0, idx)
        logits = buffer[: idx.numel()]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        w_c = None if weights is None else weights.index_select(0, idx)
        if row_grad is not None:  # folded into the kernel's row weights: no extra pass over the chunk
            g_c = row_grad.index_select(0, idx).float()
            w_c = g_c if w_c is None else w_c * g_c
        loss_c, lse_c, dlogits = cross_entropy_rows(logits, labels.index_select(0, idx), w_c, scale, backend,
                                                    compute_grad=compute_grad, inplace=True, **options)
        loss.index_copy_(0, idx, loss_c)
        lse.index_copy_(0, idx, lse_c)
        if not compute_grad:
            continue
        if grad_x is not None:
            grad_x.index_copy_(0, idx, dlogits @ weight)
        if grad_w is not None:
            _accumulate_grad_w(grad_w, dlogits, h)
        if grad_b is not None:
            grad_b.add_(dlogits.sum(0, dtype=torch.float32))
    return loss, lse, grad_x, grad_w, grad_b


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, labels, weights, rows, scale, backend, reduction, options, chunk_size,
                needs):
        # Per-row grad_output: dW and db need it inside the chunk loop, so they are formed in backward.
        deferred = reduction == "none" and (needs[1] or needs[2])
        # fp16: the chunks' gradients leave out 1/denominator; backward applies it with grad_output.
        ctx.defer = defer_scale(x.dtype)
        grad_scale = torch.ones_like(scale) if ctx.defer else scale
        loss, lse, gx, gw, gb = _chunked_pass(x, weight, bias, labels, weights, rows, grad_scale, backend,
                                              options, chunk_size, needs=(False,) * 3 if deferred else needs)
        ctx.mark_non_differentiable(lse)
        ctx.meta = (backend, reduction, options, chunk_size, needs, weight.dtype, bias is not None, deferred)
        if deferred:
            ctx.save_for_backward(x, weight, bias, labels, weights, rows, scale)
        else:
            ctx.save_for_backward(gx, gw, gb, scale)
        loss = loss * scale if reduction == "none" else loss.sum() * scale
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        backend, reduction, options, chunk_size, needs, w_dtype, has_bias, deferred = ctx.meta
        if deferred:
            x, weight, bias, labels, weights, rows, scale = ctx.saved_tensors
            grad_scale, row_grad = scale, grad_loss
            if ctx.defer:
                grad_scale, row_grad = torch.ones_like(scale), grad_loss * scale
            _, _, gx, gw, gb = _chunked_pass(x, weight, bias, labels, weights, rows, grad_scale, backend,
                                             options, chunk_size, row_grad=row_grad, needs=needs)
        else:
            _mark_consumed(ctx)
            gx, gw, gb, scale = ctx.saved_tensors
            if ctx.defer:
                grad_loss = grad_loss * scale
            # Reading grad_output is free on CPU: skip the scale when it is 1.
            on_cpu = grad_loss.device.type == "cpu" and not torch.compiler.is_compiling()
            if reduction == "none":  # only dX (see forward): each row times its own grad_output
                gx.mul_(grad_loss.reshape(-1, 1))
            elif ctx.defer or not (on_cpu and grad_loss.item() == 1.0):
                gx, gw, gb = (None if g is None else g.mul_(grad_loss) for g in (gx, gw, gb))
        gw = None if gw is None else gw.to(w_dtype)
        gb = gb.to(w_dtype) if has_bias and gb is not None else None
        return gx, gw, gb, None, None, None, None, None, None, None, None, None


def _full(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A DTensor (e.g. an FSDP2-sharded parameter) gathered to a full tensor of the compute `dtype`,
    differentiably; its gradient is marked partial, so backward sums the ranks' contributions."""
    if t is None or not hasattr(t, "full_tensor"):
        return t
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial()] * t.device_mesh.ndim).to(dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor | torch.nn.Module, labels: torch.Tensor,
                         *, weights: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         num_items: torch.Tensor | int | None = None, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: float | None = None, return_lse: bool = False,
                         layout: PackedLayout | None = None, backend: str | None = None,
                         chunk_size: int | None = None):
    """masked_cross_entropy(hidden @ weight.T + bias, labels, ...) without storing N x V logits.

    hidden [..., H]; weight [V, H] or a module holding it (an `nn.Linear` lm_head, FSDP2-sharded or
    not; its bias is used when `bias` is None); labels [...]; `weights` [...] per-row loss weights
    (float, like labels; None = all ones). `layout`: the batch's PackedLayout, whose label rows
    (and, for reduction="mean", count) are used instead of deriving them from `labels` on the device.
    The chunks' logits are internal, so they always become the gradient in place.
    dW and db come back in the weight's dtype after fp32 accumulation.
    """
    if isinstance(weight, torch.nn.Module):
        bias = getattr(weight, "bias", None) if bias is None else bias
        weight = weight.weight
    weight, bias = _full(weight, hidden.dtype), _full(bias, hidden.dtype)
    _check_linear_args(hidden, weight, bias)
    n_rows, h = hidden.numel() // hidden.shape[-1], hidden.shape[-1]
    if labels.numel() != n_rows:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree: "
                         "expected hidden [..., H] with one label per row")
    backend = _dispatch.resolve_backend("linear_cross_entropy", hidden.device.type, backend)
    if backend == "cpu" and hidden.dtype not in (torch.float32, torch.bfloat16):
        backend = "torch"
    check_options(labels, weights, reduction, label_smoothing, softcap)
    flat = labels.reshape(-1).long()
    check_label_range(flat, ignore_index, weight.shape[0], backend)
    weights = flat_weights(weights, hidden.device)
    if layout is not None and layout.num_tokens != n_rows:
        raise ValueError(f"layout has {layout.num_tokens} tokens, hidden {n_rows} rows")
    known = layout is not None and layout.label_rows is not None
    if known and num_items is None and reduction == "mean" and weights is None:
        num_items = layout.num_label_rows
    scale = _row_scale(flat, weights, reduction, num_items, ignore_index, hidden.device)
    rows = layout.label_rows.to(hidden.device) if known else _label_rows(flat, ignore_index)
    options = dict(ignore_index=ignore_index, eps=float(label_smoothing), z_loss=float(z_loss),
                   softcap=None if softcap is None else float(softcap))
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    chunk = chunk_size or default_chunk_size(n_rows, h, weight.shape[0], hidden.device, hidden.element_size())
    loss, lse = LinearCrossEntropyFunction.apply(hidden.reshape(n_rows, h), weight, bias, flat, weights, rows,
                                                 scale, backend, reduction, options, chunk, needs)
    if reduction == "none":
        loss = loss.view(labels.shape)
    return (loss, lse.view(labels.shape)) if return_lse else loss


def _check_linear_args(hidden, weight, bias) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} disagree: "
                         "expected hidden [..., H] and weight [V, H]")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one to match")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be [V] = [{weight.shape[0]}]")


def linear_cross_entropy_ref(hidden, weight, labels, *, bias=None, **options):
    """The specification: materialise the logits, then `masked_cross_entropy_ref`."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return masked_cross_entropy_ref(logits, labels, **options)


class LinearCrossEntropy(torch.nn.Module):
    """Module form of `linear_cross_entropy`; `forward(hidden, weight, labels, bias=None, num_items=None,
    weights=None)` where `weight` may be the lm_head module itself."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, return_lse: bool = False,
                 backend: str | None = None, chunk_size: int | None = None):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            z_loss=z_loss, softcap=softcap, return_lse=return_lse, backend=backend,
                            chunk_size=chunk_size)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | torch.nn.Module, labels: torch.Tensor,
                bias: torch.Tensor | None = None, num_items: torch.Tensor | int | None = None,
                weights: torch.Tensor | None = None):
        return linear_cross_entropy(hidden, weight, labels, bias=bias, num_items=num_items, weights=weights,
                                    **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
