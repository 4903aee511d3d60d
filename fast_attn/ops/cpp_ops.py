"""Fake kernels for the C++ ops declared in csrc/schema.cpp.

torch.ops.fast_attn.attention_forward / attention_backward have a CPU
implementation (csrc/cpu) and, when built with CUDA, a CUDA one (csrc/cuda);
the forward's autograd is registered in C++ (csrc/attention_autograd.cpp).
Registering their fake kernels here makes them usable under
torch.compile(fullgraph=True).

Their schemas are those of fast_attn/ops/autograd.py followed by the score
modifiers (alibi_slopes, window_left, window_right, softcap), whose defaults
mean "none"; the outputs' shapes do not depend on them.
"""

from __future__ import annotations

import torch

from .. import _extension
from . import autograd

FORWARD_OP = "fast_attn::attention_forward"
BACKWARD_OP = "fast_attn::attention_backward"


def has_kernel_for(dispatch_key: str) -> bool:
    """Whether the built extension registered its forward op for "CPU" or "CUDA"."""
    if _extension.load()[0] is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD_OP, dispatch_key)


def forward_fake(
    q, k, v, bias, key_mask, dropout_seed, scale, causal, dropout_p,
    alibi_slopes=None, window_left=-1, window_right=-1, softcap=0.0,
):
    return autograd.forward_fake(q, k, v, bias, key_mask, dropout_seed, scale, causal, dropout_p)


def backward_fake(
    grad_out, grad_lse, q, k, v, bias, key_mask, dropout_seed, out, lse, scale, causal, dropout_p,
    compute_dbias, deterministic, alibi_slopes=None, window_left=-1, window_right=-1, softcap=0.0,
):
    return autograd.backward_fake(
        grad_out, grad_lse, q, k, v, bias, key_mask, dropout_seed, out, lse, scale, causal, dropout_p,
        compute_dbias, deterministic,
    )


if _extension.load()[0] is not None:
    torch.library.register_fake(FORWARD_OP)(forward_fake)
    torch.library.register_fake(BACKWARD_OP)(backward_fake)


def attention_forward(problem, dropout_seed):
    """Run the C++ forward op (CPU or CUDA implementation, by the tensors' device)."""
    window_left, window_right = problem.window if problem.window is not None else (-1, -1)
    return torch.ops.fast_attn.attention_forward(
        problem.q, problem.k, problem.v, problem.bias, problem.key_mask, dropout_seed,
        problem.scale, int(problem.causal), problem.dropout_p,
        problem.alibi_slopes, window_left, window_right, problem.softcap or 0.0,
    )
