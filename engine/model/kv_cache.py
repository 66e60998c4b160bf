"""A key/value cache for decoding a batch of sequences of different lengths together.

Generation runs in two kinds of step, both through the model's ordinary forward:

- prefill: every prompt at once as one packed row (`PackedLayout.packed(prompt_lengths)`), its
  attention the training path's `varlen_attention`; each token's keys/values are written to its
  sequence's cache row at its position;
- decode: one new token per cache row (`input_ids` `[B]`), at position `lengths[b]` of its own
  sequence; its query attends over that row's cached keys `0 .. lengths[b]` only (a per-row mask,
  so the shorter rows' unused slots never count: padding cannot change a result). The step runs
  on SDPA's fused kernels (memory-efficient attention, or cuDNN's, on CUDA): the mask is additive
  float (0 or the dtype's minimum, as transformers builds it), and grouped-query heads need no
  expanded copy of the cache: each kv head's query heads become that many query positions of one
  SDPA call over the head's keys (flash and memory-efficient attention take no `enable_gqa` with
  a mask; a [B, Hq, L, D] copy of the cache per layer and step would cost more than the attention).
  A logit softcap (Gemma 2) is computed eagerly instead (one query per row: tiny logits).

The prefill reads the prompt lengths back from the device once (the host needs them for the
attention width and the rows' positions; generation reads each step's tokens back anyway); the
rest of a prefill and every decode step build their indices and masks on the device.

Rows whose sequence has finished are dropped with `keep`, which moves the last live rows into
the holes (a copy of the moved rows only) and narrows the cache, so finished sequences cost no
further compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packtune.kernels import PackedLayout
from packtune.kernels.attention import sdpa_attention, varlen_attention
from packtune.model.config import ModelArgs


class KVCache:
    """Keys and values `[layers, B, Hk, max_len, D]` of B sequences, row b holding positions
    `0 .. lengths[b] - 1` of its sequence.

    The model calls `begin(layout)` before a step (the packed prompts of a prefill, or None for one
    token per row), each layer's attention `attend`, and `advance` once every layer has seen the step.
    """

    def __init__(self, args: ModelArgs, batch: int, max_len: int, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (args.num_hidden_layers, batch, args.num_key_value_heads, max_len, args.head_dim)
        # zeros, not empty: a masked-out slot still enters the attention products (0 x NaN = NaN)
        self._k = torch.zeros(shape, device=device, dtype=dtype)
        self._v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * batch
        """Cached positions per row (host ints: the attention width needs no sync)."""
        self._lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self._prefill: PackedLayout | None = None
        self._prompt_lengths: list[int] = []
        self._rows: torch.Tensor | None = None  # prefill: each packed token's cache row
        self._keys = self._causal = self._batch_rows = torch.empty(0, device=device)  # decode: see begin

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def begin(self, input_ids: torch.Tensor, layout: PackedLayout | None) -> tuple[torch.Tensor, int]:
        """Start a step of `input_ids`; returns the step's token positions and the highest position + 1.

        `layout`: the prompts as one packed row, one per row of the (empty) cache; None: a decode
        step of one token per row."""
        tokens = self.batch if layout is None else layout.num_tokens
        if input_ids.dim() != 1 or input_ids.shape[0] != tokens:
            raise ValueError(f"a KV cache step takes input_ids [{tokens}], got {tuple(input_ids.shape)}")
        if layout is not None:
            if any(self.lengths) or layout.cu_seqlens is None or layout.cu_seqlens.numel() != self.batch + 1:
                raise ValueError(f"a prefill fills an empty KV cache with {self.batch} packed prompts")
            if layout.max_seqlen > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions; a prompt has {layout.max_seqlen}")
            lengths = layout.cu_seqlens.to(self._k.device).diff()
            self._prefill, self._prompt_lengths = layout, lengths.tolist()
            rows = torch.arange(self.batch, device=self._k.device)
            self._rows = rows.repeat_interleave(lengths, output_size=layout.num_tokens)
            self._lengths = lengths.long()
            return layout.positions, layout.max_seqlen
        end = max(self.lengths) + 1
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this step needs {end}")
        self._prefill = None
        # the step's key positions and causal mask, the same in every layer: built once per step
        self._keys = torch.arange(end, device=self._k.device)[None, :]
        self._causal = self._keys <= self._lengths[:, None]
        self._batch_rows = torch.arange(self.batch, device=self._k.device)
        return self._lengths, end

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None,
               scale: float | None, softcap: float | None, alibi_slopes: torch.Tensor | None = None,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Store this step's keys/values (`[T, Hk, D]`) and return its attention output `[T, Hq, D]`.
        `alibi_slopes` (BLOOM): in a decoding step each row's one query sees slope * key position,
        which differs from slope * (key - query) by a constant per row: the same softmax."""
        layout = self._prefill
        if layout is not None:
            self._k[layer][self._rows, :, layout.positions] = k
            self._v[layer][self._rows, :, layout.positions] = v
            return varlen_attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, window=window, scale=scale,
                                    softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
        self._k[layer][self._batch_rows, :, self._lengths] = k
        self._v[layer][self._batch_rows, :, self._lengths] = v
        end = self._keys.shape[1]
        keys, values = self._k[layer, :, :, :end], self._v[layer, :, :, :end]
        mask = self._causal
        if window is not None:
            mask = mask & (self._keys > self._lengths[:, None] - window)
        if softcap is not None or sinks is not None:  # eager logits: Gemma 2's caps, gpt-oss's sinks
            out = sdpa_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None, :],
                                 is_causal=False, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                                 enable_gqa=q.shape[1] != k.shape[1], sinks=sinks)
            return out[:, :, 0]
        batch, heads, dim = q.shape
        groups = heads // k.shape[1]
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill_(~mask, torch.finfo(q.dtype).min)[:, None, None, :]  # [B, 1, 1, end]
        if alibi_slopes is not None:  # slope_h * (key - query position), per query head: [B, Hk, groups, end]
            offsets = (self._keys - self._lengths[:, None]).float()[:, None, :]
            alibi = alibi_slopes.float().to(q.device)[None, :, None] * offsets  # [B, Hq, end]
            bias = bias + alibi.to(q.dtype).view(batch, k.shape[1], groups, end)
        out = F.scaled_dot_product_attention(q.reshape(batch, k.shape[1], groups, dim), keys, values,
                                             attn_mask=bias, scale=scale)
        return out.reshape(batch, heads, dim)

    def advance(self) -> None:
        """The step is stored in every layer: the rows' lengths move past it."""
        if self._prefill is not None:
            self.lengths = self._prompt_lengths
            self._prefill = self._rows = None
        else:
            self.lengths = [n + 1 for n in self.lengths]
            self._lengths += 1

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only the cache rows `rows` (increasing); returns, for each row afterwards, its index
        before. Rows past the kept count move into the holes the dropped ones leave."""
        n = len(rows)
        kept = set(rows)
        holes = [i for i in range(n) if i not in kept]
        movers = [r for r in rows if r >= n]
        order = list(range(n))
        if holes:
            dst = torch.tensor(holes, device=self._k.device)
            src = torch.tensor(movers, device=self._k.device)
            self._k[:, dst] = self._k[:, src]
            self._v[:, dst] = self._v[:, src]
            self._lengths[dst] = self._lengths[src]
            for hole, mover in zip(holes, movers, strict=True):
                order[hole] = mover
        self._k, self._v, self._lengths = self._k[:, :n], self._v[:, :n], self._lengths[:n]
        self.lengths = [self.lengths[i] for i in order]
        return order
