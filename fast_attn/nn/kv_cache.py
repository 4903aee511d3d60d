"""A preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    Stored (B, max_length, Hkv, D): the projections come out (B, S, Hkv, D), so
    appending a step copies contiguous rows, and the (B, Hkv, S, D) views handed
    to the kernel need no copy (fast_attn reads any strides with a contiguous
    head dim). For a cross-attention layer the cache is filled once with the
    encoder's keys and values and then only read.

    Decoding writes through fast_attn.decode_attention instead: `seqlens` (int32 (B,), the
    tokens cached, on the cache's device) is its cache_seqlens; `reserve` checks the room for the
    step's tokens before the kernel writes them in place, and `advance` counts them afterwards.
    """

    def __init__(
        self,
        batch: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if min(batch, max_length, num_kv_heads, head_dim) < 1:
            raise ValueError(
                f"KVCache sizes must be positive, got batch={batch}, max_length={max_length}, "
                f"num_kv_heads={num_kv_heads}, head_dim={head_dim}"
            )
        shape = (batch, max_length, num_kv_heads, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)  # self.length in every row

    @property
    def max_length(self) -> int:
        return self.keys.shape[1]

    def reserve(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Check that keys/values (B, S_new, Hkv, D) fit; return `seqlens`, where they will go."""
        expected = (self.keys.shape[0], keys.shape[1], *self.keys.shape[2:])
        if tuple(keys.shape) != expected or tuple(values.shape) != expected:
            raise ValueError(
                f"KVCache expects keys and values of shape (B, S_new, Hkv, D) = {expected}, "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if self.length + keys.shape[1] > self.max_length:
            raise ValueError(
                f"KVCache is full: {self.length} cached + {keys.shape[1]} new tokens > max_length {self.max_length}"
            )
        return self.seqlens

    def advance(self, count: int) -> None:
        """Count `count` tokens written at the end (by decode_attention or append)."""
        self.length += count
        self.seqlens.add_(count)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values (B, S_new, Hkv, D); return all of them as (B, Hkv, S_total, D) views."""
        self.reserve(keys, values)
        end = self.length + keys.shape[1]
        self.keys[:, self.length : end] = keys
        self.values[:, self.length : end] = values
        self.advance(keys.shape[1])
        return self.cached()

    def cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values as (B, Hkv, length, D) views."""
        return (
            self.keys[:, : self.length].transpose(1, 2),
            self.values[:, : self.length].transpose(1, 2),
        )

    def reset(self) -> None:
        self.length = 0
        self.seqlens.zero_()
