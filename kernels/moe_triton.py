"""The `triton` backend of `moe_experts` (kernels/moe.py): grouped GEMMs over rows sorted by expert.

No host sync: how many rows each expert owns stays on the device. The row-tile kernels run on a
grid of cdiv(S, BLOCK_M) + E tiles, the most any routing needs; `_tile_schedule` maps each tile to
its expert and first row with device ops (searchsorted over the cumulative tile counts), and a
tile past the last one returns at once. The weight-gradient kernel runs one program per (expert,
output tile) and loops over that expert's rows, its bounds read from `ends` on the device.

Kernels, in a layer's order (S = T*k sorted rows; weights as in-by-out views, any strides):

    forward   _gate_up_kernel      gu = x[token] @ Wgu[e] (+ bias), h = act(gu): the gather fused
                                   into the A loads, the activation into the epilogue (gate and up
                                   accumulated side by side, so one tile holds both halves of h)
              _grouped_mm_kernel   y = (h @ Wd[e] + bias) * w: bias and routing weight in the epilogue
              _unpermute_kernel    out[t] = sum of token t's k rows of y, in fp32 (a deterministic
                                   scatter-add: every token's rows are found through `position`)
    backward  _grouped_mm_kernel   dh' = dy[token] @ Wd[e]^T (the gather fused again)
              _gated_grad_kernel   dw = <dh', h> (+ <dy, bias>), dgu = act'(dh' w), dh' <- h w
              _grouped_wgrad_kernel  dWd[e] = (h w)^T dy[token], dbd[e] = w^T dy[token]
              _grouped_mm_kernel   dx rows = dgu @ Wgu[e]^T
              _grouped_wgrad_kernel  dWgu[e] = x[token]^T dgu, dbgu[e] = column sums of dgu
              _unpermute_kernel    dx[t] = sum of token t's k dx rows
"""

from __future__ import annotations

import torch

from packtune.kernels._dispatch import launch_device, triton_interpreted
from packtune.kernels._triton import _dot, tl, triton

_BLOCK_M, _BLOCK_N, _BLOCK_K = 64, 128, 64
_GLU_BLOCK_N = 64  # two accumulators (gate, up) per tile
_ROW_BLOCK = 1024
_LAUNCH = {"num_warps": 4, "num_stages": 3}


@triton.jit
def _gated(g, u, alpha, limit, up_shift):
    """(h, g', u', sigmoid(alpha g')) in fp32: h = g' sigmoid(alpha g') (u' + up_shift), clamped g', u'."""
    gc = tl.minimum(g, limit)
    uc = tl.minimum(tl.maximum(u, -limit), limit)
    s = tl.sigmoid(alpha * gc)
    return gc * s * (uc + up_shift), gc, uc, s


@triton.jit
def _tile_rows(TILE_ROW, ENDS, e, BLOCK_M: tl.constexpr):
    """(rows, rows inside expert e) of this program's row tile."""
    rows = tl.load(TILE_ROW + tl.program_id(0)) + tl.arange(0, BLOCK_M)
    return rows, rows < tl.load(ENDS + e)


@triton.jit
def _gate_up_kernel(X, TOKEN, W, BIAS, GU, H, TILE_EXPERT, TILE_ROW, ENDS, stride_x, hidden, inter,
                    stride_we, stride_wk, stride_wn, alpha, limit, up_shift, HAS_BIAS: tl.constexpr,
                    INTERLEAVED: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.load(TILE_EXPERT + tl.program_id(0))
    if e < 0:  # past the last tile of this routing
        return
    rows, row_ok = _tile_rows(TILE_ROW, ENDS, e, BLOCK_M)
    token = tl.load(TOKEN + rows, mask=row_ok, other=0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    gate_cols = 2 * cols if INTERLEAVED else cols
    up_cols = gate_cols + 1 if INTERLEAVED else cols + inter
    w = W + e.to(tl.int64) * stride_we
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        a = tl.load(X + token[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b_mask = k_ok[:, None] & col_ok[None, :]
        b_g = tl.load(w + ks[:, None] * stride_wk + gate_cols[None, :] * stride_wn, mask=b_mask, other=0.0)
        b_u = tl.load(w + ks[:, None] * stride_wk + up_cols[None, :] * stride_wn, mask=b_mask, other=0.0)
        acc_g = _dot(a, b_g, acc_g, UPCAST)
        acc_u = _dot(a, b_u, acc_u, UPCAST)
    if HAS_BIAS:
        acc_g += tl.load(BIAS + e * 2 * inter + gate_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(BIAS + e * 2 * inter + up_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    g = acc_g.to(GU.dtype.element_ty)  # h from the stored values, as the backward recomputes it
    u = acc_u.to(GU.dtype.element_ty)
    out_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(GU + rows[:, None] * 2 * inter + gate_cols[None, :], g, mask=out_ok)
    tl.store(GU + rows[:, None] * 2 * inter + up_cols[None, :], u, mask=out_ok)
    h, _, _, _ = _gated(g.to(tl.float32), u.to(tl.float32), alpha, limit, up_shift)
    tl.store(H + rows[:, None] * inter + cols[None, :], h.to(H.dtype.element_ty), mask=out_ok)


@triton.jit
def _grouped_mm_kernel(A, A_ROWS, B, BIAS, SCALE, C, TILE_EXPERT, TILE_ROW, ENDS, stride_a, n_cols, depth,
                       stride_be, stride_bk, stride_bn, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[rows] = (A[rows or A_ROWS[rows]] @ B[e] + BIAS[e]) * SCALE[rows], fp32 accumulation."""
    e = tl.load(TILE_EXPERT + tl.program_id(0))
    if e < 0:  # past the last tile of this routing
        return
    rows, row_ok = _tile_rows(TILE_ROW, ENDS, e, BLOCK_M)
    a_rows = tl.load(A_ROWS + rows, mask=row_ok, other=0) if GATHER else rows
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    b = B + e.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < depth
        a = tl.load(A + a_rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(b + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _dot(a, w, acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(BIAS + e * n_cols + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(SCALE + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(C + rows[:, None] * n_cols + cols[None, :], acc.to(C.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gated_grad_kernel(HW, GU, DGU, SCALE, DW, DY, TOKEN, EXPERT, DOWN_BIAS, inter, hidden, alpha, limit,
                       up_shift, INTERLEAVED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """One sorted row: HW holds dh' = dy Wd^T; writes dw = <dh', h> (+ <dy, bias>), dgu = act'(w dh'),
    then h w over dh' (the down weight gradient's A operand)."""
    r = tl.program_id(0).to(tl.int64)
    w = tl.load(SCALE + r)
    dw = tl.zeros((BLOCK,), tl.float32)
    for c0 in range(0, inter, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < inter
        gate_cols = 2 * cols if INTERLEAVED else cols
        up_cols = gate_cols + 1 if INTERLEAVED else cols + inter
        g = tl.load(GU + r * 2 * inter + gate_cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(GU + r * 2 * inter + up_cols, mask=ok, other=0.0).to(tl.float32)
        dh = tl.load(HW + r * inter + cols, mask=ok, other=0.0).to(tl.float32)
        h, gc, uc, s = _gated(g, u, alpha, limit, up_shift)
        dw += dh * h
        dh *= w
        dgate = tl.where(g <= limit, dh * (uc + up_shift) * (s + alpha * gc * s * (1.0 - s)), 0.0)
        dup = tl.where((u >= -limit) & (u <= limit), dh * gc * s, 0.0)
        tl.store(DGU + r * 2 * inter + gate_cols, dgate.to(DGU.dtype.element_ty), mask=ok)
        tl.store(DGU + r * 2 * inter + up_cols, dup.to(DGU.dtype.element_ty), mask=ok)
        tl.store(HW + r * inter + cols, (h * w).to(HW.dtype.element_ty), mask=ok)
    if HAS_BIAS:
        token = tl.load(TOKEN + r)
        e = tl.load(EXPERT + r)
        for c0 in range(0, hidden, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            ok = cols < hidden
            dy = tl.load(DY + token * hidden + cols, mask=ok, other=0.0).to(tl.float32)
            dw += dy * tl.load(DOWN_BIAS + e * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(DW + r, tl.sum(dw, axis=0))


@triton.jit
def _grouped_wgrad_kernel(A, A_ROWS, B, B_ROWS, C, DBIAS, SCALE, ENDS, m_size, n_size, stride_a, stride_b,
                          stride_ce, stride_cm, stride_cn, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
                          BIAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[e] = A_e^T B_e over expert e's rows (an expert without rows gets zeros); with BIAS_GRAD also
    DBIAS[e] = SCALE_e^T B_e (SCALE all ones without HAS_SCALE)."""
    e = tl.program_id(0)
    tiles_n = tl.cdiv(n_size, BLOCK_N)
    tile_m, tile_n = tl.program_id(1) // tiles_n, tl.program_id(1) % tiles_n
    start = tl.load(ENDS + e - 1, mask=e > 0, other=0)
    end = tl.load(ENDS + e)
    ms = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = ms < m_size, ns < n_size
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        ok = rows < end
        a_rows = tl.load(A_ROWS + rows, mask=ok, other=0) if GATHER_A else rows
        b_rows = tl.load(B_ROWS + rows, mask=ok, other=0) if GATHER_B else rows
        a_t = tl.load(A + a_rows[None, :] * stride_a + ms[:, None], mask=ok[None, :] & m_ok[:, None],
                      other=0.0)
        b = tl.load(B + b_rows[:, None] * stride_b + ns[None, :], mask=ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a_t, b, acc, UPCAST)
        if BIAS_GRAD:
            if tile_m == 0:
                scale = tl.load(SCALE + rows, mask=ok, other=0.0) if HAS_SCALE else ok.to(tl.float32)
                bias_acc += tl.sum(b.to(tl.float32) * scale[:, None], axis=0)
    tl.store(C + e.to(tl.int64) * stride_ce + ms[:, None] * stride_cm + ns[None, :] * stride_cn,
             acc.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    if BIAS_GRAD:
        if tile_m == 0:
            tl.store(DBIAS + e * n_size + ns, bias_acc.to(DBIAS.dtype.element_ty), mask=n_ok)


@triton.jit
def _unpermute_kernel(ROWS, POSITION, OUT, hidden, top_k, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < hidden
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in range(0, top_k):
        row = tl.load(POSITION + t * top_k + j)
        acc += tl.load(ROWS + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + t * hidden + cols, acc.to(OUT.dtype.element_ty), mask=ok)


def _tile_schedule(ends: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert, first row) of each of the cdiv(rows, BLOCK_M) + E row tiles; expert -1 past the last."""
    experts = ends.numel()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + _BLOCK_M - 1) // _BLOCK_M
    tile_ends = torch.cumsum(tiles, 0)
    tile = torch.arange(triton.cdiv(rows, _BLOCK_M) + experts, device=ends.device)
    expert = torch.searchsorted(tile_ends, tile, right=True)
    e = expert.clamp(max=experts - 1)
    first_row = starts[e] + (tile - (tile_ends - tiles)[e]) * _BLOCK_M
    return torch.where(expert < experts, expert, -1), first_row


def _or(t: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """An optional kernel operand; the placeholder is never read (its constexpr flag is off)."""
    return placeholder if t is None else t


def _grouped_mm(a, b_view, schedule, ends, a_rows=None, bias=None, scale=None) -> torch.Tensor:
    """Sorted rows a[a_rows[r] or r] @ b_view[e] (+ bias[e]) (* scale[r]); b_view [E, K, N], any strides."""
    _, depth, n_cols = b_view.shape
    c = torch.empty(_or(a_rows, a).shape[0], n_cols, dtype=a.dtype, device=a.device)
    grid = (schedule[0].numel(), triton.cdiv(n_cols, _BLOCK_N))
    _grouped_mm_kernel[grid](
        a, _or(a_rows, ends), b_view, _or(bias, a), _or(scale, a), c, *schedule, ends, a.stride(0), n_cols,
        depth, *b_view.stride(), GATHER=a_rows is not None, HAS_BIAS=bias is not None,
        HAS_SCALE=scale is not None, UPCAST=triton_interpreted(), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K, **_LAUNCH)
    return c


def _grouped_wgrad(a, b, grad_view, ends, a_rows=None, b_rows=None, dbias=None, scale=None) -> None:
    """grad_view[e] = a[e's rows]^T b[e's rows] (rows gathered through a_rows / b_rows); dbias too."""
    experts, m_size, n_size = grad_view.shape
    grid = (experts, triton.cdiv(m_size, _BLOCK_M) * triton.cdiv(n_size, _BLOCK_N))
    _grouped_wgrad_kernel[grid](
        a, _or(a_rows, ends), b, _or(b_rows, ends), grad_view, _or(dbias, grad_view), _or(scale, ends), ends,
        m_size, n_size, a.stride(0), b.stride(0), *grad_view.stride(), GATHER_A=a_rows is not None,
        GATHER_B=b_rows is not None, BIAS_GRAD=dbias is not None, HAS_SCALE=scale is not None,
        UPCAST=triton_interpreted(), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, **_LAUNCH)


def _unpermute(rows: torch.Tensor, position: torch.Tensor, tokens: int) -> torch.Tensor:
    out = torch.zeros(tokens, rows.shape[1], dtype=rows.dtype, device=rows.device)
    if rows.numel():
        grid = (tokens, triton.cdiv(rows.shape[1], _ROW_BLOCK))
        top_k = position.numel() // tokens
        _unpermute_kernel[grid](rows, position, out, rows.shape[1], top_k, BLOCK=_ROW_BLOCK)
    return out


def forward(x, routing, w_sorted, gate_up, gate_up_bias, down, down_bias, fmt, save):
    """(out [T, H], the gate/up rows [S, 2I] for the backward: [0, 2I] unless `save`)."""
    x = x.contiguous()
    w_gate_up, w_down = fmt.in_out(gate_up, down)
    hidden, inter = w_gate_up.shape[1], w_gate_up.shape[2] // 2
    rows = routing.token.numel()
    gu = torch.empty(rows, 2 * inter, dtype=x.dtype, device=x.device)
    h = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    with launch_device(x):
        schedule = _tile_schedule(routing.ends, rows)
        if rows:
            grid = (schedule[0].numel(), triton.cdiv(inter, _GLU_BLOCK_N))
            _gate_up_kernel[grid](
                x, routing.token, w_gate_up, _or(gate_up_bias, x), gu, h, *schedule, routing.ends,
                x.stride(0), hidden, inter, *w_gate_up.stride(), fmt.alpha, fmt.limit, fmt.up_shift,
                HAS_BIAS=gate_up_bias is not None, INTERLEAVED=fmt.interleaved, UPCAST=triton_interpreted(),
                BLOCK_M=_BLOCK_M, BLOCK_N=_GLU_BLOCK_N, BLOCK_K=_BLOCK_K, **_LAUNCH)
        y = _grouped_mm(h, w_down, schedule, routing.ends, bias=down_bias, scale=w_sorted)
        del h
        out = _unpermute(y, routing.position, x.shape[0])
    return out, gu if save else gu[:0]


def backward(dy, x, routing, w_sorted, gu, gate_up, gate_up_bias, down, down_bias, fmt, needs):
    """(dx, d sorted routing weights, d gate_up, d gate_up bias, d down, d down bias), weight
    gradients in their parameters' layouts; None where `needs` (dx, weights) says not wanted."""
    need_dx, need_weights = needs
    x = x.contiguous()
    w_gate_up, w_down = fmt.in_out(gate_up, down)
    inter, rows = w_down.shape[1], routing.token.numel()
    dgate_up, ddown = (torch.empty_like(t) if need_weights else None for t in (gate_up, down))
    dgate_up_bias, ddown_bias = (None if t is None or not need_weights else t.new_empty(t.shape)
                                 for t in (gate_up_bias, down_bias))
    with launch_device(x):
        schedule = _tile_schedule(routing.ends, rows)
        hw = _grouped_mm(dy, w_down.transpose(1, 2), schedule, routing.ends, a_rows=routing.token)
        dgu = torch.empty_like(gu)
        dw = torch.empty(rows, dtype=w_sorted.dtype, device=x.device)
        if rows:
            block = min(_ROW_BLOCK, triton.next_power_of_2(max(inter, x.shape[1])))
            _gated_grad_kernel[(rows,)](
                hw, gu, dgu, w_sorted, dw, dy, routing.token, routing.expert, _or(down_bias, dy), inter,
                x.shape[1], fmt.alpha, fmt.limit, fmt.up_shift, INTERLEAVED=fmt.interleaved,
                HAS_BIAS=down_bias is not None, BLOCK=block)
        if need_weights:
            dgate_up_view, ddown_view = fmt.in_out(dgate_up, ddown)
            _grouped_wgrad(hw, dy, ddown_view, routing.ends, b_rows=routing.token, dbias=ddown_bias,
                           scale=w_sorted)
            _grouped_wgrad(x, dgu, dgate_up_view, routing.ends, a_rows=routing.token, dbias=dgate_up_bias)
        del hw
        dx = None
        if need_dx:
            dx_rows = _grouped_mm(dgu, w_gate_up.transpose(1, 2), schedule, routing.ends)
            dx = _unpermute(dx_rows, routing.position, x.shape[0])
    return dx, dw, dgate_up, dgate_up_bias, ddown, ddown_bias
