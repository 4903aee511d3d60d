"""Backward kernel for the gradient of a broadcast bias.

A bias of shape (Bb, Hb, Sqb, Skb), each dim 1 or full, receives the score
gradient dS summed over every (batch, head, row, key) that reads each of its
elements. Writing dS per (batch, head) and reducing afterwards would materialize
(B, Hq, Sq, Sk); accumulating into the bias from the dK/dV or dQ programs would
need atomics or a fp32 read-modify-write per tile and (batch, head): 8 bytes of
traffic per score. Estimated for an H100 (not measured): a 128 x 64 tile at D 64
does ~4 MFLOP of products in the dK/dV loop, ~1.4 us of one SM's share of 400
TFLOP/s, against 64 KB of read-modify-write, ~2.8 us of its share of 3 TB/s.

Instead each program owns one tile of the bias (rows and keys of one block, or
all of them along a broadcast dim) and loops over every (batch, head) pair that
reads it, recomputing dS (two matrix products per tile: q.k and dO.v, +2/7 on the
backward's seven) and summing it in registers; it writes its tile once. The pairs may be cut into a few splits
(chosen by the launcher to fill the GPU) whose partial sums the launcher adds in
a fixed order, so the result has the same bits every run.

A bias with full rows and keys (T5's (1, H, Sq, Sk)) gives each program one tile,
so its only loop runs over the pairs, and Triton pipelines that loop's loads. (In
a loop nest with the pairs outermost, as for a broadcast bias, that case's inner
loops run once each and every load waits unhidden; with the pairs innermost in
the nest, the T5 tile spilled 288 B on sm_90.)
"""

import triton
import triton.language as tl

from .backward_dq import load_query_rows, score_gradient_tile
from .block_ranges import key_blocks_for_query_block
from .dropout import dropout_parameters, dropout_row_offsets
from .head_slices import bias_slice, key_mask_row, key_value_rows, query_grad_out_rows
from .scores import load_alibi_slope


@triton.jit
def _tile_range(tile, end, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """[begin, stop) of the tile-th block of BLOCK along a dim the bias has in full (FULL),
    cut at `end`; else the whole [0, end), which the bias broadcasts over."""
    begin = 0
    stop = end
    if FULL:
        begin = tile * BLOCK
        stop = tl.minimum(begin + BLOCK, end)
    return begin, stop


@triton.jit
def _pair_of_slice(
    pair, bias_batch, bias_head, heads_per_slice, heads_q, seqlen_q, kv_group_size, inputs,
    HAS_KEY_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    """For the pair-th (batch, head) pair that reads bias slice (bias_batch, bias_head): the
    row of (b, h, 0) in (B, Hq, Sq), the pair's q_do, kv, bias and key_mask tuples, and its
    ALiBi slope (load_alibi_slope). inputs: the kernel's pointers and strides, a tuple per
    input as head_slices takes them."""
    q, grad_out, k, v, bias, key_mask, alibi = inputs
    batch = (bias_batch + pair // heads_per_slice).to(tl.int64)
    head = (bias_head + pair % heads_per_slice).to(tl.int64)
    kv_head = head // kv_group_size
    head_row = (batch * heads_q + head) * seqlen_q
    alibi_slopes_ptr, alibi_batch_stride = alibi
    return (
        head_row,
        query_grad_out_rows(q, grad_out, batch, head, 0),
        key_value_rows(k, v, batch, kv_head, 0),
        bias_slice(bias, batch, head, True),
        key_mask_row(key_mask, batch, HAS_KEY_MASK),
        load_alibi_slope(alibi_slopes_ptr, alibi_batch_stride, batch, head, HAS_ALIBI),
    )


@triton.jit
def attention_backward_dbias_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, key_mask_ptr, dropout_seed_ptr, grad_out_ptr, lse_ptr, delta_ptr,
    dbias_partials_ptr,
    q_batch_stride, q_head_stride, q_row_stride,
    k_batch_stride, k_head_stride, k_row_stride,
    v_batch_stride, v_head_stride, v_row_stride,
    bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride,
    key_mask_batch_stride, key_mask_col_stride,
    grad_out_batch_stride, grad_out_head_stride, grad_out_row_stride,
    partials_split_stride, partials_batch_stride, partials_head_stride, partials_row_stride,
    heads_q, seqlen_q, seqlen_k, kv_group_size,
    scale_log2,
    first_key_offset, last_key_offset,
    dropout_keep_threshold, dropout_keep_scale,
    softcap, alibi_slopes_ptr, alibi_batch_stride,
    heads_per_slice, pairs_per_slice, pairs_per_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    ROWS_FULL: tl.constexpr, COLS_FULL: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (row tiles * key tiles * num_splits, Hb, Bb); row tiles: cdiv(Sq, BLOCK_M)
    with ROWS_FULL, else 1; key tiles: cdiv(Sk, BLOCK_N) with COLS_FULL, else 1.

    dbias_partials (num_splits, Bb, Hb, Sqb, Skb) contiguous, fully written: float32
    partial sums, or with one split dbias itself in the bias's dtype.
    A bias slice (bb, hb) is read by the pairs p in [0, pairs_per_slice):
    batch bb + p // heads_per_slice, head hb + p % heads_per_slice (heads_per_slice
    is Hq when the bias broadcasts over heads, else 1; pairs_per_slice adds a
    factor B when it broadcasts over the batch). ROWS_FULL / COLS_FULL: Sqb == Sq /
    Skb == Sk (else the dim has size 1 and is summed over). The scalars and pointers of
    the modifiers the variant lacks (first_key_offset, softcap, alibi_*) are None.
    """
    num_row_tiles = 1
    if ROWS_FULL:
        num_row_tiles = tl.cdiv(seqlen_q, BLOCK_M)
    num_col_tiles = 1
    if COLS_FULL:
        num_col_tiles = tl.cdiv(seqlen_k, BLOCK_N)
    num_tiles = num_row_tiles * num_col_tiles
    tile = tl.program_id(0) % num_tiles
    split = tl.program_id(0) // num_tiles
    bias_head = tl.program_id(1)
    bias_batch = tl.program_id(2)
    row_tile = tile // num_col_tiles
    col_tile = tile % num_col_tiles

    rows_begin, rows_end = _tile_range(row_tile, seqlen_q, BLOCK_M, ROWS_FULL)
    dropout = dropout_parameters(dropout_seed_ptr, dropout_keep_threshold, dropout_keep_scale, HAS_DROPOUT)
    bounds = (seqlen_q, seqlen_k, first_key_offset, last_key_offset)
    inputs = (
        (q_ptr, q_batch_stride, q_head_stride, q_row_stride),
        (grad_out_ptr, grad_out_batch_stride, grad_out_head_stride, grad_out_row_stride),
        (k_ptr, k_batch_stride, k_head_stride, k_row_stride),
        (v_ptr, v_batch_stride, v_head_stride, v_row_stride),
        (bias_ptr, bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride),
        (key_mask_ptr, key_mask_batch_stride, key_mask_col_stride),
        (alibi_slopes_ptr, alibi_batch_stride),
    )  # the pointers and strides _pair_of_slice offsets to each pair's slices

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # dS summed over pairs (and broadcast rows / keys)
    pair_begin = split * pairs_per_split
    pair_end = tl.minimum(pair_begin + pairs_per_split, pairs_per_slice)
    if ROWS_FULL and COLS_FULL:
        # One tile per program: its masks (or none) are the same for every pair, and
        # a tile no row sees keeps its zero sum. The pair loop is the only loop, so
        # Triton pipelines its loads (q, dO, k and v of the next pairs arrive while
        # the current pair computes).
        query_index = rows_begin + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        start_n = col_tile * BLOCK_N
        begin, full_begin, full_end, end = key_blocks_for_query_block(
            rows_begin, bounds, LEFT_BOUNDED, RIGHT_BOUNDED, BLOCK_M, BLOCK_N
        )
        for phase in tl.static_range(2):
            # Unmasked when every score of the tile is visible and in bounds, else masked.
            if phase == 0:
                visited = start_n < full_end
                if LEFT_BOUNDED:
                    visited = visited and start_n >= full_begin
            else:
                visited = start_n >= full_end and start_n < end
                if LEFT_BOUNDED:
                    visited = (visited or start_n < full_begin) and start_n >= begin
            if visited:
                for pair in range(pair_begin, pair_end):
                    head_row, q_do, kv, bias, key_mask, alibi_slope_log2 = _pair_of_slice(
                        pair, bias_batch, bias_head, heads_per_slice, heads_q, seqlen_q, kv_group_size,
                        inputs, HAS_KEY_MASK, HAS_ALIBI,
                    )
                    query_rows = load_query_rows(
                        query_index, head_row, q_do, lse_ptr, delta_ptr, seqlen_q, HEAD_DIM, BLOCK_D
                    )
                    dropout_rows = (0, 0)
                    if HAS_DROPOUT:
                        dropout_rows = dropout_row_offsets(head_row, query_index, seqlen_k, 0)
                    ds, _, _ = score_gradient_tile(
                        query_rows, query_index, dropout_rows, start_n,
                        kv, bias, key_mask, (softcap, alibi_slope_log2), dropout, bounds, scale_log2,
                        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_KEY_MASK, HAS_DROPOUT,
                        HAS_SOFTCAP, HAS_ALIBI, LEFT_BOUNDED, RIGHT_BOUNDED, UPCAST_OPERANDS, DOT_PRECISION,
                        phase == 1,
                    )
                    acc += ds
    else:
        # Rows or keys broadcast: each pair sums a strip of tiles, loading its q and dO
        # once per row block.
        for pair in range(pair_begin, pair_end):
            head_row, q_do, kv, bias, key_mask, alibi_slope_log2 = _pair_of_slice(
                pair, bias_batch, bias_head, heads_per_slice, heads_q, seqlen_q, kv_group_size,
                inputs, HAS_KEY_MASK, HAS_ALIBI,
            )
            for start_m in range(rows_begin, rows_end, BLOCK_M):
                query_index = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
                query_rows = load_query_rows(
                    query_index, head_row, q_do, lse_ptr, delta_ptr, seqlen_q, HEAD_DIM, BLOCK_D
                )
                dropout_rows = (0, 0)
                if HAS_DROPOUT:
                    dropout_rows = dropout_row_offsets(head_row, query_index, seqlen_k, 0)
                begin, full_begin, full_end, end = key_blocks_for_query_block(
                    start_m, bounds, LEFT_BOUNDED, RIGHT_BOUNDED, BLOCK_M, BLOCK_N
                )
                keys_begin, keys_end = _tile_range(col_tile, end, BLOCK_N, COLS_FULL)
                if LEFT_BOUNDED:
                    keys_begin = tl.maximum(keys_begin, begin)
                for phase in tl.static_range(3):
                    # Within [keys_begin, keys_end): key blocks on the band's left edge with masks (none
                    # without one), those every row sees in full without, then the others with masks.
                    if phase == 0:
                        lo = keys_begin
                        hi = tl.minimum(keys_end, full_begin)
                    elif phase == 1:
                        lo = keys_begin
                        if LEFT_BOUNDED:
                            lo = tl.maximum(lo, full_begin)
                        hi = tl.minimum(keys_end, full_end)
                    else:
                        lo = tl.maximum(keys_begin, full_end)
                        hi = keys_end
                    if LEFT_BOUNDED or phase > 0:
                        for start_n in range(lo, hi, BLOCK_N):
                            ds, _, _ = score_gradient_tile(
                                query_rows, query_index, dropout_rows, start_n,
                                kv, bias, key_mask, (softcap, alibi_slope_log2), dropout, bounds, scale_log2,
                                HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_KEY_MASK, HAS_DROPOUT,
                                HAS_SOFTCAP, HAS_ALIBI, LEFT_BOUNDED, RIGHT_BOUNDED, UPCAST_OPERANDS,
                                DOT_PRECISION, phase != 1,
                            )
                            acc += ds

    partials_ptr = (
        dbias_partials_ptr
        + split.to(tl.int64) * partials_split_stride
        + bias_batch.to(tl.int64) * partials_batch_stride
        + bias_head.to(tl.int64) * partials_head_stride
    )
    out_dtype = dbias_partials_ptr.dtype.element_ty
    row_index = rows_begin + tl.arange(0, BLOCK_M)
    col_index = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    if ROWS_FULL:
        if COLS_FULL:
            ptrs = partials_ptr + row_index.to(tl.int64)[:, None] * partials_row_stride + col_index[None, :]
            tl.store(
                ptrs,
                acc.to(out_dtype),
                mask=(row_index < seqlen_q)[:, None] & (col_index < seqlen_k)[None, :],
            )
        else:
            tl.store(
                partials_ptr + row_index * partials_row_stride,
                tl.sum(acc, 1).to(out_dtype),
                mask=row_index < seqlen_q,
            )
    else:
        if COLS_FULL:
            tl.store(partials_ptr + col_index, tl.sum(acc, 0).to(out_dtype), mask=col_index < seqlen_k)
        else:
            tl.store(partials_ptr, tl.sum(tl.sum(acc, 1), 0).to(out_dtype))
