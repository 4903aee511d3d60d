"""Where a program's slice of each input starts: the rows of one (batch, head).

The kernels take a (B, H, S, ...) tensor as a pointer and its strides, flat, and hand
them here as one tuple, (pointer, batch stride, head stride, row stride) (a bias adds
its column stride, the key mask has (pointer, batch stride, column stride)); back come
the tuples their helpers read (fast_attn/triton/__init__.py): a head pointer with its
row stride, kv, q_do, bias and key_mask. The batch comes in int64 (sequence_view's) and
the head is taken to int64, so that the offsets of large tensors do not overflow.
"""

import triton
import triton.language as tl


@triton.jit
def head_rows(tensor, batch, head, first_row):
    """(pointer to row first_row of slice (batch, head) of `tensor`, row stride)."""
    pointer, batch_stride, head_stride, row_stride = tensor[0], tensor[1], tensor[2], tensor[3]
    head_ptr = pointer + batch * batch_stride + head.to(tl.int64) * head_stride + first_row * row_stride
    return head_ptr, row_stride


@triton.jit
def key_value_rows(k, v, batch, kv_head, k_begin):
    """kv: the rows of k and v's slices (batch, kv_head) from key row k_begin on (or of dk
    and dv's, shaped alike)."""
    k_head_ptr, k_row_stride = head_rows(k, batch, kv_head, k_begin)
    v_head_ptr, v_row_stride = head_rows(v, batch, kv_head, k_begin)
    return k_head_ptr, v_head_ptr, k_row_stride, v_row_stride


@triton.jit
def query_grad_out_rows(q, grad_out, batch, head, q_begin):
    """q_do: the rows of q and grad_out's slices (batch, head) from query row q_begin on."""
    q_head_ptr, q_row_stride = head_rows(q, batch, head, q_begin)
    grad_out_head_ptr, grad_out_row_stride = head_rows(grad_out, batch, head, q_begin)
    return q_head_ptr, grad_out_head_ptr, q_row_stride, grad_out_row_stride


@triton.jit
def bias_slice(bias, batch, head, HAS_BIAS: tl.constexpr):
    """bias: slice (batch, head) of the bias with its row and column strides; without
    HAS_BIAS the placeholder pointer as it came (never read)."""
    bias_head_ptr = bias[0]
    if HAS_BIAS:
        bias_head_ptr = bias[0] + batch * bias[1] + head.to(tl.int64) * bias[2]
    return bias_head_ptr, bias[3], bias[4]


@triton.jit
def key_mask_row(key_mask, batch, HAS_KEY_MASK: tl.constexpr):
    """key_mask: row `batch` of the key mask with its column stride; without HAS_KEY_MASK
    the placeholder pointer as it came (never read)."""
    key_mask_ptr, key_mask_batch_stride, key_mask_col_stride = key_mask
    key_mask_row_ptr = key_mask_ptr
    if HAS_KEY_MASK:
        key_mask_row_ptr = key_mask_ptr + batch * key_mask_batch_stride
    return key_mask_row_ptr, key_mask_col_stride
