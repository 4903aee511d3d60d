"""Decoding against a KV cache (the decode_forward contract of csrc/schema.cpp): a few query rows
per sequence against a long cache, paged or contiguous, the new keys written in place first.

Three kernels, launched in this order on one stream (fast_attn/ops/triton_decode.py):

decode_append_kernel  writes k_new / v_new into the caches at positions cache_seqlens[b] ...
                      A kernel of its own, launched first: every split program then reads the
                      new keys from the cache like any other, and stream order guarantees that
                      the write is complete before any program reads them (inside the decode
                      kernel, the programs of other splits or row blocks could read a slot
                      before the program that writes it has).
decode_split_kernel   one program per (split, row block x kv head, sequence). Its tile's rows
                      are the g = Hq / Hkv query heads times the Sq query rows that share one kv
                      head (GQA packing: each K and V block is loaded once for all of them),
                      row r = i * g + h is query row i of query head kv_head * g + h. It walks
                      its split's share of the sequence's visible keys in blocks of BLOCK_N
                      with the online softmax of forward.py and the scores of scores.py, and
                      writes its normalized output and lse: with one split directly into out
                      and lse, with several into float32 partials.
decode_merge_kernel   with several splits: lse = log sum_s exp(lse_s) and
                      out = sum_s exp(lse_s - lse) out_s, one program per output row.
A split kernel that merged its partials itself (the last program of a sequence to finish
doing the merge) would need atomics and a counter zeroed per call; a merge launch costs a few
microseconds and keeps every output element written by one program, deterministically.

Key j (0 <= j < Lk) of sequence b is cache position p = start + j, start = cache_leftpad[b]
(0 without), Lk = cache_seqlens[b] + S_new - start. Position p lives at (row, slot) of the
cache (rows, slots, Hkv, D): with a block table (PAGED) row = block_table[b, p // page_size]
(each key's page gathered on its own: any page size), slot = p % page_size; otherwise
row = cache_batch_idx[b] (or b) and slot = p. Any strides of rows, slots and heads (K and V
pages interleaved in one storage); the head dim is contiguous.

So that a direct op call with bad values cannot read or write outside the tensors, positions
are clamped to the cache's capacity (rows x slots, or max_pages x page_size), the leftpad to
[0, end], and page ids and cache rows to the cache's rows.
"""

import triton
import triton.language as tl

from .block_ranges import key_blocks_for_query_block
from .forward import finish_online_softmax, online_softmax_step
from .scores import LOG2E, load_alibi_slope, masked_scores, mma, scaled_scores


@triton.jit
def _clamp(x, low, high):
    return tl.minimum(tl.maximum(x, low), high)


@triton.jit
def _sequence_keys(cache_seqlens_ptr, cache_leftpad_ptr, sequence, new_rows, capacity, HAS_LEFTPAD: tl.constexpr):
    """(start, end): sequence's keys are cache positions [start, end), clamped to the cache."""
    end = _clamp(tl.load(cache_seqlens_ptr + sequence) + new_rows, 0, capacity)
    start = 0
    if HAS_LEFTPAD:
        start = _clamp(tl.load(cache_leftpad_ptr + sequence), 0, end)
    return start, end


@triton.jit
def _cache_rows(
    positions, sequence, cache, block_table_ptr, block_table_batch_stride, cache_batch_idx_ptr,
    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
):
    """(row, slot), int64 like positions (any shape): where cache positions `positions` (int32, in
    the cache's capacity) of `sequence` live. cache: (rows, page_size)."""
    num_rows, page_size = cache
    if PAGED:
        pages = tl.load(block_table_ptr + sequence.to(tl.int64) * block_table_batch_stride + positions // page_size)
        row = _clamp(pages, 0, num_rows - 1).to(tl.int64)
        slot = (positions % page_size).to(tl.int64)
    else:
        row = sequence.to(tl.int64)
        if HAS_BATCH_IDX:
            row = _clamp(tl.load(cache_batch_idx_ptr + sequence), 0, num_rows - 1).to(tl.int64)
        slot = positions.to(tl.int64)
    return row, slot


@triton.jit
def _tile_pointers(row_pointers, BLOCK_D: tl.constexpr):
    """(R, BLOCK_D) pointers of the head-dim elements of rows starting at row_pointers (R,)."""
    return row_pointers[:, None] + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def decode_append_kernel(
    k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr,
    cache_seqlens_ptr, block_table_ptr, cache_batch_idx_ptr,
    k_new_batch_stride, k_new_row_stride, k_new_head_stride,
    v_new_batch_stride, v_new_row_stride, v_new_head_stride,
    k_cache_row_stride, k_cache_slot_stride, k_cache_head_stride,
    v_cache_row_stride, v_cache_slot_stride, v_cache_head_stride,
    block_table_batch_stride, cache_rows, page_size, capacity,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
):
    """Grid (S_new, Hkv, B): new row t of kv head `head` of sequence b, k_new[b, t, head] and
    v_new[b, t, head] (B, S_new, Hkv, D), into cache position cache_seqlens[b] + t (skipped past
    the cache's capacity)."""
    row = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    sequence = tl.program_id(2)
    position = tl.load(cache_seqlens_ptr + sequence) + row
    if (position >= 0) & (position < capacity):
        cache_row, slot = _cache_rows(
            position, sequence, (cache_rows, page_size), block_table_ptr, block_table_batch_stride,
            cache_batch_idx_ptr, PAGED, HAS_BATCH_IDX,
        )
        offs_d = tl.arange(0, BLOCK_D)
        in_head = offs_d < HEAD_DIM
        batch64 = sequence.to(tl.int64)
        k_src = k_new_ptr + batch64 * k_new_batch_stride + row * k_new_row_stride + head * k_new_head_stride
        v_src = v_new_ptr + batch64 * v_new_batch_stride + row * v_new_row_stride + head * v_new_head_stride
        k_dst = k_cache_ptr + cache_row * k_cache_row_stride + slot * k_cache_slot_stride + head * k_cache_head_stride
        v_dst = v_cache_ptr + cache_row * v_cache_row_stride + slot * v_cache_slot_stride + head * v_cache_head_stride
        tl.store(k_dst + offs_d, tl.load(k_src + offs_d, mask=in_head), mask=in_head)
        tl.store(v_dst + offs_d, tl.load(v_src + offs_d, mask=in_head), mask=in_head)


@triton.jit
def decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    cache_seqlens_ptr, cache_leftpad_ptr, block_table_ptr, cache_batch_idx_ptr,
    q_batch_stride, q_row_stride, q_head_stride,
    k_cache_row_stride, k_cache_slot_stride, k_cache_head_stride,
    v_cache_row_stride, v_cache_slot_stride, v_cache_head_stride,
    out_split_stride, out_batch_stride, out_row_stride, out_head_stride,
    lse_split_stride, lse_batch_stride, lse_head_stride,
    block_table_batch_stride, cache_rows, page_size, capacity,
    seqlen_q, new_rows, kv_group_size, num_splits, scale_log2,
    first_key_offset, last_key_offset, softcap, alibi_slopes_ptr, alibi_batch_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
    LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (num_splits, cdiv(g * Sq, BLOCK_M) * Hkv, B). q (B, Sq, Hq, D); out (splits, B, Sq, Hq, D)
    and lse (splits, B, Hq, Sq) through their strides (with one split the op's out and lse
    themselves, unsqueezed). first_key_offset and last_key_offset are the band's offsets from the
    diagonal j = i (None / 0 without that side), moved here to each sequence's bottom-right
    diagonal j = i + Lk - Sq; softcap and alibi_* are None without them."""
    split = tl.program_id(0)
    row_blocks = tl.cdiv(kv_group_size * seqlen_q, BLOCK_M)
    row_block = tl.program_id(1) % row_blocks
    kv_head = tl.program_id(1) // row_blocks
    sequence = tl.program_id(2)
    batch64 = sequence.to(tl.int64)
    start, end = _sequence_keys(cache_seqlens_ptr, cache_leftpad_ptr, sequence, new_rows, capacity, HAS_LEFTPAD)
    seqlen_k = end - start
    diagonal = seqlen_k - seqlen_q
    if LEFT_BOUNDED:
        first_key_offset += diagonal
    bounds = (seqlen_q, seqlen_k, first_key_offset, last_key_offset + diagonal)

    tile_row = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows i * g + h
    query_index = tile_row // kv_group_size  # (BLOCK_M,) i; >= Sq on padding rows
    head = kv_head * kv_group_size + tile_row % kv_group_size  # (BLOCK_M,) query heads
    row_valid = query_index < seqlen_q
    q_rows = q_ptr + batch64 * q_batch_stride + query_index.to(tl.int64) * q_row_stride + head * q_head_stride
    in_head = (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]  # (1, BLOCK_D)
    q = tl.load(_tile_pointers(q_rows, BLOCK_D), mask=row_valid[:, None] & in_head, other=0.0)  # (BLOCK_M, BLOCK_D)
    alibi_slope_log2 = load_alibi_slope(alibi_slopes_ptr, alibi_batch_stride, sequence, head, HAS_ALIBI)
    if HAS_ALIBI:
        alibi_slope_log2 = alibi_slope_log2[:, None]  # (BLOCK_M, 1): each row's head's slope

    # The keys any row of the tile sees, cut into num_splits ranges of whole blocks.
    key_ranges = key_blocks_for_query_block(
        row_block * BLOCK_M // kv_group_size, bounds, LEFT_BOUNDED, RIGHT_BOUNDED, BLOCK_M, BLOCK_N
    )  # (begin, full_begin, full_end, end): every block is masked here
    begin = key_ranges[0]
    visible_end = key_ranges[3]
    blocks_per_split = tl.cdiv(tl.cdiv(visible_end - begin, BLOCK_N), num_splits)
    split_begin = begin + split * blocks_per_split * BLOCK_N
    split_end = tl.minimum(split_begin + blocks_per_split * BLOCK_N, visible_end)

    cache = (cache_rows, page_size)
    kv_head64 = kv_head.to(tl.int64)
    k_head_ptr = k_cache_ptr + kv_head64 * k_cache_head_stride
    v_head_ptr = v_cache_ptr + kv_head64 * v_cache_head_stride
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m)
    for start_n in range(split_begin, split_end, BLOCK_N):
        key_index = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) j
        key_valid = key_index < seqlen_k
        positions = tl.where(key_valid, start + key_index, 0)
        cache_row, slot = _cache_rows(
            positions, sequence, cache, block_table_ptr, block_table_batch_stride, cache_batch_idx_ptr,
            PAGED, HAS_BATCH_IDX,
        )  # (BLOCK_N,) each
        k_rows = k_head_ptr + cache_row * k_cache_row_stride + slot * k_cache_slot_stride
        v_rows = v_head_ptr + cache_row * v_cache_row_stride + slot * v_cache_slot_stride
        k = tl.load(_tile_pointers(k_rows, BLOCK_D), mask=key_valid[:, None] & in_head, other=0.0)
        v = tl.load(_tile_pointers(v_rows, BLOCK_D), mask=key_valid[:, None] & in_head, other=0.0)
        qk = mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST_OPERANDS, DOT_PRECISION)
        scores = scaled_scores(qk, scale_log2, softcap, HAS_SOFTCAP)[0]
        scores = masked_scores(
            scores, query_index[:, None], key_index[None, :], None, False, alibi_slope_log2, bounds,
            False, False, HAS_ALIBI, LEFT_BOUNDED, RIGHT_BOUNDED, True,
        )  # (BLOCK_M, BLOCK_N), log2 domain
        p, acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, scores)
        acc = mma(p.to(v.dtype), v, acc, UPCAST_OPERANDS, DOT_PRECISION)

    out, lse = finish_online_softmax(acc, m_i, l_i, 1.0)  # a split without keys: out 0, lse -inf
    split64 = split.to(tl.int64)
    out_rows = (
        out_ptr + split64 * out_split_stride + batch64 * out_batch_stride
        + query_index.to(tl.int64) * out_row_stride + head * out_head_stride
    )
    tl.store(_tile_pointers(out_rows, BLOCK_D), out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & in_head)
    lse_ptrs = lse_ptr + split64 * lse_split_stride + batch64 * lse_batch_stride + head * lse_head_stride + query_index
    tl.store(lse_ptrs, lse, mask=row_valid)


@triton.jit
def decode_merge_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, lse_ptr,
    partial_out_split_stride, partial_lse_split_stride, heads_q, seqlen_q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    """Grid (Hq, Sq, B): output row (b, i, h) from the float32 partials of every split,
    partial_out (splits, B, Sq, Hq, D) and partial_lse (splits, B, Hq, Sq), contiguous but the
    split dim; out (B, Sq, Hq, D) and lse (B, Hq, Sq) contiguous. A split whose keys none of
    the row sees has lse_s -inf and weight 0; a row that sees no key at all gets out 0, lse -inf."""
    head = tl.program_id(0)
    row = tl.program_id(1)
    sequence = tl.program_id(2).to(tl.int64)
    lse_index = (sequence * heads_q + head) * seqlen_q + row
    out_index = ((sequence * seqlen_q + row) * heads_q + head) * HEAD_DIM
    splits = tl.arange(0, BLOCK_SPLITS)
    split_lse = tl.load(
        partial_lse_ptr + splits * partial_lse_split_stride + lse_index, mask=splits < num_splits, other=float("-inf")
    )  # (BLOCK_SPLITS,)
    lse_max = tl.max(split_lse, 0)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.sum(tl.exp2((split_lse - shift) * LOG2E), 0)
    lse = tl.where(total == 0.0, float("-inf"), shift + tl.log(tl.where(total == 0.0, 1.0, total)))
    lse_shift = tl.where(total == 0.0, float("inf"), lse)  # weights exp(lse_s - lse): all 0 without keys

    offs_d = tl.arange(0, BLOCK_D)
    in_head = offs_d < HEAD_DIM
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for split in range(num_splits):
        weight = tl.exp2((tl.load(partial_lse_ptr + split * partial_lse_split_stride + lse_index) - lse_shift) * LOG2E)
        partial = tl.load(partial_out_ptr + split * partial_out_split_stride + out_index + offs_d, mask=in_head)
        acc += weight * partial
    tl.store(out_ptr + out_index + offs_d, acc.to(out_ptr.dtype.element_ty), mask=in_head)
    tl.store(lse_ptr + lse_index, lse)
