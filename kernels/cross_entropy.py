"""Masked cross-entropy on logits, with the gradient computed during the forward pass.

Per row i with label y (rows whose label is `ignore_index` give loss 0 and gradient 0):

    z     = softcap * tanh(x / softcap)        (or z = x without softcap)
    lse   = log(sum_j exp(z_j))
    loss  = lse - (1 - eps) * z_y - eps * mean_j(z_j) + z_loss * lse^2
    dloss/dz_j = softmax(z)_j * (1 + 2 * z_loss * lse) - eps / V - (1 - eps) * [j == y]

then the chain rule through the softcap (dz/dx = 1 - (z / softcap)^2). Optional per-row
`weights` w (float32 [N]; None means all ones and skips the weight load) multiply each row's loss
and gradient. The reduction divides the sum of (weighted) row losses by `num_items` when given (a
tensor or int: the global count of label tokens across micro-batches and ranks, or of samples or
turns under sample/turn loss weighting), else for "mean" by the number of label rows (the sum of
their weights when weighted); a count is clamped to at least 1 and a zero weight sum gives scale
0, so zero label tokens give loss 0 and gradients 0.

Because the gradient is known once the log-sum-exp is, the kernels write it during the forward
pass (already multiplied by w/denominator) and backward is one scale by grad_output. fp16 is the
exception: there the 1/denominator waits for backward (`defer_scale`), where it is applied
together with grad_output, and the forward writes the gradient at a power-of-two scale as large as
fp16 holds (`fp16_grad_scale`, about 2^14), divided out in backward: a loss-scaled gradient
(GradScaler) then loses no more entries to fp16's range than the float32 gradient rounded once to
fp16 would, though the forward cannot know the loss scale. It goes
into the logits' own storage with `inplace_backward=True` (no N x V buffer beyond the logits;
the logits are overwritten), else into one new buffer. Three implementations: a Triton kernel
(one program per row, online log-sum-exp over vocab blocks, fp32 math), the C++ op
`torch.ops.packtune.cross_entropy_fwd` (csrc/cross_entropy.cpp) for CPU tensors, and
`masked_cross_entropy_ref`, the PyTorch specification, used as the "torch" backend.
"""

from __future__ import annotations

import torch

from packtune.kernels import _dispatch
from packtune.kernels.loss_inputs import check_label_range, check_options, flat_weights

_dispatch.register_op("masked_cross_entropy", ("triton", "cpu", "torch"))

triton = _dispatch.triton_module()
if triton is not None:
    import triton.language as tl

    @triton.jit
    def _softcap(x, softcap):
        # softcap * tanh(x / softcap), overflow-free: tanh(|u|) = (1 - e) / (1 + e), e = exp(-2|u|).
        u = x / softcap
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return softcap * tl.where(u < 0, -t, t)

    @triton.jit
    def _cross_entropy_fwd_kernel(
        x_ptr, x_stride, g_ptr, g_stride, labels_ptr, w_ptr, loss_ptr, lse_ptr, scale_ptr,
        V, ignore_index, eps, z_loss, softcap,
        HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_ptr += row * x_stride
        g_ptr += row * g_stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        if label == ignore_index:
            # Every output slot is written, ignored rows too (compile/CUDA-graph safety, in-place zeros).
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if COMPUTE_GRAD:
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    tl.store(g_ptr + offs, tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty), mask=offs < V)
            return

        # Pass 1: online log-sum-exp (running max m, running sum d of exp(z - m)), fp32.
        m = -float("inf")
        d = 0.0
        sum_z = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            z = tl.where(mask, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
            if HAS_SMOOTHING:
                sum_z += tl.sum(tl.where(mask, z, 0.0), 0)
        lse = m + tl.log(d)
        z_y = tl.load(x_ptr + label).to(tl.float32)
        if HAS_SOFTCAP:
            z_y = _softcap(z_y, softcap)
        loss = lse - (1.0 - eps) * z_y + z_loss * lse * lse
        if HAS_SMOOTHING:
            loss -= eps * sum_z / V
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + row).to(tl.float32)
            loss *= w
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)

        # Pass 2: the gradient, scaled by w/denominator, written over the row (in place or not).
        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr).to(tl.float32)
            if HAS_WEIGHTS:
                scale *= w
            a = scale * (1.0 + 2.0 * z_loss * lse)
            b = scale * eps / V
            c = scale * (1.0 - eps)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = _softcap(z, softcap)
                g = tl.exp(z - lse) * a - b - tl.where(offs == label, c, 0.0)
                if HAS_SOFTCAP:
                    g *= 1.0 - (z / softcap) * (z / softcap)
                tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


def _triton_forward(x, labels, weights, scale, ignore_index, eps, z_loss, softcap, grad):
    """Launch one program per row; `grad` is the output buffer (x itself when in place) or None."""
    n, v = x.shape
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    block_v = min(triton.next_power_of_2(v), 8192)
    with _dispatch.launch_device(x):
        _cross_entropy_fwd_kernel[(n,)](
            x, x.stride(0), x if grad is None else grad, x.stride(0) if grad is None else grad.stride(0),
            labels, loss if weights is None else weights, loss, lse, scale, v, ignore_index, eps, z_loss,
            1.0 if softcap is None else softcap, HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=eps > 0,
            HAS_WEIGHTS=weights is not None, COMPUTE_GRAD=grad is not None, BLOCK_V=block_v,
            num_warps=16 if block_v >= 4096 else 8,
        )
    return loss, lse


if _dispatch.cpu_extension() is not None:

    @torch.library.register_fake("packtune::cross_entropy_fwd")
    def _(logits, labels, weights, scale, ignore_index, eps, z_loss, softcap, compute_grad):
        n, v = logits.shape
        grad = logits.new_empty((n, v) if compute_grad else (0,))
        return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32), grad

    @torch.library.register_fake("packtune::cross_entropy_fwd_")
    def _(logits, labels, weights, scale, ignore_index, eps, z_loss, softcap):
        n = logits.shape[0]
        return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


def cross_entropy_rows(x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                       scale: torch.Tensor, backend: str, *, ignore_index: int, eps: float, z_loss: float,
                       softcap: float | None, compute_grad: bool, inplace: bool):
    """Per-row (loss, lse) and the gradient scaled by `scale` (x itself when `inplace`, else a new
    buffer; None when not `compute_grad`), loss and gradient of row i also by weights[i] when
    `weights` (fp32 [N]) is given. x is [N, V] with unit column stride."""
    if backend == "torch":
        return _torch_rows(x, labels, weights, scale, ignore_index, eps, z_loss, softcap, compute_grad,
                           inplace)
    if backend == "cpu":
        ops = torch.ops.packtune
        if compute_grad and inplace:
            loss, lse = ops.cross_entropy_fwd_(x, labels, weights, scale, ignore_index, eps, z_loss,
                                               softcap or 0.0)
            return loss, lse, x
        loss, lse, grad = ops.cross_entropy_fwd(x, labels, weights, scale, ignore_index, eps, z_loss,
                                                softcap or 0.0, compute_grad)
        return loss, lse, grad if compute_grad else None
    grad = None
    if compute_grad:
        grad = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    loss, lse = _triton_forward(x, labels, weights, scale, ignore_index, eps, z_loss, softcap, grad)
    return loss, lse, grad


def _torch_rows(x, labels, weights, scale, ignore_index, eps, z_loss, softcap, compute_grad, inplace):
    """`cross_entropy_rows` in PyTorch ops, fp32 math (linear CE's chunks use it on the torch backend)."""
    z = x.float()
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)[:, None]
    z_y = z.gather(1, safe)[:, 0]
    loss = torch.where(valid, lse - (1 - eps) * z_y - eps * z.mean(-1) + z_loss * lse * lse, 0.0)
    lse = torch.where(valid, lse, 0.0)
    if weights is not None:
        loss = loss * weights
    if not compute_grad:
        return loss, lse, None
    s = (scale.expand(z.shape[0]) if weights is None else scale * weights)[:, None]  # per-row scale
    grad = torch.softmax(z, dim=-1).mul_(s * (1 + 2 * z_loss * lse[:, None]))
    grad.sub_(s * (eps / z.shape[1]))
    grad.scatter_add_(1, safe, -s * (1 - eps))
    if softcap is not None:
        grad.mul_(1 - t * t)
    grad.mul_(valid[:, None])
    return loss, lse, x.copy_(grad) if inplace else grad.to(x.dtype)


class MaskedCrossEntropyFunction(torch.autograd.Function):
    """Forward computes loss and gradient together; backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, logits, labels, weights, scale, backend, reduction, ignore_index, eps, z_loss, softcap,
                inplace, compute_grad):
        shape = logits.shape
        x = logits.reshape(-1, shape[-1])
        if x.stride(-1) != 1:
            x = x.contiguous()
        deferred = defer_scale(x.dtype)
        grad_scale = fp16_grad_scale(weights, scale) if deferred else scale
        loss, lse, grad = cross_entropy_rows(x, labels, weights, grad_scale, backend,
                                             ignore_index=ignore_index, eps=eps, z_loss=z_loss,
                                             softcap=softcap, compute_grad=compute_grad, inplace=inplace)
        if compute_grad and inplace:
            bump_version(logits, written=x)
        loss = loss * scale if reduction == "none" else loss.sum() * scale
        ctx.mark_non_differentiable(lse)
        ctx.reduction, ctx.shape, ctx.deferred = reduction, shape, deferred
        if grad is not None:  # detached: a view made here (no grad mode) must not carry view metadata
            ctx.save_for_backward(grad.detach(), scale / grad_scale if deferred else scale)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        grad, scale = ctx.saved_tensors
        _mark_consumed(ctx)
        if ctx.deferred:
            grad_loss = grad_loss * scale
        if ctx.reduction == "none":
            grad.mul_(grad_loss.reshape(-1, 1))
        elif (ctx.deferred or torch.compiler.is_compiling() or grad.device.type != "cpu"
              or grad_loss.item() != 1.0):
            # Skipped only for CPU tensors, where reading grad_output is not a device sync.
            grad.mul_(grad_loss)
        return grad.view(ctx.shape), None, None, None, None, None, None, None, None, None, None, None


def defer_scale(dtype: torch.dtype) -> bool:
    """Whether the 1/denominator waits for backward: for fp16, where p/N written in the forward
    underflows before GradScaler's loss scale multiplies it (bf16 and fp32 have fp32's range)."""
    return dtype == torch.float16


def fp16_grad_scale(weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The power of two an fp16 gradient is written at in the forward (0-dim, on the device, no host
    sync): 2^14 / max(1, max |w|) rounded down. A row's gradient is at most (1 + 2 z_loss lse) |w| in
    magnitude, so the stored values stay below fp16's 65504 (for 1 + 2 z_loss lse < 4) while its
    smallest entries stay 2^14 times further from the subnormal floor than p/1 would."""
    top = torch.full_like(like, 2.0**14)
    if weights is None or weights.numel() == 0:
        return top
    return torch.exp2(torch.floor(torch.log2(top / weights.abs().max().clamp(min=1.0))))


def bump_version(x: torch.Tensor, written: torch.Tensor) -> None:
    """Record that a kernel overwrote `x` in place: the Triton kernel writes through a raw pointer,
    and the C++ op's `Tensor(a!)` declaration does not bump the version inside an autograd.Function
    (no grad mode, no autograd kernel for the op). Autograd then refuses a backward that needs x's
    old values (e.g. the output of `z.exp()`) instead of computing wrong gradients from the gradient
    written over them. `written` is what the kernel wrote: x's flat view, or a contiguous copy of a
    view that does not flatten (TRL's `logits[:, :-1]`), which leaves x intact: nothing to record."""
    if torch.compiler.is_compiling():  # under torch.compile the kernel's mutation is traced
        return
    if written.data_ptr() == x.data_ptr():
        torch.autograd.graph.increment_version(x)


def _mark_consumed(ctx) -> None:
    """The stored gradient is scaled in place, so a second backward through the graph would be wrong."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError("packtune: backward through a fused cross-entropy ran twice (retain_graph=True); "
                           "its gradient is computed in the forward pass and scaled in place, so it can be "
                           "used once")
    ctx.consumed = True


def _row_scale(labels: torch.Tensor, weights: torch.Tensor | None, reduction: str, num_items,
               ignore_index: int, device) -> torch.Tensor:
    """1/denominator as a 0-dim tensor on `device` (fp32; the weights' dtype for a weighted mean),
    computed without a host sync."""
    if isinstance(num_items, torch.Tensor):
        count = num_items.to(device=device, dtype=torch.float32, non_blocking=True)
    elif num_items is not None:
        count = torch.full((), float(num_items), device=device)
    elif reduction == "mean" and weights is not None:  # the weighted mean: / the label rows' weight sum
        total = torch.where(labels != ignore_index, weights, 0.0).sum()
        return torch.where(total > 0, 1.0 / total, 0.0)
    elif reduction == "mean":
        count = (labels != ignore_index).sum().to(torch.float32)
    else:
        return torch.ones((), dtype=torch.float32, device=device)
    return 1.0 / count.clamp(min=1.0)


def _check_args(logits, labels, weights, reduction, label_smoothing, softcap) -> None:
    if logits.dim() < 1 or logits.numel() // max(logits.shape[-1], 1) != labels.numel():
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                         "expected logits [..., V] with one label per row")
    check_options(labels, weights, reduction, label_smoothing, softcap)


def masked_cross_entropy_ref(logits, labels, *, weights=None, ignore_index=-100, reduction="mean",
                             num_items=None, label_smoothing=0.0, z_loss=0.0, softcap=None, return_lse=False):
    """The specification, in plain PyTorch (autograd differentiates it). Computes in float64 for
    float64 logits, else in float32."""
    _check_args(logits, labels, weights, reduction, label_smoothing, softcap)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.reshape(-1, logits.shape[-1]).to(dtype)
    shape, labels = labels.shape, labels.reshape(-1)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    z_y = z.gather(1, torch.where(valid, labels, 0).long()[:, None])[:, 0]
    loss = lse - (1 - label_smoothing) * z_y - label_smoothing * z.mean(-1) + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if weights is not None:
        weights = weights.reshape(-1).to(z.device, dtype)
        loss = loss * weights
    scale = _row_scale(labels, weights, reduction, num_items, ignore_index, z.device).to(dtype)
    loss = (loss * scale).reshape(shape) if reduction == "none" else loss.sum() * scale
    return (loss, torch.where(valid, lse, 0.0).detach().reshape(shape)) if return_lse else loss


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, weights: torch.Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         num_items: torch.Tensor | int | None = None,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         return_lse: bool = False, inplace_backward: bool = False,
                         backend: str | None = None):
    """Cross-entropy of `logits` [..., V] against `labels` [...], rows labelled `ignore_index` skipped.

    `weights` [...] (float, like labels) multiplies each row's loss and gradient; None = all ones.
    Returns the loss (fp32: a scalar, or per row for reduction="none"), and with `return_lse` also
    the per-row log-sum-exp (0 on ignored rows, not differentiable). `inplace_backward=True`
    overwrites `logits` with the gradient (only for logits nobody else reads afterwards). The
    "cpu" backend takes fp32/bf16 and the torch reference runs other dtypes.
    """
    backend = _dispatch.resolve_backend("masked_cross_entropy", logits.device.type, backend)
    if backend == "cpu" and logits.dtype not in (torch.float32, torch.bfloat16):
        backend = "torch"
    options = dict(weights=weights, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
                   label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if backend == "torch":
        return masked_cross_entropy_ref(logits, labels, return_lse=return_lse, **options)
    _check_args(logits, labels, weights, reduction, label_smoothing, softcap)
    flat = labels.reshape(-1).long()
    check_label_range(flat, ignore_index, logits.shape[-1], backend)
    weights = flat_weights(weights, logits.device)
    scale = _row_scale(flat, weights, reduction, num_items, ignore_index, logits.device)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, lse = MaskedCrossEntropyFunction.apply(
        logits, flat, weights, scale, backend, reduction, ignore_index, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), inplace_backward, compute_grad)
    if reduction == "none":
        loss = loss.view(labels.shape)
    return (loss, lse.view(labels.shape)) if return_lse else loss


class MaskedCrossEntropy(torch.nn.Module):
    """Module form of `masked_cross_entropy`; `forward(logits, labels, num_items=None, weights=None)`."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, return_lse: bool = False,
                 inplace_backward: bool = False, backend: str | None = None):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            z_loss=z_loss, softcap=softcap, return_lse=return_lse,
                            inplace_backward=inplace_backward, backend=backend)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                num_items: torch.Tensor | int | None = None, weights: torch.Tensor | None = None):
        return masked_cross_entropy(logits, labels, num_items=num_items, weights=weights, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
