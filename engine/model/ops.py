"""What the decoder needs beyond `packtune.kernels`' signatures: rotary embedding on per-token
cos/sin, and the dense causal attention used for padded batches and the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packtune import kernels


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[..., Hq, D]` and k `[..., Hk, D]` by per-token cos/sin `[..., D]` (rotate-half layout).

    The model computes cos/sin per token (dynamic and llama3 rope scaling live there), so they are
    handed to the kernel as a table indexed by token number.
    """
    table_cos, table_sin = cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1])
    token = torch.arange(table_cos.shape[0], device=q.device)
    return kernels.rotary(q, k, table_cos, table_sin, position_ids=token)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None, q_offset: int = 0
) -> torch.Tensor:
    """Causal attention on `[B, Lq, Hq, D]` queries and `[B, Lk, Hk, D]` keys/values (GQA allowed).

    Query i sits at position `q_offset + i` and key j at position j (a KV cache holds the keys of
    earlier positions). With `window`, a query sees the `window` most recent keys, itself
    included, as transformers' `sliding_window`.
    """
    lq, lk = q.shape[1], k.shape[1]
    mask, is_causal = None, False
    if q_offset == 0 and lq == lk and (window is None or window >= lk):
        is_causal = lq > 1
    else:
        q_pos = torch.arange(q_offset, q_offset + lq, device=q.device)[:, None]
        k_pos = torch.arange(lk, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        is_causal=is_causal,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
