"""Packed variable-length sequences (varlen) in the Triton ops, against the float64 reference
run on each sequence alone.

The ops take q (1, Hq, Tq, D) and k, v (1, Hkv, Tk, D), views of packed (T, H, D) tensors,
with int32 offsets cu_seqlens_q / cu_seqlens_k (N + 1,): sequence n is rows
cu_seqlens_q[n]:cu_seqlens_q[n + 1] of q against rows cu_seqlens_k[n]:cu_seqlens_k[n + 1] of
k and v. Each test runs one packed forward and backward (dq, dk, dv through the op's
autograd, with a gradient on lse too) and holds every sequence's slice of out, lse and the
gradients to fast_attn.testing's error rule against reference_attention on that sequence.
Under the interpreter the kernels run 32 x 32 tiles: lengths 0, 1, 31-33 and 40-70 cover
empty sequences, partial blocks and several blocks per sequence.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

import fast_attn  # noqa: E402,F401  (registers the ops)
from fast_attn.causal import CausalMode  # noqa: E402
from fast_attn.dropout import dropout_keep_mask  # noqa: E402
from fast_attn.testing import assert_error_rule, rounded_output_reference, run_reference  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32 = torch.float16, torch.float32
CAUSAL = {False: CausalMode.NONE, "top_left": CausalMode.TOP_LEFT, "bottom_right": CausalMode.BOTTOM_RIGHT}
SEED = 0x5EED_0123_4567


def offsets(lengths) -> torch.Tensor:
    """int32 (N + 1,) offsets of consecutive sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def packed(rows: int, heads: int, head_dim: int, dtype, layout: str) -> torch.Tensor:
    """(1, H, T, D) view of packed (T, H, D) memory; "strided": rows further apart than H * D."""
    pad = 8 if layout == "strided" else 0
    t = torch.randn(rows, heads, head_dim + pad, device=DEVICE)[..., :head_dim].to(dtype)
    return t.permute(1, 0, 2)[None].requires_grad_()


def run_packed(
    q,
    k,
    v,
    cu_q,
    cu_k,
    max_q,
    max_k,
    *,
    causal=False,
    window=None,
    softcap=None,
    alibi=None,
    dropout_p=0.0,
    seed=None,
    scale=None,
):
    """out, lse and (dq, dk, dv) of the Triton forward op and its autograd, with random output
    gradients (returned too)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    left, right = window or (-1, -1)
    out, lse = torch.ops.fast_attn.triton_attention_forward(
        q, k, v, None, None, seed, scale, int(CAUSAL[causal]), dropout_p, alibi, left, right,
        softcap or 0.0, cu_q, cu_k, max_q, max_k,
    )  # fmt: skip
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad([out, lse], [q, k, v], [grad_out, grad_lse])
    return out, lse, grads, grad_out, grad_lse


def sequence_rows(cu: torch.Tensor, n: int, total: int, bound: int) -> tuple[int, int]:
    """(begin, end) of sequence n as the kernels read it: offsets clamped to [0, total], the
    length to [0, bound] (csrc/attention_params.h's sequence_view)."""
    begin, end = (min(max(int(x), 0), total) for x in (cu[n], cu[n + 1]))
    return begin, begin + min(max(end - begin, 0), bound)


def check_packed(q, k, v, cu_q, cu_k, max_q=-1, max_k=-1, **options):
    """Run the packed problem; hold each sequence to the reference on that sequence alone, and
    every packed row that no sequence covers to out 0, lse -inf and zero gradients."""
    out, lse, (dq, dk, dv), grad_out, grad_lse = run_packed(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    dtype, (tq, tk) = q.dtype, (q.shape[2], k.shape[2])
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3] and lse.dtype == F32
    bound_q = tq if max_q < 0 else max_q
    bound_k = tk if max_k < 0 else max_k
    covered_q = torch.zeros(tq, dtype=torch.bool)
    covered_k = torch.zeros(tk, dtype=torch.bool)
    alibi, seed = options.get("alibi"), options.get("seed")
    for n in range(cu_q.numel() - 1):
        qa, qb = sequence_rows(cu_q, n, tq, bound_q)
        ka, kb = sequence_rows(cu_k, n, tk, bound_k)
        covered_q[qa:qb] = True
        covered_k[ka:kb] = True
        inputs = {
            name: t[:, :, a:b].detach().requires_grad_()
            for name, t, a, b in (("q", q, qa, qb), ("k", k, ka, kb), ("v", v, ka, kb))
        }
        if alibi is not None:
            inputs["alibi_slopes"] = alibi[n if alibi.shape[0] > 1 else 0][None]  # (1, Hq)
        keep = None
        if seed is not None:  # the sequence's block of the packed problem's keep mask
            keep = dropout_keep_mask(
                seed, options["dropout_p"], 1, q.shape[1], tq, tk, q.device, range(qa, qb), range(ka, kb)
            )
        reference_options = dict(
            causal=options.get("causal", False),
            window_size=options.get("window"),
            softcap=options.get("softcap"),
            scale=options.get("scale"),
            dropout_p=options.get("dropout_p", 0.0),
            dropout_keep=keep,
            grad_out=grad_out[:, :, qa:qb],
            grad_lse=grad_lse[:, :, qa:qb],
        )
        exact = run_reference(inputs, compute_dtype=torch.float64, **reference_options)
        same_dtype = run_reference(inputs, compute_dtype=dtype, **reference_options)
        rounded = rounded_output_reference(
            inputs, out_dtype=dtype, fed_out=out[:, :, qa:qb], **reference_options
        )
        name = f"sequence {n} (q {qa}:{qb}, k {ka}:{kb})"
        assert_error_rule(f"{name} out", out[:, :, qa:qb], exact.out, same_dtype.out, dtype)
        seq_lse = lse[:, :, qa:qb]
        assert torch.equal(torch.isneginf(seq_lse), torch.isneginf(exact.lse)), f"{name}: rows with lse -inf"
        assert_error_rule(f"{name} lse", seq_lse, exact.lse, same_dtype.lse, dtype)
        for grad_name, grad in (("q", dq[:, :, qa:qb]), ("k", dk[:, :, ka:kb]), ("v", dv[:, :, ka:kb])):
            assert_error_rule(
                f"{name} d{grad_name}",
                grad,
                exact.grads[grad_name],
                same_dtype.grads[grad_name],
                dtype,
                rounded_output=rounded.grads[grad_name],
            )
    uncovered_q, uncovered_k = ~covered_q.to(q.device), ~covered_k.to(q.device)
    assert torch.all(out[:, :, uncovered_q] == 0) and torch.all(dq[:, :, uncovered_q] == 0)
    assert torch.all(lse[:, :, uncovered_q] == -math.inf)
    assert torch.all(dk[:, :, uncovered_k] == 0) and torch.all(dv[:, :, uncovered_k] == 0)
    return out, lse


def check_lengths(
    lengths_q, lengths_k, heads_q=2, heads_kv=1, head_dim=16, dtype=F32, layout="thd", **options
):
    cu_q, cu_k = offsets(lengths_q), offsets(lengths_k)
    q = packed(sum(lengths_q), heads_q, head_dim, dtype, layout)
    k = packed(sum(lengths_k), heads_kv, head_dim, dtype, layout)
    v = packed(sum(lengths_k), heads_kv, head_dim, dtype, layout)
    max_q = options.pop("max_seqlen_q", max(lengths_q))
    max_k = options.pop("max_seqlen_k", max(lengths_k))
    return check_packed(q, k, v, cu_q, cu_k, max_q, max_k, **options)


# ---------------------------------------------------------------- lengths and layouts


@pytest.mark.parametrize(
    "lengths_q,lengths_k",
    [
        ([1], [1]),  # N = 1, the smallest problem
        ([45], [70]),  # N = 1 over several blocks
        ([1, 0, 33, 31, 5], [1, 7, 33, 0, 64]),  # empty sequences on either side, block edges
        ([32, 40, 2], [32, 40, 2]),  # Sq_n == Sk_n
    ],
)
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_lengths(lengths_q, lengths_k, dtype):
    check_lengths(lengths_q, lengths_k, dtype=dtype)


def test_mha_strided_rows_and_head_dim_40():
    check_lengths([20, 37], [50, 9], heads_q=3, heads_kv=3, head_dim=40, layout="strided")


def test_max_seqlen_derived_from_the_offsets():
    check_lengths([3, 40], [35, 6], max_seqlen_q=-1, max_seqlen_k=-1)


# ---------------------------------------------------------------- score modifiers


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
def test_causal_alignments_per_sequence(causal):
    # Sq_n < Sk_n, Sq_n > Sk_n (bottom-right: its first rows see no key) and equal.
    check_lengths([20, 45, 33, 0], [50, 12, 33, 4], causal=causal)


@pytest.mark.parametrize(
    "causal,window", [(False, (5, 3)), (False, (-1, 0)), ("top_left", (7, -1)), ("bottom_right", (40, -1))]
)
def test_windows(causal, window):
    check_lengths([20, 45, 1], [50, 12, 40], causal=causal, window=window)


@pytest.mark.parametrize("per_sequence", [True, False], ids=["slopes-n", "slopes-1"])
def test_softcap_and_alibi(per_sequence):
    slopes = torch.rand(3 if per_sequence else 1, 2, device=DEVICE)
    check_lengths([20, 45, 7], [50, 12, 7], causal="bottom_right", softcap=5.0, alibi=slopes)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_dropout_uses_the_packed_keep_mask(dtype):
    seed = torch.tensor([SEED], dtype=torch.int64, device=DEVICE)
    check_lengths([20, 0, 40], [33, 5, 40], dtype=dtype, causal="bottom_right", dropout_p=0.3, seed=seed)


# ---------------------------------------------------------------- offsets the kernels clamp


def test_offsets_are_clamped_and_lengths_cut_to_the_bound():
    # q: sequence 0 starts below row 0 and is cut to 8 rows by max_seqlen_q, sequence 1 ends
    # before it begins (empty); k: sequence 0 ends past the last row. Rows 8..19 of q belong to
    # no sequence (out 0, lse -inf, zero gradients).
    q, k, v = packed(20, 2, 16, F32, "thd"), packed(30, 1, 16, F32, "thd"), packed(30, 1, 16, F32, "thd")
    cu_q = torch.tensor([-3, 12, 5], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 50, 60], dtype=torch.int32, device=DEVICE)
    check_packed(q, k, v, cu_q, cu_k, 8, 40, causal="bottom_right")


def test_rows_outside_every_sequence():
    q, k, v = packed(50, 2, 16, F32, "thd"), packed(40, 1, 16, F32, "thd"), packed(40, 1, 16, F32, "thd")
    cu_q = torch.tensor([4, 10, 30], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([3, 20, 21], dtype=torch.int32, device=DEVICE)
    check_packed(q, k, v, cu_q, cu_k, -1, -1)


def test_no_sequences():
    q, k, v = packed(5, 2, 16, F32, "thd"), packed(6, 1, 16, F32, "thd"), packed(6, 1, 16, F32, "thd")
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    check_packed(q, k, v, cu, cu, -1, -1)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(cu_seqlens_k=None), "go together"),
        (dict(cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int64)), "int32"),
        (dict(cu_seqlens_k=torch.tensor([0, 4, 6], dtype=torch.int32)), "same length"),
        (dict(bias=torch.zeros(1, 2, 4, 6)), "no bias"),
        (dict(max_seqlen_q=-2), "max_seqlen"),
        (dict(alibi_slopes=torch.zeros(2, 2)), "alibi_slopes"),
    ],
)
def test_bad_packed_arguments_are_refused(change, message):
    def on_device(t):
        return None if t is None else t.to(DEVICE)

    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    arguments = dict(
        bias=None, alibi_slopes=None, max_seqlen_q=-1, max_seqlen_k=-1,
        cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 6], dtype=torch.int32),
    )  # fmt: skip
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        torch.ops.fast_attn.triton_attention_forward(
            *map(on_device, (q, k, v, arguments["bias"])), None, None, 0.25, 0, 0.0,
            on_device(arguments["alibi_slopes"]), -1, -1, 0.0,
            on_device(arguments["cu_seqlens_q"]), on_device(arguments["cu_seqlens_k"]),
            arguments["max_seqlen_q"], arguments["max_seqlen_k"],
        )  # fmt: skip


def test_unknown_bound_while_tracing_is_the_packed_rows():
    # Under torch.compile on a GPU the offsets are fake tensors without values: max_seqlen -1
    # then sizes the grid by the packed rows, which bound every sequence.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fast_attn.ops.triton_ops import _max_seqlen

    offsets = torch.tensor([0, 3, 40], dtype=torch.int32)
    assert _max_seqlen(offsets, -1, 50) == 37
    assert _max_seqlen(offsets, 8, 50) == 8 and _max_seqlen(offsets, 80, 50) == 50
    assert _max_seqlen(FakeTensorMode().from_tensor(offsets), -1, 50) == 50
