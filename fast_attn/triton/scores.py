"""Tiles of attention scores: matrix products, tile loads, the score modifiers and
the masks of the contract (sequence bounds, the band of causal masks and windows,
key padding, bias, softcap, ALiBi).

Scores live in the log2 domain, s2 = (capped(scale * q.k) + bias + alibi) * log2(e),
so softmax uses exp2 (one MUFU instruction on NVIDIA GPUs) with log2(e) folded
into the scale. capped(x) = softcap * tanh(x / softcap) with a softcap, else x;
alibi = -slope * |i + Sk - Sq - j|. A masked score is -inf; so is a score whose
bias is -inf.

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
    bf16 operands (seen with triton 3.6 and 3.8), so when interpreting bf16 the operands are
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
def tanh(x):
    """tanh of a float32 tile (the interpreter runs no libdevice tanh). (1 - e) / (1 + e) with
    e = exp(-2|x|) loses relative accuracy to cancellation near 0, where the Taylor series
    to x^7 takes over (its error is below 2e-9 relative for |x| < 1/8)."""
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(tl.abs(x) < 0.125, series, tl.where(x < 0.0, -magnitude, magnitude))


@triton.jit
def scaled_scores(qk, scale_log2, softcap, HAS_SOFTCAP: tl.constexpr):
    """(capped(scale * q.k) * log2(e), t): the scores in the log2 domain before bias,
    ALiBi and masks, and with HAS_SOFTCAP t = tanh(scale * q.k / softcap), whose
    1 - t^2 the backward needs (0 without)."""
    if HAS_SOFTCAP:
        capped = tanh(qk * (scale_log2 / (softcap * LOG2E)))
        scores = capped * (softcap * LOG2E)
    else:
        capped = 0.0
        scores = qk * scale_log2
    return scores, capped


@triton.jit
def qk_gradient(ds, capped, HAS_SOFTCAP: tl.constexpr):
    """The gradient of scale * q.k from dS, the gradient of the score (and of the bias):
    through softcap * tanh(x / softcap), whose derivative is 1 - t^2 (scaled_scores' t)."""
    if HAS_SOFTCAP:
        ds = ds * (1.0 - capped * capped)
    return ds


@triton.jit
def load_alibi_slope(alibi_slopes_ptr, alibi_batch_stride, batch, head, HAS_ALIBI: tl.constexpr):
    """ALiBi's slope of (batch, head) times log2(e) (0 without HAS_ALIBI): the slopes are a
    contiguous float32 (B or 1, Hq) tensor, alibi_batch_stride 0 for one row shared by the batch."""
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(alibi_slopes_ptr + batch * alibi_batch_stride + head) * LOG2E
    return slope_log2


@triton.jit
def masked_scores(
    scores,  # float32 tile of scaled_scores
    query_index,  # int32, broadcastable to the tile
    key_index,  # int32, broadcastable to the tile
    bias,  # unused without HAS_BIAS
    key_allowed,  # bool, broadcastable to the tile; unused without HAS_KEY_MASK
    alibi_slope_log2,  # load_alibi_slope's; unused without HAS_ALIBI
    bounds,  # (seqlen_q, seqlen_k, first_key_offset, last_key_offset): see fast_attn/triton/__init__.py
    HAS_BIAS: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    LEFT_BOUNDED: tl.constexpr,
    RIGHT_BOUNDED: tl.constexpr,
    MASKED: tl.constexpr,  # the tile may hold out-of-bounds pairs or pairs outside the band
):
    """Scores plus bias and ALiBi, -inf where a pair is masked (log2 domain)."""
    seqlen_q, seqlen_k, first_key_offset, last_key_offset = bounds
    if HAS_BIAS:
        bias_head_ptr, bias_row_stride, bias_col_stride = bias
        # Row offsets in int64: one (Sq, Sk) bias slice may exceed 2^31 elements.
        bias_ptrs = bias_head_ptr + query_index.to(tl.int64) * bias_row_stride + key_index * bias_col_stride
        if MASKED:
            bias_tile = tl.load(bias_ptrs, mask=(query_index < seqlen_q) & (key_index < seqlen_k), other=0.0)
        else:
            bias_tile = tl.load(bias_ptrs)
        scores += bias_tile.to(tl.float32) * LOG2E
    if HAS_ALIBI:
        distance = tl.abs(query_index + (seqlen_k - seqlen_q) - key_index)
        scores -= alibi_slope_log2 * distance.to(tl.float32)
    if MASKED:
        visible = (query_index < seqlen_q) & (key_index < seqlen_k)
        if RIGHT_BOUNDED:
            visible = visible & (key_index <= query_index + last_key_offset)
        if LEFT_BOUNDED:
            visible = visible & (key_index >= query_index + first_key_offset)
        scores = tl.where(visible, scores, float("-inf"))
    if HAS_KEY_MASK:
        scores = tl.where(key_allowed, scores, float("-inf"))
    return scores


@triton.jit
def key_block_scores(
    q, query_index, key_index, kv, bias, key_mask, modifiers, bounds, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    LEFT_BOUNDED: tl.constexpr, RIGHT_BOUNDED: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
):
    """For keys `key_index` ((BLOCK_N,) int32) of one (b, kv head): K and V tiles
    (BLOCK_N, BLOCK_D), the scores (BLOCK_M, BLOCK_N) of the query rows q
    (BLOCK_M, BLOCK_D), at positions query_index ((BLOCK_M,) int32), against them (log2
    domain, -inf where masked), and scaled_scores' t. The forward and dQ kernels' key loops.
    modifiers: (softcap, alibi_slope_log2)."""
    k_head_ptr, v_head_ptr, k_row_stride, v_row_stride = kv
    softcap, alibi_slope_log2 = modifiers
    _, seqlen_k, _, _ = bounds
    k = load_rows(k_head_ptr, key_index, k_row_stride, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
    v = load_rows(v_head_ptr, key_index, v_row_stride, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
    if HAS_KEY_MASK:
        key_allowed = load_key_allowed(key_mask, key_index, seqlen_k)[None, :]
    else:
        key_allowed = False
    qk = mma(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), UPCAST_OPERANDS, DOT_PRECISION)
    scores, capped = scaled_scores(qk, scale_log2, softcap, HAS_SOFTCAP)
    scores = masked_scores(
        scores, query_index[:, None], key_index[None, :], bias, key_allowed, alibi_slope_log2, bounds,
        HAS_BIAS, HAS_KEY_MASK, HAS_ALIBI, LEFT_BOUNDED, RIGHT_BOUNDED, MASKED,
    )
    return k, v, scores, capped


@triton.jit
def lse_to_log2(lse):
    """Row log-sum-exp (natural log) as the log2-domain offset of exp2(s2 - offset).

    A row with no visible key has lse -inf; +inf makes every exp2 of its scores 0
    (instead of exp2(-inf + inf) = NaN), which gives its zero gradients.
    """
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
