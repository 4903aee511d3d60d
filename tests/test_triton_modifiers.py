"""The score modifiers in the Triton kernels: the band (sliding windows and causal masks,
both alignments, Sq != Sk), softcap and ALiBi, forward and every gradient, alone and with
bias (and its gradient, through each of the three ways dbias is written), key padding,
GQA, grad_lse and dropout, against the float64 reference by fast_attn.testing's error rule.

Under the interpreter the kernels run 32 x 32 tiles, so sequences of 40-100 span several
blocks: whole blocks outside the band are skipped and only the band's edge blocks are
masked, which test_blocks_outside_the_band_are_never_read checks by poisoning them.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from fast_attn.testing import Case, attention_runner, check_against_reference

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32 = torch.float16, torch.float32
run_triton = attention_runner("triton")


def check(case: Case, inputs: dict | None = None, run=run_triton):
    """Forward, lse and every gradient of the Triton backend vs float64 by the error rule, with the
    kernel's own output as the gradients' second baseline (dropout: the case's seed, replayed)."""
    return check_against_reference(run, case, DEVICE, inputs=inputs, rounded_output="kernel")


# ---------------------------------------------------------------- the band


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 29), (33, 9), (70, 90), (90, 40)])
@pytest.mark.parametrize("causal", [False, "top_left", "bottom_right"])
@pytest.mark.parametrize("window", [(0, 0), (3, -1), (-1, 3), (5, 5), (40, 7)])
def test_window(seqlen_q, seqlen_k, causal, window):
    check(Case(1, 2, 1, seqlen_q, seqlen_k, 16, causal=causal, window_size=window, grad_lse=True))


@pytest.mark.parametrize("causal,window", [(False, (2, 0)), ("top_left", (4, -1)), (False, (-1, 0))])
def test_window_leaving_rows_empty(causal, window):
    # Sq > Sk: the first 50 rows of the bottom-right windows (diagonal i - 50) and the rows past
    # 23 of the top-left one see no key; key padding empties a batch row on top.
    check(
        Case(
            2,
            2,
            2,
            70,
            20,
            16,
            causal=causal,
            window_size=window,
            key_mask=True,
            empty_key_rows=(1,),
            grad_lse=True,
        )
    )


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_window_with_bias_gradient_key_mask_and_gqa(dtype):
    # A full bias: dS written by the dQ programs.
    check(
        Case(
            2,
            4,
            2,
            45,
            70,
            24,
            dtype,
            causal="bottom_right",
            window_size=(20, -1),
            bias_shape=(2, 4, 45, 70),
            key_mask=True,
            grad_lse=True,
        )
    )


@pytest.mark.parametrize(
    "bias_shape", [(1, 2, 70, 75), (1, 1, 1, 75), (2, 2, 70, 1)], ids=["heads-rows-keys", "keys", "rows"]
)
def test_window_with_broadcast_bias_gradient(bias_shape):
    # Each shape takes another branch of the dbias kernel, with both edges of the band.
    check(Case(2, 2, 1, 70, 75, 16, window_size=(9, 12), bias_shape=bias_shape, grad_lse=True))


@pytest.mark.parametrize(
    "seqlen_q,seqlen_k,causal,window,poisoned_keys",
    [
        (30, 100, "top_left", (10, -1), slice(32, 100)),  # right of every row's band (left edge on)
        (30, 100, "bottom_right", (5, 0), slice(0, 64)),  # left of every row's band
        (40, 128, False, (3, 3), slice(0, 64)),  # bottom-right window: left of every band
    ],
)
def test_blocks_outside_the_band_are_never_read(seqlen_q, seqlen_k, causal, window, poisoned_keys):
    # Keys in whole 32-key blocks that no query sees hold NaN in K, V and the bias: a kernel
    # that loads such a block (forward, dK/dV, dQ or the dbias reduction) turns NaN.
    # A bias broadcast over the batch: its gradient comes from the dbias kernel.
    case = Case(
        2,
        2,
        1,
        seqlen_q,
        seqlen_k,
        16,
        causal=causal,
        window_size=window,
        bias_shape=(1, 2, seqlen_q, seqlen_k),
        grad_lse=True,
    )
    clean = case.make_inputs(DEVICE)
    poisoned = {}
    for name, nan_part in (
        ("k", (..., poisoned_keys, slice(None))),
        ("v", (..., poisoned_keys, slice(None))),
        ("bias", (..., poisoned_keys)),
    ):
        poisoned[name] = clean[name].detach().clone()
        poisoned[name][nan_part] = math.nan
        poisoned[name].requires_grad_(True)

    def run_on_poisoned(case, inputs, grad_out, grad_lse):
        out, lse, grads = run_triton(case, {**inputs, **poisoned}, grad_out, grad_lse)
        return out, lse, grads

    check(case, clean, run=run_on_poisoned)


# ---------------------------------------------------------------- softcap and ALiBi


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, "bottom_right"])
def test_softcap(dtype, causal):
    # Scale 1 (4x the default at D 16): scaled scores up to ~10, so a cap of 2 saturates tanh for many.
    check(Case(1, 2, 2, 40, 50, 16, dtype, causal=causal, softcap=2.0, scale=1.0, grad_lse=True))


@pytest.mark.parametrize("bias_shape", [(2, 2, 40, 35), (1, 2, 40, 35)], ids=["full", "broadcast"])
def test_softcap_keeps_the_bias_gradient_uncapped(bias_shape):
    check(Case(2, 2, 2, 40, 35, 16, softcap=1.5, scale=0.75, bias_shape=bias_shape, grad_lse=True))


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("alibi", ["h", "bh"], ids=["heads", "batch-heads"])
def test_alibi(dtype, alibi):
    check(Case(2, 4, 2, 33, 45, 16, dtype, causal="top_left", alibi=alibi, grad_lse=True))


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_every_modifier_with_bias_key_mask_gqa_and_dropout(dtype):
    check(
        Case(
            2,
            4,
            2,
            50,
            66,
            16,
            dtype,
            causal="bottom_right",
            window_size=(24, 0),
            softcap=1.5,
            alibi="bh",
            scale=0.5,
            bias_shape=(1, 4, 50, 66),
            key_mask=True,
            dropout_p=0.2,
            grad_lse=True,
        )
    )


def test_softcap_and_alibi_with_dropout_and_no_window():
    check(Case(1, 2, 1, 20, 30, 16, softcap=1.0, alibi="h", scale=0.75, dropout_p=0.3, grad_lse=True))
