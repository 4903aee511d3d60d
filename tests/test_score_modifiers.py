"""The score modifiers of the contract: window_size, softcap, alibi_slopes and sinks.

The reference's meaning of each is checked against its definition written out
element by element; every backend that declares a modifier is checked against
the float64 reference (forward, lse and every gradient, sinks' included), and
every backend that does not declare it refuses it by name.
"""

from __future__ import annotations

import math

import pytest
import torch

import fast_attn
from fast_attn import dispatch
from fast_attn.reference import reference_attention
from fast_attn.testing import (
    assert_error_rule,
    random_key_mask,
    random_qkv,
    rounded_output_reference,
    run_reference,
)

KERNEL_BACKENDS = [name for name in dispatch.BACKENDS if name != "reference"]


def explicit_attention(q, k, v, *, visible, softcap=None, slopes=None, sink=None):
    """One (Sq, D) head by the definitions, one score at a time, in float64."""
    seqlen_q, seqlen_k = q.shape[0], k.shape[0]
    scale = 1.0 / math.sqrt(q.shape[1])
    out = torch.zeros(seqlen_q, v.shape[1], dtype=torch.float64)
    lse = torch.empty(seqlen_q, dtype=torch.float64)
    for i in range(seqlen_q):
        logits = []
        for j in range(seqlen_k):
            if not visible(i, j):
                continue
            s = float(q[i] @ k[j]) * scale
            if softcap is not None:
                s = softcap * math.tanh(s / softcap)
            if slopes is not None:
                s -= slopes * abs(i + seqlen_k - seqlen_q - j)
            logits.append((j, s))
        terms = [s for _, s in logits] + ([sink] if sink is not None else [])
        if not terms:
            lse[i] = -math.inf
            continue
        top = max(terms)
        total = sum(math.exp(t - top) for t in terms)
        lse[i] = top + math.log(total)
        for j, s in logits:
            out[i] += math.exp(s - lse[i]) * v[j]
    return out, lse


def band_visible(seqlen_q, seqlen_k, causal, window):
    left, right = window
    diagonal = 0 if causal == "top_left" else seqlen_k - seqlen_q
    if causal:
        right = 0

    def visible(i, j):
        d = i + diagonal
        return (left < 0 or j >= d - left) and (right < 0 or j <= d + right)

    return visible


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(7, 7), (3, 9), (9, 4)])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("window", [(2, 1), (0, 0), (3, -1), (-1, 2), (20, 20)])
def test_reference_window_is_the_band_of_its_definition(seqlen_q, seqlen_k, causal, window):
    q, k, v = (t[0, 0].double() for t in random_qkv(1, 1, 1, seqlen_q, seqlen_k, 8))
    out, lse = reference_attention(q[None, None], k[None, None], v[None, None], causal=causal, window_size=window)
    expected_out, expected_lse = explicit_attention(q, k, v, visible=band_visible(seqlen_q, seqlen_k, causal, window))
    torch.testing.assert_close(lse[0, 0], expected_lse)
    torch.testing.assert_close(out[0, 0], expected_out)


def test_reference_window_follows_flash_attention_pictures():
    # FlashAttention's docstring: causal, Sq = 2, Sk = 5 -> rows 1 1 1 1 0 / 1 1 1 1 1; window (1, 0) keeps
    # the diagonal and one key to its left.
    q, k, v = random_qkv(1, 1, 1, 2, 5, 4, dtype=torch.float64)
    probs = torch.eye(5, dtype=torch.float64)[None, None]  # v = I reads the probabilities back
    for causal, window, rows in (
        ("bottom_right", None, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        (False, (1, 0), [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]),
        ("top_left", (1, -1), [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]),
    ):
        out, _ = reference_attention(q, k, probs, causal=causal, window_size=window)
        assert ((out[0, 0] > 0).int().tolist()) == rows, (causal, window)


def test_reference_softcap_alibi_and_sinks_follow_their_definitions():
    q, k, v = (t[0, 0].double() * 3 for t in random_qkv(1, 1, 1, 6, 9, 8))
    visible = band_visible(6, 9, "bottom_right", (4, -1))
    out, lse = reference_attention(
        q[None, None], k[None, None], v[None, None], causal="bottom_right", window_size=(4, -1), softcap=2.5,
        alibi_slopes=torch.tensor([0.3]), sinks=torch.tensor([0.7], dtype=torch.float64),
    )
    expected_out, expected_lse = explicit_attention(q, k, v, visible=visible, softcap=2.5, slopes=0.3, sink=0.7)
    torch.testing.assert_close(lse[0, 0], expected_lse)
    torch.testing.assert_close(out[0, 0], expected_out)


def test_reference_sink_of_a_row_without_keys_is_its_lse():
    q, k, v = random_qkv(1, 2, 1, 3, 4, 8, dtype=torch.float64)
    key_mask = torch.zeros(1, 4, dtype=torch.bool)
    sinks = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    out, lse = reference_attention(q, k, v, key_mask=key_mask, sinks=sinks)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, sinks.detach()[None, :, None].expand(1, 2, 3))
    (grad,) = torch.autograd.grad(lse.sum() + out.sum(), sinks)
    torch.testing.assert_close(grad, torch.full((2,), 3.0, dtype=torch.float64))  # d lse / d sink = 1 per row


def test_reference_alibi_of_b_and_h_slopes():
    q, k, v = random_qkv(2, 3, 3, 5, 7, 8, dtype=torch.float64)
    slopes = torch.rand(2, 3)
    out, _ = reference_attention(q, k, v, alibi_slopes=slopes)
    for b in range(2):
        for h in range(3):
            expected, _ = explicit_attention(q[b, h], k[b, h], v[b, h], visible=lambda i, j: True,
                                             slopes=float(slopes[b, h]))
            torch.testing.assert_close(out[b, h], expected)


def modifier_arguments(feature: str, heads: int, dtype: torch.dtype) -> dict:
    if feature == "window":
        return {"window_size": (5, 3)}
    if feature == "softcap":
        return {"softcap": 1.5}
    if feature == "alibi":
        return {"alibi_slopes": torch.rand(heads)}
    return {"sinks": (torch.randn(heads) * 2).to(dtype).requires_grad_(True)}


def check_against_reference(backend, dtype, q, k, v, **arguments):
    """Forward, lse and every gradient (sinks' too) of `backend` vs float64, by the error rule."""
    out, lse = fast_attn.attention(q, k, v, return_lse=True, backend=backend, **arguments)
    tensors = {name: t for name, t in arguments.items() if isinstance(t, torch.Tensor)}
    options = {name: value for name, value in arguments.items() if name not in tensors}
    inputs = {"q": q, "k": k, "v": v, **tensors}
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, grad_lse=grad_lse, **options)
    same_dtype = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, grad_lse=grad_lse, **options)
    assert_error_rule("out", out, exact.out, same_dtype.out, dtype)
    assert_error_rule("lse", lse, exact.lse, same_dtype.lse, dtype)
    wanted = [name for name, t in inputs.items() if t.is_floating_point() and t.requires_grad]
    rounded = rounded_output_reference(
        inputs, out_dtype=dtype, grad_out=grad_out, grad_lse=grad_lse, fed_out=out, **options
    )
    grads = torch.autograd.grad([out, lse], [inputs[n] for n in wanted], [grad_out, grad_lse])
    for name, grad in zip(wanted, grads):
        assert grad.shape == inputs[name].shape, name
        assert_error_rule(
            f"d{name}", grad, exact.grads[name], same_dtype.grads[name], dtype, rounded_output=rounded.grads[name]
        )


def runnable(backend: str, dtype: torch.dtype) -> None:
    reason = dispatch.UNAVAILABLE[backend]
    if reason is not None:
        pytest.skip(reason)
    if dtype not in dispatch.BACKENDS[backend].dtypes:
        pytest.skip(f"{backend} does not declare {dtype}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("feature", sorted(dispatch.FEATURES.keys() - {"dropout"}))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_modifier_on_each_backend_or_refused_by_name(backend, feature, dtype):
    runnable(backend, dtype)
    device = "cuda" if "cpu" not in dispatch.BACKENDS[backend].device_types else "cpu"
    q, k, v = random_qkv(2, 4, 2, 19, 23, 16, dtype=dtype, device=device, requires_grad=True)
    arguments = {"causal": "bottom_right", "key_mask": random_key_mask(2, 23, device=device, empty_rows=(1,))}
    arguments.update({n: (t.to(device) if isinstance(t, torch.Tensor) else t)
                      for n, t in modifier_arguments(feature, 4, dtype).items()})
    if "sinks" in arguments:
        arguments["sinks"] = arguments["sinks"].detach().requires_grad_(True)
    if feature not in dispatch.BACKENDS[backend].features:
        with pytest.raises(dispatch.BackendNotSupportedError, match=dispatch.FEATURES[feature]):
            fast_attn.attention(q, k, v, backend=backend, **arguments)
        return
    check_against_reference(backend, dtype, q, k, v, **arguments)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_modifiers_together_with_bias_gqa_and_lse(backend):
    features = dispatch.BACKENDS[backend].features
    if not {"window", "softcap", "alibi", "sinks"} <= features:
        pytest.skip(f"{backend} does not declare every modifier yet")
    runnable(backend, torch.float32)
    device = "cuda" if "cpu" not in dispatch.BACKENDS[backend].device_types else "cpu"
    q, k, v = random_qkv(2, 6, 2, 33, 41, 32, device=device, requires_grad=True)
    check_against_reference(
        backend, torch.float32, q, k, v, causal="top_left", window_size=(9, -1), softcap=0.8,
        alibi_slopes=torch.rand(2, 6, device=device), sinks=torch.randn(6, device=device, requires_grad=True),
        bias=torch.randn(1, 6, 33, 41, device=device, requires_grad=True),
    )


def test_auto_runs_what_the_kernels_lack_on_the_reference():
    q, k, v = random_qkv(1, 2, 2, 9, 9, 8)
    problem = fast_attn.validation.build_problem(q, k, v, window_size=(2, 0), softcap=3.0)
    chosen = dispatch.select_backend(problem)
    assert dispatch.asked_features(problem) <= chosen.features
    out = fast_attn.attention(q, k, v, window_size=(2, 0), softcap=3.0)
    expected, _ = reference_attention(q, k, v, window_size=(2, 0), softcap=3.0)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "arguments,error,match",
    [
        ({"window_size": 4}, TypeError, "window_size must be None or two ints"),
        ({"window_size": (4, 1.5)}, TypeError, "window_size must be None or two ints"),
        ({"window_size": (True, 0)}, TypeError, "window_size must be None or two ints"),
        ({"window_size": (4, -2)}, ValueError, r"window_size values must be >= -1.*\(4, -2\)"),
        ({"softcap": 0.0}, ValueError, "softcap must be a finite number > 0, got 0.0"),
        ({"softcap": -1}, ValueError, "softcap must be a finite number > 0, got -1.0"),
        ({"softcap": math.inf}, ValueError, "softcap must be a finite number > 0, got inf"),
        ({"softcap": math.nan}, ValueError, "softcap must be a finite number > 0, got nan"),
        ({"softcap": "50"}, TypeError, "softcap must be a real number or None, got str"),
        ({"alibi_slopes": torch.rand(4, dtype=torch.float64)}, TypeError, "alibi_slopes must be float32"),
        ({"alibi_slopes": torch.rand(3)}, ValueError, r"alibi_slopes must have shape \(Hq,\) = \(4,\).*\(3,\)"),
        ({"alibi_slopes": torch.rand(1, 4, 1)}, ValueError, r"alibi_slopes must have shape.*\(1, 4, 1\)"),
        ({"sinks": torch.rand(2)}, ValueError, r"sinks must have shape \(Hq,\) = \(4,\), got \(2,\)"),
        ({"sinks": torch.ones(4, dtype=torch.long)}, TypeError, "sinks must be a floating-point tensor"),
        ({"sinks": [0.0] * 4}, TypeError, "sinks must be a torch.Tensor, got list"),
    ],
)
def test_bad_modifier_arguments_are_refused_by_name(arguments, error, match):
    q, k, v = random_qkv(2, 4, 2, 5, 6, 8)
    with pytest.raises(error, match=match):
        fast_attn.attention(q, k, v, **arguments)


def test_window_of_minus_ones_is_no_window():
    q, k, v = random_qkv(1, 2, 2, 5, 6, 8)
    problem = fast_attn.validation.build_problem(q, k, v, window_size=(-1, -1))
    assert problem.window is None and dispatch.asked_features(problem) == set()


# ---------------------------------------------------------------------------
# The CPU kernels (csrc/cpu) with the score modifiers, against float64 by the
# error rule: forward, lse and every gradient. The op is called directly with a
# seed of our own so that dropout's keep decisions are the reference's.

CPU_OP_AVAILABLE = dispatch.UNAVAILABLE["cpu"] is None
needs_cpu_op = pytest.mark.skipif(not CPU_OP_AVAILABLE, reason=str(dispatch.UNAVAILABLE["cpu"]))
CAUSAL_MODES = {False: 0, "top_left": 1, "bottom_right": 2}
# FAST_ATTN_CPU_ISA is read on every call: each instruction-set path runs in this process.
ISA_PATHS = ["native", "avx2", "generic"]


def accumulation(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_cpu_op(
    dtype, q, k, v, *, bias=None, key_mask=None, causal=False, window=None, softcap=None, alibi_slopes=None,
    dropout_p=0.0, scale=None,
):
    """torch.ops.fast_attn.attention_forward on the CPU (and its C++ autograd) vs the float64
    reference: out, lse and the gradient of every input that requires one."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seed = torch.tensor([(1 << 41) + 977], dtype=torch.int64)
    slopes_2d = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None])
    left, right = window if window is not None else (-1, -1)
    out, lse = torch.ops.fast_attn.attention_forward(
        q, k, v, bias, key_mask, seed if dropout_p > 0 else None, scale, CAUSAL_MODES[causal], dropout_p,
        slopes_2d, left, right, softcap or 0.0,
    )
    assert out.dtype == dtype and lse.dtype == accumulation(dtype)
    inputs = {"q": q, "k": k, "v": v, "bias": bias, "key_mask": key_mask, "alibi_slopes": alibi_slopes}
    options = {"causal": causal, "window_size": window, "softcap": softcap, "scale": scale, "dropout_p": dropout_p,
               "dropout_seed": seed if dropout_p > 0 else None}
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, grad_lse=grad_lse, **options)
    same_dtype = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, grad_lse=grad_lse, **options)
    assert_error_rule("out", out, exact.out, same_dtype.out, dtype)
    assert_error_rule("lse", lse, exact.lse, same_dtype.lse, dtype)
    wanted = [name for name, t in inputs.items() if t is not None and t.is_floating_point() and t.requires_grad]
    if not wanted:
        return
    rounded = rounded_output_reference(
        inputs, out_dtype=dtype, grad_out=grad_out, grad_lse=grad_lse, fed_out=out, **options
    )
    grads = torch.autograd.grad([out, lse], [inputs[n] for n in wanted], [grad_out, grad_lse])
    for name, grad in zip(wanted, grads):
        assert grad.shape == inputs[name].shape, name
        assert_error_rule(
            f"d{name}", grad, exact.grads[name], same_dtype.grads[name], dtype, rounded_output=rounded.grads[name]
        )


def qkv(dtype, seqlen_q, seqlen_k, *, batch=2, heads_q=4, heads_kv=2, head_dim=32, spread=1.0):
    q, k, v = random_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim)
    return tuple((t * spread).to(dtype).requires_grad_(True) for t in (q, k, v))


def bias_of(shape, dtype):
    return torch.randn(shape).to(dtype).requires_grad_(True)


SHAPES = [(1, 17), (17, 1), (17, 97), (97, 17), (97, 97), (257, 97), (97, 257), (257, 257)]
WINDOWS = [(0, 0), (3, -1), (-1, 3), (16, 16), (100, 0)]


@needs_cpu_op
@pytest.mark.parametrize("seqlen_q,seqlen_k", SHAPES)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("window", WINDOWS)
def test_cpu_window_grid_float32(seqlen_q, seqlen_k, causal, window):
    # Sq > Sk aligned bottom-right (and windows with a left side under top-left
    # causal for Sq > Sk + left) leave rows with an empty band: out 0, lse -inf, zero gradients.
    q, k, v = qkv(torch.float32, seqlen_q, seqlen_k)
    check_cpu_op(torch.float32, q, k, v, causal=causal, window=window)


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 97), (97, 17), (257, 257)])
@pytest.mark.parametrize("causal,window", [(False, (3, -1)), ("bottom_right", (16, 16)), ("top_left", (0, 0)),
                                           (False, (-1, 3))])
def test_cpu_window_grid_other_dtypes(dtype, seqlen_q, seqlen_k, causal, window):
    q, k, v = qkv(dtype, seqlen_q, seqlen_k)
    check_cpu_op(dtype, q, k, v, causal=causal, window=window)


@needs_cpu_op
def test_empty_rows_of_a_window_are_zero_with_zero_gradients():
    # top_left causal, window (3, -1): rows i >= Sk + 3 = 20 see no key.
    q, k, v = qkv(torch.float32, 97, 17)
    out, lse = torch.ops.fast_attn.attention_forward(q, k, v, None, None, None, 0.3, 1, 0.0, None, 3, -1, 0.0)
    assert torch.equal(out[:, :, 20:], torch.zeros_like(out[:, :, 20:]))
    assert torch.isneginf(lse[:, :, 20:]).all() and torch.isfinite(lse[:, :, :20]).all()
    dq, dk, dv = torch.autograd.grad([out, lse.masked_fill(lse.isinf(), 0)], [q, k, v],
                                     [torch.randn_like(out), torch.randn_like(lse)])
    assert torch.equal(dq[:, :, 20:], torch.zeros_like(dq[:, :, 20:]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


@needs_cpu_op
@pytest.mark.parametrize("isa", ISA_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,window", [
    (97, 257, False, (16, 16)), (257, 97, "bottom_right", (100, 0)), (97, 17, "top_left", (3, -1)),
])
def test_cpu_window_with_bias_key_mask_and_gqa_on_each_isa(monkeypatch, isa, dtype, seqlen_q, seqlen_k, causal,
                                                            window):
    if isa != "native":
        monkeypatch.setenv("FAST_ATTN_CPU_ISA", isa)
    q, k, v = qkv(dtype, seqlen_q, seqlen_k, heads_q=6, heads_kv=2)
    key_mask = random_key_mask(2, seqlen_k, empty_rows=(1,))
    # A full bias: each dbias element stored once (tiles outside the band store zeros).
    check_cpu_op(dtype, q, k, v, bias=bias_of((2, 6, seqlen_q, seqlen_k), accumulation(dtype)), key_mask=key_mask,
                 causal=causal, window=window)
    # A bias broadcast over batch and rows: partial sums.
    check_cpu_op(dtype, q, k, v, bias=bias_of((1, 6, 1, seqlen_k), dtype), causal=causal, window=window)


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal,window", [(False, (16, 16)), ("bottom_right", (3, -1))])
def test_cpu_window_with_dropout(dtype, causal, window):
    q, k, v = qkv(dtype, 97, 130)
    check_cpu_op(dtype, q, k, v, bias=bias_of((1, 4, 97, 130), accumulation(dtype)), causal=causal, window=window,
                 dropout_p=0.3, scale=0.2)


@needs_cpu_op
@pytest.mark.parametrize("isa", ISA_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("softcap", [0.5, 30.0])
@pytest.mark.parametrize("seqlen_q,seqlen_k,causal", [(97, 97, False), (17, 257, "bottom_right"),
                                                      (257, 97, "top_left")])
def test_cpu_softcap(monkeypatch, isa, dtype, softcap, seqlen_q, seqlen_k, causal):
    if isa != "native":
        monkeypatch.setenv("FAST_ATTN_CPU_ISA", isa)
    # spread 3: scores of +-10 and more, so that a cap of 0.5 is deep in tanh's saturation.
    q, k, v = qkv(dtype, seqlen_q, seqlen_k, spread=3.0)
    check_cpu_op(dtype, q, k, v, causal=causal, softcap=softcap)


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_cpu_softcap_with_window_bias_key_mask_and_dropout(dtype, dropout_p):
    q, k, v = qkv(dtype, 97, 113, spread=2.0)
    check_cpu_op(dtype, q, k, v, bias=bias_of((2, 1, 97, 113), accumulation(dtype)),
                 key_mask=random_key_mask(2, 113, empty_rows=(0,)), causal="bottom_right", window=(20, -1),
                 softcap=1.5, dropout_p=dropout_p)


@needs_cpu_op
@pytest.mark.parametrize("isa", ISA_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("slopes_shape", [(4,), (2, 4)])
@pytest.mark.parametrize("seqlen_q,seqlen_k,causal", [(97, 97, False), (17, 257, "bottom_right"),
                                                      (257, 97, "top_left"), (1, 97, False)])
def test_cpu_alibi(monkeypatch, isa, dtype, slopes_shape, seqlen_q, seqlen_k, causal):
    if isa != "native":
        monkeypatch.setenv("FAST_ATTN_CPU_ISA", isa)
    q, k, v = qkv(dtype, seqlen_q, seqlen_k)
    slopes = torch.rand(slopes_shape) * 0.5
    check_cpu_op(dtype, q, k, v, causal=causal, alibi_slopes=slopes)


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_cpu_all_modifiers_with_bias_key_mask_gqa_and_dropout(dtype, dropout_p):
    q, k, v = qkv(dtype, 130, 97, heads_q=6, heads_kv=3, head_dim=40, spread=2.0)
    check_cpu_op(dtype, q, k, v, bias=bias_of((2, 6, 130, 97), accumulation(dtype)),
                 key_mask=random_key_mask(2, 97), causal=False, window=(24, 8), softcap=2.0,
                 alibi_slopes=torch.rand(2, 6) * 0.3, dropout_p=dropout_p)


@needs_cpu_op
def test_cpu_modifiers_through_the_public_api_with_sinks():
    q, k, v = qkv(torch.float32, 45, 70, heads_q=6, heads_kv=2)
    check_against_reference(
        "cpu", torch.float32, q, k, v, causal="bottom_right", window_size=(12, -1), softcap=3.0,
        alibi_slopes=torch.rand(6), sinks=torch.randn(6, requires_grad=True),
        key_mask=random_key_mask(2, 70, empty_rows=(1,)), bias=bias_of((2, 1, 45, 70), torch.float32),
    )


@needs_cpu_op
def test_cpu_gradcheck_float64_with_every_modifier():
    q, k, v = (t.double().requires_grad_(True) for t in random_qkv(2, 4, 2, 9, 12, 8))
    bias = torch.randn(1, 4, 9, 12, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(2, 4)
    key_mask = random_key_mask(2, 12)

    def function(q, k, v, bias, sinks):
        return fast_attn.attention(
            q, k, v, bias=bias, key_mask=key_mask, causal="top_left", window_size=(4, -1), softcap=1.3,
            alibi_slopes=slopes, sinks=sinks, scale=0.6, return_lse=True, backend="cpu",
        )

    assert torch.autograd.gradcheck(function, (q, k, v, bias, sinks))
    assert torch.autograd.gradcheck(
        lambda q, k, v: fast_attn.attention(q, k, v, window_size=(2, 5), softcap=0.7, backend="cpu"), (q, k, v)
    )


@needs_cpu_op
def test_cpu_opcheck_of_the_modifier_arguments():
    q, k, v = (t.requires_grad_(True) for t in random_qkv(2, 4, 2, 9, 13, 8))
    bias = torch.randn(1, 4, 9, 13, requires_grad=True)
    key_mask = random_key_mask(2, 13)
    seed = torch.tensor([7], dtype=torch.int64)
    slopes = torch.rand(1, 4)
    forward_args = (q, k, v, bias, key_mask, seed, 0.5, 2, 0.1, slopes, 4, 1, 2.5)
    torch.library.opcheck(torch.ops.fast_attn.attention_forward.default, forward_args)
    out, lse = torch.ops.fast_attn.attention_forward(*forward_args)
    backward_args = (
        torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), bias.detach(), key_mask,
        seed, out.detach(), lse.detach(), 0.5, 2, 0.1, True, False, slopes, 4, 1, 2.5,
    )
    torch.library.opcheck(torch.ops.fast_attn.attention_backward.default, backward_args)


@needs_cpu_op
@pytest.mark.parametrize(
    "arguments,match",
    [
        ({"window_left": -2}, "window_left and window_right must be >= -1"),
        ({"window_right": -5}, "window_left and window_right must be >= -1"),
        ({"softcap": -1.0}, "softcap must be finite and >= 0"),
        ({"softcap": math.inf}, "softcap must be finite and >= 0"),
        ({"alibi_slopes": torch.rand(1, 4, dtype=torch.float64)}, "alibi_slopes must be float32"),
        ({"alibi_slopes": torch.rand(4)}, r"alibi_slopes must have shape \(B or 1, Hq\)"),
        ({"alibi_slopes": torch.rand(3, 4)}, r"alibi_slopes must have shape \(B or 1, Hq\)"),
        ({"alibi_slopes": torch.rand(4, 2).t()}, r"alibi_slopes must have shape|alibi_slopes must be contiguous"),
        ({"alibi_slopes": torch.rand(2, 8)[:, ::2]}, "alibi_slopes must be contiguous"),
    ],
)
def test_cpu_op_refuses_bad_modifier_arguments(arguments, match):
    q, k, v = random_qkv(2, 4, 2, 5, 7, 8)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fast_attn.attention_forward(q, k, v, None, None, None, 0.5, 0, 0.0, **arguments)


@needs_cpu_op
def test_cpu_torch_compile_fullgraph_with_window_and_softcap():
    q, k, v = qkv(torch.float32, 70, 90)
    slopes = torch.rand(4)

    def step(q, k, v):
        out = fast_attn.attention(q, k, v, causal="bottom_right", window_size=(16, -1), softcap=2.0,
                                  alibi_slopes=slopes, backend="cpu")
        return out, (out * out).sum()

    compiled = torch.compile(step, fullgraph=True)
    eager_out, eager_loss = step(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, [q, k, v])
    compiled_out, compiled_loss = compiled(q, k, v)
    compiled_grads = torch.autograd.grad(compiled_loss, [q, k, v])
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=0)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-6, atol=1e-6)
