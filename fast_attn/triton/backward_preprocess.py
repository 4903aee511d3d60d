"""Backward preprocessing: delta = rowsum(grad_out * out) - grad_lse.

With P the attention probabilities, dS = P * (dP - delta) is the gradient of the
scores: rowsum(dO * O) = rowsum(P * dP) is the softmax term, and grad_lse enters
because d lse_i / d s_ij = P_ij. One read of out and grad_out per row, float32.
"""

import triton
import triton.language as tl

from .scores import load_rows


@triton.jit
def attention_backward_preprocess_kernel(
    out_ptr,
    grad_out_ptr,
    grad_lse_ptr,
    delta_ptr,
    out_batch_stride,
    out_head_stride,
    out_row_stride,
    grad_out_batch_stride,
    grad_out_head_stride,
    grad_out_row_stride,
    grad_lse_batch_stride,
    grad_lse_head_stride,
    grad_lse_row_stride,
    heads_q,
    seqlen_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Grid (cdiv(Sq, BLOCK_M), Hq, B). delta (B, Hq, Sq) contiguous float32."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    row_index = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    out_head_ptr = out_ptr + batch * out_batch_stride + head * out_head_stride
    grad_out_head_ptr = grad_out_ptr + batch * grad_out_batch_stride + head * grad_out_head_stride
    out = load_rows(out_head_ptr, row_index, out_row_stride, seqlen_q, HEAD_DIM, BLOCK_D, True)
    grad_out = load_rows(grad_out_head_ptr, row_index, grad_out_row_stride, seqlen_q, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)  # (BLOCK_M,)
    in_rows = row_index < seqlen_q
    if HAS_GRAD_LSE:
        grad_lse_head_ptr = grad_lse_ptr + batch * grad_lse_batch_stride + head * grad_lse_head_stride
        delta -= tl.load(grad_lse_head_ptr + row_index * grad_lse_row_stride, mask=in_rows, other=0.0)
    tl.store(delta_ptr + (batch * heads_q + head) * seqlen_q + row_index, delta, mask=in_rows)
