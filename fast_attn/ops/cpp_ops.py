"""Fake kernels for the C++ ops declared in csrc/schema.cpp.

torch.ops.fast_attn.attention_forward / attention_backward have a CPU
implementation (csrc/cpu) and, when built with CUDA, a CUDA one (csrc/cuda);
the forward's autograd is registered in C++ (csrc/attention_autograd.cpp).
Registering their fake kernels here makes them usable under
torch.compile(fullgraph=True).

Their schemas are those of fast_attn/ops/autograd.py.
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


if _extension.load()[0] is not None:
    autograd.register_fakes(FORWARD_OP, BACKWARD_OP)


def attention_forward(problem, dropout_seed):
    """Run the C++ forward op (CPU or CUDA implementation, by the tensors' device)."""
    return torch.ops.fast_attn.attention_forward(*autograd.forward_op_arguments(problem, dropout_seed))
