"""The C++ ops declared in csrc/schema.cpp: their fake kernels, and how Python calls them.

torch.ops.fast_attn.attention_forward / attention_backward have a CPU
implementation (csrc/cpu) and, when built with CUDA, a CUDA one (csrc/cuda);
the forward's autograd is registered in C++ (csrc/attention_autograd.cpp).
torch.ops.fast_attn.decode_forward (decoding against a KV cache, no backward) has a
CPU implementation (csrc/cpu/decode_cpu.cpp). Registering their fake kernels here
makes them usable under torch.compile(fullgraph=True). Outside torch.compile they are entered
through the extension's typed entries (csrc/bindings.cpp), which skip torch.ops' boxing.

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


# The extension module, whose typed entries (csrc/bindings.cpp) call the ops below; None without it,
# when nothing here is called.
_C = _extension.load()[0]

if _C is not None:
    autograd.register_fakes(FORWARD_OP, BACKWARD_OP)
    torch.library.register_fake(DECODE_OP)(decode_forward_fake)


def _call(name: str, arguments: tuple):
    """The op `name` on `arguments`, entered through the extension's typed entry of that name (~4 us
    less a call than torch.ops' boxed entry), except where the call must be seen from Python: under
    torch.compile, which traces torch.ops, and for tensors or modes with __torch_function__, which
    only torch.ops' entry consults. There the op's one overload is named: the packet would match the
    arguments against its overloads first (~0.8 us)."""
    if torch.compiler.is_compiling() or torch.overrides.has_torch_function(arguments):
        return getattr(torch.ops.fast_attn, name).default(*arguments)
    return getattr(_C, name)(*arguments)


def attention_forward(problem, dropout_seed):
    """Run the C++ forward op (CPU or CUDA implementation, by the tensors' device)."""
    return _call("attention_forward", autograd.forward_op_arguments(problem, dropout_seed))


def decode_forward(arguments: tuple):
    """Run the C++ decode op on the schema's arguments (csrc/schema.cpp), caches written in place."""
    return _call("decode_forward", arguments)
