"""QLoRA's base GEMMs over an NF4 weight: y = x deq(W)^T + b and dx = g deq(W).

W [out, in] is a torchao `NF4Tensor` (4-bit NormalFloat): `quantized_data` holds two 4-bit codes
per byte (element 2j in the high nibble), in W's row-major order; every `block_size` (64)
consecutive elements share one scale, itself double-quantised (int8 `quantized_scalers` per
block, one `quantization_factor` per group of `scaler_block_size` blocks, plus `scaler_mean`).
A weight element is `nf4[code] * scale[block]`, rounded to W's dtype (bf16 in packtune).

Two paths on the `triton` backend, chosen per shape at run time (`nf4_path`: timed once, cached):

- the fused kernels read the packed codes and the per-block scales and build each [rows, 64] tile
  of W in registers, one NF4 block per row per K step, so no dense [out, in] copy of W ever exists
  in memory. Each weight tile is decoded once per program for all its rows (up to 256: two or
  more row tiles of a plain GEMM), the programs run in grouped order (L2 reuse of the codes and the
  activations), and the tile shapes are autotuned per layer shape on CUDA (fixed under the
  interpreter: FORWARD_BLOCKS, DX_BLOCKS);
- dequantise + cuBLAS: `nf4_dequantize` writes deq(W) into a per-call scratch [out, in] (one
  memory-bound pass), then one cuBLAS GEMM: at thousands of rows the GEMM's tensor-core peak
  outweighs the scratch, where the fused kernel decodes every weight tile once per row tile.

The scales are expanded on the device by torchao's own `dequantize_scalers` (numel / 64 values,
bitwise torchao's by construction) once per weight, cached with the version of its quantised
scales; the code lookup (a gather from the 16-entry table) and the scale multiply happen inside
the kernels. The product is rounded to W's dtype exactly as torch rounds a bf16 multiply (to
nearest even, done on the fp32 bits because the interpreter's fp32 -> bf16 cast truncates), then
cast to the activations' dtype: every dequantised value equals `W.get_original_weight().to(x.dtype)`
bit for bit, and the results equal dequantise + matmul to GEMM rounding (fp32 accumulation). Only
dx is computed for the backward: W is frozen, dW is never formed.

The kernels need `in % block_size == 0` (every real model's widths are multiples of 64); other
shapes, and the `torch` backend (CPU), dequantise the whole layer per call through torchao and use
torch.matmul. The tests pass smaller blocks to exercise several tiles under the interpreter.
"""

from __future__ import annotations

import os

import torch
from torch.utils.weak import WeakIdKeyDictionary

from packtune.kernels._dispatch import launch_device, register_op, resolve_backend, triton_interpreted
from packtune.kernels._triton import _dot, tl, triton

__all__ = ["NF4MatmulFunction", "is_nf4", "nf4_dequantize", "nf4_kernel_fits", "nf4_matmul", "nf4_matmul_ref",
           "nf4_path"]

register_op("nf4_matmul", ("triton", "torch"))

FORWARD_BLOCKS = (128, 128, 64)
"""(rows, outputs, K) of one forward program; K divides the NF4 block size."""
DX_BLOCKS = (128, 64, 64)
"""(rows, inputs, outputs per step) of one dx program; inputs divides the NF4 block size."""


def is_nf4(weight: torch.Tensor) -> bool:
    """Whether `weight` is a torchao NF4 tensor (packed codes, scales and a dequantiser)."""
    return hasattr(weight, "quantized_data") and hasattr(weight, "get_original_weight")


def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` as a plain tensor of `dtype`: dequantises a torchao NF4 tensor, casts otherwise."""
    if is_nf4(weight):
        return weight.get_original_weight().to(dtype)
    return weight.to(dtype)


def nf4_kernel_fits(weight: torch.Tensor, k_block: int = 64) -> bool:
    """Whether the Triton kernels take `weight`: a whole 2-D NF4 tensor (not a view of one) whose
    rows are whole NF4 blocks, each block a multiple of `k_block`."""
    if not is_nf4(weight) or weight.dim() != 2:
        return False
    block = weight.block_size
    return (weight.shape[1] % block == 0 and block % k_block == 0
            and weight.quantized_data.numel() * 2 == weight.numel()
            and weight.quantized_scalers.numel() * block == weight.numel())


def nf4_matmul_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The specification: F.linear over torchao's dequantised weight, in x's dtype."""
    bias = None if bias is None else bias.to(x.dtype)
    return torch.nn.functional.linear(x, dense_weight(weight, x.dtype), bias)


@triton.jit
def _round_to_bf16(v):
    """fp32 `v` rounded to the nearest bf16 (ties to even), kept in fp32: torch's bf16 multiply."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nf4_tile(Q, S, TABLE, rows, col0, n_rows, n_cols, block_size, ROWS: tl.constexpr, COLS: tl.constexpr):
    """deq(W)[rows, col0 : col0 + COLS] as fp32 values of W's dtype; col0 a multiple of COLS, COLS
    dividing the NF4 block, so each row of the tile is inside one block (one scale)."""
    inside = rows < n_rows
    first = rows * n_cols + col0  # int64: the flat index of each tile row's first element
    pairs = tl.arange(0, COLS // 2)
    packed = tl.load(Q + first[:, None] // 2 + pairs[None, :], mask=inside[:, None], other=0)
    codes = tl.join(packed >> 4, packed & 15).reshape(ROWS, COLS)  # element 2j: the high nibble
    scale = tl.load(S + first // block_size, mask=inside, other=0.0).to(tl.float32)
    w = tl.load(TABLE + codes).to(tl.float32) * scale[:, None]  # exact in fp32 (8 x 8 significant bits)
    if S.dtype.element_ty == tl.bfloat16:
        return _round_to_bf16(w)
    return w.to(S.dtype.element_ty).to(tl.float32)


@triton.jit
def _grouped(pid, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP row tiles run down one
    column of tiles before the next, so a weight tile's packed codes and a row tile of the
    activations are read while still in L2 (Triton's matmul tutorial order)."""
    row_tiles = tl.cdiv(n_rows, BLOCK_R)
    col_tiles = tl.cdiv(n_cols, BLOCK_C)
    per_group = GROUP * col_tiles
    first = (pid // per_group) * GROUP
    size = tl.minimum(row_tiles - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _nf4_forward_kernel(X, Q, S, TABLE, BIAS, Y, n_rows, n_in, n_out, stride_x, block_size, n_bucket,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP: tl.constexpr, UPCAST: tl.constexpr):
    """Y[N, out] = X[N, in] @ deq(W)[out, in]^T (+ bias), one program per output tile: each K step
    decodes one [BLOCK_OUT, BLOCK_K] weight tile once for all BLOCK_N (up to 256) rows."""
    pid_n, pid_out = _grouped(tl.program_id(0), n_rows, n_out, BLOCK_N, BLOCK_OUT, GROUP)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    outs = pid_out.to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    acc = tl.zeros((BLOCK_N, BLOCK_OUT), tl.float32)
    for k0 in range(0, n_in, BLOCK_K):  # n_in is a multiple of BLOCK_K: no K mask
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=rows[:, None] < n_rows, other=0.0)
        w = _nf4_tile(Q, S, TABLE, outs, k0, n_out, n_in, block_size, BLOCK_OUT, BLOCK_K)
        acc = _dot(x, tl.trans(w.to(X.dtype.element_ty)), acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(BIAS + outs, mask=outs < n_out, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * n_out + outs[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (outs[None, :] < n_out))


@triton.jit
def _nf4_dx_kernel(G, Q, S, TABLE, DX, n_rows, n_in, n_out, stride_g, block_size, n_bucket,
                   BLOCK_N: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_OUT: tl.constexpr,
                   GROUP: tl.constexpr, UPCAST: tl.constexpr):
    """DX[N, in] = G[N, out] @ deq(W)[out, in], one program per dx tile (one weight tile decoded
    per step for all BLOCK_N rows)."""
    pid_n, pid_in = _grouped(tl.program_id(0), n_rows, n_in, BLOCK_N, BLOCK_IN, GROUP)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = pid_in.to(tl.int64) * BLOCK_IN
    acc = tl.zeros((BLOCK_N, BLOCK_IN), tl.float32)
    for o0 in range(0, n_out, BLOCK_OUT):
        outs = o0 + tl.arange(0, BLOCK_OUT).to(tl.int64)
        g = tl.load(G + rows[:, None] * stride_g + outs[None, :],
                    mask=(rows[:, None] < n_rows) & (outs[None, :] < n_out), other=0.0)
        w = _nf4_tile(Q, S, TABLE, outs, col0, n_out, n_in, block_size, BLOCK_OUT, BLOCK_IN)
        acc = _dot(g, w.to(G.dtype.element_ty), acc, UPCAST)
    cols = col0 + tl.arange(0, BLOCK_IN)
    tl.store(DX + rows[:, None] * n_in + cols[None, :], acc.to(DX.dtype.element_ty),
             mask=rows[:, None] < n_rows)


@triton.jit
def _nf4_dequantize_kernel(Q, S, TABLE, W, n_out, n_in, block_size, BLOCK_OUT: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """W[out, in] = deq(W) in W's dtype, one [BLOCK_OUT, BLOCK_K] tile per program."""
    outs = tl.program_id(0).to(tl.int64) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    w = _nf4_tile(Q, S, TABLE, outs, col0, n_out, n_in, block_size, BLOCK_OUT, BLOCK_K)
    cols = col0 + tl.arange(0, BLOCK_K)
    tl.store(W + outs[:, None] * n_in + cols[None, :], w.to(W.dtype.element_ty), mask=outs[:, None] < n_out)


def _configs(tiles: list[tuple[int, int, int, int]]) -> list:
    """Autotune candidates from (rows, outputs, warps, pipeline stages); the K / input side fixed."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_OUT": o, "GROUP": 8}, num_warps=w, num_stages=st)
            for n, o, w, st in tiles]


# Candidates for Hopper: 256-row tiles halve the decodes per weight element (the decode runs on the
# CUDA cores beside the tensor cores); the autotuner picks per (layer shape, power-of-two row count).
_FORWARD = _configs([(128, 128, 8, 3), (256, 128, 8, 3), (128, 256, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4)])
_DX = _configs([(128, 128, 8, 3), (256, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4)])
_autotuned_forward = triton.autotune(_FORWARD, key=["n_in", "n_out", "n_bucket"])(_nf4_forward_kernel)
_autotuned_dx = triton.autotune(_DX, key=["n_in", "n_out", "n_bucket"])(_nf4_dx_kernel)


def _operands(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, one scale per block in W's dtype, the 16-entry table). The scales are expanded
    from their double quantisation by torchao itself, on W's device, once per weight: cached
    (weakly) with the version of the quantised scales, so an in-place update re-expands them."""
    version = (weight.quantized_scalers._version, weight.quantization_factor._version)
    cached = _SCALES.get(weight)
    if cached is None or cached[0] != version:
        scales = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                           weight.scaler_block_size)
        if torch.compiler.is_compiling():
            return weight.quantized_data, scales, weight.nf4
        cached = _SCALES[weight] = (version, scales)
    return weight.quantized_data, cached[1], weight.nf4


_SCALES = WeakIdKeyDictionary()
"""NF4 weight -> (version of its quantised scales, the expanded scales)."""


def _bucket(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def nf4_matmul_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [N, in] (unit column stride) @ deq(W)^T (+ bias) -> [N, out] in x's dtype (Triton kernel).
    `blocks` (rows, outputs, K): a fixed tile; None: autotuned on CUDA, FORWARD_BLOCKS interpreted."""
    n, n_in = x.shape
    n_out = weight.shape[0]
    y = torch.empty(n, n_out, dtype=x.dtype, device=x.device)
    if not y.numel():
        return y
    codes, scales, table = _operands(weight)
    args = (x, codes, scales, table, y if bias is None else bias, y, n, n_in, n_out, x.stride(0),
            weight.block_size, _bucket(n))
    common = {"HAS_BIAS": bias is not None, "BLOCK_K": FORWARD_BLOCKS[2], "UPCAST": triton_interpreted()}
    with launch_device(x):
        if blocks is None and not triton_interpreted():
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(n_out, meta["BLOCK_OUT"]),)
            _autotuned_forward[grid](*args, **common)
        else:
            block_n, block_out, block_k = blocks or FORWARD_BLOCKS
            grid = (triton.cdiv(n, block_n) * triton.cdiv(n_out, block_out),)
            _nf4_forward_kernel[grid](*args, **{**common, "BLOCK_K": block_k}, BLOCK_N=block_n,
                                      BLOCK_OUT=block_out, GROUP=8, num_warps=8)
    return y


def nf4_matmul_dx(g: torch.Tensor, weight: torch.Tensor, blocks: tuple[int, int, int] | None = None
                  ) -> torch.Tensor:
    """g [N, out] (unit column stride) @ deq(W) -> [N, in] in g's dtype (Triton kernel). `blocks`
    (rows, inputs, outputs per step): a fixed tile; None: autotuned on CUDA, DX_BLOCKS interpreted."""
    n, n_out = g.shape
    n_in = weight.shape[1]
    dx = torch.empty(n, n_in, dtype=g.dtype, device=g.device)
    if not dx.numel():
        return dx
    codes, scales, table = _operands(weight)
    args = (g, codes, scales, table, dx, n, n_in, n_out, g.stride(0), weight.block_size, _bucket(n))
    with launch_device(g):
        if blocks is None and not triton_interpreted():
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * (n_in // DX_BLOCKS[1]),)
            _autotuned_dx[grid](*args, BLOCK_IN=DX_BLOCKS[1], UPCAST=triton_interpreted())
        else:
            block_n, block_in, block_out = blocks or DX_BLOCKS
            _nf4_dx_kernel[(triton.cdiv(n, block_n) * (n_in // block_in),)](
                *args, BLOCK_N=block_n, BLOCK_IN=block_in, BLOCK_OUT=block_out, GROUP=8,
                UPCAST=triton_interpreted())
    return dx


def nf4_dequantize(weight: torch.Tensor, dtype: torch.dtype, blocks: tuple[int, int] = (64, 64)
                   ) -> torch.Tensor:
    """deq(W) as a dense [out, in] tensor of `dtype` (Triton), bitwise torchao's
    `get_original_weight().to(dtype)`: the scratch of the dequantise + cuBLAS path."""
    n_out, n_in = weight.shape
    w = torch.empty(n_out, n_in, dtype=dtype, device=weight.device)
    if w.numel():
        codes, scales, table = _operands(weight)
        with launch_device(w):
            _nf4_dequantize_kernel[(triton.cdiv(n_out, blocks[0]), n_in // blocks[1])](
                codes, scales, table, w, n_out, n_in, weight.block_size, BLOCK_OUT=blocks[0],
                BLOCK_K=blocks[1])
    return w


NF4_PATHS = ("kernel", "dequant")
_CHOSEN: dict[tuple, str] = {}
"""(op, device, dtype, weight shape, power-of-two row count) -> the NF4 path measured faster."""


def nf4_path(op: str, a: torch.Tensor, weight: torch.Tensor) -> str:
    """Which NF4 GEMM runs `op` ("forward": a = x; "dx": a = g): "kernel" (the fused Triton kernel,
    no dense weight in memory) or "dequant" (`nf4_dequantize` into a scratch [out, in], then cuBLAS).
    PACKTUNE_NF4_PATH forces one. On CUDA the first call for each (op, device, dtype, weight shape,
    power-of-two row count) times both on its own inputs (host syncs then, once); every later call
    reads that choice: no sync. Under the interpreter, the kernel (what the CPU tests check); inside
    a CUDA-graph capture or a torch.compile trace, the choice made before, else the kernel."""
    forced = os.environ.get("PACKTUNE_NF4_PATH")
    if forced:
        if forced not in NF4_PATHS:
            raise ValueError(f"PACKTUNE_NF4_PATH={forced!r}; choose from {', '.join(NF4_PATHS)}")
        return forced
    if a.device.type != "cuda":
        return "kernel"
    key = (op, a.device, a.dtype, tuple(weight.shape), _bucket(a.shape[0]))
    choice = _CHOSEN.get(key)
    if choice is None:
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return "kernel"
        choice = _CHOSEN[key] = _faster_path(op, a, weight)
    return choice


def _faster_path(op: str, a: torch.Tensor, weight: torch.Tensor, repeats: int = 3) -> str:
    """Time both NF4 paths on `a` (CUDA events, after one untimed call each: compilation, autotuning)."""
    def kernel():
        return nf4_matmul_forward(a, weight) if op == "forward" else nf4_matmul_dx(a, weight)

    def dequant():
        w = nf4_dequantize(weight, a.dtype)
        return a @ (w.t() if op == "forward" else w)

    times = {}
    with torch.no_grad():
        for name, run in (("kernel", kernel), ("dequant", dequant)):
            run()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                run()
            end.record()
            end.synchronize()
            times[name] = start.elapsed_time(end)
    return min(times, key=times.__getitem__)


def base_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str
                ) -> torch.Tensor:
    """x W^T + b in x's dtype for x [N, in]: over an NF4 weight on `triton`, the fused kernel or
    dequantise + cuBLAS, whichever `nf4_path` measured faster for this shape; else one torch GEMM
    over the dense (or torchao-dequantised) weight, the bias added by addmm."""
    if backend == "triton" and nf4_kernel_fits(weight, FORWARD_BLOCKS[2]):
        if nf4_path("forward", x, weight) == "kernel":
            return nf4_matmul_forward(x, weight, bias)
        w = nf4_dequantize(weight, x.dtype)
    else:
        w = dense_weight(weight, x.dtype)
    return torch.addmm(bias.to(x.dtype), x, w.t()) if bias is not None else x @ w.t()


def base_matmul_dx(g: torch.Tensor, weight: torch.Tensor, backend: str, dx_into: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """g W for g [N, out] in g's dtype, the NF4 paths as `base_matmul`. `dx_into` receives the
    product in place (the torch GEMM accumulates into it: BLAS's beta = 1)."""
    if backend == "triton" and nf4_kernel_fits(weight, DX_BLOCKS[1]):
        if nf4_path("dx", g, weight) == "kernel":
            dx = nf4_matmul_dx(g, weight)
            return dx if dx_into is None else dx_into.add_(dx)
        w = nf4_dequantize(weight, g.dtype)
    else:
        w = dense_weight(weight, g.dtype)
    return g @ w if dx_into is None else dx_into.addmm_(g, w)


class NF4MatmulFunction(torch.autograd.Function):
    """x deq(W)^T + b on [N, in] rows; gradients for x and the bias, never for W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str
                ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.backend = backend
        return base_matmul(x, weight, bias, backend)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (weight,) = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = base_matmul_dx(dy.contiguous(), weight, ctx.backend) if need[0] else None
        dbias = dy.sum(0) if need[2] else None
        return dx, None, dbias, None


def nf4_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               backend: str | None = None) -> torch.Tensor:
    """x deq(W)^T + bias (F.linear) for x [..., in] and a torchao NF4 weight [out, in], in x's dtype;
    differentiable in x and the bias. `triton`: the NF4 GEMM kernels; `torch`: dequantise + matmul."""
    if not is_nf4(weight):
        raise TypeError(f"nf4_matmul: weight must be a torchao NF4 tensor, got {type(weight).__name__}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"nf4_matmul: x has {x.shape[-1]} features, the weight takes {weight.shape[1]}")
    backend = resolve_backend("nf4_matmul", x.device, backend)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = NF4MatmulFunction.apply(x2, weight, bias, backend)
    return y.view(*x.shape[:-1], y.shape[-1])
