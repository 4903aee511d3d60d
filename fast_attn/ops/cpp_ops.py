"""Fake kernels and autograd for the C++ ops declared in csrc/schema.cpp.

torch.ops.fast_attn.attention_forward / attention_backward have a CPU
implementation (csrc/cpu) and, when built with CUDA, a CUDA one (csrc/cuda).
Registering their fake kernels and autograd here makes them usable under
torch.compile(fullgraph=True) and in training.
"""

from __future__ import annotations

import torch

from .. import _extension


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_bshd_like(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, S, D) tensor stored (B, S, H, D)-contiguous, as the kernels return."""
    batch, heads, seqlen, head_dim = t.shape
    return t.new_empty((batch, seqlen, heads, head_dim)).transpose(1, 2)


def _forward_fake(q, k, v, bias, key_mask, dropout_seed, scale, causal, dropout_p):
    out = empty_bshd_like(q)
    lse = q.new_empty(q.shape[:3], dtype=_accumulation_dtype(q.dtype))
    return out, lse


def _backward_fake(
    grad_out, grad_lse, q, k, v, bias, key_mask, dropout_seed, out, lse, scale, causal, dropout_p,
    compute_dbias, deterministic,
):
    dbias = bias.new_empty(bias.shape) if compute_dbias else q.new_empty((0,))
    return empty_bshd_like(q), empty_bshd_like(k), empty_bshd_like(v), dbias


def setup_attention_context(ctx, inputs, output) -> None:
    """Shared by the C++ and Triton forward ops, whose inputs have the same schema."""
    q, k, v, bias, key_mask, dropout_seed, scale, causal, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, key_mask, dropout_seed, out, lse)
    ctx.scale, ctx.causal, ctx.dropout_p = scale, causal, dropout_p


def make_attention_backward(backward_op):
    """Autograd backward for a forward op, calling `backward_op` (same schema as attention_backward)."""

    def backward(ctx, grad_out, grad_lse):
        q, k, v, bias, key_mask, dropout_seed, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        elif grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        compute_dbias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = backward_op(
            grad_out, grad_lse, q, k, v, bias, key_mask, dropout_seed, out, lse,
            ctx.scale, ctx.causal, ctx.dropout_p, compute_dbias,
            torch.are_deterministic_algorithms_enabled(),
        )
        return dq, dk, dv, (dbias if compute_dbias else None), None, None, None, None, None

    return backward


def _register() -> None:
    module, _ = _extension.load()
    if module is None:
        return
    torch.library.register_fake("fast_attn::attention_forward")(_forward_fake)
    torch.library.register_fake("fast_attn::attention_backward")(_backward_fake)
    torch.library.register_autograd(
        "fast_attn::attention_forward",
        make_attention_backward(torch.ops.fast_attn.attention_backward),
        setup_context=setup_attention_context,
    )


_register()


def attention_forward(problem, dropout_seed):
    """Run the C++ forward op (CPU or CUDA implementation, by the tensors' device)."""
    return torch.ops.fast_attn.attention_forward(
        problem.q, problem.k, problem.v, problem.bias, problem.key_mask, dropout_seed,
        problem.scale, int(problem.causal), problem.dropout_p,
    )
