"""The Triton decode op, fast_attn::triton_decode_forward (fast_attn/ops/triton_decode.py), against
reference_decode_attention through fast_attn.testing's DecodeCase harness: out and lse by the error
rule against the float64 oracle, the caches afterwards equal to the reference's to the bit.

Under the interpreter the split kernel runs 16-key blocks and multiprocessor_count pretends 4 SMs,
so the short caches here hold several key blocks, num_splits = 0 splits small batches, and a
split can find its keys all masked (windows) or none at all (short sequences next to long ones).
On a GPU (marker gpu) a few cases run on CUDA tensors at real sizes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton")

import fast_attn  # noqa: F401  (registers the ops)
from fast_attn.ops import triton_configs, triton_decode
from fast_attn.testing import DecodeCase, check_decode_against_reference, decode_op_arguments
from fast_attn.validation import build_decode_problem

pytestmark = pytest.mark.triton

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def run_op(case: DecodeCase):
    return lambda inputs: torch.ops.fast_attn.triton_decode_forward(*decode_op_arguments(case, inputs))


def check(case: DecodeCase, device: str = "cpu") -> None:
    check_decode_against_reference(run_op(case), case, device)


# Every option of the op at once: the band's two sides with ALiBi and softcap, paged, split.
ALL_FEATURES = dict(
    causal=True, window_size=(12, -1), softcap=4.0, alibi="bh", leftpad=True, page_size=16, num_splits=3
)
CASES = [
    # Contiguous caches: GQA ratios 1, 2, 4, 8, each dtype, head dims 16, 40, 64, 128.
    DecodeCase((5, 40), heads_q=2, heads_kv=2),
    DecodeCase((33, 17), heads_q=4, heads_kv=2, dtype=F16, head_dim=64),
    DecodeCase((50,), heads_q=4, heads_kv=1, dtype=BF16, head_dim=40),
    DecodeCase((21, 48, 3), heads_q=16, heads_kv=2, dtype=F16, head_dim=128, num_splits=3),
    # Paged caches with random block tables, page sizes 8, 16, 64, 256, K and V interleaved.
    DecodeCase((37, 3), page_size=8, heads_q=8, heads_kv=1, dtype=BF16),
    DecodeCase((40, 0, 15), page_size=16, interleaved=True, leftpad=True, dtype=F16, num_splits=3),
    DecodeCase((70, 9), page_size=64, interleaved=True, head_dim=40),
    DecodeCase((120, 300), page_size=256, heads_q=4, heads_kv=4, dtype=BF16, head_dim=64),
    # Sq 1..4, with and without new rows (Sq != S_new too).
    DecodeCase((30, 12), new_rows=0, query_rows=1, batch_idx=True),
    DecodeCase((30, 12), new_rows=2, page_size=8, causal=True, dtype=F16),
    DecodeCase((26, 40), new_rows=3, query_rows=3, causal=True, leftpad=True, dtype=BF16, num_splits=3),
    DecodeCase((45,), new_rows=0, query_rows=4, causal=True, heads_q=8, heads_kv=2, page_size=16),
    DecodeCase((19, 33), new_rows=4, query_rows=2, batch_idx=True, num_splits=1),
    # Windows (left, both sides, right only), with causal and without.
    DecodeCase((60, 25), window_size=(10, -1), causal=True, num_splits=3),
    DecodeCase((60, 25), new_rows=2, window_size=(7, 3), page_size=8, dtype=F16),
    DecodeCase((45, 9), new_rows=0, query_rows=3, window_size=(-1, 0), leftpad=True, dtype=BF16),
    DecodeCase((70,), new_rows=1, query_rows=4, window_size=(5, 5), heads_q=4, heads_kv=1, num_splits=3),
    # Softcap and ALiBi, slopes (Hq,) and (B, Hq), with everything else.
    DecodeCase((40, 22), softcap=5.0, alibi="h", dtype=F16),
    DecodeCase((40, 22), new_rows=2, causal=True, alibi="bh", softcap=3.0, page_size=8, interleaved=True),
    DecodeCase((51, 6, 30), new_rows=2, query_rows=3, heads_q=8, head_dim=40, dtype=BF16, **ALL_FEATURES),
    # A tile of more rows than one program takes (g * Sq = 96 > 64): two row blocks.
    DecodeCase((40, 20), new_rows=3, query_rows=3, causal=True, heads_q=32, heads_kv=1, alibi="h"),
    # Empty sequences: no keys at all (out 0, lse -inf), next to a full one and all of the batch.
    DecodeCase((0, 18), new_rows=0),
    DecodeCase((0, 0), new_rows=0, page_size=8, num_splits=3),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_against_the_reference(case):
    check(case)


@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_splits_agree_with_one(num_splits, paged):
    # The same inputs through 1 split and through num_splits (0: the heuristic, 4 splits here):
    # each held to the oracle, and to each other within float32 rounding of the merge.
    case = DecodeCase((80, 35), new_rows=2, causal=True, heads_kv=1, page_size=16 if paged else None)
    check(dataclasses.replace(case, num_splits=num_splits))
    results = []
    for splits in (1, num_splits):
        torch.manual_seed(0)
        split_case = dataclasses.replace(case, num_splits=splits)
        results.append(run_op(split_case)(split_case.make_inputs()))
    (out_1, lse_1), (out_n, lse_n) = results
    torch.testing.assert_close(out_n, out_1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_n, lse_1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "case",
    [
        DecodeCase((30, 9), new_rows=2, window_size=(6, 2), alibi="h", page_size=8, num_splits=3),
        DecodeCase((25,), query_rows=2, causal=True, softcap=3.0, alibi="bh", leftpad=True, dtype=BF16),
    ],
    ids=str,
)
def test_decode_forward_runs_a_validated_problem(case):
    # triton_decode.decode_forward, what a backend's decode runs: the op on validation's DecodeProblem
    # (its window, softcap None and (1 or B, Hq) slopes mapped onto the op's arguments).
    def run(inputs):
        names = ("k", "v", "cache_leftpad", "block_table", "cache_batch_idx")
        problem = build_decode_problem(
            *(inputs[n] for n in ("q", "k_cache", "v_cache", "cache_seqlens")),
            **{n: inputs[n] for n in names},
            **case.options(inputs),
            num_splits=case.num_splits,
        )
        return triton_decode.decode_forward(problem)

    check_decode_against_reference(run, case)


def test_split_heuristic():
    # Under the interpreter the device has 4 SMs: one work unit wants 4 splits (a full wave), two
    # want 2, a launch that fills 80% of the SMs none; never more splits than key blocks.
    cpu = torch.device("cpu")
    assert triton_configs.multiprocessor_count(cpu) == 4
    assert triton_configs.decode_splits(1, 100, cpu) == 4
    assert triton_configs.decode_splits(2, 100, cpu) == 2
    assert triton_configs.decode_splits(3, 100, cpu) == 4  # 3 full waves of 4 (2 or 3 splits: 75% full)
    assert triton_configs.decode_splits(4, 100, cpu) == 1
    assert triton_configs.decode_splits(1, 3, cpu) == 3
    assert triton_configs.decode_splits(1, 1, cpu) == 1
    # What a launch takes: the heuristic bounded by the cache's key blocks (16 keys each here).
    case = DecodeCase((80,), heads_kv=1)
    problem = triton_decode.DecodeKernelProblem(*decode_op_arguments(case, case.make_inputs())[:-1])
    assert triton_decode.choose_splits(problem, 0) == 4
    assert triton_decode.choose_splits(problem, 500) == triton_configs.cdiv(problem.capacity, 16)


def test_bad_arguments_are_refused_before_any_kernel_runs():
    case = DecodeCase((10, 4), page_size=8)
    arguments = list(decode_op_arguments(case, case.make_inputs()))
    op = torch.ops.fast_attn.triton_decode_forward
    for index, bad, words in (
        (5, arguments[5].long(), "cache_seqlens"),  # int64 lengths
        (7, arguments[7][:1], "block_table"),  # one row for two sequences
        (2, arguments[2][..., :8], "v_cache"),  # K and V caches of different head dims
        (15, -1, "num_splits"),
    ):
        with pytest.raises(ValueError, match=words):
            op(*arguments[:index], bad, *arguments[index + 1 :])


def test_schema_is_decode_forwards():
    # The same arguments as the C++ op fast_attn::decode_forward (csrc/schema.cpp), in order, with
    # the same types (an inferred int is a SymInt) and the same mutations.
    if not hasattr(torch.ops.fast_attn, "decode_forward"):
        pytest.skip("this build of the extension predates fast_attn::decode_forward")

    def arguments(op):
        return [
            (a.name, str(a.type).replace("SymInt", "int"), a.alias_info is not None and a.alias_info.is_write)
            for a in op.default._schema.arguments
        ]

    assert arguments(torch.ops.fast_attn.triton_decode_forward) == arguments(
        torch.ops.fast_attn.decode_forward
    )


def test_opcheck_under_the_interpreter_or_gpu():
    # The schema's mutations (k_cache, v_cache) and fake tensor propagation.
    case = DecodeCase((20, 9), new_rows=2, page_size=8, causal=True, alibi="h")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arguments = decode_op_arguments(case, case.make_inputs(device))
    torch.library.opcheck(torch.ops.fast_attn.triton_decode_forward, arguments)


GPU_CASES = [
    DecodeCase((1000, 4000), heads_q=32, heads_kv=8, head_dim=128, dtype=BF16, page_size=256),
    DecodeCase((3000, 17, 900), new_rows=1, heads_q=8, heads_kv=1, head_dim=64, dtype=F16, leftpad=True),
    DecodeCase(
        (2000, 513),
        new_rows=4,
        causal=True,
        window_size=(256, -1),
        softcap=30.0,
        alibi="bh",
        heads_q=16,
        heads_kv=4,
        head_dim=128,
        dtype=BF16,
        page_size=16,
        interleaved=True,
    ),
    DecodeCase(
        (700, 64), new_rows=2, heads_q=4, heads_kv=2, head_dim=40, dtype=F32, batch_idx=True, num_splits=3
    ),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_decode(case):
    check(case, "cuda")


def test_torch_compile_fullgraph_under_the_interpreter_or_gpu():
    # The op captured by torch.compile (on a GPU its kernels wrapped; under the interpreter the op
    # kept whole), the cache writes functionalized: the same out, lse and caches as eager on
    # copies of the inputs.
    case = DecodeCase((90, 33), new_rows=1, heads_q=16, heads_kv=4, head_dim=64, dtype=BF16, page_size=16)
    inputs = case.make_inputs("cuda" if torch.cuda.is_available() else "cpu")
    arguments = decode_op_arguments(case, inputs)
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in arguments]
    compiled = torch.compile(lambda *a: torch.ops.fast_attn.triton_decode_forward(*a), fullgraph=True)
    for actual, expected in zip(compiled(*arguments), torch.ops.fast_attn.triton_decode_forward(*copies)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    torch.testing.assert_close(arguments[1], copies[1], rtol=0, atol=0)  # k_cache, the new row written
    torch.testing.assert_close(arguments[2], copies[2], rtol=0, atol=0)
