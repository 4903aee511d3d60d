"""Which tiles a program visits, and which of them need masks.

The band (query i sees key j iff i + first_key_offset <= j, with LEFT_BOUNDED, and
j <= i + last_key_offset, with RIGHT_BOUNDED: causal masks and sliding windows)
makes whole tiles invisible: they are never loaded nor computed. Tiles that every
row sees in full, inside both sequences, run without any index mask (the cheap
path); only the tiles on the band's edges or at the end of a sequence pay for
masks. Key padding and -inf biases are data, not indices: they are applied on
every tile.

Each function returns the visited range cut in three, [begin, full_begin) with
masks, [full_begin, full_end) without, [full_end, end) with masks (the first is
empty without LEFT_BOUNDED). All block starts returned are multiples of the block
size, except that an empty range may be returned as (n, n) for any n.
"""

import triton
import triton.language as tl


@triton.jit
def key_blocks_for_query_block(
    start_m, bounds, LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For queries [start_m, start_m + BLOCK_M): returns (begin, full_begin, full_end, end).

    Keys [full_begin, full_end) are visible to every query row of the block and inside
    the sequence: no masks. Keys [begin, full_begin) and [full_end, end) need masks.
    Keys outside [begin, end) are visible to no row of the block: skipped. A block that
    runs past the end of the queries needs masks on every tile (its bias rows would be
    read out of bounds). bounds: (seqlen_q, seqlen_k, first_key_offset, last_key_offset).
    """
    seqlen_q, seqlen_k, first_key_offset, last_key_offset = bounds
    full_end = tl.where(start_m + BLOCK_M <= seqlen_q, seqlen_k // BLOCK_N * BLOCK_N, 0)
    rows_end = tl.minimum(start_m + BLOCK_M, seqlen_q)  # the last real row + 1
    if RIGHT_BOUNDED:
        end = tl.minimum(tl.maximum(rows_end + last_key_offset, 0), seqlen_k)
        # The first row sees keys j <= start_m + last_key_offset, and every later row sees more.
        first_row_keys = tl.maximum(start_m + last_key_offset + 1, 0)
        full_end = tl.minimum(first_row_keys // BLOCK_N * BLOCK_N, full_end)
    else:
        end = seqlen_k
    begin = 0
    full_begin = 0
    if LEFT_BOUNDED:
        # The first row sees keys j >= start_m + first_key_offset, and every later row fewer:
        # the last real row's first key starts the keys every row sees.
        begin = tl.maximum(start_m + first_key_offset, 0) // BLOCK_N * BLOCK_N
        last_row_first_key = tl.maximum(rows_end - 1 + first_key_offset, 0)
        full_begin = (last_row_first_key + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        # A block whose rows see no key (begin >= end) gets empty ranges.
        begin = tl.minimum(begin, end)
        full_begin = tl.minimum(full_begin, end)
        full_end = tl.maximum(full_end, full_begin)
    return begin, full_begin, full_end, end


@triton.jit
def query_blocks_for_key_block(
    start_n, bounds, LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For keys [start_n, start_n + BLOCK_N): returns (begin, full_begin, full_end, end).

    Query rows outside [begin, end) see no key of the block: skipped. Rows
    [begin, full_begin) and [full_end, end) need masks. Rows [full_begin, full_end) see
    every key of the block, inside both sequences: no masks.
    bounds: (seqlen_q, seqlen_k, first_key_offset, last_key_offset).
    """
    seqlen_q, seqlen_k, first_key_offset, last_key_offset = bounds
    full_rows_end = seqlen_q // BLOCK_M * BLOCK_M
    if RIGHT_BOUNDED:
        # Row i sees key start_n iff i >= start_n - last_key_offset.
        first_row = tl.maximum(start_n - last_key_offset, 0)
        begin = tl.minimum(first_row, seqlen_q) // BLOCK_M * BLOCK_M
        # Row i sees the whole block iff i >= start_n + BLOCK_N - 1 - last_key_offset.
        first_full_row = tl.maximum(start_n + BLOCK_N - 1 - last_key_offset, 0)
        full_begin = (first_full_row + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        full_begin = tl.minimum(tl.maximum(full_begin, begin), full_rows_end)
        # No row sees the block at all: an empty range everywhere.
        no_rows = first_row >= seqlen_q
        begin = tl.where(no_rows, seqlen_q, begin)
        full_begin = tl.where(no_rows, seqlen_q, full_begin)
    else:
        begin = 0
        full_begin = 0
    # A block that runs past the end of the keys needs masks on every tile.
    full_end = tl.where(start_n + BLOCK_N <= seqlen_k, tl.maximum(full_rows_end, full_begin), full_begin)
    end = seqlen_q
    if LEFT_BOUNDED:
        # Row i sees key start_n + BLOCK_N - 1 iff i <= start_n + BLOCK_N - 1 - first_key_offset:
        # later rows see no key of the block.
        end = tl.minimum(tl.maximum(start_n + BLOCK_N - first_key_offset, 0), seqlen_q)
        # Row i sees key start_n, hence (on this side) the whole block, iff i <= start_n - first_key_offset.
        left_full_rows_end = tl.maximum(start_n - first_key_offset + 1, 0) // BLOCK_M * BLOCK_M
        # A block no row sees (begin >= end) gets empty ranges.
        begin = tl.minimum(begin, end)
        full_begin = tl.minimum(full_begin, end)
        full_end = tl.minimum(tl.maximum(tl.minimum(full_end, left_full_rows_end), full_begin), end)
    return begin, full_begin, full_end, end


@triton.jit
def phase_range(phase: tl.constexpr, begin, full_begin, full_end, end):
    """The part of a range cut in three (as the functions above return it) that phase 0, 1
    or 2 of a loop visits: [begin, full_begin) with masks, [full_begin, full_end) without,
    [full_end, end) with masks. Returns (lo, hi)."""
    if phase == 0:
        lo = begin
        hi = full_begin
    elif phase == 1:
        lo = full_begin
        hi = full_end
    else:
        lo = full_end
        hi = end
    return lo, hi
