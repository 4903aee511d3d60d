"""The whole attention contract in plain PyTorch: the oracle of every test and
the last fallback backend.

Differentiable with ordinary autograd and exact in float64. Memory is
O(B * H * Sq * Sk): it is a reference, not a kernel.
"""

from __future__ import annotations

import math

import torch

from .causal import CausalMode, parse_causal, visible_band
from .dropout import dropout_keep_mask


def _visible_mask(
    seqlen_q: int,
    seqlen_k: int,
    mode: CausalMode,
    window: tuple[int, int] | None,
    key_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Bool, broadcastable to (B, H, Sq, Sk): True where query i may attend key j."""
    visible = None
    band = visible_band(mode, window, seqlen_q, seqlen_k)
    if band is not None:
        diagonal = torch.arange(seqlen_q, device=device)[:, None] + band.offset  # (Sq, 1)
        cols = torch.arange(seqlen_k, device=device)[None, :]
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
        if band.left >= 0:
            visible &= cols >= diagonal - band.left
        if band.right >= 0:
            visible &= cols <= diagonal + band.right
    if key_mask is not None:
        keys = key_mask[:, None, None, :]  # (B, 1, 1, Sk)
        visible = keys if visible is None else visible & keys
    return visible


def alibi_bias(slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, dtype: torch.dtype) -> torch.Tensor:
    """-slope * |i + Sk - Sq - j| for slopes (Bs, Hq): (Bs, Hq, Sq, Sk) in `dtype`."""
    rows = torch.arange(seqlen_q, device=slopes.device, dtype=dtype)[:, None] + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=slopes.device, dtype=dtype)[None, :]
    return -slopes.to(dtype)[:, :, None, None] * (rows - cols).abs()


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    causal: object = False,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
    dropout_keep: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (out, lse) for q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D).

    The score of query i and key j is scale * q_i.k_j, capped to softcap * tanh(score / softcap),
    plus bias, plus ALiBi's -slope * |i + Sk - Sq - j| (alibi_slopes (Hq,) or (B, Hq)); masked
    scores (key_mask, the causal mask, the window) are -inf. sinks (Hq,) or (B, Hq, Sq) join each row's
    softmax denominator as one more logit and nothing else; lse includes them.
    Dropout keeps what dropout_keep_mask(dropout_seed, ...) keeps, or what `dropout_keep`
    (bool (B, Hq, Sq, Sk)) says when given. The math runs in `compute_dtype` (default: float64 for float64 inputs, else
    float32); out has q's dtype, lse has the compute dtype. Rows with no
    visible key give out 0 and lse -inf (the sink with sinks) with zero, NaN-free gradients.
    """
    mode = parse_causal(causal)
    out_dtype = q.dtype
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    group = heads_q // heads_kv
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(group, dim=1)  # (B, Hq, Sk, D)
    vc = v.to(compute_dtype).repeat_interleave(group, dim=1)

    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(compute_dtype)
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]  # (Bs, Hq)
        scores = scores + alibi_bias(slopes, seqlen_q, seqlen_k, compute_dtype)

    visible = _visible_mask(seqlen_q, seqlen_k, mode, window_size, key_mask, q.device)
    # A score of -inf (from a bias or float mask) is a masked score too.
    finite_or_nan = scores != float("-inf")
    visible = finite_or_nan if visible is None else visible & finite_or_nan
    visible = visible.expand(scores.shape)
    row_has_key = visible.any(dim=-1, keepdim=True)  # (B, Hq, Sq, 1)

    # Fully masked rows get finite placeholder scores so that nothing in the
    # graph produces NaN; their probabilities are zeroed below.
    scores = torch.where(visible, scores, float("-inf"))
    scores = torch.where(row_has_key, scores, torch.zeros((), dtype=compute_dtype, device=q.device))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, Hq, Sq, 1)
    lse = torch.where(row_has_key, lse, float("-inf"))
    if sinks is not None:
        sink = sinks.to(compute_dtype)
        sink = (sink[..., None] if sink.dim() == 3 else sink[None, :, None, None]).expand(lse.shape)
        lse = torch.logaddexp(lse, sink)  # a row without keys: the sink alone
    probs = torch.exp(scores - torch.where(row_has_key, lse, 0.0)) * row_has_key
    lse = lse.squeeze(-1)

    if dropout_p > 0.0:
        if dropout_keep is None and dropout_seed is None:
            raise ValueError("reference_attention: dropout_p > 0 needs a dropout_seed tensor")
        keep = dropout_keep
        if keep is None:
            keep = dropout_keep_mask(dropout_seed, dropout_p, batch, heads_q, seqlen_q, seqlen_k, q.device)
        probs = probs * keep / (1.0 - dropout_p)

    out = torch.matmul(probs, vc).to(out_dtype)
    return out, lse


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences: (out (Tq, Hq, D), lse (Hq, Tq)) for q (Tq, Hq, D), k and v (Tk, Hkv, D).

    Sequence n, rows cu_seqlens_q[n]:cu_seqlens_q[n + 1] of q and cu_seqlens_k[n]:cu_seqlens_k[n + 1]
    of k and v, runs through reference_attention alone, with its own row of alibi_slopes
    ((Hq,) or (N, Hq)) and its block of the packed (1, Hq, Tq, Tk) problem's dropout mask;
    `options` are reference_attention's other keywords (causal, window_size, softcap, sinks, scale).
    """
    total_q, heads_q, _ = q.shape
    total_k = k.shape[0]
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for n in range(len(offsets_q) - 1):
        rows, cols = range(offsets_q[n], offsets_q[n + 1]), range(offsets_k[n], offsets_k[n + 1])
        keep = None
        if dropout_p > 0.0:
            keep = dropout_keep_mask(
                dropout_seed, dropout_p, 1, heads_q, total_q, total_k, q.device, rows, cols
            )
        slopes = None
        if alibi_slopes is not None:
            slope_rows = alibi_slopes.reshape(-1, heads_q)  # (N or 1, Hq)
            slopes = slope_rows[n if len(slope_rows) > 1 else 0]
        out, lse = reference_attention(
            q[rows.start : rows.stop].transpose(0, 1)[None],
            k[cols.start : cols.stop].transpose(0, 1)[None],
            v[cols.start : cols.stop].transpose(0, 1)[None],
            alibi_slopes=slopes,
            dropout_p=dropout_p,
            dropout_keep=keep,
            **options,
        )  # (1, Hq, Sq_n, D), (1, Hq, Sq_n)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:  # no sequence at all: nothing to attend
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_zeros(q.shape), q.new_full((heads_q, total_q), -math.inf, dtype=lse_dtype)
    return torch.cat(outs), torch.cat(lses, dim=1)


def cache_slots(
    positions: torch.Tensor,
    sequence: int,
    page_size: int,
    block_table: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, slot) indices into a cache (rows, slots, Hkv, D) of sequence `sequence`'s key positions.

    A paged cache's rows are its pages: position p lives in page block_table[sequence, p // page_size]
    at slot p % page_size. A contiguous cache's row is cache_batch_idx[sequence] (or `sequence`).
    """
    if block_table is not None:
        return block_table[sequence].long()[positions // page_size], positions % page_size
    row = sequence if cache_batch_idx is None else int(cache_batch_idx[sequence])
    return torch.full_like(positions, row), positions


def reference_decode_attention(
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
    alibi_slopes: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoding against a KV cache: (out (B, Sq, Hq, D), lse (B, Hq, Sq)) for q (B, Sq, Hq, D).

    The contract of decode_forward (csrc/schema.cpp): k and v (B, S_new, Hkv, D), when given, are
    written into k_cache and v_cache in place at positions cache_seqlens[b] .. + S_new - 1 of
    sequence b; then sequence b attends its keys cache_leftpad[b] .. cache_seqlens[b] + S_new - 1
    as one reference_attention problem, causal bottom-right, with its row of alibi_slopes ((Hq,) or
    (B, Hq)); `options` are reference_attention's window_size, softcap, sinks and scale.
    """
    batch, _, heads_q, _ = q.shape
    page_size = k_cache.shape[1]
    new_rows = 0 if k is None else k.shape[1]
    ends = cache_seqlens.tolist()
    starts = [0] * batch if cache_leftpad is None else cache_leftpad.tolist()
    outs, lses = [], []
    for b in range(batch):
        if k is not None:
            new_positions = torch.arange(ends[b], ends[b] + new_rows, device=q.device)
            rows, slots = cache_slots(new_positions, b, page_size, block_table, cache_batch_idx)
            k_cache[rows, slots] = k[b]
            v_cache[rows, slots] = v[b]
        positions = torch.arange(starts[b], ends[b] + new_rows, device=q.device)
        rows, slots = cache_slots(positions, b, page_size, block_table, cache_batch_idx)
        keys, values = k_cache[rows, slots], v_cache[rows, slots]  # (Lk, Hkv, D)
        slopes = None
        if alibi_slopes is not None:
            slope_rows = alibi_slopes.reshape(-1, heads_q)  # (B or 1, Hq)
            slopes = slope_rows[b if len(slope_rows) > 1 else 0]
        out, lse = reference_attention(
            q[b].transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            causal="bottom_right" if causal else False,
            alibi_slopes=slopes,
            **options,
        )  # (1, Hq, Sq, D), (1, Hq, Sq)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)
