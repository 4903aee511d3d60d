"""The contract's dropout decision inside Triton kernels.

Bit for bit the hash of fast_attn/dropout.py and csrc/attention_params.h: score
(b, h, i, j) is kept iff lowbias32-style hash(seed, ((b * Hq + h) * Sq + i) * Sk + j)
>= threshold, all in uint32 arithmetic (multiplications wrap mod 2^32 and shifts
are logical because the operands are unsigned). For packed sequences the index is the
score's in the packed (1, Hq, Tq, Tk) problem: i and j count from the packed rows' start.
"""

import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    # x is uint32: the integer constants below are promoted to uint32, so the
    # products wrap mod 2^32 and ">>" is a logical shift, as in C++.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def load_dropout_seed(seed_ptr):
    """The int64 seed split into its (low, high) uint32 halves."""
    seed = tl.load(seed_ptr)
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def dropout_parameters(seed_ptr, keep_threshold, keep_scale, HAS_DROPOUT: tl.constexpr):
    """(seed_low, seed_high, keep_threshold, keep_scale): what dropout_keep reads, and the
    1 / (1 - p) that rescales what it keeps. Without HAS_DROPOUT the seed is not read
    (its halves are 0) and nothing reads the tuple."""
    seed_low = 0
    seed_high = 0
    if HAS_DROPOUT:
        seed_low, seed_high = load_dropout_seed(seed_ptr)
    return seed_low, seed_high, keep_threshold, keep_scale


@triton.jit
def dropout_row_offsets(head_row, query_index, seqlen_k, key_begin):
    """The uint32 (low, high) halves of ((b * Hq + h) * Sq + i) * Sk + key_begin for query rows i.

    head_row: int64 (b * Hq + h) * Sq, plus a packed sequence's first query row;
    query_index: int32 rows; key_begin: a packed sequence's first key row (0 otherwise).
    Splitting per row keeps the per-score index arithmetic in 32 bits (an int64 index
    per score cost ~2 registers per score and made the dropout kernels spill).
    """
    row_offset = (head_row.to(tl.int64) + query_index) * seqlen_k + key_begin  # int64
    return row_offset.to(tl.uint32), (row_offset >> 32).to(tl.uint32)


@triton.jit
def dropout_keep(dropout, row_low, row_high, key_index):
    """Bool tile: True where the probability of (row, key) is kept.

    dropout: dropout_parameters' tuple; row_low, row_high: dropout_row_offsets of the
    rows, shaped to broadcast against key_index (int32 key positions j).
    """
    seed_low, seed_high, keep_threshold, _ = dropout
    index_low = row_low + key_index.to(tl.uint32)  # wraps mod 2^32
    index_high = row_high + (index_low < row_low).to(tl.uint32)  # carry into the high half
    hashed = _mix32(index_low ^ seed_low)
    hashed = _mix32(hashed ^ index_high ^ seed_high)
    return hashed >= keep_threshold.to(tl.uint32)
