"""Tiles of attention scores: matrix products, tile loads, and the masks of the
contract (sequence bounds, causal alignment, key padding, bias).

Scores live in the log2 domain, s2 = (scale * q.k + bias) * log2(e), so softmax
uses exp2 (one MUFU instruction on NVIDIA GPUs) with log2(e) folded into the
scale. A masked score is -inf; so is a score whose bias is -inf.

The helpers are orientation-agnostic: `query_index` and `key_index` are int32
position tensors shaped to broadcast against the tile ((R, 1) and (1, C), or
(1, C) and (R, 1) for the transposed tiles of the dK/dV kernel).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def mma(a, b, acc, UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in float32.

    UPCAST_OPERANDS: the Triton interpreter multiplies the raw 16-bit storage of
    bf16 operands (ENVIRONMENT.md), so when interpreting bf16 the operands are
    upcast to float32 first. DOT_PRECISION: "ieee" for float32 inputs (a GPU would
    otherwise use tf32 and miss the contract's float32 accuracy), "tf32" otherwise
    (ignored for 16-bit operands).
    """
    if UPCAST_OPERANDS:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        result = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return result


@triton.jit
def load_rows(
    head_ptr,
    row_index,
    row_stride,
    num_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
):
    """(R, BLOCK_D) tile of rows `row_index` (int32, (R,)) of one head; padded head-dim
    columns and (with CHECK_ROWS) rows >= num_rows read as 0."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = head_ptr + row_index.to(tl.int64)[:, None] * row_stride + offs_d[None, :]
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=(row_index < num_rows)[:, None], other=0.0)
        else:
            tile = tl.load(
                ptrs, mask=(row_index < num_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0
            )
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def store_rows(
    head_ptr, row_index, row_stride, num_rows, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Store a (R, BLOCK_D) tile into rows `row_index` of one head (rows >= num_rows
    and padded head-dim columns are skipped), cast to the destination's dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = head_ptr + row_index.to(tl.int64)[:, None] * row_stride + offs_d[None, :]
    mask = (row_index < num_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(ptrs, tile.to(head_ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_key_allowed(key_mask, key_index, seqlen_k):
    """Bool: True where the key mask lets keys `key_index` be attended (out of bounds: False)."""
    key_mask_row_ptr, col_stride = key_mask
    allowed = tl.load(key_mask_row_ptr + key_index * col_stride, mask=key_index < seqlen_k, other=0)
    return allowed != 0


@triton.jit
def masked_scores(
    qk,  # float32 tile of q.k products
    query_index,  # int32, broadcastable to the tile
    key_index,  # int32, broadcastable to the tile
    scale_log2,  # scale * log2(e)
    bias,  # unused without HAS_BIAS
    key_allowed,  # bool, broadcastable to the tile; unused without HAS_KEY_MASK
    bounds,  # (seqlen_q, seqlen_k, causal_offset): query i sees key j iff j <= i + causal_offset
    HAS_BIAS: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,  # the tile may hold out-of-bounds or causally hidden pairs
):
    """Scores in the log2 domain, -inf where a pair is masked."""
    seqlen_q, seqlen_k, causal_offset = bounds
    scores = qk * scale_log2
    if HAS_BIAS:
        bias_head_ptr, bias_row_stride, bias_col_stride = bias
        # Row offsets in int64: one (Sq, Sk) bias slice may exceed 2^31 elements.
        bias_ptrs = bias_head_ptr + query_index.to(tl.int64) * bias_row_stride + key_index * bias_col_stride
        if MASKED:
            bias_tile = tl.load(bias_ptrs, mask=(query_index < seqlen_q) & (key_index < seqlen_k), other=0.0)
        else:
            bias_tile = tl.load(bias_ptrs)
        scores += bias_tile.to(tl.float32) * LOG2E
    if MASKED:
        visible = (query_index < seqlen_q) & (key_index < seqlen_k)
        if CAUSAL:
            visible = visible & (key_index <= query_index + causal_offset)
        scores = tl.where(visible, scores, float("-inf"))
    if HAS_KEY_MASK:
        scores = tl.where(key_allowed, scores, float("-inf"))
    return scores


@triton.jit
def key_block_scores(
    q, query_index, key_index, kv, bias, key_mask, bounds, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """For keys `key_index` ((BLOCK_N,) int32) of one (b, kv head): K and V tiles
    (BLOCK_N, BLOCK_D), and the scores (BLOCK_M, BLOCK_N) of the query rows q
    (BLOCK_M, BLOCK_D), at positions query_index ((BLOCK_M,) int32), against them (log2
    domain, -inf where masked). The forward and dQ kernels' key loops."""
    k_head_ptr, v_head_ptr, k_row_stride, v_row_stride = kv
    _, seqlen_k, _ = bounds
    k = load_rows(k_head_ptr, key_index, k_row_stride, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
    v = load_rows(v_head_ptr, key_index, v_row_stride, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
    if HAS_KEY_MASK:
        key_allowed = load_key_allowed(key_mask, key_index, seqlen_k)[None, :]
    else:
        key_allowed = False
    qk = mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST_OPERANDS, DOT_PRECISION)
    scores = masked_scores(
        qk, query_index[:, None], key_index[None, :], scale_log2, bias, key_allowed, bounds,
        HAS_BIAS, HAS_KEY_MASK, CAUSAL, MASKED,
    )
    return k, v, scores


@triton.jit
def lse_to_log2(lse):
    """Row log-sum-exp (natural log) as the log2-domain offset of exp2(s2 - offset).

    A row with no visible key has lse -inf; +inf makes every exp2 of its scores 0
    (instead of exp2(-inf + inf) = NaN), which gives its zero gradients.
    """
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
