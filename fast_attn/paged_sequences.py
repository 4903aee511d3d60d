"""Packed sequences' keys and values read from a paged KV cache (flash_attn_varlen_func's block_table).

The keys of sequence n are its first cu_seqlens_k[n + 1] - cu_seqlens_k[n] positions; position p lives
in page block_table[n, p // page_size] at slot p % page_size. gather_paged_sequences copies them into
the packed (total_k, Hkv, D) layout of fast_attn.varlen_attention, whose kernels then read them as
any packed keys.
"""

from __future__ import annotations

import torch


def _check_cache(name: str, cache: object) -> torch.Tensor:
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cache).__name__}")
    if cache.dim() != 4:
        raise ValueError(
            f"{name} must be a 4-D paged cache (num_pages, page_size, Hkv, D) with block_table, "
            f"got shape {tuple(cache.shape)}"
        )
    return cache


def _check_int32(name: str, value: object, dims: int, layout: str, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.int32 or value.dim() != dims or value.device != device:
        raise ValueError(
            f"{name} must be an int32 {layout} tensor on {device}, got {value.dtype} of shape "
            f"{tuple(value.shape)} on {value.device}"
        )
    return value


def gather_paged_sequences(
    k_cache: object, v_cache: object, block_table: object, cu_seqlens_k: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """k_cache, v_cache (num_pages, page_size, Hkv, D), int32 block_table (N, max_pages) and
    cu_seqlens_k (N + 1,) -> k, v (total_k, Hkv, D): every sequence's keys and values laid end to end
    at cu_seqlens_k. A copy (gradients flow back into the caches). It reads cu_seqlens_k, and whether
    the pages used exist, on the host (two device-to-host copies on a GPU), and raises naming the
    argument before anything is read out of bounds."""
    k_cache, v_cache = _check_cache("k", k_cache), _check_cache("v", v_cache)
    if v_cache.shape != k_cache.shape or v_cache.device != k_cache.device:
        raise ValueError(
            f"k and v must be paged caches of one shape and device, got {tuple(k_cache.shape)} on "
            f"{k_cache.device} and {tuple(v_cache.shape)} on {v_cache.device}"
        )
    device = k_cache.device
    table = _check_int32("block_table", block_table, 2, "(N, max_pages)", device)
    offsets = _check_int32("cu_seqlens_k", cu_seqlens_k, 1, "(N + 1,)", device)
    if offsets.shape[0] != table.shape[0] + 1:
        raise ValueError(
            f"cu_seqlens_k must have N + 1 = {table.shape[0] + 1} entries for block_table's N = "
            f"{table.shape[0]} sequences, got {offsets.shape[0]}"
        )
    num_pages, page_size = k_cache.shape[:2]
    ends = offsets.tolist()
    lengths = [end - start for start, end in zip(ends, ends[1:])]
    if ends[0] != 0 or min(lengths, default=0) < 0:
        raise ValueError(f"cu_seqlens_k must start at 0 and never decrease, got {ends}")
    capacity = table.shape[1] * page_size
    if max(lengths, default=0) > capacity:
        raise ValueError(
            f"a sequence has more keys than its block_table row holds: lengths {lengths} against "
            f"max_pages * page_size = {capacity}"
        )
    total = ends[-1]
    sequence = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), offsets.diff().long(), output_size=total
    )  # (total_k,)
    position = torch.arange(total, device=device) - offsets.long()[sequence]  # (total_k,)
    page = table.long()[sequence, position // page_size]  # (total_k,)
    if total and not bool(((page >= 0) & (page < num_pages)).all()):
        raise ValueError(
            f"block_table names pages outside 0..{num_pages - 1} (k has {num_pages}) among those its "
            f"sequences use: {sorted(set(page[(page < 0) | (page >= num_pages)].tolist()))}"
        )
    slot = position % page_size
    return k_cache[page, slot], v_cache[page, slot]
