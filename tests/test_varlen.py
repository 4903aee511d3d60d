"""Packed variable-length sequences (fast_attn.varlen_attention): the reference against an
independent block-diagonal formulation, every kernel backend against the reference run per
sequence (forward, lse and every gradient), each document against fast_attn.attention alone,
bad input, torch.compile and opcheck."""

from __future__ import annotations

import math

import pytest
import torch

import fast_attn
from fast_attn.dropout import dropout_keep_mask
from fast_attn.reference import alibi_bias, reference_attention, reference_varlen_attention
from fast_attn.testing import VARLEN_POSITIONAL, VarlenCase, backend_device, check_varlen_against_reference


def block_diagonal_visibility(lengths_q, lengths_k, causal: str | bool, window) -> torch.Tensor:
    """Bool (Tq, Tk) by the definition, one score at a time: a query sees only keys of its own
    sequence, inside that sequence's band (causal and window aligned to the sequence)."""
    visible = torch.zeros(sum(lengths_q), sum(lengths_k), dtype=torch.bool)
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    q0 = k0 = 0
    for sq, sk in zip(lengths_q, lengths_k):
        for i in range(sq):
            diagonal = i if causal in (True, "top_left") else i + sk - sq
            for j in range(sk):
                visible[q0 + i, k0 + j] = (left < 0 or j >= diagonal - left) and (
                    right < 0 or j <= diagonal + right
                )
        q0, k0 = q0 + sq, k0 + sk
    return visible


@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("window", [None, (2, 1)])
def test_reference_equals_the_packed_problem_with_a_block_diagonal_mask(causal, window):
    lengths_q, lengths_k = (3, 0, 1, 6, 2), (4, 2, 0, 5, 2)
    heads, cu_q, cu_k = 4, torch.tensor([0, 3, 3, 4, 10, 12]), torch.tensor([0, 4, 6, 6, 11, 13])
    q = torch.randn(12, heads, 8, dtype=torch.float64)
    k, v = torch.randn(13, 2, 8, dtype=torch.float64), torch.randn(13, 2, 8, dtype=torch.float64)
    slopes = torch.rand(5, heads)
    seed = torch.tensor([2024])
    out, lse = reference_varlen_attention(
        q, k, v, cu_q.int(), cu_k.int(), causal=causal, window_size=window, softcap=3.0,
        alibi_slopes=slopes, dropout_p=0.3, dropout_seed=seed,
    )  # fmt: skip

    visible = block_diagonal_visibility(lengths_q, lengths_k, causal, window)
    alibi = torch.zeros(heads, 12, 13, dtype=torch.float64)
    for n in range(5):
        rows, cols = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        block = alibi_bias(slopes[n][None], lengths_q[n], lengths_k[n], torch.float64)[0]
        alibi[:, rows, cols] = block
    bias = alibi.masked_fill(~visible, -math.inf)[None]
    packed = [t.transpose(0, 1)[None] for t in (q, k, v)]
    expected_out, expected_lse = reference_attention(
        *packed, bias=bias, softcap=3.0, dropout_p=0.3,
        dropout_keep=dropout_keep_mask(seed, 0.3, 1, heads, 12, 13, q.device),
    )  # fmt: skip
    torch.testing.assert_close(out, expected_out[0].transpose(0, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse[0], rtol=1e-12, atol=1e-12)


CASES = [
    VarlenCase((5, 0, 1, 37, 16)),
    VarlenCase((1,), heads_q=3, heads_kv=3),
    VarlenCase((0, 0)),
    VarlenCase((70, 3, 129), heads_q=4, heads_kv=2, causal="top_left"),
    VarlenCase((7, 1, 40), (19, 5, 0), heads_q=6, heads_kv=2, causal="bottom_right", head_dim=24),
    VarlenCase((7, 1, 40), (19, 5, 0), causal="top_left", strided=True),
    VarlenCase((33, 12, 65), causal="bottom_right", window_size=(8, 0), alibi="nh"),
    VarlenCase((20, 9), (11, 30), window_size=(4, 3), softcap=5.0, alibi="h"),
    VarlenCase((31, 2, 17), causal=True, sinks=True, max_seqlen_tensor=True),
    VarlenCase((16, 40, 5), (9, 40, 22), causal="bottom_right", dropout_p=0.25),
    VarlenCase((3, 64, 0, 18), dtype=torch.float64, causal=True, head_dim=8),
    VarlenCase((3, 64, 0, 18), dtype=torch.bfloat16, causal=True, head_dim=32),
    VarlenCase((21, 47), dtype=torch.float16, window_size=(5, -1)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_varlen_matches_reference(kernel_backend, case):
    spec = fast_attn.dispatch.BACKENDS[kernel_backend]
    if case.dtype not in spec.dtypes:
        pytest.skip(f"{kernel_backend} does not take {case.dtype}")
    check_varlen_against_reference(kernel_backend, case, backend_device(kernel_backend))


def test_each_document_gets_what_it_gets_alone(kernel_backend):
    """The promise to packed training: a document's rows and gradients in the pack equal those of
    fast_attn.attention on the document alone, on the same backend."""
    device = backend_device(kernel_backend)
    case = VarlenCase((9, 1, 30, 0, 14), heads_q=4, heads_kv=2, causal=True, window_size=(6, 0))
    inputs = case.make_inputs(device)
    out = fast_attn.varlen_attention(*(inputs[n] for n in VARLEN_POSITIONAL), **case.options(inputs),
                                     backend=kernel_backend)  # fmt: skip
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, [inputs[n] for n in ("q", "k", "v")], grad_out)
    offsets = inputs["cu_seqlens_q"].tolist()
    for begin, end in zip(offsets[:-1], offsets[1:]):
        alone = [
            inputs[n][begin:end].detach().transpose(0, 1)[None].requires_grad_(True) for n in ("q", "k", "v")
        ]
        out_alone = fast_attn.attention(*alone, causal=True, window_size=(6, 0), backend=kernel_backend)
        grads_alone = torch.autograd.grad(out_alone, alone, grad_out[begin:end].transpose(0, 1)[None])
        torch.testing.assert_close(out[begin:end], out_alone[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
        for packed_grad, grad in zip((dq, dk, dv), grads_alone):
            torch.testing.assert_close(packed_grad[begin:end], grad[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


# The CPU kernels' plans: lengths about their blocks (64 query rows; 64 keys forward, 128
# backward), many sequences of mixed lengths (tasks ordered by cost), one long sequence (its key
# blocks split over several dq accumulators), and float64 with every modifier and dropout.
MIXED_LENGTHS_Q = (76, 68, 0, 57, 1, 30, 90, 12, 0, 45, 64, 3, 88, 19, 1, 50)
MIXED_LENGTHS_K = (40, 84, 31, 0, 1, 86, 90, 7, 0, 65, 64, 128, 20, 33, 2, 51)
CPU_PLAN_CASES = [
    VarlenCase((64, 65, 1, 0, 129, 200), (128, 129, 1, 3, 0, 257), heads_q=4, heads_kv=2, causal="bottom_right"),
    VarlenCase(MIXED_LENGTHS_Q, MIXED_LENGTHS_K, heads_q=4, causal="bottom_right", window_size=(20, 0), alibi="nh"),
    VarlenCase(MIXED_LENGTHS_Q, heads_q=2, heads_kv=2, dtype=torch.bfloat16, causal=True, head_dim=64),
    VarlenCase((300,), (700,), causal="top_left", head_dim=8),
    VarlenCase((70, 10, 130, 66), (40, 150, 130, 300), dtype=torch.float64, causal="bottom_right", softcap=4.0,
               alibi="nh", dropout_p=0.2, strided=True, head_dim=8),
]  # fmt: skip


@pytest.mark.parametrize("case", CPU_PLAN_CASES, ids=str)
def test_cpu_plans_of_packed_sequences(case):
    check_varlen_against_reference("cpu", case)


def test_cpu_results_do_not_depend_on_the_thread_count():
    """The CPU plans come from the offsets alone: bitwise the same out and gradients on 1, 3 and 7 threads."""
    case = VarlenCase((300, 5, 0, 130, 1, 64), (280, 40, 7, 130, 0, 700), heads_q=4, heads_kv=2, causal=True)
    inputs = case.make_inputs()

    def run():
        out = fast_attn.varlen_attention(*(inputs[n] for n in VARLEN_POSITIONAL), causal=True, backend="cpu")
        grad_out = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        return [out.detach(), *torch.autograd.grad(out, [inputs[n] for n in ("q", "k", "v")], grad_out)]

    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 3, 7):
            torch.set_num_threads(count)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), results[0], other):
            assert torch.equal(a, b), name


def test_cpu_op_leaves_rows_of_no_sequence_at_zero():
    """Offsets that skip rows (the op takes them; varlen_attention refuses them): those rows of q
    get out 0 and lse -inf, those of k and v zero gradients; the sequences' own rows are what the
    same sequences give packed without gaps."""
    cu_q = torch.tensor([3, 50, 50, 120], dtype=torch.int32)  # q rows 0:3 and 120:140 in no sequence
    cu_k = torch.tensor([0, 80, 100, 160], dtype=torch.int32)  # k rows 160:200 in no sequence
    q = torch.randn(140, 4, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(200, 2, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(200, 2, 16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(140, 4, 16, dtype=torch.float64)

    def run(q, k, v, cu_q, cu_k, grad_out):
        out, lse = torch.ops.fast_attn.attention_forward(
            *(t.transpose(0, 1)[None] for t in (q, k, v)), None, None, None, 0.25, 2, 0.0,
            None, -1, -1, 0.0, cu_q, cu_k, 70, 80,
        )  # fmt: skip
        out, lse = out[0].transpose(0, 1), lse[0]
        loss = (out * grad_out).sum() + torch.where(lse.isinf(), 0, lse).sum()
        return [out, lse, *torch.autograd.grad(loss, (q, k, v))]

    for t in (q, k, torch.empty(4, 140, dtype=torch.float64)):  # out and dq, dk and dv, lse
        # Freed NaN blocks are often handed out again by malloc: a row no task writes shows as NaN.
        torch.full((t.numel() + 64,), math.nan, dtype=t.dtype)
    out, lse, dq, dk, dv = run(q, k, v, cu_q, cu_k, grad_out)
    q_rows, k_rows = slice(3, 120), slice(0, 160)
    expected = run(
        *(t.detach()[rows].requires_grad_(True) for t, rows in ((q, q_rows), (k, k_rows), (v, k_rows))),
        cu_q - 3, cu_k, grad_out[q_rows],
    )  # fmt: skip
    for got, want in zip((out[q_rows], lse[:, q_rows], dq[q_rows], dk[k_rows], dv[k_rows]), expected):
        torch.testing.assert_close(got, want)
    assert not out[:3].any() and not out[120:].any() and not dq[:3].any() and not dq[120:].any()
    assert (lse[:, :3] == -math.inf).all() and (lse[:, 120:] == -math.inf).all()
    assert not dk[160:].any() and not dv[160:].any()


def good_inputs(**changes):
    case = VarlenCase((3, 0, 5), heads_q=4, heads_kv=2)
    inputs = {**case.make_inputs(), **changes}
    return [inputs[n] for n in VARLEN_POSITIONAL]


BAD_INPUTS = [
    ("cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([0, 3, 3, 8])), TypeError, "int32"),
    (
        "cu_seqlens_q",
        dict(cu_seqlens_q=torch.tensor([1, 3, 3, 8], dtype=torch.int32)),
        ValueError,
        "start at 0",
    ),
    (
        "cu_seqlens_k",
        dict(cu_seqlens_k=torch.tensor([0, 4, 3, 8], dtype=torch.int32)),
        ValueError,
        "never decrease",
    ),
    ("cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([0, 3, 3, 7], dtype=torch.int32)), ValueError, "Tq = 8"),
    ("cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([[0, 3, 3, 8]], dtype=torch.int32)), ValueError, "1-D"),
    ("cu_seqlens_k", dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "N + 1"),
    ("q", dict(q=torch.randn(1, 8, 4, 16)), ValueError, "3-D"),
    ("k", dict(k=torch.randn(8, 3, 16), v=torch.randn(8, 3, 16)), ValueError, "Hq % Hkv"),
    ("cu_seqlens_k", dict(k=torch.randn(9, 2, 16), v=torch.randn(9, 2, 16)), ValueError, "Tk = 9"),
    ("v", dict(v=torch.randn(8, 2, 8)), ValueError, "same shape"),
    ("max_seqlen_q", dict(max_seqlen_q=4), ValueError, "longest sequence, 5"),
    ("max_seqlen_k", dict(max_seqlen_k=torch.tensor(2)), ValueError, "longest sequence, 5"),
    ("max_seqlen_q", dict(max_seqlen_q=5.0), TypeError, "float"),
]


@pytest.mark.parametrize(
    "argument, changes, error, words", BAD_INPUTS, ids=lambda x: x if isinstance(x, str) else ""
)
def test_bad_input_is_refused_naming_the_argument(argument, changes, error, words):
    with pytest.raises(error) as raised:
        fast_attn.varlen_attention(*good_inputs(**changes), backend="cpu")
    assert argument in str(raised.value) and words in str(raised.value)


def test_sinks_are_one_logit_per_head():
    # One logit per query row is fast_attn.attention's alone; a packed batch takes (Hq,).
    with pytest.raises(ValueError, match=r"sinks must have shape \(Hq,\) = \(4,\), got \(1, 4, 8\)"):
        fast_attn.varlen_attention(*good_inputs(), sinks=torch.zeros(1, 4, 8), backend="cpu")


def test_alibi_slopes_shape_is_checked_against_the_number_of_sequences():
    with pytest.raises(ValueError, match=r"\(N, Hq\) = \(3, 4\)"):
        fast_attn.varlen_attention(*good_inputs(), alibi_slopes=torch.rand(2, 4), backend="cpu")


@pytest.mark.parametrize("max_seqlen_tensor", [False, True])
def test_compiles_whole_forward_and_backward(max_seqlen_tensor):
    """torch.compile(fullgraph=True): no graph break, no .item() on a 0-d max_seqlen tensor."""
    case = VarlenCase((5, 0, 12, 3), heads_q=4, heads_kv=2, causal=True, max_seqlen_tensor=max_seqlen_tensor)
    inputs = case.make_inputs()
    positional = [inputs[n] for n in VARLEN_POSITIONAL]

    def loss(*args):
        out, lse = fast_attn.varlen_attention(*args, causal=True, return_lse=True, backend="cpu")
        return (out.float() ** 2).sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    expected = loss(*positional)
    expected_grads = torch.autograd.grad(expected, positional[:3])
    actual = compiled(*positional)
    actual_grads = torch.autograd.grad(actual, positional[:3])
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)


def varlen_op_arguments(case: VarlenCase) -> tuple[tuple, dict]:
    """(forward op arguments, inputs) of `case` in the ops' layout: (1, H, T, D) views."""
    inputs = case.make_inputs()
    q, k, v = (inputs[n].detach().transpose(0, 1)[None].requires_grad_(True) for n in ("q", "k", "v"))
    trailing = (None, -1, -1, 0.0, inputs["cu_seqlens_q"], inputs["cu_seqlens_k"], 40, -1)
    return (q, k, v, None, None, None, 0.25, 2, 0.0, *trailing), inputs


@pytest.mark.parametrize("op_family", ["attention", "triton_attention"])
def test_opcheck_with_packed_sequences(op_family):
    if op_family == "triton_attention":
        pytest.importorskip("triton")
        fast_attn.dispatch.BACKENDS["triton"].availability()
    forward_op = getattr(torch.ops.fast_attn, f"{op_family}_forward")
    backward_op = getattr(torch.ops.fast_attn, f"{op_family}_backward")
    forward_args, _ = varlen_op_arguments(VarlenCase((7, 0, 30), heads_q=4, heads_kv=2))
    torch.library.opcheck(forward_op.default, forward_args)
    out, lse = (t.detach() for t in forward_op(*forward_args))
    q, k, v = (t.detach() for t in forward_args[:3])
    trailing = forward_args[9:]
    backward_args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, None, None, None, out, lse,
                     0.25, 2, 0.0, False, False, *trailing)  # fmt: skip
    torch.library.opcheck(backward_op.default, backward_args)
