"""Backward kernel for dK and dV.

One program per (key block, kv head, batch): it keeps its K and V tiles and the
dK, dV accumulators on chip and loops over the query heads that share the
kv head (GQA: their contributions are summed in a fixed order, no atomics) and,
for each, over the query blocks that see the key block (block_ranges: blocks
outside the band are skipped; blocks seen in full run without masks).

Per query block, with transposed tiles (keys along rows):
    P^T  = exp2(s2^T - lse2)                 recomputed from q, k and the saved lse
    dV  += (P^T * Z^T) dO                     Z: dropout keep mask (1/(1-p) at the end)
    dP^T = Z^T * (V dO^T) / (1 - p)
    dS^T = P^T * (dP^T - delta)
    dK  += (dS^T * (1 - t^2)) q               (times scale at the end; t of a softcap, else 1 - t^2 = 1)
"""

import triton
import triton.language as tl

from .block_ranges import phase_range, query_blocks_for_key_block
from .dropout import dropout_keep, dropout_parameters, dropout_row_offsets
from .grid import program_coordinates
from .head_slices import bias_slice, key_mask_row, key_value_rows, query_grad_out_rows
from .scores import (
    load_alibi_slope,
    load_key_allowed,
    load_rows,
    lse_to_log2,
    masked_scores,
    mma,
    qk_gradient,
    scaled_scores,
    store_rows,
)
from .sequences import sequence_view


@triton.jit
def _accumulate_query_blocks(
    dk, dv, k, v, key_index, key_allowed, dropout_index, q_do, lse_row_ptr, delta_row_ptr,
    bias, modifiers, dropout, bounds, scale_log2, block_begin, block_end,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """dk, dv (BLOCK_N, BLOCK_D) plus the contributions of query rows [block_begin, block_end)
    of one (b, h), whose lse and delta rows start at lse_row_ptr and delta_row_ptr.
    modifiers: (softcap, alibi_slope_log2) of that (b, h); dropout_index: dropout_row_offsets'
    (head_row, seqlen_k, key_begin) for those rows."""
    q_head_ptr, grad_out_head_ptr, q_row_stride, grad_out_row_stride = q_do
    softcap, alibi_slope_log2 = modifiers
    seqlen_q, seqlen_k, _, _ = bounds
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(block_begin, block_end, BLOCK_M):
        query_index = start_m + offs_m  # (BLOCK_M,)
        q = load_rows(
            q_head_ptr, query_index, q_row_stride, seqlen_q, HEAD_DIM, BLOCK_D, MASKED
        )  # (BLOCK_M, BLOCK_D)
        grad_out = load_rows(
            grad_out_head_ptr, query_index, grad_out_row_stride, seqlen_q, HEAD_DIM, BLOCK_D, MASKED
        )
        if MASKED:
            lse = tl.load(lse_row_ptr + query_index, mask=query_index < seqlen_q, other=float("-inf"))
            delta = tl.load(delta_row_ptr + query_index, mask=query_index < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_row_ptr + query_index)
            delta = tl.load(delta_row_ptr + query_index)
        qk_t = mma(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), UPCAST_OPERANDS, DOT_PRECISION)
        scores_t, capped_t = scaled_scores(qk_t, scale_log2, softcap, HAS_SOFTCAP)
        scores_t = masked_scores(
            scores_t, query_index[None, :], key_index[:, None], bias, key_allowed, alibi_slope_log2, bounds,
            HAS_BIAS, HAS_KEY_MASK, HAS_ALIBI, LEFT_BOUNDED, RIGHT_BOUNDED, MASKED,
        )  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(scores_t - lse_to_log2(lse)[None, :])
        dp_t = mma(
            v, tl.trans(grad_out), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), UPCAST_OPERANDS, DOT_PRECISION
        )
        if HAS_DROPOUT:
            head_row, dropout_seqlen_k, key_begin = dropout_index
            # (BLOCK_M,) each
            row_low, row_high = dropout_row_offsets(head_row, query_index, dropout_seqlen_k, key_begin)
            keep_t = dropout_keep(dropout, row_low[None, :], row_high[None, :], key_index[:, None])
            dv = mma(
                tl.where(keep_t, p_t, 0.0).to(grad_out.dtype), grad_out, dv, UPCAST_OPERANDS, DOT_PRECISION
            )
            _, _, _, keep_scale = dropout
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            dv = mma(p_t.to(grad_out.dtype), grad_out, dv, UPCAST_OPERANDS, DOT_PRECISION)
        ds_t = qk_gradient(p_t * (dp_t - delta[None, :]), capped_t, HAS_SOFTCAP)
        dk = mma(ds_t.to(q.dtype), q, dk, UPCAST_OPERANDS, DOT_PRECISION)
    return dk, dv


@triton.jit
def attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, key_mask_ptr, dropout_seed_ptr, grad_out_ptr, lse_ptr, delta_ptr, dk_ptr,
    dv_ptr,
    q_batch_stride, q_head_stride, q_row_stride,
    k_batch_stride, k_head_stride, k_row_stride,
    v_batch_stride, v_head_stride, v_row_stride,
    bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride,
    key_mask_batch_stride, key_mask_col_stride,
    grad_out_batch_stride, grad_out_head_stride, grad_out_row_stride,
    dk_batch_stride, dk_head_stride, dk_row_stride,
    dv_batch_stride, dv_head_stride, dv_row_stride,
    heads_q, seqlen_q, seqlen_k, kv_group_size,
    scale, scale_log2,
    first_key_offset, last_key_offset,
    dropout_keep_threshold, dropout_keep_scale,
    softcap, alibi_slopes_ptr, alibi_batch_stride,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, max_seqlen_q, max_seqlen_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr, BAND_PER_SEQUENCE: tl.constexpr,
    BATCH_FASTEST: tl.constexpr, UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(Sk, BLOCK_N), Hkv, B), or (B, cdiv(Sk, BLOCK_N), Hkv) with BATCH_FASTEST
    (grid.py); with IS_VARLEN (cdiv(max_seqlen_k, BLOCK_N), Hkv, N). dk, dv (B, Hkv, Sk, D)
    through their strides; lse and delta (B, Hq, Sq) contiguous float32. The scalars and
    pointers of the modifiers the variant lacks (first_key_offset, softcap, alibi_*) are
    None, and so are those of packed sequences (cu_seqlens_*, max_seqlen_*) without IS_VARLEN."""
    pid_n, kv_head, program_batch, _ = program_coordinates(BATCH_FASTEST)
    start_n = pid_n * BLOCK_N
    batch, sequence, q_begin, k_begin, bounds = sequence_view(
        program_batch, seqlen_q, seqlen_k, first_key_offset, last_key_offset,
        (cu_seqlens_q_ptr, cu_seqlens_k_ptr, max_seqlen_q, max_seqlen_k),
        IS_VARLEN, BAND_PER_SEQUENCE, LEFT_BOUNDED,
    )
    sequence_q, sequence_k, _, _ = bounds
    if IS_VARLEN:
        if start_n >= sequence_k:
            return  # a block past its sequence's end (the grid is sized by the longest)

    key_index = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    k_head_ptr, v_head_ptr, _, _ = key_value_rows(
        (k_ptr, k_batch_stride, k_head_stride, k_row_stride),
        (v_ptr, v_batch_stride, v_head_stride, v_row_stride),
        batch, kv_head, k_begin,
    )
    k = load_rows(
        k_head_ptr, key_index, k_row_stride, sequence_k, HEAD_DIM, BLOCK_D, True
    )  # (BLOCK_N, BLOCK_D)
    v = load_rows(v_head_ptr, key_index, v_row_stride, sequence_k, HEAD_DIM, BLOCK_D, True)
    if HAS_KEY_MASK:
        key_mask = key_mask_row(
            (key_mask_ptr, key_mask_batch_stride, key_mask_col_stride), batch, HAS_KEY_MASK
        )
        key_allowed = load_key_allowed(key_mask, key_index, seqlen_k)[:, None]
    else:
        key_allowed = False
    dropout = dropout_parameters(dropout_seed_ptr, dropout_keep_threshold, dropout_keep_scale, HAS_DROPOUT)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    begin, full_begin, full_end, end = query_blocks_for_key_block(
        start_n, bounds, LEFT_BOUNDED, RIGHT_BOUNDED, BLOCK_M, BLOCK_N
    )
    for group_index in range(kv_group_size):
        head = (kv_head * kv_group_size + group_index).to(tl.int64)
        q_do = query_grad_out_rows(
            (q_ptr, q_batch_stride, q_head_stride, q_row_stride),
            (grad_out_ptr, grad_out_batch_stride, grad_out_head_stride, grad_out_row_stride),
            batch, head, q_begin,
        )
        head_row = (batch * heads_q + head) * seqlen_q + q_begin  # row of (b, h, query 0) in lse
        bias = bias_slice(
            (bias_ptr, bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride),
            batch, head, HAS_BIAS,
        )
        modifiers = (softcap, load_alibi_slope(alibi_slopes_ptr, alibi_batch_stride, sequence, head, HAS_ALIBI))
        for phase in tl.static_range(3):
            # The query rows of phase_range's three parts.
            lo, hi = phase_range(phase, begin, full_begin, full_end, end)
            dk, dv = _accumulate_query_blocks(
                dk, dv, k, v, key_index, key_allowed, (head_row, seqlen_k, k_begin), q_do,
                lse_ptr + head_row, delta_ptr + head_row, bias, modifiers, dropout, bounds, scale_log2, lo, hi,
                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_BIAS, HAS_KEY_MASK, HAS_DROPOUT,
                HAS_SOFTCAP, HAS_ALIBI, LEFT_BOUNDED, RIGHT_BOUNDED, UPCAST_OPERANDS, DOT_PRECISION, phase != 1,
            )

    dk *= scale  # s = capped(scale * q.k) + bias
    if HAS_DROPOUT:
        dv *= dropout_keep_scale
    dk_head_ptr, dv_head_ptr, _, _ = key_value_rows(
        (dk_ptr, dk_batch_stride, dk_head_stride, dk_row_stride),
        (dv_ptr, dv_batch_stride, dv_head_stride, dv_row_stride),
        batch, kv_head, k_begin,
    )
    store_rows(dk_head_ptr, key_index, dk_row_stride, sequence_k, dk, HEAD_DIM, BLOCK_D)
    store_rows(dv_head_ptr, key_index, dv_row_stride, sequence_k, dv, HEAD_DIM, BLOCK_D)
