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
from fast_attn.reference import reference_attention
from fast_attn.testing import assert_error_rule, random_key_mask, random_qkv, run_reference

pytestmark = pytest.mark.skipif(UNAVAILABLE["cpu"] is not None, reason=f"CPU kernels: {UNAVAILABLE['cpu']}")

ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GRAD_NAMES = ("q", "k", "v", "bias")


def accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_bias(shape, dtype, requires_grad=True):
    return torch.randn(shape, dtype=torch.float32).to(dtype).requires_grad_(requires_grad)


def reference(inputs, compute_dtype, grad_out, grad_lse, **kwargs):
    """Reference (out, lse, grads) in `compute_dtype` on copies of `inputs`;
    grads of <out, grad_out> (+ <lse, grad_lse>) for the inputs requiring grad."""
    copies = {
        n: t.detach().to(compute_dtype).requires_grad_(t.requires_grad)
        if t is not None and n in GRAD_NAMES
        else t
        for n, t in inputs.items()
    }
    out, lse = reference_attention(
        copies["q"],
        copies["k"],
        copies["v"],
        bias=copies["bias"],
        key_mask=copies["key_mask"],
        compute_dtype=compute_dtype,
        **kwargs,
    )
    wanted = [n for n in GRAD_NAMES if copies[n] is not None and copies[n].requires_grad]
    if not wanted:
        return out, lse, {}
    outputs, grad_outputs = [out], [grad_out.to(out.dtype)]
    if grad_lse is not None:
        outputs.append(lse)
        grad_outputs.append(grad_lse.to(lse.dtype))
    return (
        out,
        lse,
        dict(zip(wanted, torch.autograd.grad(outputs, [copies[n] for n in wanted], grad_outputs))),
    )


def check_against_reference(q, k, v, *, bias=None, key_mask=None, causal=False, scale=None, grad_lse=False):
    """Run the CPU kernels forward and backward; hold out, lse and every
    requested gradient (through lse too when grad_lse) to the error rule."""
    dtype = q.dtype
    out, lse = fast_attn.attention(
        q, k, v, bias=bias, key_mask=key_mask, causal=causal, scale=scale, return_lse=True, backend="cpu"
    )
    assert out.dtype == dtype and lse.dtype == accumulation(dtype)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    inputs = {"q": q, "k": k, "v": v, "bias": bias, "key_mask": key_mask}
    wanted = [n for n in GRAD_NAMES if inputs[n] is not None and inputs[n].requires_grad]
    grad_out = torch.randn_like(out)
    lse_grad = torch.randn_like(lse) if grad_lse else None
    kwargs = {"causal": causal, "scale": scale}
    exact_out, exact_lse, exact_grads = reference(inputs, torch.float64, grad_out, lse_grad, **kwargs)
    same_out, same_lse, same_grads = reference(inputs, dtype, grad_out, lse_grad, **kwargs)
    assert_error_rule("out", out, exact_out, same_out, dtype)
    assert_error_rule("lse", lse, exact_lse, same_lse, dtype)
    if not wanted:
        return out, lse, {}
    outputs, grad_outputs = ([out, lse], [grad_out, lse_grad]) if grad_lse else ([out], [grad_out])
    grads = dict(zip(wanted, torch.autograd.grad(outputs, [inputs[n] for n in wanted], grad_outputs)))
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, name
        assert_error_rule(f"d{name}", grad, exact_grads[name], same_grads[name], dtype)
    return out, lse, grads


def random_problem(
    dtype, batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, *, layout="bhsd", grads=("q", "k", "v")
):
    q, k, v = random_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, dtype=dtype, layout=layout)
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(name in grads)
    return q, k, v


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
    q, k, v = random_problem(dtype, 2, 2, 2, seqlen_q, seqlen_k, head_dim)
    check_against_reference(q, k, v)


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
    q, k, v = random_problem(dtype, 1, 2, 1, seqlen_q, seqlen_k, 64)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_bshd_transposed_inputs(dtype):
    q, k, v = random_problem(dtype, 2, 4, 2, 97, 130, 40, layout="bshd")
    assert not q.is_contiguous() and q.stride(-1) == 1
    bias = make_bias((1, 4, 97, 130), torch.float32)
    check_against_reference(q, k, v, bias=bias, causal="bottom_right")


@pytest.mark.parametrize("grads", [("k",), ("v",), ("q", "v"), ("bias",), ("q", "bias"), ()], ids=str)
def test_gradients_on_a_subset_of_inputs(grads):
    q, k, v = random_problem(torch.float32, 2, 2, 1, 65, 70, 32, grads=grads)
    bias = make_bias((2, 1, 65, 70), torch.float32, requires_grad="bias" in grads)
    check_against_reference(q, k, v, bias=bias)


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
    # between tasks and goes through the per-chunk partial sums.
    q, k, v = random_problem(dtype, 2, 4, 2, 97, 130, 32)
    bias = make_bias(bias_shape, bias_dtype)
    _, _, grads = check_against_reference(q, k, v, bias=bias, causal="bottom_right")
    assert grads["bias"].shape == bias.shape and grads["bias"].dtype == bias_dtype


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (4, 2), (8, 2), (8, 1)], ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_grouped_query_attention(heads_q, heads_kv, dtype):
    q, k, v = random_problem(dtype, 2, heads_q, heads_kv, 70, 129, 64)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(97, 257), (257, 97), (128, 128), (1, 97), (130, 1)], ids=str)
def test_causal_alignments(causal, seqlen_q, seqlen_k):
    q, k, v = random_problem(torch.float32, 1, 2, 1, seqlen_q, seqlen_k, 48)
    bias = make_bias((1, 2, seqlen_q, seqlen_k), torch.float32)
    out, lse, grads = check_against_reference(q, k, v, bias=bias, causal=causal)
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
    q, k, v = random_problem(dtype, 3, 2, 2, 33, 150, 32)
    key_mask = random_key_mask(3, 150, empty_rows=(1,))
    key_mask[2, 64:128] = False  # a whole key block hidden: skipped
    bias_dtype = accumulation(dtype) if dtype == torch.float64 else torch.float32
    bias = make_bias((3, bias_heads, bias_rows, 150), bias_dtype)
    out, lse, grads = check_against_reference(q, k, v, bias=bias, key_mask=key_mask, grad_lse=True)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == -math.inf)
    for name in ("q", "k", "v", "bias"):
        assert not torch.isnan(grads[name]).any(), name
        assert torch.all(grads[name][1] == 0), name


def test_strided_bias_and_broadcast_key_mask():
    # A bias read through a transposed view (keys not contiguous) and a key mask
    # of shape (1, Sk) shared by the batch, read through a strided view.
    q, k, v = random_problem(torch.float32, 2, 2, 1, 70, 90, 32)
    bias = torch.randn(1, 2, 90, 70).transpose(-1, -2).requires_grad_(True)
    assert bias.stride(-1) != 1
    key_mask = (torch.rand(1, 180) < 0.7)[:, ::2]
    key_mask[0, 0] = True
    check_against_reference(q, k, v, bias=bias, key_mask=key_mask, causal="bottom_right")


def test_gradient_through_lse():
    q, k, v = random_problem(torch.float32, 2, 2, 1, 40, 70, 32)
    bias = make_bias((1, 2, 40, 70), torch.float32)
    check_against_reference(q, k, v, bias=bias, causal=True, grad_lse=True)


def test_minus_inf_bias_counts_as_masked():
    q, k, v = random_problem(torch.float32, 1, 2, 2, 20, 30, 16)
    bias = torch.randn(1, 2, 20, 30)
    bias[0, 0, 3] = -math.inf  # a row with every score masked by the bias
    bias[0, 1, :, 5:9] = -math.inf
    bias.requires_grad_(True)
    out, lse, grads = check_against_reference(q, k, v, bias=bias)
    assert torch.all(out[0, 0, 3] == 0) and lse[0, 0, 3] == -math.inf
    assert torch.all(grads["bias"][0, 1, :, 5:9] == 0) and not torch.isnan(grads["q"]).any()


# The instruction-set paths this machine can take (FAST_ATTN_CPU_ISA); "auto" is the
# fastest, AVX-512 with bf16 dot products on the dev and CI machines.
ISAS = ["auto", "avx512", "avx2", "generic"]


@pytest.mark.parametrize("isa", ISAS)
def test_nan_inputs_propagate_like_the_reference(isa, monkeypatch):
    # Each path's exp: NaN stays NaN, -inf (a masked score) gives exactly 0.
    monkeypatch.setenv("FAST_ATTN_CPU_ISA", isa)
    q, k, v = random_problem(torch.float32, 1, 1, 1, 20, 70, 16, grads=())
    q = q.detach().clone()
    q[0, 0, 4, 2] = math.nan
    key_mask = torch.ones(1, 70, dtype=torch.bool)
    k = k.detach().clone()
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
        q, k, v = random_problem(dtype, 2, 4, 2, seqlen_q, 70, 44)
        bias = make_bias((1, 4, seqlen_q, 70), accumulation(dtype) if dtype == torch.float64 else dtype)
        key_mask = random_key_mask(2, 70)
        check_against_reference(q, k, v, bias=bias, key_mask=key_mask, causal="bottom_right")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("causal", [0, 2])
@pytest.mark.parametrize("seqlen_q", [70, 2])
def test_dropout_matches_reference_with_the_same_seed(dtype, causal, seqlen_q):
    # Sq 2: a block of few queries (dot products along D for its scores).
    q, k, v = random_problem(dtype, 2, 4, 2, seqlen_q, 97, 32)
    bias = make_bias((1, 4, seqlen_q, 97), accumulation(dtype))
    key_mask = random_key_mask(2, 97)
    seed = torch.tensor([(1 << 40) + 12345], dtype=torch.int64)  # high seed bits used too
    dropout_p, scale = 0.3, 0.2
    out, lse = torch.ops.fast_attn.attention_forward(q, k, v, bias, key_mask, seed, scale, causal, dropout_p)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, bias], grad_out)
    inputs = {"q": q, "k": k, "v": v, "bias": bias, "key_mask": key_mask}
    kwargs = {
        "causal": parse_causal(bool(causal) if causal < 2 else "bottom_right"),
        "scale": scale,
        "dropout_p": dropout_p,
        "dropout_seed": seed,
    }
    exact = run_reference(inputs, compute_dtype=torch.float64, grad_out=grad_out, **kwargs)
    same = run_reference(inputs, compute_dtype=dtype, grad_out=grad_out, **kwargs)
    assert_error_rule("out", out, exact.out, same.out, dtype)
    assert_error_rule("lse", lse, exact.lse, same.lse, dtype)
    for name, grad in zip(GRAD_NAMES, grads):
        assert_error_rule(f"d{name}", grad, exact.grads[name], same.grads[name], dtype)


def backward_once(q, k, v, bias, key_mask, causal):
    out = fast_attn.attention(q, k, v, bias=bias, key_mask=key_mask, causal=causal, backend="cpu")
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
    q, k, v = random_problem(torch.bfloat16, batch, heads_q, heads_kv, 150, 300, 64)
    bias = make_bias(bias_shape, torch.float32)
    key_mask = random_key_mask(batch, 300)
    threads = torch.get_num_threads()
    try:
        first = backward_once(q, k, v, bias, key_mask, "bottom_right")
        second = backward_once(q, k, v, bias, key_mask, "bottom_right")
        torch.set_num_threads(1)
        single = backward_once(q, k, v, bias, key_mask, "bottom_right")
        torch.set_num_threads(3)
        three = backward_once(q, k, v, bias, key_mask, "bottom_right")
    finally:
        torch.set_num_threads(threads)
    for name, a, b, c, d in zip(GRAD_NAMES, first, second, single, three):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d), name


def test_shared_bias_gradient_with_more_threads_than_cores():
    # 16 (batch, kv head) units share every element of a (Sq, Sk) bias: tasks
    # must add into distinct partial sums. A task layout that let two running
    # tasks add into one partial loses updates here (seen with 3-4 threads).
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        for _ in range(3):
            q, k, v = random_problem(torch.float32, 4, 4, 4, 150, 300, 32)
            check_against_reference(q, k, v, bias=make_bias((150, 300), torch.float32))
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
        q, k, v = random_problem(dtype, 2, 3, 1, seqlen_q, seqlen_k, head_dim)
        bias = make_bias((2, 1, seqlen_q, seqlen_k), torch.float32)
        for _ in range(3):
            poison_allocator(q, k, torch.empty(2, 3, seqlen_q), bias)
            out, lse = fast_attn.attention(q, k, v, bias=bias, return_lse=True, backend="cpu")
            grads = torch.autograd.grad(out, [q, k, v, bias], torch.randn_like(out))
            for t in (out, lse, *grads):
                assert torch.isfinite(t).all()
    check_against_reference(q, k, v, bias=bias)


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
    q, k, v = random_problem(dtype, 2, 4, 2, 97, 70, 44)
    bias = make_bias((1, 4, 97, 70), accumulation(dtype) if dtype == torch.float64 else dtype)
    key_mask = random_key_mask(2, 70)
    check_against_reference(q, k, v, bias=bias, key_mask=key_mask, causal="bottom_right")


def test_bfloat16_odd_head_dim_and_odd_strides():
    # Odd D, or odd strides of the tensors read in place as bf16 pairs (forward: k;
    # backward: q, grad_out), rule out the bf16 dot products: float products run.
    q, k, v = random_problem(torch.bfloat16, 2, 2, 1, 33, 40, 17)
    check_against_reference(q, k, v, causal=True)
    base = torch.randn(2, 2, 33, 65).to(torch.bfloat16)
    q = base[..., 1:33].requires_grad_(True)  # odd storage offset, odd row stride
    k, v = (torch.randn(2, 1, 40, 32).to(torch.bfloat16).requires_grad_(True) for _ in range(2))
    assert q.stride(2) % 2 == 1
    check_against_reference(q, k, v)
    # A block of few queries reads its q rows in place (unaligned here) with bf16 dot products.
    check_against_reference(base[:, :, :3, 1:33].requires_grad_(True), k, v)
    k_odd = torch.randn(2, 1, 40, 33).to(torch.bfloat16)[..., 1:].requires_grad_(True)
    assert k_odd.stride(2) % 2 == 1
    check_against_reference(q, k_odd, v)


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
    q, k, v = random_problem(torch.float64, 2, 2, 1, 5, 7, 4)
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


def test_opcheck_forward_and_backward():
    q, k, v = random_problem(torch.float32, 2, 4, 2, 9, 13, 8)
    bias = make_bias((1, 4, 9, 13), torch.float32)
    key_mask = random_key_mask(2, 13)
    seed = torch.tensor([7], dtype=torch.int64)
    forward_args = (q, k, v, bias, key_mask, seed, 0.5, 2, 0.1)
    torch.library.opcheck(torch.ops.fast_attn.attention_forward.default, forward_args)
    out, lse = torch.ops.fast_attn.attention_forward(*forward_args)
    backward_args = (
        torch.randn_like(out),
        torch.randn_like(lse),
        q.detach(),
        k.detach(),
        v.detach(),
        bias.detach(),
        key_mask,
        seed,
        out.detach(),
        lse.detach(),
        0.5,
        2,
        0.1,
        True,
        False,
    )
    torch.library.opcheck(torch.ops.fast_attn.attention_backward.default, backward_args)


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = random_problem(torch.float32, 2, 4, 2, 33, 40, 16)
    bias = make_bias((1, 4, 33, 40), torch.float32)
    key_mask = random_key_mask(2, 40)

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
