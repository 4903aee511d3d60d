"""Decoding against a KV cache: a few new query rows per sequence, the cache written in place."""

from __future__ import annotations

import torch

from . import dispatch
from .validation import build_decode_problem, validate_call_options


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    causal: bool = False,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int = 0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """One decoding step of every sequence of a batch against its KV cache (forward only).

    q: (B, Sq, Hq, D), in flash-attn's (batch, seq, heads, dim) layout; Sq is small (1 for greedy
    decoding, a few for speculative decoding).
    k_cache, v_cache: a contiguous cache (B_cache, S_cache, Hkv, D), or a paged one
    (num_pages, page_size, Hkv, D) with block_table int32 (B, max_pages): position p of sequence b
    lives in page block_table[b, p // page_size] at slot p % page_size. Any page size, and any
    strides but a contiguous last dim (K and V pages may interleave in one storage).
    cache_seqlens: int32 (B,), where each sequence's keys end. k, v: (B, S_new, Hkv, D) or None:
    written into the caches in place at positions cache_seqlens[b] .. cache_seqlens[b] + S_new - 1
    before attending (nothing else in the caches changes; cache_seqlens itself is not advanced).
    cache_leftpad: int32 (B,), where each sequence's keys start (left padding; default 0).
    cache_batch_idx: int32 (B,), the cache row of each sequence (contiguous caches only).
    Sequence b attends its Lk = cache_seqlens[b] + S_new - cache_leftpad[b] keys as one problem of
    fast_attn.attention: causal is bottom-right (query i sees key j <= i + Lk - Sq), and
    window_size, softcap, alibi_slopes ((Hq,) or (B, Hq)), sinks and scale mean what they mean there.
    num_splits: how many parts each sequence's keys are split into and merged (0: chosen per call).

    Returns out (B, Sq, Hq, D) in q's dtype, and with return_lse=True also lse (B, Hq, Sq), float32
    (float64 for float64 inputs); a row with no visible key gives 0 and lse -inf (the sink with sinks).

    On CPU tensors the integer inputs are checked against the cache (a sequence running past its
    cache, a page id out of range): a ValueError before anything is written. On a GPU that would
    cost a device-to-host copy and a sync per step, so it is done only with FAST_ATTN_CHECK_CACHE=1;
    without it the kernels clamp what they read and write to the cache's bounds.
    """
    validate_call_options(backend, return_lse)
    problem = build_decode_problem(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k=k,
        v=v,
        cache_leftpad=cache_leftpad,
        block_table=block_table,
        cache_batch_idx=cache_batch_idx,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        scale=scale,
        num_splits=num_splits,
    )
    out, lse = dispatch.run_decode_problem(problem, backend)
    return (out, lse) if return_lse else out
