"""Forward kernel: out = softmax(scores) v and its row log-sum-exp, with the scores of
fast_attn/triton/scores.py (scale * q k^T, softcap, bias, ALiBi, masks).

One program per (query block, query head, batch). It keeps the query tile in
registers and streams key/value blocks through an online softmax (running row
max m, running row sum l, unnormalized output acc), FlashAttention-style, in the
log2 domain. The key loop runs in three phases (block_ranges): the blocks on the
band's left edge with masks, the blocks every row sees in full without any index
mask, then the blocks on the band's right edge (the causal diagonal) or at the end
of the sequence with masks; blocks no row sees are skipped.

Rows with no visible key keep m = -inf; the running max is replaced by 0 in the
exponent (exp2(-inf - 0) = 0), so they end with l = 0, out 0 and lse -inf.
"""

import triton
import triton.language as tl

from .block_ranges import key_blocks_for_query_block, phase_range
from .dropout import dropout_keep, dropout_parameters, dropout_row_offsets
from .grid import program_coordinates
from .head_slices import bias_slice, head_rows, key_mask_row, key_value_rows
from .scores import LN2, key_block_scores, load_alibi_slope, load_rows, mma, store_rows
from .sequences import sequence_view


@triton.jit
def online_softmax_step(acc, m_i, l_i, scores):
    """One key block of the online softmax: scores (R, C) in the log2 domain against the running
    row max m_i (R,), row sum l_i (R,) and unnormalized output acc (R, BLOCK_D). Returns
    (p, acc, m_i, l_i): p = exp2(scores - new max) (R, C), for the caller to add p @ v to acc,
    which comes back rescaled to the new max."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(scores - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, acc, m_new, l_i


@triton.jit
def finish_online_softmax(acc, m_i, l_i, out_scale):
    """(out (R, BLOCK_D), lse (R,), natural log) of an online softmax, out scaled by out_scale.
    l = 0 only for rows with no visible key (otherwise the max term alone gives 1): out 0 and
    lse -inf; NaN scores make l NaN and propagate to out and lse, as in the reference."""
    no_key = l_i == 0.0
    inv_l = tl.where(no_key, 0.0, out_scale / tl.where(no_key, 1.0, l_i))
    out = acc * inv_l[:, None]
    lse = tl.where(no_key, float("-inf"), (m_i + tl.log2(tl.where(no_key, 1.0, l_i))) * LN2)
    return out, lse


@triton.jit
def _accumulate_key_blocks(
    acc, m_i, l_i, q, query_index, dropout_rows,
    kv, bias, key_mask, modifiers, dropout, bounds, scale_log2, block_begin, block_end,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """The online softmax (acc, m_i, l_i) of the query rows q, carried over keys
    [block_begin, block_end)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(block_begin, block_end, BLOCK_N):
        key_index = start_n + offs_n  # (BLOCK_N,)
        _, v, scores, _ = key_block_scores(
            q, query_index, key_index, kv, bias, key_mask, modifiers, bounds, scale_log2,
            HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_BIAS, HAS_KEY_MASK, HAS_SOFTCAP, HAS_ALIBI,
            LEFT_BOUNDED, RIGHT_BOUNDED, UPCAST_OPERANDS, DOT_PRECISION, MASKED,
        )  # (BLOCK_M, BLOCK_N), log2 domain
        p, acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, scores)  # lse: of the scores before dropout
        if HAS_DROPOUT:
            row_low, row_high = dropout_rows
            keep = dropout_keep(dropout, row_low[:, None], row_high[:, None], key_index[None, :])
            p = tl.where(keep, p, 0.0)  # 1 / (1 - p) is applied once, at the end
        acc = mma(p.to(v.dtype), v, acc, UPCAST_OPERANDS, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, key_mask_ptr, dropout_seed_ptr, out_ptr, lse_ptr,
    q_batch_stride, q_head_stride, q_row_stride,
    k_batch_stride, k_head_stride, k_row_stride,
    v_batch_stride, v_head_stride, v_row_stride,
    bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride,
    key_mask_batch_stride, key_mask_col_stride,
    out_batch_stride, out_head_stride, out_row_stride,
    heads_q, seqlen_q, seqlen_k, kv_group_size,
    scale_log2,
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
    """Grid (cdiv(Sq, BLOCK_M), Hq, B), or (B, cdiv(Sq, BLOCK_M), Hq) with BATCH_FASTEST
    (grid.py); with IS_VARLEN (cdiv(max_seqlen_q, BLOCK_M), Hq, N). out (B, Hq, Sq, D)
    through its strides; lse (B, Hq, Sq) contiguous float32, natural log. The scalars and
    pointers of the modifiers the variant lacks (first_key_offset, softcap, alibi_*) are
    None, and so are those of packed sequences (cu_seqlens_*, max_seqlen_*) without IS_VARLEN."""
    pid_m, head, program_batch, num_m_blocks = program_coordinates(BATCH_FASTEST)
    if RIGHT_BOUNDED:
        # Later query blocks see more keys: start them first so the tail of the
        # grid is made of short programs.
        pid_m = num_m_blocks - 1 - pid_m
    start_m = pid_m * BLOCK_M
    kv_head = head // kv_group_size
    batch64, sequence, q_begin, k_begin, bounds = sequence_view(
        program_batch, seqlen_q, seqlen_k, first_key_offset, last_key_offset,
        (cu_seqlens_q_ptr, cu_seqlens_k_ptr, max_seqlen_q, max_seqlen_k),
        IS_VARLEN, BAND_PER_SEQUENCE, LEFT_BOUNDED,
    )
    sequence_q, sequence_k, _, _ = bounds
    if IS_VARLEN:
        if start_m >= sequence_q:
            return  # a block past its sequence's end (the grid is sized by the longest)

    query_index = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    q_head_ptr, _ = head_rows((q_ptr, q_batch_stride, q_head_stride, q_row_stride), batch64, head, q_begin)
    kv = key_value_rows(
        (k_ptr, k_batch_stride, k_head_stride, k_row_stride),
        (v_ptr, v_batch_stride, v_head_stride, v_row_stride),
        batch64, kv_head, k_begin,
    )
    bias = bias_slice(
        (bias_ptr, bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride),
        batch64, head, HAS_BIAS,
    )
    key_mask = key_mask_row((key_mask_ptr, key_mask_batch_stride, key_mask_col_stride), batch64, HAS_KEY_MASK)
    dropout = dropout_parameters(dropout_seed_ptr, dropout_keep_threshold, dropout_keep_scale, HAS_DROPOUT)
    dropout_rows = (0, 0)
    if HAS_DROPOUT:
        head_row = (batch64 * heads_q + head) * seqlen_q + q_begin  # row of (b, h, query 0) in lse
        dropout_rows = dropout_row_offsets(head_row, query_index, seqlen_k, k_begin)  # (BLOCK_M,) each
    modifiers = (softcap, load_alibi_slope(alibi_slopes_ptr, alibi_batch_stride, sequence, head, HAS_ALIBI))

    q = load_rows(
        q_head_ptr, query_index, q_row_stride, sequence_q, HEAD_DIM, BLOCK_D, True
    )  # (BLOCK_M, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m)

    begin, full_begin, full_end, end = key_blocks_for_query_block(
        start_m, bounds, LEFT_BOUNDED, RIGHT_BOUNDED, BLOCK_M, BLOCK_N
    )
    for phase in tl.static_range(3):
        # The keys of phase_range's three parts; the first (masked) is empty without a left edge.
        lo, hi = phase_range(phase, begin, full_begin, full_end, end)
        if LEFT_BOUNDED or phase > 0:
            acc, m_i, l_i = _accumulate_key_blocks(
                acc, m_i, l_i, q, query_index, dropout_rows,
                kv, bias, key_mask, modifiers, dropout, bounds, scale_log2, lo, hi,
                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_BIAS, HAS_KEY_MASK, HAS_DROPOUT,
                HAS_SOFTCAP, HAS_ALIBI, LEFT_BOUNDED, RIGHT_BOUNDED, UPCAST_OPERANDS, DOT_PRECISION, phase != 1,
            )

    out, lse = finish_online_softmax(acc, m_i, l_i, dropout_keep_scale)

    out_head_ptr, _ = head_rows(
        (out_ptr, out_batch_stride, out_head_stride, out_row_stride), batch64, head, q_begin
    )
    store_rows(out_head_ptr, query_index, out_row_stride, sequence_q, out, HEAD_DIM, BLOCK_D)
    lse_row_ptr = lse_ptr + (batch64 * heads_q + head) * seqlen_q + q_begin
    tl.store(lse_row_ptr + query_index, lse, mask=query_index < sequence_q)
