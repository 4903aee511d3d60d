"""Attention sinks on any kernel's result: one extra logit in every row's softmax denominator, per head
(gpt-oss) or per query row (Inkling 2).

A kernel without sinks returns out = sum_j p_j v_j with p_j = exp(s_j - lse). Adding a sink logit
`sink` to the denominator gives lse' = logaddexp(lse, sink) and p'_j = p_j * exp(lse - lse'),
so out' = out * exp(lse - lse'): exact, one pass over out, and differentiable through lse (the
kernels' lse carries its gradient), which gives the sinks' gradient
dsink_bhi = exp(sink_bhi - lse'_bhi) * (grad_lse'_bhi - sum_d dO_bhid out'_bhid),
for a sink per head reduced over (b, i) by autograd's deterministic sum. A row without a visible key
keeps out 0 and gets lse' = sink.
"""

from __future__ import annotations

import torch


def apply_sinks(
    out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Sq, D) and lse (B, Hq, Sq) of a kernel without sinks -> those with sinks (Hq,) or
    (B, Hq, Sq)."""
    sink = sinks.to(lse.dtype) if sinks.dim() == 3 else sinks.to(lse.dtype)[None, :, None]  # (1|B, Hq, 1|Sq)
    lse_with_sink = torch.logaddexp(lse, sink.expand_as(lse))  # (B, Hq, Sq)
    weight = torch.exp(lse - lse_with_sink)  # the share of the keys, 0 for rows without keys
    out_with_sink = (out.to(lse.dtype) * weight[..., None]).to(out.dtype)
    return out_with_sink, lse_with_sink
