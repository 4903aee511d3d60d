"""Helpers shared by the tests and the benchmarks: random problems, FLOP
counts, and the error rule every kernel is held to.

The error rule (DESIGN.md section 5): a kernel's max abs error against the
float64 reference is at most 2x the error of the same math done by PyTorch in
the kernel's dtype, plus a small floor. For gradients, "the same math" may also
be the float64 math of a flash-style backward whose delta_i = dO_i . O_i is summed
in float32 from the output as returned (rounded_output_reference): every fused
backward, FlashAttention-2's included, computes delta that way, and in a sharply
peaked softmax its rounding can cost more than unfused math in the same dtype
(which cancels exactly where a row sees one key).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .causal import CausalMode, causal_offset, parse_causal
from .reference import reference_attention

# Floors of the error rule by dtype: what rounding of the output alone costs.
ERROR_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 2e-3,
    torch.float16: 5e-4,
}


def random_qkv(
    batch: int,
    heads_q: int,
    heads_kv: int,
    seqlen_q: int,
    seqlen_k: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    requires_grad: bool = False,
    layout: str = "bhsd",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D).

    layout "bhsd" gives contiguous tensors; "bshd" gives (B, H, S, D) views of
    (B, S, H, D) memory, as transformers models hand over.
    """

    def make(heads: int, seqlen: int) -> torch.Tensor:
        if layout == "bshd":
            t = torch.randn(batch, seqlen, heads, head_dim, generator=generator, dtype=torch.float32)
            t = t.to(device=device, dtype=dtype).transpose(1, 2)
        elif layout == "bhsd":
            t = torch.randn(batch, heads, seqlen, head_dim, generator=generator, dtype=torch.float32)
            t = t.to(device=device, dtype=dtype)
        else:
            raise ValueError(f"layout must be 'bhsd' or 'bshd', got {layout!r}")
        return t.requires_grad_(requires_grad)

    return make(heads_q, seqlen_q), make(heads_kv, seqlen_k), make(heads_kv, seqlen_k)


def random_key_mask(
    batch: int, seqlen_k: int, *, device: str | torch.device = "cpu", keep: float = 0.7,
    empty_rows: tuple[int, ...] = (), generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool (B, Sk), True = attend; the batch rows in `empty_rows` attend nothing."""
    mask = torch.rand(batch, seqlen_k, generator=generator) < keep
    if seqlen_k > 0:
        mask[:, 0] = True  # every row keeps a key unless asked otherwise
    for row in empty_rows:
        mask[row] = False
    return mask.to(device)


def attention_flops(
    batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: object = False,
    mode: str = "fwd",
) -> float:
    """FLOPs of the field's convention: 4 * B * H * Sq * Sk * D for the forward,
    counting only visible pairs under a causal mask; backward is 2.5x forward."""
    pairs = float(seqlen_q) * seqlen_k
    causal_mode = parse_causal(causal)
    if causal_mode != CausalMode.NONE:
        offset = causal_offset(causal_mode, seqlen_q, seqlen_k)
        pairs = float(sum(max(0, min(seqlen_k, i + offset + 1)) for i in range(seqlen_q)))
    forward = 4.0 * batch * heads * pairs * head_dim
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
    return forward * factor


@dataclass
class ReferenceResults:
    """Outputs (and gradients, when computed) of one reference run."""

    out: torch.Tensor
    lse: torch.Tensor
    grads: dict[str, torch.Tensor]


def run_reference(
    inputs: dict[str, torch.Tensor | None], *, compute_dtype: torch.dtype, grad_out: torch.Tensor | None = None,
    grad_lse: torch.Tensor | None = None, **kwargs,
) -> ReferenceResults:
    """Reference on copies of `inputs` (q, k, v and any tensor argument of reference_attention: bias,
    key_mask, sinks, ...) cast to `compute_dtype` (alibi_slopes stay float32, as the contract
    has them); gradients of (out * grad_out).sum() (+ (lse * grad_lse).sum()) for the float inputs
    that require grad."""
    copies: dict[str, torch.Tensor | None] = {}
    for name, t in inputs.items():
        if t is None or not t.is_floating_point() or name == "alibi_slopes":
            copies[name] = t
        else:
            copies[name] = t.detach().to(compute_dtype).requires_grad_(t.requires_grad)
    tensor_arguments = {name: t for name, t in copies.items() if name not in ("q", "k", "v")}
    out, lse = reference_attention(
        copies["q"], copies["k"], copies["v"], compute_dtype=compute_dtype, **tensor_arguments, **kwargs
    )
    grads: dict[str, torch.Tensor] = {}
    wanted = {n: t for n, t in copies.items() if t is not None and t.is_floating_point() and t.requires_grad}
    if grad_out is not None and wanted:
        outputs, output_grads = [out], [grad_out.to(out.dtype)]
        if grad_lse is not None:
            outputs.append(lse)
            output_grads.append(grad_lse.to(lse.dtype))
        values = torch.autograd.grad(outputs, list(wanted.values()), output_grads)
        grads = dict(zip(wanted.keys(), values))
    return ReferenceResults(out=out, lse=lse, grads=grads)


def rounded_output_reference(
    inputs: dict[str, torch.Tensor | None], *, out_dtype: torch.dtype, grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None = None, fed_out: torch.Tensor | None = None, **kwargs,
) -> ReferenceResults:
    """Float64 gradients of a flash-style backward whose delta_i = dO_i . O_i is
    summed in the kernels' accumulation precision from the output rounded to
    out_dtype (or from fed_out, the forward's own output, which is what a
    backward kernel receives), while P is recomputed exactly. That changes
    dS_ij = P_ij (dP_ij - delta_i) by -P_ij (delta_i - exact delta_i), which is
    what that gradient on lse_i adds (d lse_i / d s_ij = P_ij): so this is the
    float64 reference with it as lse's gradient (added to grad_lse, the
    problem's own, when given)."""
    exact_out = run_reference(inputs, compute_dtype=torch.float64, **kwargs).out  # (B, H, Sq, D)
    accumulate = torch.float64 if out_dtype == torch.float64 else torch.float32
    rounded_out = exact_out.to(out_dtype) if fed_out is None else fed_out.detach().to(out_dtype)
    delta = (grad_out.to(accumulate) * rounded_out.to(accumulate)).sum(-1).double()  # (B, H, Sq)
    rounding_grad_lse = (grad_out.double() * exact_out).sum(-1) - delta
    if grad_lse is not None:
        rounding_grad_lse = rounding_grad_lse + grad_lse.double()
    return run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, grad_lse=rounding_grad_lse,
                         **kwargs)


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| in float64, treating matching infinities as equal and any NaN as inf."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    same_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    diff = torch.where(same_inf, torch.zeros_like(a), (a - e).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    return float(diff.max())


def assert_error_rule(
    name: str, actual: torch.Tensor, exact: torch.Tensor, same_dtype: torch.Tensor, dtype: torch.dtype,
    factor: float = 2.0, rounded_output: torch.Tensor | None = None,
) -> None:
    """Assert max|actual - exact| <= factor * max|same_dtype - exact| + floor(dtype);
    with rounded_output (a gradient of rounded_output_reference), the larger of
    the two baselines' errors counts."""
    kernel_error = max_abs_error(actual, exact)
    torch_error = max_abs_error(same_dtype, exact)
    if rounded_output is not None:
        rounding_error = max_abs_error(rounded_output, exact)
        if not math.isfinite(rounding_error):  # a NaN baseline would make any error pass
            raise AssertionError(f"{name}: the rounded-output baseline is not finite")
        torch_error = max(torch_error, rounding_error)
    scale = max(1.0, float(exact.detach().abs().max())) if exact.numel() else 1.0
    bound = factor * torch_error + ERROR_FLOOR[dtype] * scale
    if not kernel_error <= bound:
        raise AssertionError(
            f"{name}: max error {kernel_error:.3e} vs float64 exceeds {bound:.3e} "
            f"({factor} x the baseline's {dtype} error {torch_error:.3e} + floor)"
        )
