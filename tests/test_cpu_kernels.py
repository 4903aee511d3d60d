"""The fused C++ CPU kernels (csrc/cpu) against the float64 reference.

Every check follows the error rule of fast_attn.testing: the kernel's max error
against the float64 oracle is at most 2x the error of the same math done by
PyTorch in the kernel's dtype, plus a small floor; forward, lse and every
gradient (dq, dk, dv, dbias). Inputs are fresh random tensors in every test.
"""

from __future__ import annotations

import math

import pytest
import torch

import fast_attn
from fast_attn.causal import parse_causal
from fast_attn.dispatch import UNAVAILABLE
from fast_attn.ops.autograd import accumulation_dtype
from fast_attn.testing import (
    GRAD_INPUTS,
    Case,
    attention_runner,
    check_against_reference,
    opcheck_forward_and_backward,
)

pytestmark = pytest.mark.skipif(UNAVAILABLE["cpu"] is not None, reason=f"CPU kernels: {UNAVAILABLE['cpu']}")

ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
F32, BF16 = torch.float32, torch.bfloat16


def check(case: Case, inputs: dict | None = None):
    """The CPU kernels forward and backward on `case` (or these inputs of it), by the error rule."""
    return check_against_reference(attention_runner("cpu"), case, inputs=inputs)


# (Sq, Sk, D): every listed length and head dim, Sq != Sk in most, tails of every block size.
SHAPES = [
    (1, 1, 64),
    (17, 97, 16),
    (97, 17, 32),
    (128, 128, 40),
    (257, 128, 80),
    (128, 257, 96),
    (97, 257, 128),
    (17, 17, 256),
    (1, 257, 64),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("seqlen_q,seqlen_k,head_dim", SHAPES, ids=lambda x: str(x))
def test_forward_and_gradients_match_reference(dtype, seqlen_q, seqlen_k, head_dim):
    check(Case(2, 2, 2, seqlen_q, seqlen_k, head_dim, dtype))


@pytest.mark.parametrize(
    "dtype,seqlen_q,seqlen_k,causal",
    [
        (torch.float32, 1025, 97, False),
        (torch.bfloat16, 97, 1025, "bottom_right"),
        (torch.float32, 1025, 1025, True),
    ],
    ids=str,
)
def test_long_sequences(dtype, seqlen_q, seqlen_k, causal):
    check(Case(1, 2, 1, seqlen_q, seqlen_k, 64, dtype, causal))


# Every option a task of one query row may carry (its tile has one lane: the one-lane softmax and the
# one-row P V product): Sq 1 (decoding without GQA) and Sq 65 (a last query block of one row).
ONE_ROW_OPTIONS = [
    {},
    {"causal": "bottom_right", "window_size": (30, 0)},
    {"causal": True},
    {"window_size": (5, 3)},
    {"softcap": 3.0, "alibi": "bh"},
    {"sinks": True, "scale": -0.3},
    {"bias": True},
    {"key_mask": True, "empty_key_rows": (1,)},
    {"dropout_p": 0.25},
]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("seqlen_q", [1, 65])
@pytest.mark.parametrize("options", ONE_ROW_OPTIONS, ids=str)
def test_one_query_row_tasks(options, seqlen_q, dtype):
    options = dict(options)
    if options.pop("bias", False):
        options["bias_shape"] = (2, 3, seqlen_q, 77)
    check(Case(2, 3, 3, seqlen_q, 77, 40, dtype, **options))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_bshd_transposed_inputs(dtype):
    case = Case(
        2, 4, 2, 97, 130, 40, dtype, "bottom_right", bias_shape=(1, 4, 97, 130), bias_dtype=F32, layout="bshd"
    )
    q = check(case).inputs["q"]
    assert not q.is_contiguous() and q.stride(-1) == 1


@pytest.mark.parametrize("grads", [("k",), ("v",), ("q", "v"), ("bias",), ("q", "bias"), ()], ids=str)
def test_gradients_on_a_subset_of_inputs(grads):
    check(Case(2, 2, 1, 65, 70, 32, bias_shape=(2, 1, 65, 70), grads=grads))


BIAS_SHAPES = [
    (1, 4, 97, 130),
    (2, 1, 1, 130),
    (97, 130),
    (1, 1, 1, 130),
    (2, 4, 97, 1),
    (1, 1, 1, 1),
    (2, 4, 97, 130),
]


@pytest.mark.parametrize("bias_shape", BIAS_SHAPES, ids=str)
@pytest.mark.parametrize(
    "dtype,bias_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)],
    ids=str,
)
def test_broadcast_bias_and_its_gradient(bias_shape, dtype, bias_dtype):
    # Hkv = 2 < Hq = 4 and B = 2: bias broadcast over batch or heads is shared
    # between tasks and goes through the per-chunk partial sums. dbias has the bias's shape and dtype.
    check(Case(2, 4, 2, 97, 130, 32, dtype, "bottom_right", bias_shape=bias_shape, bias_dtype=bias_dtype))


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (4, 2), (8, 2), (8, 1)], ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_grouped_query_attention(heads_q, heads_kv, dtype):
    check(Case(2, heads_q, heads_kv, 70, 129, 64, dtype, causal=True))


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(97, 257), (257, 97), (128, 128), (1, 97), (130, 1)], ids=str)
def test_causal_alignments(causal, seqlen_q, seqlen_k):
    case = Case(1, 2, 1, seqlen_q, seqlen_k, 48, causal=causal, bias_shape=(1, 2, seqlen_q, seqlen_k))
    checked = check(case)
    out, lse, grads = checked.out, checked.lse, checked.grads
    # Query i sees keys j <= i + offset: rows with i + offset < 0 see nothing.
    offset = seqlen_k - seqlen_q if parse_causal(causal).name == "BOTTOM_RIGHT" else 0
    empty_rows = torch.arange(seqlen_q) + offset < 0
    assert torch.all(out[:, :, empty_rows] == 0) and torch.all(lse[:, :, empty_rows] == -math.inf)
    assert torch.all(grads["q"][:, :, empty_rows] == 0)
    assert torch.all(grads["bias"][:, :, empty_rows] == 0)


@pytest.mark.parametrize("bias_heads,bias_rows", [(1, 1), (2, 33)], ids=["key-bias", "full-bias"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_key_mask_with_fully_masked_batch_rows(dtype, bias_heads, bias_rows):
    # A full-size bias has its gradient stored tile by tile: skipped tiles must store zeros.
    case = Case(
        3,
        2,
        2,
        33,
        150,
        32,
        dtype,
        bias_shape=(3, bias_heads, bias_rows, 150),
        bias_dtype=accumulation_dtype(dtype),
        key_mask=True,
        empty_key_rows=(1,),
        grad_lse=True,
    )
    inputs = case.make_inputs()
    inputs["key_mask"][2, 64:128] = False  # a whole key block hidden: skipped
    checked = check(case, inputs)
    out, lse, grads = checked.out, checked.lse, checked.grads
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)
    for name in ("q", "k", "v", "bias"):
        assert not torch.isnan(grads[name]).any(), name
        assert torch.all(grads[name][1] == 0), name


def test_strided_bias_and_broadcast_key_mask():
    # A bias read through a transposed view (keys not contiguous) and a key mask
    # of shape (1, Sk) shared by the batch, read through a strided view.
    case = Case(2, 2, 1, 70, 90, 32, causal="bottom_right")
    inputs = case.make_inputs()
    inputs["bias"] = torch.randn(1, 2, 90, 70).transpose(-1, -2).requires_grad_(True)
    assert inputs["bias"].stride(-1) != 1
    inputs["key_mask"] = (torch.rand(1, 180) < 0.7)[:, ::2]
    inputs["key_mask"][0, 0] = True
    check(case, inputs)


def test_gradient_through_lse():
    check(Case(2, 2, 1, 40, 70, 32, causal=True, bias_shape=(1, 2, 40, 70), grad_lse=True))


def test_minus_inf_bias_counts_as_masked():
    case = Case(1, 2, 2, 20, 30, 16, bias_shape=(1, 2, 20, 30))
    inputs = case.make_inputs()
    with torch.no_grad():
        inputs["bias"][0, 0, 3] = -math.inf  # a row with every score masked by the bias
        inputs["bias"][0, 1, :, 5:9] = -math.inf
    checked = check(case, inputs)
    out, lse, grads = checked.out, checked.lse, checked.grads
    assert torch.all(out[0, 0, 3] == 0) and lse[0, 0, 3] == -math.inf
    assert torch.all(grads["bias"][0, 1, :, 5:9] == 0) and not torch.isnan(grads["q"]).any()


# The instruction-set paths this machine can take (FAST_ATTN_CPU_ISA); "auto" is the
# fastest, AVX-512 with bf16 dot products on the dev and CI machines.
ISAS = ["auto", "avx512", "avx2", "generic"]


@pytest.mark.parametrize("isa", ISAS)
def test_nan_inputs_propagate_like_the_reference(isa, monkeypatch):
    # Each path's exp: NaN stays NaN, -inf (a masked score) gives exactly 0.
    monkeypatch.setenv("FAST_ATTN_CPU_ISA", isa)
    inputs = Case(1, 1, 1, 20, 70, 16, grads=()).make_inputs()
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    q[0, 0, 4, 2] = math.nan
    key_mask = torch.ones(1, 70, dtype=torch.bool)
    k[0, 0, 66, 0] = math.nan
    key_mask[0, 66] = False  # a NaN under a masked key does not leak
    out = fast_attn.attention(q, k, v, key_mask=key_mask, backend="cpu")
    ref = fast_attn.attention(q, k, v, key_mask=key_mask, backend="reference")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0, 0, 4]).all() and not torch.isnan(out[0, 0, 5]).any()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_blocks_of_few_queries(isa, dtype, monkeypatch):
    # Decoding (1 to 4 new queries against a cache) and a last query block of 4 rows
    # (68 = 64 + 4) take dot products along D for their scores; D 44 ends in a partial
    # vector for every width (16 floats for AVX-512 and generic, 8 for AVX2).
    monkeypatch.setenv("FAST_ATTN_CPU_ISA", isa)
    for seqlen_q in (1, 3, 4, 5, 68):
        bias_shape = (1, 4, seqlen_q, 70)
        check(Case(2, 4, 2, seqlen_q, 70, 44, dtype, "bottom_right", bias_shape=bias_shape, key_mask=True))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("causal", [False, "bottom_right"])
@pytest.mark.parametrize("seqlen_q", [70, 2])
def test_dropout_matches_reference_with_the_same_seed(dtype, causal, seqlen_q):
    # Sq 2: a block of few queries (dot products along D for its scores). The seed's high bits are used too.
    check(
        Case(
            2,
            4,
            2,
            seqlen_q,
            97,
            32,
            dtype,
            causal,
            scale=0.2,
            bias_shape=(1, 4, seqlen_q, 97),
            bias_dtype=accumulation_dtype(dtype),
            key_mask=True,
            dropout_p=0.3,
            dropout_seed=(1 << 40) + 12345,
        )
    )


def backward_once(inputs: dict):
    q, k, v, bias = (inputs[n] for n in GRAD_INPUTS)
    key_mask = inputs["key_mask"]
    out = fast_attn.attention(q, k, v, bias=bias, key_mask=key_mask, causal="bottom_right", backend="cpu")
    grad_out = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)
    return [g.clone() for g in torch.autograd.grad(out, [q, k, v, bias], grad_out)]


@pytest.mark.parametrize(
    "batch,heads_q,heads_kv,bias_shape",
    [(1, 4, 1, (1, 1, 150, 1)), (2, 4, 2, (1, 1, 1, 300)), (3, 2, 2, (3, 2, 150, 300))],
    ids=str,
)
def test_backward_is_deterministic_for_any_thread_count(batch, heads_q, heads_kv, bias_shape):
    # B * Hkv = 1 splits the key blocks across tasks (dq partial sums);
    # shared broadcast biases use per-chunk dbias partial sums.
    case = Case(
        batch, heads_q, heads_kv, 150, 300, 64, BF16, bias_shape=bias_shape, bias_dtype=F32, key_mask=True
    )
    inputs = case.make_inputs()
    threads = torch.get_num_threads()
    try:
        first, second = backward_once(inputs), backward_once(inputs)
        torch.set_num_threads(1)
        single = backward_once(inputs)
        torch.set_num_threads(3)
        three = backward_once(inputs)
    finally:
        torch.set_num_threads(threads)
    for name, a, b, c, d in zip(GRAD_INPUTS, first, second, single, three):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d), name


def test_shared_bias_gradient_with_more_threads_than_cores():
    # 16 (batch, kv head) units share every element of a (Sq, Sk) bias: tasks
    # must add into distinct partial sums. A task layout that let two running
    # tasks add into one partial loses updates here (seen with 3-4 threads).
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        for _ in range(3):
            check(Case(4, 4, 4, 150, 300, 32, bias_shape=(150, 300)))
    finally:
        torch.set_num_threads(threads)


def poison_allocator(*tensors_like):
    # Freed NaN-filled blocks are often handed out again by malloc: an output
    # element the kernel forgets to write then shows up as NaN.
    for t in tensors_like:
        torch.full((t.numel() + 64,), math.nan, dtype=t.dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_outputs_fully_written(isa, dtype, monkeypatch):
    # "auto": bf16 dot products for bfloat16 on CPUs with AVX512-BF16.
    monkeypatch.setenv("FAST_ATTN_CPU_ISA", isa)
    for seqlen_q, seqlen_k, head_dim in [(70, 33, 40), (1, 65, 17), (129, 129, 96)]:
        bias_shape = (2, 1, seqlen_q, seqlen_k)
        case = Case(2, 3, 1, seqlen_q, seqlen_k, head_dim, dtype, bias_shape=bias_shape, bias_dtype=F32)
        inputs = case.make_inputs()
        q, k, v, bias = (inputs[n] for n in GRAD_INPUTS)
        for _ in range(3):
            poison_allocator(q, k, torch.empty(2, 3, seqlen_q), bias)
            out, lse = fast_attn.attention(q, k, v, bias=bias, return_lse=True, backend="cpu")
            grads = torch.autograd.grad(out, [q, k, v, bias], torch.randn_like(out))
            for t in (out, lse, *grads):
                assert torch.isfinite(t).all()
    check(case, inputs)


@pytest.mark.parametrize(
    "isa,dtype",
    [("generic", dtype) for dtype in ALL_DTYPES]
    + [("avx2", dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    + [("avx512", torch.bfloat16)],
    ids=str,
)
def test_each_instruction_set_path(isa, dtype, monkeypatch):
    # "generic": the portable kernels (CPUs without AVX2; float64 always).
    # "avx2": 8-float vectors (x86 CPUs without AVX-512).
    # "avx512" for bfloat16: float products instead of bf16 dot products.
    # D 44: a partial last vector for every width.
    monkeypatch.setenv("FAST_ATTN_CPU_ISA", isa)
    check(Case(2, 4, 2, 97, 70, 44, dtype, "bottom_right", bias_shape=(1, 4, 97, 70), key_mask=True))


def test_bfloat16_odd_head_dim_and_odd_strides():
    # Odd D, or odd strides of the tensors read in place as bf16 pairs (forward: k;
    # backward: q, grad_out), rule out the bf16 dot products: float products run.
    check(Case(2, 2, 1, 33, 40, 17, BF16, causal=True))
    base = torch.randn(2, 2, 33, 65).to(torch.bfloat16)
    q = base[..., 1:33].requires_grad_(True)  # odd storage offset, odd row stride
    k, v = (torch.randn(2, 1, 40, 32).to(torch.bfloat16).requires_grad_(True) for _ in range(2))
    assert q.stride(2) % 2 == 1
    # A block of few queries reads its q rows in place (unaligned here) with bf16 dot products.
    few_queries = base[:, :, :3, 1:33].requires_grad_(True)
    k_odd = torch.randn(2, 1, 40, 33).to(torch.bfloat16)[..., 1:].requires_grad_(True)
    assert k_odd.stride(2) % 2 == 1
    for query, key in ((q, k), (few_queries, k), (q, k_odd)):
        inputs = {"q": query, "k": key, "v": v, "bias": None, "key_mask": None}
        check(Case.of_inputs(inputs), inputs)


def test_empty_inputs():
    for shape_q, shape_kv in [
        ((0, 2, 5, 8), (0, 1, 7, 8)),
        ((2, 2, 0, 8), (2, 1, 7, 8)),
        ((2, 2, 5, 8), (2, 1, 0, 8)),
    ]:
        q = torch.randn(shape_q, requires_grad=True)
        k = torch.randn(shape_kv, requires_grad=True)
        v = torch.randn(shape_kv, requires_grad=True)
        bias = torch.randn(1, 2, shape_q[2], shape_kv[2], requires_grad=True)
        out, lse = fast_attn.attention(q, k, v, bias=bias, return_lse=True, backend="cpu")
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        if shape_kv[2] == 0:  # queries but no keys: every row fully masked
            assert torch.all(out == 0) and torch.all(lse == -math.inf)
        grads = torch.autograd.grad(out, [q, k, v, bias], torch.ones_like(out))
        for grad, source in zip(grads, (q, k, v, bias)):
            assert grad.shape == source.shape and torch.all(grad == 0)


def test_gradcheck_float64():
    torch.manual_seed(0)
    q, k, v = (Case(2, 2, 1, 5, 7, 4, torch.float64).make_inputs()[n] for n in "qkv")
    bias = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    key_mask = torch.tensor([[True, False, True, True, True, False, True], [True] * 7])

    def function(q, k, v, bias):
        return fast_attn.attention(
            q,
            k,
            v,
            bias=bias,
            key_mask=key_mask,
            causal="bottom_right",
            scale=0.7,
            return_lse=True,
            backend="cpu",
        )

    assert torch.autograd.gradcheck(function, (q, k, v, bias))
    row_bias = torch.randn(2, 1, 5, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, b: function(q, k, v, b)[0], (q, k, v, row_bias))


@pytest.mark.parametrize(
    "modifiers",
    [{}, {"window_size": (4, 1), "softcap": 2.5, "alibi": "h"}],
    ids=["plain", "window-softcap-alibi"],
)
def test_opcheck_forward_and_backward(modifiers):
    case = Case(
        2,
        4,
        2,
        9,
        13,
        8,
        causal="bottom_right",
        scale=0.5,
        bias_shape=(1, 4, 9, 13),
        key_mask=True,
        dropout_p=0.1,
        dropout_seed=7,
        **modifiers,
    )
    ops = torch.ops.fast_attn
    opcheck_forward_and_backward(ops.attention_forward, ops.attention_backward, case)


def test_torch_compile_fullgraph_matches_eager():
    inputs = Case(2, 4, 2, 33, 40, 16, bias_shape=(1, 4, 33, 40), key_mask=True).make_inputs()
    q, k, v, bias, key_mask = (inputs[n] for n in (*GRAD_INPUTS, "key_mask"))

    def step(q, k, v, bias):
        out = fast_attn.attention(q, k, v, bias=bias, key_mask=key_mask, causal="bottom_right", backend="cpu")
        return out, (out * out).sum()

    compiled = torch.compile(step, fullgraph=True)  # Inductor; a graph break would raise
    eager_out, eager_loss = step(q, k, v, bias)
    eager_grads = torch.autograd.grad(eager_loss, [q, k, v, bias])
    compiled_out, compiled_loss = compiled(q, k, v, bias)
    compiled_grads = torch.autograd.grad(compiled_loss, [q, k, v, bias])
    # The same kernels run: outputs and gradients are identical; Inductor's
    # fused sum of the loss may round differently.
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=0)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
