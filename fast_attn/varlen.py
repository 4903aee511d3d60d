"""Packed variable-length sequences: many independent attention problems laid end to end."""

from __future__ import annotations

import torch

from . import dispatch
from .validation import build_varlen_problem, validate_call_options


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | torch.Tensor,
    max_seqlen_k: int | torch.Tensor,
    *,
    causal: bool | str = False,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention over sequences packed end to end, with no padding anywhere.

    q: (Tq, Hq, D); k, v: (Tk, Hkv, D), Hq % Hkv == 0. cu_seqlens_q, cu_seqlens_k: int32 (N + 1,)
    offsets starting at 0, never decreasing, ending at Tq and Tk: sequence n is rows
    cu_seqlens_q[n]:cu_seqlens_q[n + 1] of q and cu_seqlens_k[n]:cu_seqlens_k[n + 1] of k and v.
    Empty sequences are allowed. max_seqlen_q, max_seqlen_k: the longest sequence, an int or a 0-d
    tensor (never read with .item() under torch.compile: the op then derives it from the offsets).

    Each sequence is one problem of fast_attn.attention, with causal, window_size and ALiBi's
    distances aligned to that sequence; causal, window_size, softcap, sinks, scale and dropout_p
    mean what they mean there. alibi_slopes: float32 (Hq,) or (N, Hq). Dropout decides each score
    as the score of the packed (1, Hq, Tq, Tk) problem (fast_attn/dropout.py).

    Returns out (Tq, Hq, D) in q's dtype, and with return_lse=True also lse (Hq, Tq) (float32;
    float64 for float64 inputs); a row with no visible key gives 0 and lse -inf.

    Outside torch.compile the offsets are checked (on a GPU, one device-to-host copy per call);
    under torch.compile they are taken as given, and the kernels clamp them so that wrong
    offsets never read or write out of bounds.
    """
    validate_call_options(backend, return_lse)
    problem = build_varlen_problem(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        scale=scale,
        dropout_p=dropout_p,
    )
    out, lse = dispatch.run_problem(problem, backend)  # (1, Hq, Tq, D) stored (1, Tq, Hq, D), (1, Hq, Tq)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out
