"""Fake kernels for the C++ ops declared in csrc/schema.cpp.

torch.ops.fast_attn.attention_forward / attention_backward have a CPU
implementation (csrc/cpu) and, when built with CUDA, a CUDA one (csrc/cuda);
the forward's autograd is registered in C++ (csrc/attention_autograd.cpp).
torch.ops.fast_attn.decode_forward (decoding against a KV cache, no backward) has a
CPU implementation (csrc/cpu/decode_cpu.cpp). Registering their fake kernels here
makes them usable under torch.compile(fullgraph=True).

The attention ops' schemas are those of fast_attn/ops/autograd.py; decode_forward's is
in csrc/schema.cpp.
"""

from __future__ import annotations

import torch

from .. import _extension
from . import autograd

FORWARD_OP = "fast_attn::attention_forward"
BACKWARD_OP = "fast_attn::attention_backward"
DECODE_OP = "fast_attn::decode_forward"


def has_kernel_for(dispatch_key: str) -> bool:
    """Whether the built extension registered its forward op for "CPU" or "CUDA"."""
    if _extension.load()[0] is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD_OP, dispatch_key)


def decode_forward_fake(
    q,
    k_cache,
    v_cache,
    k_new,
    v_new,
    cache_seqlens,
    cache_leftpad,
    block_table,
    cache_batch_idx,
    scale,
    causal,
    alibi_slopes,
    window_left,
    window_right,
    softcap,
    num_splits,
):
    """out (B, Sq, Hq, D) contiguous in q's dtype, lse (B, Hq, Sq) float32 (float64 for float64);
    k_cache and v_cache are written in place (no output aliases them)."""
    batch, seqlen_q, heads_q, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=autograd.accumulation_dtype(q.dtype))
    return out, lse


if _extension.load()[0] is not None:
    autograd.register_fakes(FORWARD_OP, BACKWARD_OP)
    torch.library.register_fake(DECODE_OP)(decode_forward_fake)


def attention_forward(problem, dropout_seed):
    """Run the C++ forward op (CPU or CUDA implementation, by the tensors' device). Its one overload is
    called directly: the packet would match the arguments against its overloads first (~0.8 us)."""
    return torch.ops.fast_attn.attention_forward.default(
        *autograd.forward_op_arguments(problem, dropout_seed)
    )
