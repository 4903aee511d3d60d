"""Backward kernel for dQ (and dbias when the bias has the problem's full shape).

One program per (query block, query head, batch): it keeps q, grad_out, lse and
delta of its rows and the dQ accumulator in registers and loops over the key
blocks its rows see (block_ranges), recomputing the score gradient

    P  = exp2(s2 - lse2),  dP = Z * (dO V^T) / (1 - p),  dS = P * (dP - delta)
    dQ += (dS * (1 - t^2)) K         (times scale at the end; t of a softcap, else 1 - t^2 = 1)

Every dQ row is owned by one program: no atomics, the same bits every run. When
every score maps to its own bias element (bias shape (B, Hq, Sq, Sk)), the
program also stores dS as dbias; a broadcast bias is reduced by backward_dbias.
"""

import triton
import triton.language as tl

from .block_ranges import key_blocks_for_query_block, phase_range
from .dropout import dropout_keep, dropout_parameters, dropout_row_offsets
from .grid import program_coordinates
from .head_slices import bias_slice, head_rows, key_mask_row, key_value_rows, query_grad_out_rows
from .scores import key_block_scores, load_alibi_slope, load_rows, lse_to_log2, mma, qk_gradient, store_rows
from .sequences import sequence_view


@triton.jit
def load_query_rows(
    query_index, head_row, q_do, lse_ptr, delta_ptr, seqlen_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """(q, grad_out, lse2, delta) of rows `query_index` ((R,) int32) of one (b, h): q and
    grad_out (R, BLOCK_D), lse2 (lse_to_log2) and delta (R,). head_row: the row of
    (b, h, 0) in (B, Hq, Sq)."""
    q_head_ptr, grad_out_head_ptr, q_row_stride, grad_out_row_stride = q_do
    in_rows = query_index < seqlen_q
    q = load_rows(q_head_ptr, query_index, q_row_stride, seqlen_q, HEAD_DIM, BLOCK_D, True)
    grad_out = load_rows(
        grad_out_head_ptr, query_index, grad_out_row_stride, seqlen_q, HEAD_DIM, BLOCK_D, True
    )
    lse2 = lse_to_log2(tl.load(lse_ptr + head_row + query_index, mask=in_rows, other=float("-inf")))
    delta = tl.load(delta_ptr + head_row + query_index, mask=in_rows, other=0.0)
    return q, grad_out, lse2, delta


@triton.jit
def score_gradient_tile(
    query_rows, query_index, dropout_rows, start_n,
    kv, bias, key_mask, modifiers, dropout, bounds, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """dS (BLOCK_M, BLOCK_N) of the query rows (load_query_rows' tuple) against keys
    [start_n, start_n + BLOCK_N) (the gradient of the scores, and of the bias), that key
    block's K tile (BLOCK_N, BLOCK_D), and scaled_scores' t (for qk_gradient)."""
    q, grad_out, lse2, delta = query_rows
    key_index = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    k, v, scores, capped = key_block_scores(
        q, query_index, key_index, kv, bias, key_mask, modifiers, bounds, scale_log2,
        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_BIAS, HAS_KEY_MASK, HAS_SOFTCAP, HAS_ALIBI,
        LEFT_BOUNDED, RIGHT_BOUNDED, UPCAST_OPERANDS, DOT_PRECISION, MASKED,
    )  # (BLOCK_M, BLOCK_N)
    p = tl.exp2(scores - lse2[:, None])
    dp = mma(grad_out, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST_OPERANDS, DOT_PRECISION)
    if HAS_DROPOUT:
        row_low, row_high = dropout_rows
        keep = dropout_keep(dropout, row_low[:, None], row_high[:, None], key_index[None, :])
        _, _, _, keep_scale = dropout
        dp = tl.where(keep, dp * keep_scale, 0.0)
    return p * (dp - delta[:, None]), k, capped


@triton.jit
def _accumulate_key_blocks(
    dq, query_rows, query_index, dropout_rows, dbias_head_ptr,
    kv, bias, key_mask, modifiers, dropout, bounds, scale_log2, block_begin, block_end,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr,
    STORE_DBIAS: tl.constexpr, UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,
):
    """dq (BLOCK_M, BLOCK_D) plus dS K over keys [block_begin, block_end); with STORE_DBIAS,
    dS stored into the contiguous (Sq, Sk) dbias slice at dbias_head_ptr."""
    seqlen_q, seqlen_k, _, _ = bounds
    for start_n in range(block_begin, block_end, BLOCK_N):
        ds, k, capped = score_gradient_tile(
            query_rows, query_index, dropout_rows, start_n,
            kv, bias, key_mask, modifiers, dropout, bounds, scale_log2,
            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_BIAS, HAS_KEY_MASK, HAS_DROPOUT,
            HAS_SOFTCAP, HAS_ALIBI, LEFT_BOUNDED, RIGHT_BOUNDED, UPCAST_OPERANDS, DOT_PRECISION, MASKED,
        )
        if STORE_DBIAS:
            key_index = start_n + tl.arange(0, BLOCK_N)
            dbias_ptrs = dbias_head_ptr + query_index.to(tl.int64)[:, None] * seqlen_k + key_index[None, :]
            dbias_tile = ds.to(dbias_head_ptr.dtype.element_ty)
            if MASKED:
                tl.store(
                    dbias_ptrs,
                    dbias_tile,
                    mask=(query_index < seqlen_q)[:, None] & (key_index < seqlen_k)[None, :],
                )
            else:
                tl.store(dbias_ptrs, dbias_tile)
        dq = mma(qk_gradient(ds, capped, HAS_SOFTCAP).to(k.dtype), k, dq, UPCAST_OPERANDS, DOT_PRECISION)
    return dq


@triton.jit
def attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, key_mask_ptr, dropout_seed_ptr, grad_out_ptr, lse_ptr, delta_ptr, dq_ptr,
    dbias_ptr,
    q_batch_stride, q_head_stride, q_row_stride,
    k_batch_stride, k_head_stride, k_row_stride,
    v_batch_stride, v_head_stride, v_row_stride,
    bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride,
    key_mask_batch_stride, key_mask_col_stride,
    grad_out_batch_stride, grad_out_head_stride, grad_out_row_stride,
    dq_batch_stride, dq_head_stride, dq_row_stride,
    heads_q, seqlen_q, seqlen_k, kv_group_size,
    scale, scale_log2,
    first_key_offset, last_key_offset,
    dropout_keep_threshold, dropout_keep_scale,
    softcap, alibi_slopes_ptr, alibi_batch_stride,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, max_seqlen_q, max_seqlen_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr, BAND_PER_SEQUENCE: tl.constexpr,
    STORE_DBIAS: tl.constexpr, BATCH_FASTEST: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(Sq, BLOCK_M), Hq, B), or (B, cdiv(Sq, BLOCK_M), Hq) with BATCH_FASTEST
    (grid.py); with IS_VARLEN (cdiv(max_seqlen_q, BLOCK_M), Hq, N). dq (B, Hq, Sq, D)
    through its strides; with STORE_DBIAS, dbias (B, Hq, Sq, Sk) contiguous,
    zero-initialized (tiles no row sees are not written). The scalars and pointers of the
    modifiers the variant lacks (first_key_offset, softcap, alibi_*) are None, and so are
    those of packed sequences (cu_seqlens_*, max_seqlen_*) without IS_VARLEN."""
    pid_m, head, program_batch, num_m_blocks = program_coordinates(BATCH_FASTEST)
    batch, sequence, q_begin, k_begin, bounds = sequence_view(
        program_batch, seqlen_q, seqlen_k, first_key_offset, last_key_offset,
        (cu_seqlens_q_ptr, cu_seqlens_k_ptr, max_seqlen_q, max_seqlen_k),
        IS_VARLEN, BAND_PER_SEQUENCE, LEFT_BOUNDED,
    )
    sequence_q, sequence_k, _, _ = bounds
    if RIGHT_BOUNDED:
        pid_m = num_m_blocks - 1 - pid_m  # longest programs first
    start_m = pid_m * BLOCK_M
    if IS_VARLEN:
        if start_m >= sequence_q:
            return  # a block past its sequence's end (the grid is sized by the longest)
    kv_head = (head // kv_group_size).to(tl.int64)
    head = head.to(tl.int64)

    query_index = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    head_row = (batch * heads_q + head) * seqlen_q + q_begin  # row of (b, h, query 0) in lse
    q_do = query_grad_out_rows(
        (q_ptr, q_batch_stride, q_head_stride, q_row_stride),
        (grad_out_ptr, grad_out_batch_stride, grad_out_head_stride, grad_out_row_stride),
        batch, head, q_begin,
    )
    kv = key_value_rows(
        (k_ptr, k_batch_stride, k_head_stride, k_row_stride),
        (v_ptr, v_batch_stride, v_head_stride, v_row_stride),
        batch, kv_head, k_begin,
    )
    bias = bias_slice(
        (bias_ptr, bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride),
        batch, head, HAS_BIAS,
    )
    key_mask = key_mask_row((key_mask_ptr, key_mask_batch_stride, key_mask_col_stride), batch, HAS_KEY_MASK)
    dbias_head_ptr = dbias_ptr
    if STORE_DBIAS:
        dbias_head_ptr = dbias_ptr + head_row * seqlen_k
    dropout = dropout_parameters(dropout_seed_ptr, dropout_keep_threshold, dropout_keep_scale, HAS_DROPOUT)
    dropout_rows = (0, 0)
    if HAS_DROPOUT:
        dropout_rows = dropout_row_offsets(head_row, query_index, seqlen_k, k_begin)  # (BLOCK_M,) each
    modifiers = (softcap, load_alibi_slope(alibi_slopes_ptr, alibi_batch_stride, sequence, head, HAS_ALIBI))

    query_rows = load_query_rows(
        query_index, head_row, q_do, lse_ptr, delta_ptr, sequence_q, HEAD_DIM, BLOCK_D
    )
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    begin, full_begin, full_end, end = key_blocks_for_query_block(
        start_m, bounds, LEFT_BOUNDED, RIGHT_BOUNDED, BLOCK_M, BLOCK_N
    )
    for phase in tl.static_range(3):
        # The keys of phase_range's three parts; the first (masked) is empty without a left edge.
        lo, hi = phase_range(phase, begin, full_begin, full_end, end)
        if LEFT_BOUNDED or phase > 0:
            dq = _accumulate_key_blocks(
                dq, query_rows, query_index, dropout_rows, dbias_head_ptr,
                kv, bias, key_mask, modifiers, dropout, bounds, scale_log2, lo, hi,
                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_BIAS, HAS_KEY_MASK, HAS_DROPOUT,
                HAS_SOFTCAP, HAS_ALIBI, LEFT_BOUNDED, RIGHT_BOUNDED, STORE_DBIAS, UPCAST_OPERANDS, DOT_PRECISION,
                phase != 1,
            )

    dq *= scale  # s = capped(scale * q.k) + bias
    dq_head_ptr, _ = head_rows(
        (dq_ptr, dq_batch_stride, dq_head_stride, dq_row_stride), batch, head, q_begin
    )
    store_rows(dq_head_ptr, query_index, dq_row_stride, sequence_q, dq, HEAD_DIM, BLOCK_D)
