"""The Triton backend against the float64 reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest) on small
problems: blocks of 32, sequences <= 128, so every case still spans several
blocks with partial last blocks. The interpreter costs ~2.5 ms per tile, so the
cases below are chosen to cover each feature (dtypes, odd head dims, GQA, both
causal alignments, bias shapes and dtypes, key masks, fully masked rows,
strided inputs, grad_lse, dropout, empty problems) with few tiles each.

Every check uses fast_attn.testing's error rule: the kernel's max error against
float64 is at most 2x torch's error doing the same math in the kernel's dtype,
plus a floor. Allocations are poisoned (deterministic mode fills torch.empty with
NaN), so an output element a kernel forgets to write fails the check.

On a GPU (marker gpu) the same tests run on the real kernels, plus a grid of every
(Sq, Sk) pair of lengths 1 to 1025 at every head dim and dtype, opcheck and
torch.compile(fullgraph=True).
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fast_attn  # noqa: E402
from fast_attn.dropout import dropout_hash, dropout_threshold, new_dropout_seed  # noqa: E402
from fast_attn.ops import triton_configs, triton_ops  # noqa: E402
from fast_attn.reference import reference_attention  # noqa: E402
from fast_attn.testing import (  # noqa: E402
    Case,
    assert_error_rule,
    attention_runner,
    check_against_reference,
    opcheck_forward_and_backward,
    random_qkv,
)
from fast_attn.triton.dropout import dropout_keep, dropout_row_offsets, load_dropout_seed  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.filterwarnings("ignore:Deterministic behavior was enabled:UserWarning"),
]

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def poisoned_allocations():
    """torch.empty returns NaN-filled memory while deterministic algorithms are on
    (warn_only: the float64 reference's cuBLAS matmuls only warn on a GPU)."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


TRITON = attention_runner("triton")


def check_case(case: Case) -> None:
    check_against_reference(TRITON, case, DEVICE)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Each case: (B, Hq, Hkv, Sq, Sk, D, dtype) plus the features it covers.
CPU_CASES = {
    # GQA, a bias shared by the batch (dbias summed over batches), key padding, D 40.
    "fp32-gqa-batch-bias-mask": Case(2, 4, 2, 37, 50, 40, F32, bias_shape=(1, 4, 37, 50), key_mask=True),
    # Top-left causal with Sq > Sk, a full-shape bias (dbias written by the dQ programs), D 16.
    "fp16-causal-full-bias": Case(1, 2, 2, 65, 33, 16, F16, causal=True, bias_shape=(1, 2, 65, 33)),
    # Bottom-right causal with Sk > Sq, padding, (B, S, H, D) memory, bf16 (interpreter upcast).
    "bf16-bottom-right-mask-bshd": Case(
        1, 2, 2, 33, 70, 64, BF16, causal="bottom_right", key_mask=True, layout="bshd"
    ),
    # The smallest problem.
    "fp32-one-by-one-d1": Case(1, 1, 1, 1, 1, 1, F32),
    # Bottom-right with Sq > Sk: rows 0..49 see no key (out 0, lse -inf, zero grads); MQA; grad_lse.
    "fp32-mqa-empty-rows-grad-lse": Case(
        2, 2, 1, 70, 20, 24, F32, causal="bottom_right", bias_shape=(2, 2, 70, 20), grad_lse=True
    ),
    # A per-query bias (1, 1, Sq, 1) in float32 with fp16 inputs: dbias summed over batch, heads and keys.
    "fp16-row-bias-fp32": Case(2, 4, 2, 45, 30, 32, F16, bias_shape=(1, 1, 45, 1), bias_dtype=F32),
    # A per-key bias per batch (B, 1, 1, Sk) (ALiBi-like), causal, D 80, (B, S, H, D) memory.
    "fp32-key-bias-causal-d80": Case(
        2, 4, 2, 45, 30, 80, F32, causal=True, bias_shape=(2, 1, 1, 30), layout="bshd"
    ),
    # A scalar bias (1, 1, 1, 1), D 8.
    "fp32-scalar-bias": Case(3, 2, 2, 20, 20, 8, F32, causal=True, bias_shape=(1, 1, 1, 1)),
    # D 96 (padded to 128), causal, GQA, grad_lse.
    "fp16-d96-causal-gqa-grad-lse": Case(1, 2, 1, 97, 97, 96, F16, causal=True, grad_lse=True),
    # D 200 (padded to 256), Sk > Sq top-left: key blocks no query sees get zero dK/dV.
    "bf16-d200-top-left-long-keys": Case(1, 1, 1, 17, 128, 200, BF16, causal=True),
    # -inf entries in the bias mask scores, and row 0 is masked entirely by it.
    "fp32-inf-bias": Case(
        2, 2, 2, 40, 36, 32, F32, bias_shape=(1, 2, 40, 36), bias_inf_fraction=0.2, scale=0.3
    ),
    # A batch row whose key mask is all False: its rows see nothing.
    "fp16-empty-key-mask-row": Case(2, 2, 2, 33, 40, 64, F16, key_mask=True, empty_key_rows=(1,)),
    # q, k, v strided views of one packed (B, S, 3, H, D) tensor.
    "fp32-packed-qkv": Case(2, 2, 2, 40, 40, 32, F32, layout="packed", causal=True),
    # Causal offsets one and two below a block boundary (Sk - Sq = 31, 30 with blocks of 32):
    # the first key block a row sees only partly must take the masked path.
    "fp32-bottom-right-offset-31": Case(1, 2, 1, 50, 81, 16, F32, causal="bottom_right"),
    "fp32-bottom-right-offset-30": Case(1, 1, 1, 34, 64, 16, F32, causal="bottom_right", grad_lse=True),
    # Gradients for a subset of the inputs.
    "fp32-grads-q-only": Case(1, 2, 1, 40, 50, 32, F32, bias_shape=(1, 2, 40, 50), grads=("q",)),
    "fp16-grads-bias-only": Case(2, 2, 2, 40, 50, 32, F16, bias_shape=(1, 2, 40, 50), grads=("bias",)),
}


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_matches_reference(name):
    check_case(CPU_CASES[name])


SEED = 0x5EED_0123_4567  # both 32-bit halves of the seed count
DROPOUT_CASES = {
    "fp32-gqa-causal-bias": Case(
        2, 4, 2, 40, 45, 32, F32, causal=True, bias_shape=(1, 4, 40, 45), dropout_p=0.3, dropout_seed=SEED
    ),
    "bf16-mask": Case(
        1, 2, 2, 33, 64, 64, BF16, key_mask=True, dropout_p=0.5, dropout_seed=SEED, grad_lse=True
    ),
    "fp16-row-bias": Case(
        2, 2, 1, 30, 40, 16, F16, bias_shape=(2, 1, 30, 1), dropout_p=0.1, dropout_seed=SEED
    ),
}


@pytest.mark.parametrize("name", list(DROPOUT_CASES))
def test_dropout_matches_reference_with_the_same_seed(name):
    # The reference drops exactly the scores the kernels drop (fast_attn/dropout.py), so
    # out and every gradient follow the same error rule as without dropout.
    check_case(DROPOUT_CASES[name])


@triton.jit
def _dropout_keep_kernel(
    seed_ptr, keep_ptr, head_row, seqlen_k, key_begin, threshold, ROWS: tl.constexpr, KEYS: tl.constexpr
):
    seed_low, seed_high = load_dropout_seed(seed_ptr)
    rows, keys = tl.arange(0, ROWS), tl.arange(0, KEYS)
    row_low, row_high = dropout_row_offsets(head_row.to(tl.int64), rows, seqlen_k, key_begin)
    dropout = (seed_low, seed_high, threshold, 1.0)
    keep = dropout_keep(dropout, row_low[:, None], row_high[:, None], keys[None, :])
    tl.store(keep_ptr + rows[:, None] * KEYS + keys[None, :], keep)


def test_dropout_hash_is_bit_identical_to_the_python_reference():
    # Rows whose linear index crosses 2^32 inside a key block exercise the carry of the
    # kernels' 32-bit index arithmetic; seeds with the high half set and negative; a packed
    # sequence's first key (key_begin) moves every index of a row.
    for seed in (12345, 2**62 - 17, -5):
        for head_row, seqlen_k, key_begin in (
            (0, 64, 0),
            (2**32 // 64 - 3, 64, 0),
            (2**26 + 7, 100, 36),
            (3, 2**31 - 5, 2**31 - 70),
        ):
            for dropout_p in (0.1, 0.9):
                keep = torch.empty(16, 64, dtype=torch.bool, device=DEVICE)
                threshold = dropout_threshold(dropout_p)
                seed_tensor = torch.tensor([seed], device=DEVICE)
                _dropout_keep_kernel[(1,)](
                    seed_tensor, keep, head_row, seqlen_k, key_begin, threshold, ROWS=16, KEYS=64
                )
                rows, keys = torch.arange(16)[:, None], torch.arange(64)[None, :]
                index = (head_row + rows) * seqlen_k + key_begin + keys
                expected = dropout_hash(seed, index) >= threshold
                assert torch.equal(keep.cpu(), expected), (seed, head_row, key_begin, dropout_p)


def test_dropout_through_attention_uses_torch_generator():
    q, k, v = random_qkv(1, 2, 2, 33, 40, 32, device=DEVICE)
    torch.manual_seed(1234)
    out = fast_attn.attention(q, k, v, dropout_p=0.25, backend="triton")
    torch.manual_seed(1234)
    seed = new_dropout_seed(q.device)
    expected, _ = reference_attention(q.double(), k.double(), v.double(), dropout_p=0.25, dropout_seed=seed)
    without, _ = reference_attention(q.double(), k.double(), v.double())
    assert_error_rule(
        "out",
        out,
        expected,
        reference_attention(q, k, v, dropout_p=0.25, dropout_seed=seed)[0],
        torch.float32,
    )
    assert (out.double() - without).abs().max() > 0.05  # dropout did drop


def test_backward_is_deterministic():
    # GQA (dK/dV summed over the group) and a batch-shared bias reduced in several
    # splits: two runs give the same bits.
    case = Case(
        2,
        4,
        2,
        45,
        50,
        32,
        F32,
        causal=True,
        bias_shape=(1, 4, 45, 50),
        key_mask=True,
        dropout_p=0.2,
        dropout_seed=77,
    )
    inputs = case.make_inputs(DEVICE)
    grad_out = torch.randn(2, 4, 45, 32, device=DEVICE)
    first = TRITON(case, inputs, grad_out, None)
    second = TRITON(case, inputs, grad_out, None)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), f"d{name} differs between runs"


@pytest.mark.parametrize(
    "num_splits,dtype", [(1, F32), (1, F16), (3, F32), (8, F16)], ids=["1-fp32", "1-fp16", "3-fp32", "8-fp16"]
)
def test_dbias_split_count_does_not_change_the_result(monkeypatch, num_splits, dtype):
    # The split count only regroups the (batch, head) pairs of the reduction; each must
    # give dbias within the error rule (3 splits of 8 pairs leaves a short last split).
    # One split writes a 16-bit dbias directly, several sum float32 partials.
    monkeypatch.setattr(triton_ops, "dbias_splits", lambda programs, pairs, device: num_splits)
    check_case(Case(2, 4, 2, 36, 30, 16, dtype, bias_shape=(1, 1, 36, 30), grads=("bias",)))


def test_dbias_splits_fill_the_device():
    sms = triton_configs.multiprocessor_count(torch.device(DEVICE))
    assert triton_configs.dbias_splits(programs=4 * sms, pairs_per_slice=64, device=torch.device(DEVICE)) == 1
    assert triton_configs.dbias_splits(programs=1, pairs_per_slice=3, device=torch.device(DEVICE)) == 3
    splits = triton_configs.dbias_splits(programs=1, pairs_per_slice=1000, device=torch.device(DEVICE))
    assert splits == min(triton_configs.MAX_DBIAS_SPLITS, 2 * sms)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_nan_inputs_propagate_like_the_reference():
    q, k, v = random_qkv(1, 2, 2, 40, 40, 16, device=DEVICE)
    q[0, 1, 7, 3] = math.nan
    out, lse = fast_attn.attention(q, k, v, return_lse=True, backend="triton")
    expected, expected_lse = reference_attention(q.double(), k.double(), v.double())
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(torch.isnan(lse), torch.isnan(expected_lse))
    assert torch.isnan(out[0, 1, 7]).all() and not torch.isnan(out[0, 0]).any()


@pytest.mark.parametrize(
    "shape", [(0, 2, 2, 16, 16), (2, 2, 2, 0, 16), (2, 2, 2, 16, 0)], ids=["batch0", "seqlen_q0", "seqlen_k0"]
)
def test_empty_problems(shape):
    batch, heads_q, heads_kv, seqlen_q, seqlen_k = shape
    q, k, v = random_qkv(batch, heads_q, heads_kv, seqlen_q, seqlen_k, 16, device=DEVICE, requires_grad=True)
    bias = torch.randn(1, heads_q, seqlen_q, seqlen_k, device=DEVICE, requires_grad=True)
    out, lse = fast_attn.attention(q, k, v, bias=bias, return_lse=True, backend="triton")
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert (out == 0).all() and torch.isneginf(lse).all()  # vacuous when empty; all masked when Sk == 0
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias), allow_unused=False)
    for tensor, grad in zip((q, k, v, bias), grads):
        assert grad.shape == tensor.shape and (grad == 0).all()


def test_opcheck_under_the_interpreter_or_gpu():
    case = Case(
        1,
        2,
        1,
        20,
        24,
        16,
        causal=True,
        scale=0.25,
        bias_shape=(1, 2, 20, 24),
        key_mask=True,
        deterministic=True,
    )
    ops = torch.ops.fast_attn
    # Every opcheck test: under the interpreter AOTDispatcher keeps each op whole
    # (fast_attn/ops/triton_ops.py), on a GPU it captures the kernels.
    opcheck_forward_and_backward(ops.triton_attention_forward, ops.triton_attention_backward, case, DEVICE)


def test_host_integer_helpers_match_triton():
    # Plain-Python stand-ins for triton's constexpr functions on the launch path.
    for n in (1, 2, 3, 15, 16, 17, 100, 1024, 1025):
        assert triton_configs.next_power_of_2(n) == triton.next_power_of_2(n)
    for a in (0, 1, 5, 16, 17, 1000):
        for b in (1, 7, 16, 64):
            assert triton_configs.cdiv(a, b) == triton.cdiv(a, b)


def test_launch_configs_are_few_and_pruned_to_the_problem(monkeypatch):
    for kernel in triton_configs.KERNEL_NAMES:
        for arch in ("sm80", "sm90"):
            for block_d in (16, 32, 64, 128, 256):
                for dtype in (F16, BF16, F32):
                    for heavy in (False, True):
                        configs = triton_configs.table_configs(kernel, arch, block_d, dtype, heavy)
                        assert 1 <= len(configs) <= 6
                        # launch_configs caches lengths clamped to _LONGEST_PRUNED: no block may exceed it
                        assert max(max(c[0], c[1]) for c in configs) <= triton_configs._LONGEST_PRUNED
    assert triton_configs.table_configs("forward", "interpret", 64, F16) == [(32, 32, 4, 1)]
    candidates = triton_configs.table_configs("forward", "sm90", 64, BF16)

    def prune(*args, **kwargs):
        return triton_configs.prune_configs(candidates, "sm90", "forward", 64, BF16, *args, **kwargs)

    # Deterministic mode (on in this file) and FAST_ATTN_TRITON_AUTOTUNE=0 keep one candidate.
    assert prune(None, seqlen_q=4096, seqlen_k=4096) == (candidates[0],)
    torch.use_deterministic_algorithms(False)
    assert set(prune(None, seqlen_q=4096, seqlen_k=4096)) == set(candidates)
    assert len(prune(None, seqlen_q=1, seqlen_k=4096)) == 1  # no 16-row tile in the table: the smallest stays
    monkeypatch.setenv("FAST_ATTN_TRITON_AUTOTUNE", "0")
    assert prune(None, seqlen_q=4096, seqlen_k=4096) == (candidates[0],)
    monkeypatch.delenv("FAST_ATTN_TRITON_AUTOTUNE")
    # Shared memory: a float32 (128, 128) bias tile does not fit three stages at D 128.
    assert triton_configs.shared_memory_estimate("forward", (128, 64, 4, 3), 64, BF16, None) == 65536
    assert triton_configs.prune_configs(
        [(128, 128, 8, 3), (64, 64, 4, 2)], "sm90", "forward", 128, BF16, F32, 4096, 4096
    ) == ((64, 64, 4, 2),)


# ---------------------------------------------------------------- GPU only

GRID_SEQLENS = (1, 17, 97, 128, 257, 1025)
GRID_HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128, 256)
GRID_PAIRS = [(seqlen_q, seqlen_k) for seqlen_q in GRID_SEQLENS for seqlen_k in GRID_SEQLENS]
GRID_DTYPES = {"bf16": BF16, "fp16": F16, "fp32": F32}
GRID_TESTS = [(name, head_dim) for name in GRID_DTYPES for head_dim in GRID_HEAD_DIMS]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name,head_dim", GRID_TESTS, ids=[f"{n}-d{d}" for n, d in GRID_TESTS])
def test_gpu_grid(dtype_name, head_dim):
    # The (Sq, Sk) pairs of GRID_PAIRS spread over the dtype x head-dim tests:
    # four pairs each (every pair lands in two tests), the causal mode rotating. Each new
    # pair can cost kernel compiles (Triton specializes Sq == 1 and S % 16 == 0), so the
    # whole product is test_gpu_full_grid (slow).
    test_index = GRID_TESTS.index((dtype_name, head_dim))
    modes = (False, True, "bottom_right")
    for offset in range(4):
        pair_index = (test_index * 4 + offset) * 7 % len(GRID_PAIRS)  # 7 is coprime with 36
        seqlen_q, seqlen_k = GRID_PAIRS[pair_index]
        causal = modes[(test_index + offset) % 3]
        check_case(
            Case(2, 4, 2, seqlen_q, seqlen_k, head_dim, GRID_DTYPES[dtype_name], causal=causal, layout="bshd")
        )


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("head_dim", GRID_HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True, "bottom_right"], ids=["full", "top_left", "bottom_right"])
def test_gpu_full_grid(dtype, head_dim, causal):
    for seqlen_q in GRID_SEQLENS:
        for seqlen_k in GRID_SEQLENS:
            check_case(Case(1, 2, 1, seqlen_q, seqlen_k, head_dim, dtype, causal=causal))


@pytest.mark.gpu
def test_opcheck_gpu():
    case = Case(
        2,
        4,
        2,
        130,
        150,
        64,
        BF16,
        "bottom_right",
        scale=0.125,
        bias_shape=(1, 4, 130, 150),
        key_mask=True,
        dropout_p=0.1,
        dropout_seed=3,
        deterministic=True,
    )
    ops = torch.ops.fast_attn
    opcheck_forward_and_backward(ops.triton_attention_forward, ops.triton_attention_backward, case, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
def test_torch_compile_fullgraph_forward_and_backward(with_bias):
    q, k, v = random_qkv(2, 4, 2, 200, 200, 64, dtype=BF16, device="cuda", requires_grad=True)
    bias = torch.randn(1, 4, 200, 200, device="cuda", dtype=BF16, requires_grad=True) if with_bias else None

    def step(q, k, v, bias):
        out = fast_attn.attention(q, k, v, bias=bias, causal=True, backend="triton")
        return (out.float() ** 2).sum()

    compiled = torch.compile(step, fullgraph=True)
    inputs = [t for t in (q, k, v, bias) if t is not None]
    loss = compiled(q, k, v, bias)
    grads = torch.autograd.grad(loss, inputs)
    expected_loss = step(q, k, v, bias)
    expected_grads = torch.autograd.grad(expected_loss, inputs)
    # Inductor autotunes the user kernels itself and may pick other blocks than the
    # eager autotuner (another summation order), so compare within bf16 rounding.
    torch.testing.assert_close(loss, expected_loss, rtol=1e-3, atol=1e-2)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=2e-2, atol=2e-2)
