"""Helpers shared by the tests and the benchmarks: random problems, FLOP
counts, the error rule every kernel is held to, and the one harness that holds
a kernel to it (Case, check_against_reference).

The error rule: a kernel's max abs error against the float64 reference is at
most 2x the error of the same math done by PyTorch in the kernel's dtype, plus
a small floor (ERROR_FLOOR, what rounding the output alone costs). For gradients, "the same math" may also
be the float64 math of a flash-style backward whose delta_i = dO_i . O_i is summed
in float32 from the output as returned (rounded_output_reference): every fused
backward, FlashAttention-2's included, computes delta that way, and in a sharply
peaked softmax its rounding can cost more than unfused math in the same dtype
(which cancels exactly where a row sees one key).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import dispatch
from .causal import parse_causal, visible_band
from .decode import decode_attention
from .dropout import new_dropout_seed
from .functional import attention
from .ops.autograd import accumulation_dtype
from .ops.sinks import apply_sinks
from .reference import reference_attention, reference_decode_attention, reference_varlen_attention
from .validation import build_problem, build_varlen_problem
from .varlen import varlen_attention

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
    batch: int,
    seqlen_k: int,
    *,
    device: str | torch.device = "cpu",
    keep: float = 0.7,
    empty_rows: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool (B, Sk), True = attend; the batch rows in `empty_rows` attend nothing."""
    mask = torch.rand(batch, seqlen_k, generator=generator) < keep
    if seqlen_k > 0:
        mask[:, 0] = True  # every row keeps a key unless asked otherwise
    for row in empty_rows:
        mask[row] = False
    return mask.to(device)


def attention_flops(
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    head_dim: int,
    causal: object = False,
    mode: str = "fwd",
    window_size: tuple[int, int] | None = None,
) -> float:
    """FLOPs of the field's convention: 4 * B * H * Sq * Sk * D for the forward,
    counting only visible pairs under a causal mask or window; backward is 2.5x forward."""
    pairs = float(seqlen_q) * seqlen_k
    band = visible_band(parse_causal(causal), window_size, seqlen_q, seqlen_k)
    if band is not None:
        pairs = 0.0
        for i in range(seqlen_q):
            first = 0 if band.left < 0 else max(0, i + band.offset - band.left)
            last = seqlen_k - 1 if band.right < 0 else min(seqlen_k - 1, i + band.offset + band.right)
            pairs += max(0, last - first + 1)
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
    inputs: dict[str, torch.Tensor | None],
    *,
    compute_dtype: torch.dtype,
    grad_out: torch.Tensor | None = None,
    grad_lse: torch.Tensor | None = None,
    **kwargs,
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
    inputs: dict[str, torch.Tensor | None],
    *,
    out_dtype: torch.dtype,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None = None,
    fed_out: torch.Tensor | None = None,
    **kwargs,
) -> ReferenceResults:
    """Float64 gradients of a flash-style backward whose delta_i = dO_i . O_i is
    summed in the kernels' accumulation precision from the output rounded to
    out_dtype (or from fed_out, the forward's own output, which is what a
    backward kernel receives), while P is recomputed exactly. That changes
    dS_ij = P_ij (dP_ij - delta_i) by -P_ij (delta_i - exact delta_i), which is
    what that gradient on lse_i adds (d lse_i / d s_ij = P_ij): so this is the
    float64 reference with it as lse's gradient (added to grad_lse, the
    problem's own, when given). With sinks, see _rounded_output_reference_with_sinks."""
    if inputs.get("sinks") is not None:
        return _rounded_output_reference_with_sinks(
            inputs, out_dtype=out_dtype, grad_out=grad_out, grad_lse=grad_lse, **kwargs
        )
    exact_out = run_reference(inputs, compute_dtype=torch.float64, **kwargs).out  # (B, H, Sq, D)
    accumulate = torch.float64 if out_dtype == torch.float64 else torch.float32
    rounded_out = exact_out.to(out_dtype) if fed_out is None else fed_out.detach().to(out_dtype)
    delta = (grad_out.to(accumulate) * rounded_out.to(accumulate)).sum(-1).double()  # (B, H, Sq)
    rounding_grad_lse = (grad_out.double() * exact_out).sum(-1) - delta
    if grad_lse is not None:
        rounding_grad_lse = rounding_grad_lse + grad_lse.double()
    return run_reference(
        inputs, compute_dtype=torch.float64, grad_out=grad_out, grad_lse=rounding_grad_lse, **kwargs
    )


def _rounded_output_reference_with_sinks(
    inputs: dict[str, torch.Tensor | None],
    *,
    out_dtype: torch.dtype,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    **kwargs,
) -> ReferenceResults:
    """rounded_output_reference for kernels whose sinks are applied to their result afterwards
    (fast_attn/ops/sinks.py): the kernel's backward sums delta_i from its own output before the
    sinks, rounded to out_dtype, against the gradient that reaches it through the sinks
    (grad_out * weight, rounded to out_dtype as apply_sinks hands it over). So the float64 reference
    runs in the same two steps, and the rounding's error enters as a gradient on the lse before the
    sinks. The kernel's own output is not used: it is only known after the sinks."""
    copies = {
        name: t.detach().double().requires_grad_(t.requires_grad)
        if t is not None and t.is_floating_point() and name != "alibi_slopes"
        else t
        for name, t in inputs.items()
    }
    sinks = copies["sinks"]
    others = {name: t for name, t in copies.items() if name not in ("q", "k", "v", "sinks")}
    out_before, lse_before = reference_attention(
        copies["q"], copies["k"], copies["v"], compute_dtype=torch.float64, **others, **kwargs
    )  # (B, H, Sq, D), (B, H, Sq)
    exact_before = out_before.detach()
    rounded_before = exact_before.to(out_dtype).double()
    # The sinks see the kernel's rounded output (their gradient and the lse's gradient they hand the
    # kernel are computed from it); gradients flow on as through the exact one.
    out, lse = apply_sinks(out_before + (rounded_before - exact_before), lse_before, sinks)
    accumulate = torch.float64 if out_dtype == torch.float64 else torch.float32
    weight = torch.exp(lse_before - lse).detach().to(accumulate)
    grad_into_kernel = (grad_out.to(accumulate) * weight[..., None]).to(out_dtype)
    delta = (grad_into_kernel.to(accumulate) * rounded_before.to(accumulate)).sum(-1).double()
    rounding_grad_lse = (grad_into_kernel.double() * exact_before).sum(-1) - delta
    outputs, output_grads = [out], [grad_out.double()]
    for output, output_grad in ((lse_before, rounding_grad_lse), (lse, grad_lse)):
        if output_grad is not None and output.requires_grad:
            outputs.append(output)
            output_grads.append(output_grad.double())
    wanted = {n: t for n, t in copies.items() if t is not None and t.is_floating_point() and t.requires_grad}
    grads = torch.autograd.grad(outputs, list(wanted.values()), output_grads)
    return ReferenceResults(out=out, lse=lse, grads=dict(zip(wanted.keys(), grads)))


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
    name: str,
    actual: torch.Tensor,
    exact: torch.Tensor,
    same_dtype: torch.Tensor,
    dtype: torch.dtype,
    factor: float = 2.0,
    rounded_output: torch.Tensor | None = None,
) -> None:
    """Assert max|actual - exact| <= factor * max|same_dtype - exact| + floor(dtype);
    with rounded_output (a gradient of rounded_output_reference), the larger of
    the two baselines' errors counts."""
    kernel_error = max_abs_error(actual, exact)
    torch_error = max_abs_error(same_dtype, exact)
    if not math.isfinite(torch_error):  # a NaN reference or baseline would make any error pass
        raise AssertionError(f"{name}: the {dtype} baseline's error against float64 is not finite")
    if rounded_output is not None:
        rounding_error = max_abs_error(rounded_output, exact)
        if not math.isfinite(rounding_error):
            raise AssertionError(f"{name}: the rounded-output baseline is not finite")
        torch_error = max(torch_error, rounding_error)
    scale = max(1.0, float(exact.detach().abs().max())) if exact.numel() else 1.0
    bound = factor * torch_error + ERROR_FLOOR[dtype] * scale
    if not kernel_error <= bound:
        raise AssertionError(
            f"{name}: max error {kernel_error:.3e} vs float64 exceeds {bound:.3e} "
            f"({factor} x the baseline's {dtype} error {torch_error:.3e} + floor)"
        )


GRAD_INPUTS = ("q", "k", "v", "bias")  # the inputs the backward ops differentiate
DIFFERENTIABLE_INPUTS = (*GRAD_INPUTS, "sinks")  # sinks: through fast_attn/ops/sinks.py


@dataclass(frozen=True)
class Case:
    """One attention problem a test holds to the reference, its options named as in fast_attn.attention."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    causal: bool | str = False
    scale: float | None = None
    bias_shape: tuple[int, ...] | None = None  # the bias's own shape, broadcastable to (B, Hq, Sq, Sk)
    bias_dtype: torch.dtype | None = None  # None: dtype
    bias_inf_fraction: float = 0.0  # this share of bias entries is -inf, and query row 0 if the bias has rows
    key_mask: bool = False  # a bool (B, Sk) mask, True = attend (random_key_mask)
    keys_kept: float = 0.7  # with key_mask: the chance that a key is visible (key 0 always is)
    empty_key_rows: tuple[int, ...] = ()  # with key_mask: batch rows that attend no key
    window_size: tuple[int, int] | None = None
    softcap: float | None = None
    alibi: str | None = None  # "h": slopes (Hq,); "bh": slopes (B, Hq)
    sinks: bool | str = False  # True: a random logit per head, N(0, 2^2), in dtype; "row": one per query row
    dropout_p: float = 0.0
    dropout_seed: int | None = None  # None: drawn from torch's generator
    # "bhsd"; "bshd": (B, H, S, D) views of (B, S, H, D) memory; "packed": q, k, v views of one
    # (B, S, 3, H, D) tensor; "misaligned": "bhsd" starting one element into its storage
    layout: str = "bhsd"
    grads: tuple[str, ...] = DIFFERENTIABLE_INPUTS  # the inputs that require grad
    grad_lse: bool = False  # the loss has a random gradient on lse too
    deterministic: bool = False  # the backward op's flag (fast_attn.attention follows torch's setting)

    def __str__(self) -> str:
        parts = [
            f"B{self.batch}H{self.heads_q}/{self.heads_kv}",
            f"S{self.seqlen_q}x{self.seqlen_k}",
            f"D{self.head_dim}",
            str(self.dtype).replace("torch.", ""),
        ]
        flags = {
            "causal": ["", "tl", "br"][parse_causal(self.causal)],
            "scale": f"scale{self.scale}" if self.scale is not None else "",
            "bias": "x".join(map(str, self.bias_shape)) if self.bias_shape else "",
            "bias_dtype": str(self.bias_dtype).replace("torch.", "") + "bias" if self.bias_dtype else "",
            "inf": "inf" if self.bias_inf_fraction else "",
            "mask": "mask" + "".join(f"-empty{row}" for row in self.empty_key_rows) if self.key_mask else "",
            "window": f"w{self.window_size[0]}_{self.window_size[1]}" if self.window_size else "",
            "softcap": f"cap{self.softcap}" if self.softcap else "",
            "alibi": f"alibi{self.alibi}" if self.alibi else "",
            "sinks": {False: "", True: "sinks", "row": "rowsinks"}[self.sinks],
            "drop": f"p{self.dropout_p}" if self.dropout_p else "",
            "layout": self.layout if self.layout != "bhsd" else "",
            "grads": "grads-" + "".join(self.grads) if self.grads != DIFFERENTIABLE_INPUTS else "",
            "glse": "glse" if self.grad_lse else "",
            "det": "det" if self.deterministic else "",
        }
        return "-".join(parts + [v for v in flags.values() if v])

    @classmethod
    def of_inputs(cls, inputs: dict, **options) -> Case:
        """The case posed by tensors a test built itself, with `options` (causal, scale, ...)."""
        (batch, heads_q, seqlen_q, head_dim), (heads_kv, seqlen_k) = inputs["q"].shape, inputs["k"].shape[1:3]
        return cls(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, inputs["q"].dtype, **options)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    def make_inputs(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor | None]:
        """Fresh random q, k, v, bias, key_mask, alibi_slopes, sinks and dropout_seed; those named in
        `grads` require grad."""
        if self.layout == "packed":
            assert self.heads_q == self.heads_kv and self.seqlen_q == self.seqlen_k
            qkv = torch.randn(self.batch, self.seqlen_q, 3, self.heads_q, self.head_dim)
            qkv = qkv.to(device, self.dtype)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        else:
            q, k, v = random_qkv(
                self.batch,
                self.heads_q,
                self.heads_kv,
                self.seqlen_q,
                self.seqlen_k,
                self.head_dim,
                dtype=self.dtype,
                device=device,
                layout="bhsd" if self.layout == "misaligned" else self.layout,
            )
            if self.layout == "misaligned":
                q, k, v = (_misaligned_copy(t) for t in (q, k, v))
        bias = None
        if self.bias_shape is not None:
            bias = torch.randn(self.bias_shape)
            if self.bias_inf_fraction:
                bias = bias.masked_fill(torch.rand(self.bias_shape) < self.bias_inf_fraction, -math.inf)
                if self.bias_shape[-2] > 1:
                    bias[..., 0, :] = -math.inf  # query row 0 sees no key through the bias
            bias = bias.to(device, self.bias_dtype or self.dtype)
        key_mask = None
        if self.key_mask:
            key_mask = random_key_mask(
                self.batch, self.seqlen_k, device=device, keep=self.keys_kept, empty_rows=self.empty_key_rows
            )
        dropout_seed = None
        if self.dropout_p > 0:
            dropout_seed = (
                new_dropout_seed(torch.device(device))
                if self.dropout_seed is None
                else torch.tensor([self.dropout_seed], dtype=torch.int64, device=device)
            )
        alibi_slopes = None
        if self.alibi is not None:
            shape = {"h": (self.heads_q,), "bh": (self.batch, self.heads_q)}[self.alibi]
            alibi_slopes = torch.rand(shape).to(device)
        sinks = None
        if self.sinks:
            shape = (self.batch, self.heads_q, self.seqlen_q) if self.sinks == "row" else (self.heads_q,)
            sinks = (torch.randn(shape) * 2).to(device, self.dtype)
        inputs = {
            "q": q,
            "k": k,
            "v": v,
            "bias": bias,
            "key_mask": key_mask,
            "alibi_slopes": alibi_slopes,
            "sinks": sinks,
            "dropout_seed": dropout_seed,
        }
        for name in DIFFERENTIABLE_INPUTS:
            if inputs[name] is not None:
                inputs[name].requires_grad_(name in self.grads)
        return inputs


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


# A kernel under test: (case, inputs, grad_out, grad_lse or None) -> (out, lse, {name: gradient}) with the
# gradients of <out, grad_out> (+ <lse, grad_lse>) for the inputs that require grad.
Run = Callable[[Case, dict, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, dict]]


def wanted_grads(inputs: dict) -> list[str]:
    return [n for n in DIFFERENTIABLE_INPUTS if inputs.get(n) is not None and inputs[n].requires_grad]


def attention_options(case: Case, inputs: dict) -> dict:
    """fast_attn.attention's keyword arguments (dropout's aside) for `case` on `inputs`."""
    return dict(
        bias=inputs["bias"],
        key_mask=inputs["key_mask"],
        causal=case.causal,
        window_size=case.window_size,
        softcap=case.softcap,
        alibi_slopes=inputs.get("alibi_slopes"),
        sinks=inputs.get("sinks"),
        scale=case.scale,
    )


def attention_runner(backend: str) -> Run:
    """fast_attn.attention on `backend`, gradients through autograd. With dropout, the
    backend's own forward op, given the case's seed so that the reference drops the same scores."""

    def run(case: Case, inputs: dict, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):
        q, k, v = (inputs[n] for n in ("q", "k", "v"))
        options = attention_options(case, inputs)
        if case.dropout_p > 0:
            problem = build_problem(q, k, v, dropout_p=case.dropout_p, **options)
            out, lse = dispatch.BACKENDS[backend].run(problem, inputs["dropout_seed"])
        else:
            out, lse = attention(q, k, v, return_lse=True, backend=backend, **options)
        wanted = wanted_grads(inputs)
        if not wanted:
            return out, lse, {}
        outputs, output_grads = [out], [grad_out]
        if grad_lse is not None:
            outputs, output_grads = [out, lse], [grad_out, grad_lse]
        grads = torch.autograd.grad(outputs, [inputs[n] for n in wanted], output_grads)
        return out, lse, dict(zip(wanted, grads))

    return run


def backend_device(backend: str) -> str:
    """The device a kernel backend is tested on: its GPU when there is one."""
    gpu = "cuda" in dispatch.BACKENDS[backend].device_types and torch.cuda.is_available()
    return "cuda" if gpu else "cpu"


@dataclass
class Checked:
    """What check_against_reference ran, for a test's own further assertions."""

    inputs: dict
    out: torch.Tensor
    lse: torch.Tensor
    grads: dict[str, torch.Tensor]


def check_against_reference(
    run: Run,
    case: Case,
    device: str | torch.device = "cpu",
    *,
    inputs: dict | None = None,
    rounded_output: str | None = None,
) -> Checked:
    """Run `case` (or `inputs`, tensors a test built for it) through `run`; hold out, lse and
    every gradient to the error rule against the float64 reference.

    rounded_output adds rounded_output_reference as the gradients' second baseline, with delta
    summed from the exact output rounded to the dtype ("exact") or from the kernel's own ("kernel").
    """
    inputs = case.make_inputs(device) if inputs is None else inputs
    q, dtype = inputs["q"], case.dtype
    grad_out = torch.randn(q.shape, device=q.device).to(dtype)
    grad_lse = None
    if case.grad_lse:
        grad_lse = torch.randn(q.shape[:3], device=q.device, dtype=accumulation_dtype(dtype))
    out, lse, grads = run(case, inputs, grad_out, grad_lse)
    assert out.shape == q.shape and out.dtype == dtype, f"{case}: out {tuple(out.shape)} {out.dtype}"
    assert lse.shape == q.shape[:3] and lse.dtype == accumulation_dtype(dtype), f"{case}: lse {lse.dtype}"

    reference_inputs = {
        n: inputs.get(n) for n in ("q", "k", "v", "bias", "key_mask", "alibi_slopes", "sinks")
    }
    options = {n: getattr(case, n) for n in ("causal", "window_size", "softcap", "scale", "dropout_p")}
    options.update(dropout_seed=inputs.get("dropout_seed"), grad_out=grad_out, grad_lse=grad_lse)
    exact = run_reference(reference_inputs, compute_dtype=torch.float64, **options)
    same_dtype = run_reference(reference_inputs, compute_dtype=dtype, **options)
    assert_error_rule(f"{case} out", out, exact.out, same_dtype.out, dtype)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact.lse)), f"{case}: rows with lse = -inf differ"
    assert_error_rule(f"{case} lse", lse, exact.lse, same_dtype.lse, dtype)

    assert set(grads) == set(exact.grads), f"{case}: gradients of {sorted(grads)}, not {sorted(exact.grads)}"
    rounded_grads = {}
    if grads and rounded_output is not None:
        fed_out = {"exact": None, "kernel": out}[rounded_output]
        rounded = rounded_output_reference(reference_inputs, out_dtype=dtype, fed_out=fed_out, **options)
        rounded_grads = rounded.grads
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, f"{case}: d{name}"
        assert not torch.isnan(grad).any(), f"{case}: d{name} has NaN"
        assert_error_rule(
            f"{case} d{name}",
            grad,
            exact.grads[name],
            same_dtype.grads[name],
            dtype,
            rounded_output=rounded_grads.get(name),
        )
    return Checked(inputs, out, lse, grads)


def _modifier_op_arguments(case: Case, inputs: dict) -> tuple:
    """The ops' trailing arguments: alibi_slopes (B or 1, Hq), window_left, window_right, softcap."""
    if case.sinks:
        raise ValueError(f"{case}: sinks are applied to an op's result, not passed to the op")
    slopes = inputs.get("alibi_slopes")
    slopes = slopes if slopes is None or slopes.dim() == 2 else slopes[None]
    left, right = case.window_size if case.window_size is not None else (-1, -1)
    return slopes, left, right, case.softcap or 0.0


def forward_op_arguments(case: Case, inputs: dict) -> tuple:
    """The positional arguments of every forward op (fast_attn.ops.autograd's schema) for `case`."""
    return (
        *(inputs[n] for n in ("q", "k", "v", "bias", "key_mask", "dropout_seed")),
        case.softmax_scale,
        int(parse_causal(case.causal)),
        case.dropout_p,
        *_modifier_op_arguments(case, inputs),
    )


def backward_op_arguments(case: Case, inputs: dict, out, lse, grad_out, grad_lse) -> tuple:
    """The positional arguments of every backward op for `case`, its forward's out and lse, and
    the gradients of those."""
    q, k, v, bias = (None if inputs[n] is None else inputs[n].detach() for n in ("q", "k", "v", "bias"))
    return (
        grad_out,
        grad_lse,
        q,
        k,
        v,
        bias,
        inputs["key_mask"],
        inputs["dropout_seed"],
        out.detach(),
        lse.detach(),
        case.softmax_scale,
        int(parse_causal(case.causal)),
        case.dropout_p,
        bias is not None,
        case.deterministic,
        *_modifier_op_arguments(case, inputs),
    )


def opcheck_forward_and_backward(
    forward_op,
    backward_op,
    case: Case,
    device: str = "cpu",
    *,
    forward_utils: tuple[str, ...] | None = None,
    backward_utils: tuple[str, ...] | None = None,
) -> None:
    """torch.library.opcheck of a forward op and of its backward op on `case`'s inputs
    (the given opcheck test_utils, or all of them)."""
    inputs = case.make_inputs(device)
    forward_args = forward_op_arguments(case, inputs)
    torch.library.opcheck(forward_op.default, forward_args, **_test_utils(forward_utils))
    out, lse = forward_op(*forward_args)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    backward_args = backward_op_arguments(case, inputs, out, lse, grad_out, grad_lse)
    torch.library.opcheck(backward_op.default, backward_args, **_test_utils(backward_utils))


def _test_utils(utils: tuple[str, ...] | None) -> dict:
    return {} if utils is None else {"test_utils": utils}


def _score_options(case, inputs: dict) -> dict:
    """A case's causal, window_size and softcap with its inputs' alibi_slopes and sinks, as keywords."""
    return dict(
        causal=case.causal,
        window_size=case.window_size,
        softcap=case.softcap,
        alibi_slopes=inputs["alibi_slopes"],
        sinks=inputs["sinks"],
    )


@dataclass(frozen=True)
class VarlenCase:
    """Packed sequences a test holds to the reference run per sequence, its options named as in
    fast_attn.varlen_attention."""

    lengths_q: tuple[int, ...]
    lengths_k: tuple[int, ...] | None = None  # None: lengths_q
    heads_q: int = 2
    heads_kv: int = 1
    head_dim: int = 16
    dtype: torch.dtype = torch.float32
    causal: bool | str = False
    window_size: tuple[int, int] | None = None
    softcap: float | None = None
    alibi: str | None = None  # "h": slopes (Hq,); "nh": slopes (N, Hq)
    sinks: bool = False
    dropout_p: float = 0.0
    strided: bool = False  # q, k, v are slices of wider tensors (no contiguous row stride)
    max_seqlen_tensor: bool = False  # max_seqlen_* given as 0-d tensors

    def __str__(self) -> str:
        lengths = "_".join(map(str, self.lengths_q))
        if self.lengths_k is not None:
            lengths += "x" + "_".join(map(str, self.lengths_k))
        options = {
            "causal": ["", "tl", "br"][parse_causal(self.causal)],
            "window": f"w{self.window_size[0]}_{self.window_size[1]}" if self.window_size else "",
            "softcap": f"cap{self.softcap}" if self.softcap else "",
            "alibi": f"alibi{self.alibi}" if self.alibi else "",
            "sinks": "sinks" if self.sinks else "",
            "drop": f"p{self.dropout_p}" if self.dropout_p else "",
            "strided": "strided" if self.strided else "",
            "max": "maxtensor" if self.max_seqlen_tensor else "",
        }
        parts = [f"L{lengths}", f"H{self.heads_q}/{self.heads_kv}", f"D{self.head_dim}", str(self.dtype)[6:]]
        return "-".join(parts + [v for v in options.values() if v])

    def make_inputs(self, device: str | torch.device = "cpu") -> dict:
        """Random packed q (Tq, Hq, D), k, v (Tk, Hkv, D) requiring grad, the offsets, the bounds,
        alibi_slopes and sinks."""
        lengths_k = self.lengths_q if self.lengths_k is None else self.lengths_k
        width = 2 if self.strided else 1

        def packed(total: int, heads: int) -> torch.Tensor:
            wide = torch.randn(total, heads * width, self.head_dim).to(device, self.dtype)
            return wide[:, ::width].requires_grad_(True)  # a view when strided: leaf of its own

        def offsets(lengths: tuple[int, ...]) -> torch.Tensor:
            return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)

        def bound(lengths: tuple[int, ...]) -> int | torch.Tensor:
            longest = max(lengths, default=0)
            return torch.tensor(longest) if self.max_seqlen_tensor else longest

        num_sequences = len(self.lengths_q)
        slopes = None
        if self.alibi is not None:
            shape = {"h": (self.heads_q,), "nh": (num_sequences, self.heads_q)}[self.alibi]
            slopes = torch.rand(shape).to(device)
        sinks = (
            (torch.randn(self.heads_q) * 2).to(device, self.dtype).requires_grad_(True)
            if self.sinks
            else None
        )
        return {
            "q": packed(sum(self.lengths_q), self.heads_q),
            "k": packed(sum(lengths_k), self.heads_kv),
            "v": packed(sum(lengths_k), self.heads_kv),
            "cu_seqlens_q": offsets(self.lengths_q),
            "cu_seqlens_k": offsets(lengths_k),
            "max_seqlen_q": bound(self.lengths_q),
            "max_seqlen_k": bound(lengths_k),
            "alibi_slopes": slopes,
            "sinks": sinks,
        }

    def options(self, inputs: dict) -> dict:
        """varlen_attention's keywords (but dropout_p) for these inputs."""
        return _score_options(self, inputs)


VARLEN_POSITIONAL = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def check_varlen_against_reference(
    backend: str, case: VarlenCase, device: str | torch.device = "cpu"
) -> None:
    """fast_attn.varlen_attention on `backend` against the float64 reference run per sequence:
    out, lse and the gradients of q, k, v (and sinks) by the error rule. With dropout, the
    backend runs with a known seed so that the reference drops the same scores."""
    inputs = case.make_inputs(device)
    positional = [inputs[n] for n in VARLEN_POSITIONAL]
    seed = new_dropout_seed(torch.device(device)) if case.dropout_p > 0 else None
    if seed is None:
        out, lse = varlen_attention(*positional, **case.options(inputs), return_lse=True, backend=backend)
    else:
        problem = build_varlen_problem(*positional, dropout_p=case.dropout_p, **case.options(inputs))
        out4, lse3 = dispatch.BACKENDS[backend].run(problem, seed)
        out, lse = out4[0].transpose(0, 1), lse3[0]
    q, dtype = inputs["q"], case.dtype
    assert out.shape == q.shape and out.dtype == dtype, f"{case}: out {tuple(out.shape)} {out.dtype}"
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == accumulation_dtype(dtype), f"{case}: lse"
    grad_out = torch.randn(q.shape, device=q.device).to(dtype)
    grad_lse = torch.randn(lse.shape, device=q.device, dtype=lse.dtype)
    names = [n for n in ("q", "k", "v", "sinks") if inputs[n] is not None]
    grads = torch.autograd.grad(
        [out, lse], [inputs[n] for n in names], [grad_out, grad_lse], allow_unused=False
    )

    def reference(compute_dtype: torch.dtype):
        copies = {n: inputs[n].detach().to(compute_dtype).requires_grad_(True) for n in names}
        ref_out, ref_lse = reference_varlen_attention(
            copies["q"],
            copies["k"],
            copies["v"],
            inputs["cu_seqlens_q"],
            inputs["cu_seqlens_k"],
            **{**case.options(inputs), "sinks": copies.get("sinks")},
            dropout_p=case.dropout_p,
            dropout_seed=seed,
            compute_dtype=compute_dtype,
        )
        ref_grads = torch.autograd.grad(
            [ref_out, ref_lse],
            [copies[n] for n in names],
            [grad_out.to(ref_out.dtype), grad_lse.to(ref_lse.dtype)],
        )
        return ref_out, ref_lse, ref_grads

    exact, same_dtype = reference(torch.float64), reference(dtype)
    rounded = _rounded_output_varlen_grads(case, inputs, grad_out, grad_lse, names) if seed is None else {}
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact[1])), f"{case}: rows with lse = -inf differ"
    for name, actual, exact_value, same_value in [
        ("out", out, exact[0], same_dtype[0]),
        ("lse", lse, exact[1], same_dtype[1]),
        *((f"d{n}", g, e, s) for n, g, e, s in zip(names, grads, exact[2], same_dtype[2])),
    ]:
        assert_error_rule(
            f"{case} {name}", actual, exact_value, same_value, dtype, rounded_output=rounded.get(name[1:])
        )


def _rounded_output_varlen_grads(
    case: VarlenCase, inputs: dict, grad_out: torch.Tensor, grad_lse: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """rounded_output_reference's gradients of a packed problem, sequence by sequence (each a problem
    of batch 1): dq, dk, dv packed as q, k, v; dsinks summed over the sequences."""
    options = {n: v for n, v in case.options(inputs).items() if n not in ("alibi_slopes", "sinks")}
    slopes = inputs["alibi_slopes"]
    grads = {n: torch.zeros(inputs[n].shape, dtype=torch.float64, device=inputs[n].device) for n in names}
    ends_q, ends_k = inputs["cu_seqlens_q"].tolist(), inputs["cu_seqlens_k"].tolist()
    for n, (q0, q1, k0, k1) in enumerate(zip(ends_q, ends_q[1:], ends_k, ends_k[1:])):
        if q1 == q0:
            continue  # no query: no gradient

        def sequence(name: str, begin: int, end: int) -> torch.Tensor:  # (1, H, L, D)
            return inputs[name].detach()[begin:end].transpose(0, 1)[None].requires_grad_(True)

        sequence_inputs = {"q": sequence("q", q0, q1), "k": sequence("k", k0, k1), "v": sequence("v", k0, k1)}
        sequence_inputs["sinks"] = (
            None if inputs["sinks"] is None else inputs["sinks"].detach().requires_grad_(True)
        )
        sequence_inputs["alibi_slopes"] = (
            None if slopes is None else (slopes if slopes.dim() == 1 else slopes[n])
        )
        result = rounded_output_reference(
            sequence_inputs,
            out_dtype=case.dtype,
            grad_out=grad_out[q0:q1].transpose(0, 1)[None],
            grad_lse=grad_lse[:, q0:q1][None],
            **options,
        )
        for name, begin, end in (("q", q0, q1), ("k", k0, k1), ("v", k0, k1)):
            grads[name][begin:end] += result.grads[name][0].transpose(0, 1)
        if "sinks" in grads:
            grads["sinks"] += result.grads["sinks"]
    return grads


@dataclass(frozen=True)
class DecodeCase:
    """A decoding step against a KV cache that a test holds to reference_decode_attention, its
    options named as in the decode_forward op (csrc/schema.cpp)."""

    lengths: tuple[int, ...]  # each sequence's cache_seqlens: its keys before the new ones
    new_rows: int = 1  # S_new: keys and values appended in place (0: none given)
    query_rows: int | None = None  # Sq; None: new_rows (1 when no keys are appended)
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 16
    dtype: torch.dtype = torch.float32
    page_size: int | None = None  # None: a contiguous cache (B, S_cache, Hkv, D)
    interleaved: bool = False  # K and V pages (or rows) alternate in one storage: a strided page dim
    leftpad: bool = False  # random cache_leftpad
    batch_idx: bool = False  # a contiguous cache with more rows than sequences, in shuffled order
    causal: bool = False
    window_size: tuple[int, int] | None = None
    softcap: float | None = None
    alibi: str | None = None  # "h": slopes (Hq,); "bh": slopes (B, Hq)
    sinks: bool = False  # only through the public function: the op has none
    num_splits: int = 0

    @property
    def rows(self) -> int:
        return self.query_rows if self.query_rows is not None else max(self.new_rows, 1)

    def __str__(self) -> str:
        options = {
            "new": f"new{self.new_rows}",
            "rows": f"q{self.rows}",
            "page": f"page{self.page_size}" if self.page_size else "contiguous",
            "interleaved": "interleaved" if self.interleaved else "",
            "leftpad": "leftpad" if self.leftpad else "",
            "batch_idx": "batchidx" if self.batch_idx else "",
            "causal": "causal" if self.causal else "",
            "window": f"w{self.window_size[0]}_{self.window_size[1]}" if self.window_size else "",
            "softcap": f"cap{self.softcap}" if self.softcap else "",
            "alibi": f"alibi{self.alibi}" if self.alibi else "",
            "sinks": "sinks" if self.sinks else "",
            "splits": f"splits{self.num_splits}" if self.num_splits else "",
        }
        lengths = "_".join(map(str, self.lengths))
        parts = [f"L{lengths}", f"H{self.heads_q}/{self.heads_kv}", f"D{self.head_dim}", str(self.dtype)[6:]]
        return "-".join(parts + [v for v in options.values() if v])

    def make_inputs(
        self, device: str | torch.device = "cpu", generator: torch.Generator | None = None
    ) -> dict:
        """Random inputs named as decode_attention's arguments: q (B, Sq, Hq, D), the caches
        filled with random values everywhere (so that a stray read or write shows), k and v
        (B, S_new, Hkv, D) or None, int32 cache_seqlens, and the optional indirections."""
        batch, heads_kv, head_dim = len(self.lengths), self.heads_kv, self.head_dim
        ends = [n + self.new_rows for n in self.lengths]

        def random(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device, self.dtype)

        def int32(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        block_table = cache_batch_idx = None
        if self.page_size is None:
            rows = batch + 2 if self.batch_idx else batch
            slots = max(ends, default=0) + 3
            if self.batch_idx:
                cache_batch_idx = int32(torch.randperm(rows, generator=generator)[:batch].tolist())
        else:
            pages_of = [-(-end // self.page_size) for end in ends]
            max_pages = max(pages_of, default=0) + 1
            rows, slots = batch * max_pages + 2, self.page_size
            # Every sequence's pages are distinct random pages; unused entries point at pages too.
            order = torch.randperm(rows, generator=generator)
            block_table = int32(order[: batch * max_pages].reshape(batch, max_pages).tolist())
        if self.interleaved:
            storage = random(rows, 2, slots, heads_kv, head_dim)
            k_cache, v_cache = storage[:, 0], storage[:, 1]
        else:
            k_cache, v_cache = (
                random(rows, slots, heads_kv, head_dim),
                random(rows, slots, heads_kv, head_dim),
            )
        leftpad = None
        if self.leftpad:
            leftpad = int32([int(torch.randint(0, n + 1, (), generator=generator)) for n in self.lengths])
        slopes = None
        if self.alibi is not None:
            shape = {"h": (self.heads_q,), "bh": (batch, self.heads_q)}[self.alibi]
            slopes = torch.rand(shape, generator=generator).to(device)
        new = self.new_rows > 0
        return {
            "q": random(batch, self.rows, self.heads_q, head_dim),
            "k_cache": k_cache,
            "v_cache": v_cache,
            "cache_seqlens": int32(list(self.lengths)),
            "k": random(batch, self.new_rows, heads_kv, head_dim) if new else None,
            "v": random(batch, self.new_rows, heads_kv, head_dim) if new else None,
            "cache_leftpad": leftpad,
            "block_table": block_table,
            "cache_batch_idx": cache_batch_idx,
            "alibi_slopes": slopes,
            "sinks": (torch.randn(self.heads_q, generator=generator) * 2).to(device) if self.sinks else None,
        }

    def options(self, inputs: dict) -> dict:
        """The score options of decode_attention and reference_decode_attention (no scale: the default)."""
        return _score_options(self, inputs)


DECODE_TENSORS = (
    "q",
    "k_cache",
    "v_cache",
    "cache_seqlens",
    "k",
    "v",
    "cache_leftpad",
    "block_table",
    "cache_batch_idx",
)


def decode_runner(case: DecodeCase, backend: str) -> Callable[[dict], tuple[torch.Tensor, torch.Tensor]]:
    """check_decode_against_reference's run: fast_attn.decode_attention on `backend`."""

    def run(inputs: dict):
        positional = [inputs[n] for n in DECODE_TENSORS[:4]]
        keywords = {n: inputs[n] for n in DECODE_TENSORS[4:]}
        return decode_attention(
            *positional, **keywords, **case.options(inputs), num_splits=case.num_splits, return_lse=True,
            backend=backend,
        )  # fmt: skip

    return run


def decode_op_arguments(case: DecodeCase, inputs: dict) -> tuple:
    """The positional arguments of a decode_forward op (csrc/schema.cpp) for these inputs."""
    if case.sinks:
        raise ValueError(f"{case}: the decode ops take no sinks (fast_attn/ops/sinks.py applies them)")
    window_left, window_right = case.window_size or (-1, -1)
    slopes = inputs["alibi_slopes"]
    return (
        inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k"], inputs["v"], inputs["cache_seqlens"],
        inputs["cache_leftpad"], inputs["block_table"], inputs["cache_batch_idx"],
        1.0 / math.sqrt(case.head_dim), case.causal,
        None if slopes is None else slopes.reshape(-1, case.heads_q).float().contiguous(),
        window_left, window_right, case.softcap or 0.0, case.num_splits,
    )  # fmt: skip


def check_decode_against_reference(
    run: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
    case: DecodeCase,
    device: str | torch.device = "cpu",
) -> None:
    """run(inputs) (a decode op or decode_attention on DecodeCase.make_inputs' tensors, returning
    (out (B, Sq, Hq, D), lse (B, Hq, Sq))) against reference_decode_attention: out and lse by the
    error rule, the caches afterwards equal to the reference's to the bit (the new rows written,
    nothing else touched)."""
    inputs = case.make_inputs(device)

    def reference(compute_dtype: torch.dtype):
        copies = {n: inputs[n] for n in DECODE_TENSORS}
        storage_dtype = torch.float64 if compute_dtype == torch.float64 else case.dtype
        for name in ("q", "k_cache", "v_cache", "k", "v"):
            if copies[name] is not None:
                copies[name] = copies[name].to(storage_dtype, copy=True)
        out, lse = reference_decode_attention(
            *(copies[n] for n in DECODE_TENSORS[:4]),
            **{n: copies[n] for n in DECODE_TENSORS[4:]},
            **case.options(inputs),
            compute_dtype=compute_dtype,
        )
        return out, lse, copies["k_cache"], copies["v_cache"]

    exact, same_dtype = reference(torch.float64), reference(case.dtype)
    out, lse = run(inputs)
    batch, heads_q = len(case.lengths), case.heads_q
    assert out.shape == (batch, case.rows, heads_q, case.head_dim) and out.dtype == case.dtype, (
        f"{case}: out {tuple(out.shape)} {out.dtype}"
    )
    assert lse.shape == (batch, heads_q, case.rows) and lse.dtype == accumulation_dtype(case.dtype), (
        f"{case}: lse {tuple(lse.shape)} {lse.dtype}"
    )
    for name in ("k_cache", "v_cache"):
        assert torch.equal(inputs[name], same_dtype[2 if name == "k_cache" else 3]), (
            f"{case}: {name} differs from the reference's after the in-place write"
        )
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact[1])), f"{case}: rows with lse = -inf differ"
    assert_error_rule(f"{case} out", out, exact[0], same_dtype[0], case.dtype)
    assert_error_rule(f"{case} lse", lse, exact[1], same_dtype[1], case.dtype)
