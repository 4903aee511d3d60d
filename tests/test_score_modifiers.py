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
    Case,
    attention_runner,
    backend_device,
    check_against_reference,
    random_key_mask,
    random_qkv,
)


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
    out, lse = reference_attention(
        q[None, None], k[None, None], v[None, None], causal=causal, window_size=window
    )
    expected_out, expected_lse = explicit_attention(
        q, k, v, visible=band_visible(seqlen_q, seqlen_k, causal, window)
    )
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
        q[None, None],
        k[None, None],
        v[None, None],
        causal="bottom_right",
        window_size=(4, -1),
        softcap=2.5,
        alibi_slopes=torch.tensor([0.3]),
        sinks=torch.tensor([0.7], dtype=torch.float64),
    )
    expected_out, expected_lse = explicit_attention(
        q, k, v, visible=visible, softcap=2.5, slopes=0.3, sink=0.7
    )
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
            expected, _ = explicit_attention(
                q[b, h], k[b, h], v[b, h], visible=lambda i, j: True, slopes=float(slopes[b, h])
            )
            torch.testing.assert_close(out[b, h], expected)


def test_reference_per_row_sinks_follow_their_definition():
    # One more logit per query row in the softmax, with no value: Inkling 2's eager attention.
    q, k, v = random_qkv(2, 3, 3, 5, 7, 8, dtype=torch.float64)
    sinks = torch.randn(2, 3, 5, dtype=torch.float64) * 2
    out, lse = reference_attention(q, k, v, sinks=sinks)
    logits = torch.cat([q @ k.transpose(-1, -2) / math.sqrt(8), sinks[..., None]], dim=-1)
    expected = torch.softmax(logits, dim=-1)[..., :-1] @ v
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1))


MODIFIERS = {
    "window": {"window_size": (5, 3)},
    "softcap": {"softcap": 1.5},
    "alibi": {"alibi": "h"},
    "sinks": {"sinks": True},
}


def check(backend: str, case: Case):
    """`case` through fast_attn.attention on `backend` against float64 by the error rule, every gradient
    (sinks' included), with the kernel's own output as the gradients' second baseline."""
    return check_against_reference(
        attention_runner(backend), case, backend_device(backend), rounded_output="kernel"
    )


@pytest.mark.parametrize("feature", sorted(MODIFIERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_modifier_on_each_backend_or_refused_by_name(kernel_backend, feature, dtype):
    if dtype not in dispatch.BACKENDS[kernel_backend].dtypes:
        pytest.skip(f"{kernel_backend} does not declare {dtype}")
    case = Case(
        2,
        4,
        2,
        19,
        23,
        16,
        dtype,
        causal="bottom_right",
        key_mask=True,
        empty_key_rows=(1,),
        grad_lse=True,
        **MODIFIERS[feature],
    )
    if feature not in dispatch.BACKENDS[kernel_backend].features:
        inputs = case.make_inputs(backend_device(kernel_backend))
        with pytest.raises(dispatch.BackendNotSupportedError, match=dispatch.FEATURES[feature]):
            attention_runner(kernel_backend)(case, inputs, torch.randn_like(inputs["q"]), None)
        return
    check(kernel_backend, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_row_sinks_on_each_backend(kernel_backend, dtype):
    if "sinks" not in dispatch.BACKENDS[kernel_backend].features:
        pytest.skip(f"{kernel_backend} does not declare sinks")
    if dtype not in dispatch.BACKENDS[kernel_backend].dtypes:
        pytest.skip(f"{kernel_backend} does not declare {dtype}")
    case = Case(2, 4, 2, 19, 23, 16, dtype, causal="bottom_right", key_mask=True, empty_key_rows=(1,),
                window_size=(6, 2), sinks="row", grad_lse=True)  # fmt: skip
    check(kernel_backend, case)


def test_all_modifiers_together_with_bias_gqa_and_lse(kernel_backend):
    if not {"window", "softcap", "alibi", "sinks"} <= dispatch.BACKENDS[kernel_backend].features:
        pytest.skip(f"{kernel_backend} does not declare every modifier yet")
    check(
        kernel_backend,
        Case(
            2,
            6,
            2,
            33,
            41,
            32,
            causal="top_left",
            window_size=(9, -1),
            softcap=0.8,
            alibi="bh",
            sinks=True,
            bias_shape=(1, 6, 33, 41),
            grad_lse=True,
        ),
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
        (
            {"alibi_slopes": torch.rand(3)},
            ValueError,
            r"alibi_slopes must have shape \(Hq,\) = \(4,\).*\(3,\)",
        ),
        ({"alibi_slopes": torch.rand(1, 4, 1)}, ValueError, r"alibi_slopes must have shape.*\(1, 4, 1\)"),
        (
            {"sinks": torch.rand(2)},
            ValueError,
            r"sinks must have shape \(Hq,\) = \(4,\) or \(B, Hq, Sq\) = \(2, 4, 5\), got \(2,\)",
        ),
        ({"sinks": torch.rand(2, 4, 6)}, ValueError, r"sinks must have shape .*, got \(2, 4, 6\)"),
        ({"sinks": torch.rand(2, 4, 5, 1)}, ValueError, r"sinks must have shape .*, got \(2, 4, 5, 1\)"),
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


# ---- The CPU kernels: windows, softcap and ALiBi over the shape grid -------------------------------
# Each case through fast_attn.attention(backend="cpu") against float64 by the error rule: forward, lse
# and every gradient; with dropout the op gets the case's seed, so that the reference drops the same scores.

needs_cpu_op = pytest.mark.skipif(
    dispatch.UNAVAILABLE["cpu"] is not None, reason=str(dispatch.UNAVAILABLE["cpu"])
)
# FAST_ATTN_CPU_ISA is read on every call: each instruction-set path runs in this process.
ISA_PATHS = ["native", "avx2", "generic"]
SHAPES = [(1, 17), (17, 1), (17, 97), (97, 17), (97, 97), (257, 97), (97, 257), (257, 257)]
WINDOWS = [(0, 0), (3, -1), (-1, 3), (16, 16), (100, 0)]


def accumulation(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def on_isa(monkeypatch, isa: str) -> None:
    if isa != "native":
        monkeypatch.setenv("FAST_ATTN_CPU_ISA", isa)


def scores_spread(factor: float, head_dim: int = 32) -> float:
    """A softmax scale that makes scores `factor` times larger than 1 / sqrt(D) would."""
    return factor / math.sqrt(head_dim)


@needs_cpu_op
@pytest.mark.parametrize("seqlen_q,seqlen_k", SHAPES)
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("window", WINDOWS)
def test_cpu_window_grid_float32(seqlen_q, seqlen_k, causal, window):
    # Sq > Sk aligned bottom-right (and windows with a left side under top-left
    # causal for Sq > Sk + left) leave rows with an empty band: out 0, lse -inf, zero gradients.
    check("cpu", Case(2, 4, 2, seqlen_q, seqlen_k, 32, causal=causal, window_size=window, grad_lse=True))


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 97), (97, 17), (257, 257)])
@pytest.mark.parametrize(
    "causal,window", [(False, (3, -1)), ("bottom_right", (16, 16)), ("top_left", (0, 0)), (False, (-1, 3))]
)
def test_cpu_window_grid_other_dtypes(dtype, seqlen_q, seqlen_k, causal, window):
    check(
        "cpu", Case(2, 4, 2, seqlen_q, seqlen_k, 32, dtype, causal=causal, window_size=window, grad_lse=True)
    )


@needs_cpu_op
def test_empty_rows_of_a_window_are_zero_with_zero_gradients():
    # top_left causal, window (3, -1): rows i >= Sk + 3 = 20 see no key.
    checked = check("cpu", Case(2, 4, 2, 97, 17, 32, causal="top_left", window_size=(3, -1), scale=0.3))
    assert torch.equal(checked.out[:, :, 20:], torch.zeros_like(checked.out[:, :, 20:]))
    assert torch.isneginf(checked.lse[:, :, 20:]).all() and torch.isfinite(checked.lse[:, :, :20]).all()
    assert torch.equal(checked.grads["q"][:, :, 20:], torch.zeros_like(checked.grads["q"][:, :, 20:]))


@needs_cpu_op
@pytest.mark.parametrize("isa", ISA_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "seqlen_q,seqlen_k,causal,window",
    [
        (97, 257, False, (16, 16)),
        (257, 97, "bottom_right", (100, 0)),
        (97, 17, "top_left", (3, -1)),
    ],
)
def test_cpu_window_with_bias_key_mask_and_gqa_on_each_isa(
    monkeypatch, isa, dtype, seqlen_q, seqlen_k, causal, window
):
    on_isa(monkeypatch, isa)
    shape = dict(
        batch=2, heads_q=6, heads_kv=2, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=32, dtype=dtype
    )
    # A full bias: each dbias element stored once (tiles outside the band store zeros).
    check(
        "cpu",
        Case(
            **shape,
            causal=causal,
            window_size=window,
            bias_shape=(2, 6, seqlen_q, seqlen_k),
            bias_dtype=accumulation(dtype),
            key_mask=True,
            empty_key_rows=(1,),
            grad_lse=True,
        ),
    )
    # A bias broadcast over batch and rows: partial sums.
    check("cpu", Case(**shape, causal=causal, window_size=window, bias_shape=(1, 6, 1, seqlen_k)))


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal,window", [(False, (16, 16)), ("bottom_right", (3, -1))])
def test_cpu_window_with_dropout(dtype, causal, window):
    check(
        "cpu",
        Case(
            2,
            4,
            2,
            97,
            130,
            32,
            dtype,
            causal=causal,
            window_size=window,
            scale=0.2,
            bias_shape=(1, 4, 97, 130),
            bias_dtype=accumulation(dtype),
            dropout_p=0.3,
            dropout_seed=(1 << 41) + 977,
            grad_lse=True,
        ),
    )


@needs_cpu_op
@pytest.mark.parametrize("isa", ISA_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("softcap", [0.5, 30.0])
@pytest.mark.parametrize(
    "seqlen_q,seqlen_k,causal", [(97, 97, False), (17, 257, "bottom_right"), (257, 97, "top_left")]
)
def test_cpu_softcap(monkeypatch, isa, dtype, softcap, seqlen_q, seqlen_k, causal):
    on_isa(monkeypatch, isa)
    # Scores 9x the usual spread (+-10 and more), so that a cap of 0.5 is deep in tanh's saturation.
    check(
        "cpu",
        Case(
            2,
            4,
            2,
            seqlen_q,
            seqlen_k,
            32,
            dtype,
            causal=causal,
            softcap=softcap,
            scale=scores_spread(9.0),
            grad_lse=True,
        ),
    )


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_cpu_softcap_with_window_bias_key_mask_and_dropout(dtype, dropout_p):
    check(
        "cpu",
        Case(
            2,
            4,
            2,
            97,
            113,
            32,
            dtype,
            causal="bottom_right",
            window_size=(20, -1),
            softcap=1.5,
            scale=scores_spread(4.0),
            bias_shape=(2, 1, 97, 113),
            bias_dtype=accumulation(dtype),
            key_mask=True,
            empty_key_rows=(0,),
            dropout_p=dropout_p,
            dropout_seed=(1 << 41) + 977,
            grad_lse=True,
        ),
    )


@needs_cpu_op
@pytest.mark.parametrize("isa", ISA_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("alibi", ["h", "bh"])
@pytest.mark.parametrize(
    "seqlen_q,seqlen_k,causal",
    [(97, 97, False), (17, 257, "bottom_right"), (257, 97, "top_left"), (1, 97, False)],
)
def test_cpu_alibi(monkeypatch, isa, dtype, alibi, seqlen_q, seqlen_k, causal):
    on_isa(monkeypatch, isa)
    check("cpu", Case(2, 4, 2, seqlen_q, seqlen_k, 32, dtype, causal=causal, alibi=alibi, grad_lse=True))


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_cpu_all_modifiers_with_bias_key_mask_gqa_and_dropout(dtype, dropout_p):
    check(
        "cpu",
        Case(
            2,
            6,
            3,
            130,
            97,
            40,
            dtype,
            window_size=(24, 8),
            softcap=2.0,
            alibi="bh",
            scale=scores_spread(4.0, 40),
            bias_shape=(2, 6, 130, 97),
            bias_dtype=accumulation(dtype),
            key_mask=True,
            dropout_p=dropout_p,
            dropout_seed=(1 << 41) + 977,
            grad_lse=True,
        ),
    )


@needs_cpu_op
def test_cpu_modifiers_through_the_public_api_with_sinks():
    check(
        "cpu",
        Case(
            2,
            6,
            2,
            45,
            70,
            32,
            causal="bottom_right",
            window_size=(12, -1),
            softcap=3.0,
            alibi="h",
            sinks=True,
            key_mask=True,
            empty_key_rows=(1,),
            bias_shape=(2, 1, 45, 70),
            grad_lse=True,
        ),
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
            q,
            k,
            v,
            bias=bias,
            key_mask=key_mask,
            causal="top_left",
            window_size=(4, -1),
            softcap=1.3,
            alibi_slopes=slopes,
            sinks=sinks,
            scale=0.6,
            return_lse=True,
            backend="cpu",
        )

    assert torch.autograd.gradcheck(function, (q, k, v, bias, sinks))
    assert torch.autograd.gradcheck(
        lambda q, k, v: fast_attn.attention(q, k, v, window_size=(2, 5), softcap=0.7, backend="cpu"),
        (q, k, v),
    )


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
        (
            {"alibi_slopes": torch.rand(4, 2).t()},
            r"alibi_slopes must have shape|alibi_slopes must be contiguous",
        ),
        ({"alibi_slopes": torch.rand(2, 8)[:, ::2]}, "alibi_slopes must be contiguous"),
    ],
)
def test_cpu_op_refuses_bad_modifier_arguments(arguments, match):
    q, k, v = random_qkv(2, 4, 2, 5, 7, 8)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fast_attn.attention_forward(q, k, v, None, None, None, 0.5, 0, 0.0, **arguments)


@needs_cpu_op
def test_cpu_torch_compile_fullgraph_with_window_and_softcap():
    q, k, v = random_qkv(2, 4, 2, 70, 90, 32, requires_grad=True)
    slopes = torch.rand(4)

    def step(q, k, v):
        out = fast_attn.attention(
            q,
            k,
            v,
            causal="bottom_right",
            window_size=(16, -1),
            softcap=2.0,
            alibi_slopes=slopes,
            backend="cpu",
        )
        return out, (out * out).sum()

    compiled = torch.compile(step, fullgraph=True)
    eager_out, eager_loss = step(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, [q, k, v])
    compiled_out, compiled_loss = compiled(q, k, v)
    compiled_grads = torch.autograd.grad(compiled_loss, [q, k, v])
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=0)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-6, atol=1e-6)


def test_cuda_refuses_a_broadcast_bias_gradient_with_modifiers_at_large_head_dims(monkeypatch):
    # The CUDA dK/dV kernel that sums such a gradient has no variant with the modifiers at kernel head
    # dims of 128 and up; dispatch says so before the op would (facts only: CPU tensors suffice here).
    monkeypatch.setattr(dispatch, "CUDA_HEAD_DIMS", (32, 64, 96, 128, 256))
    cuda = dispatch.BACKENDS["cuda"]

    def reasons(head_dim, bias_shape, **modifiers):
        q, k, v = random_qkv(2, 4, 2, 9, 11, head_dim)
        bias = torch.randn(bias_shape, requires_grad=True)
        return cuda.extra_reasons(fast_attn.validation.build_problem(q, k, v, bias=bias, **modifiers), True)

    assert reasons(128, (2, 4, 1, 11), softcap=2.0) and reasons(104, (1, 4, 9, 1), window_size=(3, -1))
    assert not reasons(96, (2, 4, 1, 11), softcap=2.0)  # kernel head dim 96 has the variant
    assert not reasons(128, (1, 4, 9, 11), softcap=2.0)  # full rows and keys: the dbias kernel
    assert not reasons(128, (2, 4, 1, 11), window_size=(-1, 3))  # a right edge alone is the fast path
