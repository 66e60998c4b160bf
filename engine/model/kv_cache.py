"""A key/value cache for incremental decoding of one sequence."""

from __future__ import annotations

import torch

from packtune.model.config import ModelArgs


class KVCache:
    """Keys and values of every layer for positions `0 .. length-1`, preallocated to `max_len`.

    Layers write their new keys/values with `update`; the model calls `advance` once all layers
    have seen the new tokens, so every layer of one forward writes at the same offset.
    """

    def __init__(self, args: ModelArgs, max_len: int, *, device: torch.device, dtype: torch.dtype) -> None:
        shape = (args.num_hidden_layers, max_len, args.num_key_value_heads, args.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's `[t, Hk, D]` keys/values; return all so far `[length + t, Hk, D]`."""
        end = self.length + k.shape[0]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this forward needs {end}")
        self.k[layer, self.length : end] = k
        self.v[layer, self.length : end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def advance(self, tokens: int) -> None:
        self.length += tokens
