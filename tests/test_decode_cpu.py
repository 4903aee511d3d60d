"""The C++ CPU decode kernel (torch.ops.fast_attn.decode_forward, csrc/cpu/decode_kernel.h) against
reference_decode_attention: out and lse by the error rule, the caches afterwards to the bit.

Caches contiguous and paged (random block tables, page sizes 5..256, K and V pages interleaved in one
storage), cache_leftpad, cache_batch_idx, GQA ratios 1..8, 1..4 query rows with and without new keys,
the score options, every dtype, split-KV, lengths 0..3000, head dims 16..128; refused input.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fast_attn.dispatch import UNAVAILABLE
from fast_attn.testing import DecodeCase, check_decode_against_reference, decode_op_arguments

pytestmark = pytest.mark.skipif(UNAVAILABLE["cpu"] is not None, reason=f"CPU kernels: {UNAVAILABLE['cpu']}")

ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def decode_op(case: DecodeCase):
    return lambda inputs: torch.ops.fast_attn.decode_forward(*decode_op_arguments(case, inputs))


def check(case: DecodeCase) -> None:
    check_decode_against_reference(decode_op(case), case)


# Lengths from an empty cache to a few thousand keys, across key tiles (64) and pages.
LENGTHS = (0, 1, 63, 64, 200, 1000, 3000)


@pytest.mark.parametrize("page_size", [None, 5, 8, 16, 64, 256])
@pytest.mark.parametrize("interleaved", [False, True], ids=["separate", "interleaved"])
def test_cache_layouts(page_size, interleaved):
    check(DecodeCase(LENGTHS, page_size=page_size, interleaved=interleaved, heads_q=8, heads_kv=2))


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("new_rows", [0, 3])
def test_leftpad(page_size, new_rows):
    check(
        DecodeCase(
            (0, 5, 90, 700), new_rows=new_rows, query_rows=3, page_size=page_size, leftpad=True, causal=True
        )
    )


@pytest.mark.parametrize("new_rows", [0, 2])
def test_cache_batch_idx(new_rows):
    check(DecodeCase((7, 130, 0, 513), new_rows=new_rows, batch_idx=True, leftpad=True, interleaved=True))


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 2), (16, 2)], ids=lambda h: f"H{h[0]}/{h[1]}")
@pytest.mark.parametrize("query_rows", [1, 2, 3, 4])
@pytest.mark.parametrize("new_rows", [0, "query_rows"])
def test_gqa_and_query_rows(heads, query_rows, new_rows):
    new = query_rows if new_rows == "query_rows" else 0
    check(DecodeCase((2, 77, 300), new_rows=new, query_rows=query_rows, heads_q=heads[0], heads_kv=heads[1],
                     page_size=16, causal=True))  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [dict(causal=True, window_size=(50, 0)), dict(alibi="bh", softcap=5.0), dict(window_size=(100, 3))],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_one_query_row_per_kv_head(options, dtype):
    # Hq == Hkv and one query row: each task's tile has one lane (the one-lane softmax, the one-row
    # P V product), over key ranges that are no multiple of the vector width.
    check(DecodeCase((1, 77, 300), heads_q=3, heads_kv=3, head_dim=40, dtype=dtype, page_size=8, **options))


# A group of g * Sq = 8 * 12 = 96 rows is two lane blocks of the tile (64 + 32).
def test_more_rows_than_one_tile():
    check(DecodeCase((40, 500), new_rows=12, heads_q=16, heads_kv=2, causal=True, window_size=(30, 0)))
    check(DecodeCase((40, 500), new_rows=0, query_rows=12, heads_q=16, heads_kv=2, alibi="bh", softcap=5.0))


MODIFIERS = {
    "causal": dict(causal=True),
    "window_left": dict(window_size=(50, -1)),
    "window_both": dict(window_size=(20, 3)),
    "window_right": dict(window_size=(-1, 1)),
    "causal_window": dict(causal=True, window_size=(100, 7)),
    "softcap": dict(softcap=3.0),
    "alibi_h": dict(alibi="h"),
    "alibi_bh": dict(alibi="bh", causal=True),
    "all": dict(causal=True, window_size=(64, 0), softcap=2.0, alibi="bh"),
}


@pytest.mark.parametrize("modifiers", MODIFIERS.values(), ids=MODIFIERS.keys())
@pytest.mark.parametrize("rows", [(1, 1), (0, 4), (3, 3)], ids=lambda r: f"new{r[0]}q{r[1]}")
def test_score_modifiers(modifiers, rows):
    new_rows, query_rows = rows
    check(DecodeCase((0, 3, 150, 700), new_rows=new_rows, query_rows=query_rows, heads_q=8, heads_kv=2,
                     page_size=64, leftpad=True, **modifiers))  # fmt: skip


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [None, 16])
def test_dtypes(dtype, page_size):
    check(DecodeCase((1, 100, 1000), new_rows=2, heads_q=8, heads_kv=2, head_dim=64, dtype=dtype,
                     page_size=page_size, causal=True, softcap=4.0))  # fmt: skip


@pytest.mark.parametrize("head_dim", [16, 40, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dims(head_dim, dtype):
    check(DecodeCase((5, 129, 900), heads_q=4, heads_kv=1, head_dim=head_dim, dtype=dtype, page_size=8))


@pytest.mark.parametrize("num_splits", [0, 1, 3, 8])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_num_splits(num_splits, dtype):
    check(DecodeCase((0, 40, 1500), new_rows=1, heads_q=4, heads_kv=1, dtype=dtype, page_size=16,
                     leftpad=True, window_size=(2000, -1), num_splits=num_splits))  # fmt: skip


def run_twice(case: DecodeCase, first: dict, second: dict) -> tuple:
    """The op on one set of inputs under two settings (num_splits, threads), each on its own caches."""
    inputs = case.make_inputs()
    results = []
    for setting in (first, second):
        threads = torch.get_num_threads()
        torch.set_num_threads(setting.get("threads", threads))
        try:
            copies = {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in inputs.items()}
            split_case = dataclasses.replace(case, num_splits=setting.get("num_splits", case.num_splits))
            results.append(torch.ops.fast_attn.decode_forward(*decode_op_arguments(split_case, copies)))
        finally:
            torch.set_num_threads(threads)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_splits_agree_with_one_split(dtype, num_splits):
    case = DecodeCase(
        (3000, 700, 0), new_rows=2, heads_q=8, heads_kv=2, dtype=dtype, page_size=64, causal=True
    )
    (out, lse), (split_out, split_lse) = run_twice(case, {"num_splits": 1}, {"num_splits": num_splits})
    assert not torch.equal(out, split_out), "no rounding at all: the splits did not run"
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(split_out, out, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(split_lse, lse, rtol=tolerance, atol=tolerance)


def test_automatic_splits_occupy_idle_threads():
    # One (sequence, kv head) pair for 2 threads: num_splits=0 cuts its 3000 keys in two.
    case = DecodeCase((3000,), heads_q=4, heads_kv=1, page_size=16)
    (auto_out, auto_lse), (out, lse) = run_twice(
        case, {"threads": 2, "num_splits": 0}, {"threads": 2, "num_splits": 1}
    )
    assert not torch.equal(auto_out, out), "no rounding at all: the splits did not run"
    torch.testing.assert_close(auto_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(auto_lse, lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_threads_give_identical_results(num_splits):
    case = DecodeCase((2500, 600, 1), new_rows=1, heads_q=4, heads_kv=2, page_size=16, num_splits=num_splits)
    (out, lse), (other_out, other_lse) = run_twice(case, {"threads": 1}, {"threads": 2})
    assert torch.equal(out, other_out) and torch.equal(lse, other_lse)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_instruction_sets(monkeypatch, isa):
    monkeypatch.setenv("FAST_ATTN_CPU_ISA", isa)
    for dtype in (torch.float32, torch.bfloat16):
        check(DecodeCase((9, 700), new_rows=2, heads_q=8, heads_kv=2, head_dim=40, dtype=dtype, page_size=16,
                         leftpad=True, window_size=(300, 0), softcap=3.0, alibi="h", num_splits=2))  # fmt: skip


def test_empty_sequences_and_empty_queries():
    check(DecodeCase((0, 0), new_rows=0))
    check(DecodeCase((3, 10), new_rows=0, query_rows=0, page_size=8))


def test_empty_batch():
    case = DecodeCase((5,), new_rows=1, heads_q=4, heads_kv=2)
    inputs = case.make_inputs()
    for name in ("q", "cache_seqlens", "k", "v"):
        inputs[name] = inputs[name][:0]
    out, lse = torch.ops.fast_attn.decode_forward(*decode_op_arguments(case, inputs))
    assert out.shape == (0, 1, 4, 16) and lse.shape == (0, 4, 1) and lse.dtype == torch.float32


def test_opcheck():
    for case in (
        DecodeCase(
            (5, 70), new_rows=2, heads_q=4, heads_kv=2, head_dim=8, page_size=16, causal=True, alibi="h"
        ),
        DecodeCase(
            (5, 70), new_rows=0, query_rows=2, head_dim=8, batch_idx=True, window_size=(9, 0), softcap=2.0
        ),
    ):
        # No autograd: the op has no backward.
        torch.library.opcheck(
            torch.ops.fast_attn.decode_forward.default,
            decode_op_arguments(case, case.make_inputs()),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


def bad_arguments(case: DecodeCase, **changes) -> tuple:
    """decode_forward's arguments for `case` with some inputs replaced (by name)."""
    inputs = case.make_inputs()
    for name, change in changes.items():
        inputs[name] = change(inputs)
    return decode_op_arguments(case, inputs)


PAGED = DecodeCase((10, 40), new_rows=1, page_size=16)
CONTIGUOUS = DecodeCase((10, 40), new_rows=1)


def _set(value):
    return lambda inputs: value


def _with_entry(name: str, index: tuple, value: int):
    def change(inputs):
        t = inputs[name].clone()
        t[index] = value
        return t

    return change


BAD_INPUTS = {
    "page out of range": (
        PAGED,
        dict(block_table=_with_entry("block_table", (1, 2), 1000)),
        r"block_table\[1, 2\] = 1000 is not a page of the caches",
    ),
    "negative page": (
        PAGED,
        dict(block_table=_with_entry("block_table", (0, 0), -1)),
        r"block_table\[0, 0\] = -1",
    ),
    "paged cache too short": (
        PAGED,
        dict(cache_seqlens=_with_entry("cache_seqlens", (1,), 64)),
        r"too short for sequence 1: cache_seqlens\[1\] \+ S_new = 64 \+ 1 > 64",
    ),
    "contiguous cache too short": (
        CONTIGUOUS,
        dict(cache_seqlens=_with_entry("cache_seqlens", (0,), 44)),
        r"too short for sequence 0: cache_seqlens\[0\] \+ S_new = 44 \+ 1 > 44",
    ),
    "negative length": (
        CONTIGUOUS,
        dict(cache_seqlens=_with_entry("cache_seqlens", (1,), -3)),
        r"cache_seqlens\[1\] = -3 is negative",
    ),
    "negative leftpad": (
        CONTIGUOUS,
        dict(cache_leftpad=lambda inputs: torch.tensor([0, -2], dtype=torch.int32)),
        r"cache_leftpad\[1\] = -2 is negative",
    ),
    "batch index with pages": (
        PAGED,
        dict(cache_batch_idx=lambda inputs: torch.tensor([0, 1], dtype=torch.int32)),
        "cache_batch_idx goes with contiguous caches only",
    ),
    "batch index out of range": (
        DecodeCase((10, 40), batch_idx=True),
        dict(cache_batch_idx=_with_entry("cache_batch_idx", (1,), 4)),
        r"cache_batch_idx\[1\] = 4 is not a row of the caches \(4 rows\)",
    ),
    "int64 lengths": (
        CONTIGUOUS,
        dict(cache_seqlens=lambda inputs: inputs["cache_seqlens"].long()),
        "cache_seqlens must be int32, got Long",
    ),
    "lengths per sequence": (
        CONTIGUOUS,
        dict(cache_seqlens=_set(torch.tensor([1, 2, 3], dtype=torch.int32))),
        r"cache_seqlens must have one row per sequence \(2\)",
    ),
    "cache dtype": (
        CONTIGUOUS,
        dict(k_cache=lambda inputs: inputs["k_cache"].double()),
        "k_cache must have q's dtype Float, got Double",
    ),
    "q rank": (CONTIGUOUS, dict(q=lambda inputs: inputs["q"][0]), r"q must be 4-D \(B, Sq, Hq, D\)"),
    "cache last dim": (
        CONTIGUOUS,
        dict(v_cache=lambda inputs: inputs["v_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
        "v_cache must have a contiguous last dim",
    ),
    "k_new alone": (CONTIGUOUS, dict(v=_set(None)), "k_new and v_new go together"),
    "k_new heads": (
        CONTIGUOUS,
        dict(
            k=lambda inputs: inputs["k"].repeat(1, 1, 2, 1), v=lambda inputs: inputs["v"].repeat(1, 1, 2, 1)
        ),
        r"k_new and v_new must have shape \(B, S_new, Hkv, D\)",
    ),
    "gqa heads": (
        DecodeCase((3,), heads_q=3, heads_kv=2),
        {},
        r"q's heads \(3\) must be a multiple of the caches' \(2\)",
    ),
}


@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused(bad):
    case, changes, message = bad
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fast_attn.decode_forward(*bad_arguments(case, **changes))


def test_bad_scalars_are_refused():
    arguments = list(decode_op_arguments(CONTIGUOUS, CONTIGUOUS.make_inputs()))
    for index, value, message in [
        (12, -2, "window_left and window_right must be >= -1"),
        (14, -1.0, "softcap must be finite and >= 0"),
        (15, -1, "num_splits must be >= 0"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fast_attn.decode_forward(*arguments[:index], value, *arguments[index + 1 :])
