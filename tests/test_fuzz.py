"""Property-based comparison of every kernel backend with the float64 reference.

Hypothesis draws valid problems: shapes including 1 and primes, GQA ratios,
transposed views, broadcast biases with and without gradient, key masks with
empty and full rows, both causal alignments, dtypes, and the score modifiers
(window_size, softcap, alibi_slopes, sinks) that dispatch lets a backend run. CI runs a fixed,
derandomized set; `--fuzz-examples N` runs N random examples per backend.
Packed variable-length sequences are drawn the same way (lengths with 0 and 1, GQA, both
alignments, windows, softcap, ALiBi, sinks, strided views) against the per-sequence reference.
Decoding steps against a KV cache are drawn too (contiguous, paged with any page size, K and V
pages interleaved, left padding, shuffled cache rows, new keys written in place, split counts) on
every backend that decodes. Every failure found becomes a regular test in test_contract.py,
test_varlen.py, test_decode.py or a backend suite.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fast_attn
from fast_attn.testing import (
    Case,
    DecodeCase,
    VarlenCase,
    attention_options,
    attention_runner,
    backend_device,
    check_against_reference,
    check_decode_against_reference,
    check_varlen_against_reference,
    decode_runner,
)
from fast_attn.validation import build_problem

HAS_CUDA = torch.cuda.is_available()

LENGTHS = [1, 2, 3, 5, 7, 13, 17, 31, 64, 97]
BIAS_SHAPES = ["none", "full", "1HSS", "B11S", "SS", "111S", "1H1S", "1HS1", "1111"]
WINDOW_SIDES = [0, 1, 3, 16, -1]  # keys on each side of the diagonal; -1: unbounded


def bias_shape(kind: str, batch: int, heads: int, sq: int, sk: int) -> tuple[int, ...] | None:
    return {
        "none": None,
        "full": (batch, heads, sq, sk),
        "1HSS": (1, heads, sq, sk),
        "B11S": (batch, 1, 1, sk),
        "SS": (sq, sk),
        "111S": (1, 1, 1, sk),
        "1H1S": (1, heads, 1, sk),
        "1HS1": (1, heads, sq, 1),  # constant along the keys: its exact gradient is 0 (without lse's)
        "1111": (1, 1, 1, 1),
    }[kind]


@st.composite
def score_modifiers(draw) -> dict:
    """Case fields of the score modifiers, each on or off on its own; windows meet every causal alignment."""
    return dict(
        window_size=draw(st.none() | st.tuples(st.sampled_from(WINDOW_SIDES), st.sampled_from(WINDOW_SIDES))),
        softcap=draw(st.sampled_from([None, 5.0, 30.0])),
        alibi=draw(st.sampled_from([None, "h", "bh"])),
        sinks=draw(st.booleans()),
    )


def refused(backend: str, case: Case) -> bool:
    """Whether dispatch refuses `backend` the case's modifiers: a feature the case asks for
    (dispatch.asked_features) that the backend does not declare, or a reason of the backend's own
    (cuda: _cuda_modifier_reasons). Devices, dtypes and head dims the strategy keeps to itself."""
    inputs = case.make_inputs(backend_device(backend))
    problem = build_problem(inputs["q"], inputs["k"], inputs["v"], **attention_options(case, inputs))
    spec = fast_attn.dispatch.BACKENDS[backend]
    lacking = fast_attn.dispatch.asked_features(problem) - spec.features
    return bool(lacking or spec.extra_reasons(problem, True))


@st.composite
def problems(draw, backend: str) -> Case:
    spec = fast_attn.dispatch.BACKENDS[backend]
    interpreted = backend == "triton" and not HAS_CUDA
    lengths = LENGTHS[:8] if interpreted else LENGTHS
    head_dims = [8, 16, 24, 40] if interpreted else [8, 16, 24, 40, 64, 72]
    if backend == "cuda":
        head_dims = [d for d in head_dims + [96, 128] if spec.supports_head_dim(d)]
    dtypes = [d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64) if d in spec.dtypes]
    if interpreted:
        dtypes = [torch.float32, torch.float16]
    batch, heads_kv = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    seqlen_q, seqlen_k = draw(st.sampled_from(lengths)), draw(st.sampled_from(lengths))
    head_dim, dtype = draw(st.sampled_from(head_dims)), draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["bhsd", "bshd"]))
    bias = bias_shape(draw(st.sampled_from(BIAS_SHAPES)), batch, heads_kv * group, seqlen_q, seqlen_k)
    bias_grad, sinks_grad = draw(st.booleans()), draw(st.booleans())
    key_mask = draw(st.sampled_from(["none", "random", "with-empty-row", "full"]))
    causal = draw(st.sampled_from([False, "top_left", "bottom_right"]))
    scale = draw(st.sampled_from([None, 1.0, 0.125]))
    grads = draw(st.sampled_from([("q", "k", "v"), ("q",), ("k", "v"), ()]))
    modifiers = draw(score_modifiers())
    case = Case(
        batch,
        heads_kv * group,
        heads_kv,
        seqlen_q,
        seqlen_k,
        head_dim,
        dtype,
        causal,
        scale=scale,
        bias_shape=bias,
        key_mask=key_mask != "none",
        keys_kept=1.0 if key_mask == "full" else 0.6,
        empty_key_rows=(batch - 1,) if key_mask == "with-empty-row" else (),
        layout=layout,
        grads=grads + (("bias",) if bias_grad else ()) + (("sinks",) if sinks_grad else ()),
        **modifiers,
    )
    assume(not refused(backend, case))
    return case


def fuzz_settings(config, backend: str):
    requested = config.getoption("--fuzz-examples")
    interpreted = backend == "triton" and not HAS_CUDA
    return settings(
        max_examples=requested or (12 if interpreted else 40),
        derandomize=not requested,  # CI: a fixed set; --fuzz-examples: fresh random draws
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


def test_fuzz_against_reference(kernel_backend, pytestconfig):
    run, device = attention_runner(kernel_backend), backend_device(kernel_backend)

    @fuzz_settings(pytestconfig, kernel_backend)
    @given(problems(kernel_backend))
    def check(case: Case):
        # The rounded-output baseline, fed the kernel's own output: found by this test
        # (bf16, scale 1, a peaked softmax; biases constant along the keys).
        check_against_reference(run, case, device, rounded_output="kernel")

    check()


@st.composite
def varlen_problems(draw, backend: str) -> VarlenCase:
    spec = fast_attn.dispatch.BACKENDS[backend]
    interpreted = backend == "triton" and not HAS_CUDA
    lengths = [0, 1, 2, 3, 5, 13, 31] if interpreted else [0, 1, 2, 3, 5, 13, 31, 64, 97]
    head_dims = [8, 16, 40] if interpreted else [8, 16, 40, 64]
    if backend == "cuda":
        head_dims = [d for d in head_dims + [128] if spec.supports_head_dim(d)]
    dtypes = [torch.float32, torch.float16] if interpreted else [d for d in spec.dtypes if d != torch.float64]
    count = draw(st.integers(1, 4))
    lengths_q = tuple(draw(st.lists(st.sampled_from(lengths), min_size=count, max_size=count)))
    lengths_k = draw(st.one_of(st.none(), st.lists(st.sampled_from(lengths), min_size=count, max_size=count)))
    heads_kv, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    window = draw(st.sampled_from([None, (0, 0), (3, -1), (-1, 2), (5, 1)]))
    return VarlenCase(
        lengths_q,
        None if lengths_k is None else tuple(lengths_k),
        heads_q=heads_kv * group,
        heads_kv=heads_kv,
        head_dim=draw(st.sampled_from(head_dims)),
        dtype=draw(st.sampled_from(dtypes)),
        causal=draw(st.sampled_from([False, "top_left", "bottom_right"])),
        window_size=window,
        softcap=draw(st.sampled_from([None, 4.0])),
        alibi=draw(st.sampled_from([None, "h", "nh"])),
        sinks=draw(st.booleans()),
        strided=draw(st.booleans()),
    )


def test_fuzz_varlen_against_reference(kernel_backend, pytestconfig):
    device = backend_device(kernel_backend)

    @fuzz_settings(pytestconfig, kernel_backend)
    @given(varlen_problems(kernel_backend))
    def check(case: VarlenCase):
        check_varlen_against_reference(kernel_backend, case, device)

    check()


@st.composite
def decode_problems(draw, backend: str) -> DecodeCase:
    spec = fast_attn.dispatch.BACKENDS[backend]
    interpreted = backend == "triton" and not HAS_CUDA
    head_dims = [8, 16, 40] if interpreted else [8, 16, 40, 64, 128]
    if backend == "cuda":
        head_dims = [d for d in head_dims if spec.supports_head_dim(d)]
    dtypes = [torch.float32, torch.float16] if interpreted else list(spec.dtypes)
    count = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.sampled_from([0, 1, 5, 17, 64, 97, 130]), min_size=count, max_size=count))
    page_size = draw(st.sampled_from([None, 1, 5, 16, 64]))
    new_rows = draw(st.sampled_from([0, 1, 2, 3]))
    heads_kv, group = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3, 8]))
    window = draw(st.sampled_from([None, (0, 0), (3, -1), (-1, 2), (20, 1)]))
    return DecodeCase(
        tuple(lengths),
        new_rows=new_rows,
        query_rows=draw(st.sampled_from([None, 1, 2, 4])) if new_rows == 0 else None,
        heads_q=heads_kv * group,
        heads_kv=heads_kv,
        head_dim=draw(st.sampled_from(head_dims)),
        dtype=draw(st.sampled_from(dtypes)),
        page_size=page_size,
        interleaved=draw(st.booleans()),
        leftpad=draw(st.booleans()),
        batch_idx=page_size is None and draw(st.booleans()),
        causal=draw(st.booleans()),
        window_size=window,
        softcap=draw(st.sampled_from([None, 4.0])),
        alibi=draw(st.sampled_from([None, "h", "bh"])),
        sinks=draw(st.booleans()),
        num_splits=draw(st.sampled_from([0, 1, 2, 3, 7])),
    )


def test_fuzz_decode_against_reference(decode_backend, pytestconfig):
    device = backend_device(decode_backend)

    @fuzz_settings(pytestconfig, decode_backend)
    @given(decode_problems(decode_backend))
    def check(case: DecodeCase):
        check_decode_against_reference(decode_runner(case, decode_backend), case, device)

    check()
