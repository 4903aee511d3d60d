"""Pieces shared by every forward/backward op pair of the library (C++ and
Triton): output layout, fake kernels, and the autograd formula. The Triton ops
register this formula; the C++ ops carry the same one in C++
(csrc/attention_autograd.cpp), so that their training steps run no Python in
autograd. A change to one is a change to both.

Every forward op has the schema
    (q, k, v, bias?, key_mask?, dropout_seed?, scale, causal, dropout_p,
     alibi_slopes?=None, window_left=-1, window_right=-1, softcap=0.0,
     cu_seqlens_q?=None, cu_seqlens_k?=None, max_seqlen_q=-1, max_seqlen_k=-1) -> (out, lse)
and every backward op
    (grad_out, grad_lse?, q, k, v, bias?, key_mask?, dropout_seed?, out, lse,
     scale, causal, dropout_p, compute_dbias, deterministic,
     alibi_slopes?=None, window_left=-1, window_right=-1, softcap=0.0,
     cu_seqlens_q?=None, cu_seqlens_k?=None, max_seqlen_q=-1, max_seqlen_k=-1) -> (dq, dk, dv, dbias)
The score modifiers come next to last, with defaults that mean "none": window_left /
window_right -1 for an unbounded side (fast_attn.causal.visible_band), softcap
0.0 for none; alibi_slopes (float32 (B or 1, Hq)) get no gradient. The packed
sequences (varlen) come last: int32 (N + 1,) row offsets into q and k/v of batch 1,
and bounds on the sequences' lengths (-1: derived from the offsets); csrc/schema.cpp
says what they mean.
"""

from __future__ import annotations

import torch


def forward_op_arguments(problem, dropout_seed) -> tuple:
    """The positional arguments of every forward op for a validated AttentionProblem. Without score
    modifiers or packed sequences the trailing ones are left to the schema's defaults (each argument
    given costs the op call ~0.1 us of boxing)."""
    leading = (
        problem.q, problem.k, problem.v, problem.bias, problem.key_mask, dropout_seed,
        problem.scale, int(problem.causal), problem.dropout_p,
    )  # fmt: skip
    window, softcap, packed = problem.window, problem.softcap, problem.packed_sequences
    if window is None and softcap is None and problem.alibi_slopes is None and packed is None:
        return leading
    window_left, window_right = window if window is not None else (-1, -1)
    modifiers = (problem.alibi_slopes, window_left, window_right, softcap or 0.0)
    return (*leading, *modifiers, *(packed or NO_PACKED_SEQUENCES))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_bshd_like(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, S, D) tensor stored (B, S, H, D)-contiguous, as the kernels return."""
    batch, heads, seqlen, head_dim = t.shape
    return t.new_empty((batch, seqlen, heads, head_dim)).transpose(1, 2)


def forward_fake(q, *_):
    """Every forward op's fake kernel: out and lse as the kernels return them for q."""
    out = empty_bshd_like(q)
    lse = q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    return out, lse


def backward_fake(grad_out, grad_lse, q, k, v, bias, *rest):
    """Every backward op's fake kernel: dq, dk, dv as the kernels return them, and dbias in the
    bias's shape with compute_dbias (rest: the schema's arguments after bias)."""
    key_mask, dropout_seed, out, lse, scale, causal, dropout_p, compute_dbias, *_ = rest
    dbias = bias.new_empty(bias.shape) if compute_dbias else q.new_empty((0,))
    return empty_bshd_like(q), empty_bshd_like(k), empty_bshd_like(v), dbias


# The trailing arguments' defaults: no modifier (alibi_slopes, window_left, window_right,
# softcap), no packed sequences (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k).
TRAILING_DEFAULTS = (None, -1, -1, 0.0, None, None, -1, -1)
NO_PACKED_SEQUENCES = TRAILING_DEFAULTS[4:]


def setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, key_mask, dropout_seed, scale, causal, dropout_p, *given = inputs
    trailing = (*given, *TRAILING_DEFAULTS[len(given) :])
    alibi_slopes, ctx.window_left, ctx.window_right, ctx.softcap = trailing[:4]
    cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k = trailing[4:]
    out, lse = output
    saved = (q, k, v, bias, key_mask, dropout_seed, alibi_slopes, cu_seqlens_q, cu_seqlens_k, out, lse)
    ctx.save_for_backward(*saved)
    ctx.scale, ctx.causal, ctx.dropout_p = scale, causal, dropout_p


def make_backward(backward_op):
    """The autograd backward of a forward op, computed by `backward_op`."""

    def backward(ctx, grad_out, grad_lse):
        q, k, v, bias, key_mask, dropout_seed, alibi_slopes, cu_seqlens_q, cu_seqlens_k, out, lse = (
            ctx.saved_tensors
        )
        if grad_out is None or grad_out.numel() == 0:
            grad_out = torch.zeros_like(out)  # out's layout: a contiguous last dim even when empty
        elif grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        compute_dbias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = backward_op(
            grad_out, grad_lse, q, k, v, bias, key_mask, dropout_seed, out, lse,
            ctx.scale, ctx.causal, ctx.dropout_p, compute_dbias, torch.are_deterministic_algorithms_enabled(),
            alibi_slopes, ctx.window_left, ctx.window_right, ctx.softcap,
            cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k,
        )  # fmt: skip
        # key_mask, dropout_seed, the scalars, the modifiers and the packed sequences
        no_gradients = (None,) * 13
        return (dq, dk, dv, dbias if compute_dbias else None, *no_gradients)

    return backward


def register_fakes(forward_name: str, backward_name: str) -> None:
    """Register the fake kernels (output shapes for tracing) of an op pair."""
    torch.library.register_fake(forward_name)(forward_fake)
    torch.library.register_fake(backward_name)(backward_fake)
