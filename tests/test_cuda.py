"""The CUDA kernels (csrc/cuda) against the float64 reference.

The same checks run through two runners:
- "gpu": the extension's CUDA implementation of torch.ops.fast_attn.* on a
  GPU (marker gpu; skipped without one).
- "emulated": the same kernel sources and host launcher compiled with the host
  compiler for the CPU warp emulator (csrc/cuda/emulation), built once per
  session (about 3 minutes on 2 cores, cached in the temp dir). It models the
  PTX fragment layouts of ldmatrix / mma.sync, cp.async groups and barriers,
  poisons every allocation with NaN, and fails a launch on shared-memory
  races, out-of-bounds or cross-CTA global accesses. Needs the CUDA headers
  (cuda_fp16.h), not a GPU.

Every check: fresh random inputs, forward (out, lse) and every gradient
(dq, dk, dv, dbias) held to fast_attn.testing.assert_error_rule against the
reference computed in float64 and in the kernel's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fast_attn import dispatch
from fast_attn.causal import parse_causal
from fast_attn.dropout import new_dropout_seed
from fast_attn.reference import reference_varlen_attention
from fast_attn.testing import (
    GRAD_INPUTS,
    Case,
    DecodeCase,
    VarlenCase,
    assert_error_rule,
    attention_options,
    backward_op_arguments,
    check_against_reference,
    check_decode_against_reference,
    decode_op_arguments,
    forward_op_arguments,
    opcheck_forward_and_backward,
    random_qkv,
    wanted_grads,
)
from fast_attn.validation import build_problem

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
SM_COUNT = 132  # the emulator sizes the dbias split as for an H100


# ---------------------------------------------------------------------------
# Runners


@dataclass(frozen=True)
class Runner:
    name: str
    device: str
    forward: Callable  # the forward op's arguments (csrc/schema.cpp) -> (out, lse)
    backward: Callable  # the backward op's arguments -> (dq, dk, dv, dbias)
    decode: Callable  # the decode op's arguments -> (out, lse)
    launch_count: Callable[[], int] | None = None
    head_dims: tuple[int, ...] = ()  # the kernel head dims compiled (the emulator's)
    kernel_path: Callable | None = None  # the forward op's arguments -> the host's KernelPath (emulator)
    dkdv_splits: Callable | None = None  # sizes -> the dK/dV kernel's split count (emulator)
    dq_accum_layout: Callable | None = None  # (head dim, vector) -> blocked dq_accum layout (emulator)

    def run(self, case: Case, inputs: dict, grad_out: torch.Tensor, grad_lse: torch.Tensor | None):
        """The forward and backward ops on `case` (a fast_attn.testing.Run)."""
        tensors = {name: t.detach() if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}
        out, lse = self.forward(*forward_op_arguments(case, tensors))
        grads = self.backward(*backward_op_arguments(case, tensors, out, lse, grad_out, grad_lse))
        if inputs["bias"] is None:
            assert grads[3].numel() == 0, "a dbias without a bias"
        wanted = wanted_grads(inputs)
        return out, lse, {name: grad for name, grad in zip(GRAD_INPUTS, grads) if name in wanted}


def _cuda_include_dir() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file():
            return Path(home) / "include"
    return None


def _build_emulator():
    from torch.utils import cpp_extension

    include = _cuda_include_dir()
    if include is None:
        pytest.skip("the CUDA emulator needs the CUDA toolkit headers (cuda_fp16.h); set CUDA_HOME")
    # One build folder per checkout: two checkouts sharing one would compile each other's sources.
    checkout = zlib.crc32(str(ROOT).encode())
    build_dir = (
        Path(tempfile.gettempdir()) / f"fast_attn_cuda_emulator_torch{torch.__version__}_{checkout:08x}"
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [
        CUDA_SOURCES / "emulation" / "emulation_module.cpp",
        CUDA_SOURCES / "emulation" / "emulated_device.cpp",
        CUDA_SOURCES / "attention_cuda_host.cpp",
        CUDA_SOURCES / "decode_cuda_host.cpp",
        ROOT / "csrc" / "attention_launch.cpp",
        ROOT / "csrc" / "decode_launch.cpp",
    ]
    # The kernel translation units themselves (the generated instantiations included),
    # compiled as C++ through one-line wrappers.
    for kernel_source in sorted(CUDA_SOURCES.glob("*.cu")) + sorted(CUDA_SOURCES.glob("instantiations/*.cu")):
        wrapper = build_dir / f"kernel_{kernel_source.stem}.cpp"
        text = f'#include "{kernel_source}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(wrapper)
    return cpp_extension.load(
        name="fast_attn_cuda_emulator",
        sources=[str(s) for s in sources],
        build_directory=str(build_dir),
        extra_cflags=["-O1", "-DFAST_ATTN_CUDA_EMULATION"],
        extra_include_paths=[str(ROOT / "csrc"), str(include)],
        verbose=False,
    )


@pytest.fixture(scope="session")
def emulated() -> Runner:
    module = _build_emulator()
    return Runner(
        name="emulated",
        device="cpu",
        forward=functools.partial(module.forward, sm_count=SM_COUNT),
        backward=functools.partial(module.backward, sm_count=SM_COUNT),
        decode=functools.partial(module.decode, sm_count=SM_COUNT),
        launch_count=module.launch_count,
        head_dims=tuple(module.compiled_head_dims()),
        kernel_path=module.kernel_path,
        dkdv_splits=module.dkdv_splits,
        dq_accum_layout=module.dq_accum_layout,
    )


def _within_compiled_head_dims(op: Callable) -> Callable:
    """The op, skipping a case whose head dim (the last dim of its first tensor) is above every
    head dim this extension compiled: a build for some head dims (FAST_ATTN_CUDA_HEAD_DIMS=64,128,
    as benchmarks/gpu_check.sh's cuda_kernels preset builds) runs a smaller one padded, a larger
    one not at all."""

    @functools.wraps(op)
    def call(*args):
        head_dim = args[0].shape[-1]
        if head_dim > max(dispatch.CUDA_HEAD_DIMS):
            pytest.skip(
                f"head dim {head_dim}: this build's CUDA kernels go up to {max(dispatch.CUDA_HEAD_DIMS)}"
            )
        return op(*args)

    return call


def test_gpu_runner_skips_head_dims_above_the_build(monkeypatch):
    monkeypatch.setattr(dispatch, "CUDA_HEAD_DIMS", (64, 128))
    op = _within_compiled_head_dims(lambda *args: "ran")
    assert op(torch.empty(1, 1, 1, 96)) == "ran"
    with pytest.raises(pytest.skip.Exception, match="head dim 256: this build's CUDA kernels go up to 128"):
        op(torch.empty(1, 1, 1, 256))


@pytest.fixture(scope="session")
def gpu() -> Runner:
    from fast_attn.ops.cpp_ops import has_kernel_for

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not has_kernel_for("CUDA"):
        pytest.fail("a CUDA GPU is present but fast_attn was built without CUDA kernels")
    ops = torch.ops.fast_attn
    return Runner(
        name="gpu",
        device="cuda",
        forward=_within_compiled_head_dims(ops.attention_forward),
        backward=_within_compiled_head_dims(ops.attention_backward),
        decode=_within_compiled_head_dims(ops.decode_forward),
    )


@pytest.fixture(params=["emulated", pytest.param("gpu", marks=pytest.mark.gpu)])
def runner(request) -> Runner:
    """Each runner in turn: the emulator, then the GPU (marker gpu)."""
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------------------
# One checked problem

# The CUDA kernels take 16-bit inputs: a case is bf16 unless it names fp16; a key mask
# hides every key of batch row 0.
F32 = torch.float32
F16 = torch.float16
CudaCase = functools.partial(Case, dtype=torch.bfloat16, empty_key_rows=(0,))


def check_case(runner: Runner, case: Case) -> None:
    """Forward and every gradient by the error rule; the gradients' second baseline is the
    flash-style backward fed the kernel's own output (fast_attn.testing.rounded_output_reference):
    it holds the backward to what it can do with that output, the forward's error being checked
    on out itself. (Found by the fuzz below: a bias constant along the keys has an exact gradient
    of 0, softmax being shift-invariant, and every flash-style kernel returns
    sum_i dO_i . (O_i - exact O_i) instead.)"""
    check_against_reference(runner.run, case, runner.device, rounded_output="kernel")


# ---------------------------------------------------------------------------
# The grid

BASE = CudaCase(batch=1, heads_q=2, heads_kv=2, seqlen_q=97, seqlen_k=97, head_dim=64)


def _grid(base: Case, **axes) -> list[Case]:
    """One case per value of each axis, the others at base (not the cartesian product)."""
    cases = [base]
    for field, values in axes.items():
        cases += [dataclasses.replace(base, **{field: value}) for value in values]
    return cases


# Sequence lengths, head dims (40 and 80 run padded in the 64 and 96 kernels), dtypes, layouts.
SHAPE_CASES = [
    *_grid(BASE, head_dim=[32, 40, 80, 96, 128, 256], dtype=[torch.float16], layout=["bshd", "misaligned"]),
    *[
        CudaCase(1, 1, 1, sq, sk, 64, causal=c)
        for sq, sk in [(1, 1), (1, 17), (17, 1), (17, 97), (128, 128), (257, 130), (130, 257)]
        for c in (False, "bottom_right")
    ],
    CudaCase(1, 1, 1, 257, 130, 64, causal=True),
    CudaCase(2, 2, 2, 129, 129, 128, dtype=torch.float16, causal=True, layout="bshd"),
    CudaCase(1, 2, 2, 70, 45, 256, causal="bottom_right"),
    CudaCase(1, 2, 2, 33, 65, 96, dtype=torch.float16, causal=True),
]

# GQA (including MQA), both causal alignments with Sq != Sk, fully masked rows.
MASK_CASES = [
    CudaCase(2, 4, 2, 97, 65, 64, causal=True),
    CudaCase(1, 4, 1, 65, 97, 64, causal="bottom_right"),
    CudaCase(1, 8, 2, 33, 33, 32, dtype=torch.float16),
    CudaCase(3, 2, 2, 65, 80, 64, key_mask=True),
    # Bottom-right with Sq > Sk: leading rows see nothing.
    CudaCase(2, 4, 2, 70, 33, 128, key_mask=True, causal="bottom_right"),
    CudaCase(1, 2, 2, 33, 70, 64, causal=True, grad_lse=True),
    CudaCase(2, 2, 1, 65, 65, 64, key_mask=True, grad_lse=True, deterministic=True),
]

# Biases: full, broadcast over each dim and all of them, float32 with bf16 inputs, -inf entries.
BIAS_CASES = [
    CudaCase(2, 2, 2, 65, 70, 64, bias_shape=(2, 2, 65, 70)),
    CudaCase(2, 2, 2, 65, 70, 64, bias_shape=(1, 2, 65, 70), bias_dtype=F32),  # T5's relative position bias
    CudaCase(2, 4, 2, 65, 70, 64, bias_shape=(2, 1, 65, 70), dtype=torch.float16),
    CudaCase(2, 2, 2, 65, 70, 64, bias_shape=(2, 2, 1, 70), causal=True),
    CudaCase(2, 2, 2, 65, 70, 32, bias_shape=(2, 2, 65, 1)),
    CudaCase(2, 2, 2, 33, 40, 64, bias_shape=(1, 1, 1, 1), dtype=torch.float16),
    CudaCase(2, 2, 2, 65, 70, 64, bias_shape=(1, 2, 65, 70), bias_inf_fraction=0.1, key_mask=True),
    CudaCase(1, 2, 2, 97, 97, 128, bias_shape=(1, 2, 97, 97), causal="bottom_right", deterministic=True),
    CudaCase(2, 2, 2, 40, 33, 256, bias_shape=(2, 1, 1, 33), bias_dtype=F32),
    # Full rows and columns (the dbias kernel) at each of its tile shapes: summed over
    # batch and heads with GQA and an odd Sk (neighbouring 16-bit stores of two CTAs),
    # not summed with fully masked causal tiles, a single query row, bottom-right at D 256.
    CudaCase(2, 4, 2, 33, 47, 32, bias_shape=(1, 1, 33, 47), dtype=torch.float16),
    CudaCase(2, 2, 2, 130, 100, 96, bias_shape=(2, 2, 130, 100), causal=True),
    CudaCase(3, 2, 2, 1, 50, 64, bias_shape=(1, 2, 1, 50)),
    CudaCase(1, 2, 2, 70, 45, 256, bias_shape=(1, 2, 70, 45), causal="bottom_right", bias_inf_fraction=0.1),
    # Found by the fuzz: a bias constant along the keys, whose exact gradient is 0.
    CudaCase(
        2,
        6,
        2,
        7,
        7,
        128,
        dtype=torch.float16,
        causal="bottom_right",
        bias_shape=(1, 1, 1, 1),
        bias_dtype=F32,
    ),
    CudaCase(1, 1, 1, 1, 1, 32, bias_shape=(1, 1, 1, 1), dropout_p=0.25),
]

DROPOUT_CASES = [
    CudaCase(1, 2, 2, 65, 97, 64, dropout_p=0.2),
    CudaCase(2, 2, 1, 97, 65, 128, dropout_p=0.5, causal=True, dtype=torch.float16),
    CudaCase(
        1, 2, 2, 65, 65, 64, dropout_p=0.3, bias_shape=(1, 2, 65, 65), key_mask=True, deterministic=True
    ),
]

# Score modifiers (the kernels instantiated with kModifiers). Windows with every causal
# alignment and Sq != Sk: 97x33 with a left edge leaves rows whose band is empty, and the
# longer ones skip whole key tiles (forward, dQ) and query blocks (dK/dV, dbias) outside the band.
WINDOW_CASES = [
    CudaCase(1, 2, 2, sq, sk, 64, causal=c, window_size=w)
    for w, (sq, sk) in [((0, 0), (97, 33)), ((3, -1), (97, 33)), ((-1, 3), (33, 97)), ((16, 16), (33, 97))]
    for c in (False, True, "bottom_right")
] + [
    CudaCase(1, 2, 2, 300, 300, 64, window_size=(40, 40)),
    CudaCase(2, 2, 1, 300, 40, 32, causal=True, window_size=(8, -1), key_mask=True),  # rows 48+ see nothing
    CudaCase(1, 2, 2, 257, 200, 128, dtype=torch.float16, causal="bottom_right", window_size=(16, 0)),
    CudaCase(1, 2, 2, 200, 257, 128, window_size=(70, 3), deterministic=True),
    CudaCase(1, 2, 2, 70, 45, 256, window_size=(5, 5), grad_lse=True),
    CudaCase(1, 2, 2, 97, 97, 96, dtype=torch.float16, window_size=(0, -1), deterministic=True),
]

# softcap with scores scaled up (|scale q.k| reaches 30, the cap 5: tanh saturates), ALiBi
# per head and per (batch, head), each with the masks and both dtypes.
SOFTCAP_ALIBI_CASES = [
    CudaCase(1, 2, 2, 97, 97, 64, scale=1.0, softcap=5.0),
    CudaCase(1, 2, 2, 97, 65, 64, dtype=torch.float16, scale=1.0, softcap=5.0, causal=True, grad_lse=True),
    CudaCase(1, 2, 2, 65, 97, 128, scale=0.5, softcap=8.0, causal="bottom_right", deterministic=True),
    CudaCase(1, 2, 2, 45, 70, 256, dtype=torch.float16, scale=1.0, softcap=5.0),
    CudaCase(
        2, 2, 2, 65, 70, 32, scale=1.0, softcap=5.0, bias_shape=(1, 2, 1, 70)
    ),  # dbias in the dK/dV kernel
    CudaCase(1, 2, 2, 97, 65, 64, alibi="h"),
    CudaCase(2, 2, 2, 65, 97, 64, dtype=torch.float16, alibi="bh", causal="bottom_right", key_mask=True),
    CudaCase(2, 4, 2, 40, 33, 96, alibi="bh", deterministic=True, dropout_p=0.2),
]

# Everything at once, with bias gradients through the dK/dV kernel (a broadcast bias) and
# the dbias kernel (full, and T5's (1, H, S, S)), key mask, GQA, grad_lse, dropout.
ALL_MODIFIERS = dict(window_size=(20, 6), softcap=8.0, scale=0.5, key_mask=True, grad_lse=True, dropout_p=0.2)
COMBINED_MODIFIER_CASES = [
    CudaCase(2, 4, 2, 97, 80, 64, alibi="bh", bias_shape=(2, 4, 97, 80), **ALL_MODIFIERS),
    CudaCase(2, 4, 2, 97, 80, 64, dtype=torch.float16, alibi="h", bias_shape=(1, 4, 97, 80), **ALL_MODIFIERS),
    CudaCase(2, 4, 2, 97, 80, 64, causal=True, alibi="bh", bias_shape=(2, 1, 1, 80), **ALL_MODIFIERS),
    CudaCase(
        2,
        4,
        1,
        80,
        97,
        128,
        dtype=torch.float16,
        causal="bottom_right",
        alibi="h",
        bias_shape=(1, 4, 80, 97),
        deterministic=True,
        **ALL_MODIFIERS,
    ),
    CudaCase(1, 2, 1, 70, 45, 256, alibi="bh", bias_shape=(1, 2, 70, 45), **ALL_MODIFIERS),
]

MODIFIER_CASES = WINDOW_CASES + SOFTCAP_ALIBI_CASES + COMBINED_MODIFIER_CASES

ALL_CASES = SHAPE_CASES + MASK_CASES + BIAS_CASES + DROPOUT_CASES + MODIFIER_CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_kernels(runner: Runner, case: Case):
    check_case(runner, case)


# The forward and dK/dV kernels' paths (KernelPath, csrc/cuda/kernel_api.h): the one the host
# picks for each kind of problem, each on awkward shapes. The kFast and kCausal forward tiles are
# 128 x 64 at D 64 and 128 x 48 at D 128 (4 warps x 32 query rows, two m16 tiles each), the
# dK/dV kernel's key blocks 128 and 64: several key tiles with a partial last one, Sq != Sk, both
# causal alignments with diagonal tiles (masked) and tiles below the diagonal (unmasked), rows
# that see no key; the general path for a scale <= 0. The warps' two m16 tiles: Sq 100 leaves the
# last warp's second tile past Sq, Sq 120 half of it; with Sk = Sq + 16 (bottom right) the
# diagonal of a key tile masks one m16 tile of a warp entirely and the other in part.
PATH_CASES = [
    (CudaCase(1, 2, 2, 300, 200, 64), "fast"),
    (CudaCase(2, 4, 2, 200, 300, 128, dtype=torch.float16, grad_lse=True), "fast"),
    (CudaCase(1, 2, 2, 128, 256, 128, layout="bshd"), "fast"),
    (CudaCase(1, 2, 1, 150, 270, 64, deterministic=True), "fast"),
    (CudaCase(1, 2, 2, 300, 300, 64, causal=True), "causal"),
    (CudaCase(1, 2, 2, 256, 256, 128, causal=True, grad_lse=True), "causal"),
    (CudaCase(1, 2, 1, 200, 330, 128, causal="bottom_right"), "causal"),
    (CudaCase(1, 2, 2, 330, 200, 64, dtype=torch.float16, causal="bottom_right"), "causal"),
    (CudaCase(1, 2, 2, 270, 150, 64, causal=True, deterministic=True), "causal"),
    (CudaCase(1, 2, 2, 150, 230, 64, window_size=(-1, 7)), "causal"),
    (CudaCase(1, 2, 2, 100, 150, 64), "fast"),
    (CudaCase(1, 2, 1, 120, 90, 128, dtype=torch.float16), "fast"),
    (CudaCase(1, 2, 2, 100, 116, 64, causal="bottom_right"), "causal"),
    (CudaCase(1, 2, 2, 120, 136, 128, causal="bottom_right", grad_lse=True), "causal"),
    (CudaCase(1, 2, 2, 100, 100, 128, causal=True), "causal"),
    # D 128's single-buffered key tiles of 48: Sk a multiple of 48 (no masked tile), one key tile
    # (no copy in the loop), D 120 in the D 128 kernel (zero-filled columns in every copy).
    (CudaCase(1, 2, 2, 130, 144, 128), "fast"),
    (CudaCase(1, 2, 1, 70, 40, 128, causal="bottom_right"), "causal"),
    (CudaCase(1, 2, 2, 150, 200, 120, causal=True), "causal"),
    # The kFast and kCausal dK/dV kernels (the staged kernel at D 32 to 128): query blocks ending
    # inside a warp's tile (Sq 45, 77, 100, 161), the band's edge crossing the warps' query tiles
    # at an offset that is no multiple of 16 (81), GQA and MQA, deterministic, D 32, 96 and 128.
    (CudaCase(1, 4, 2, 100, 181, 64, causal="bottom_right"), "causal"),
    (CudaCase(2, 3, 1, 161, 200, 96, dtype=torch.float16, causal=True), "causal"),
    (CudaCase(1, 2, 2, 77, 300, 96, deterministic=True), "fast"),
    (CudaCase(1, 4, 1, 45, 140, 128, causal=True, deterministic=True), "causal"),
    (CudaCase(1, 2, 1, 70, 140, 32, grad_lse=True), "fast"),
    # The staged kFast and kCausal dK/dV kernels (dkdv_staged_tile_config: 128 keys, steps of 128
    # queries at D 32 and 64, 64 at D 96 and 128): several query blocks per query head of a GQA or
    # MQA group, the masked steps (the diagonal, a partial key block) and the unmasked ones
    # alternating per head, a last query block past Sq, Sk a multiple of 128 (no masked step),
    # deterministic splits, at each head dim; D 80 in the D 96 kernel (zero-filled columns).
    *(
        case
        for long_steps, short_steps in ((64, 128), (32, 96))  # steps of 128 and of 64 queries
        for case in (
            (CudaCase(1, 4, 2, 300, 260, long_steps, causal=True), "causal"),
            (
                CudaCase(
                    1, 4, 1, 200, 333, short_steps, dtype=F16, causal="bottom_right", deterministic=True
                ),
                "causal",
            ),
            (CudaCase(1, 2, 2, 260, 384, long_steps, deterministic=True), "fast"),
            (CudaCase(2, 3, 1, 190, 256, short_steps, grad_lse=True), "fast"),
        )
    ),
    (CudaCase(1, 2, 2, 150, 200, 80, causal=True), "causal"),
    (CudaCase(1, 2, 2, 200, 150, 64, scale=-0.3), "general"),
    (CudaCase(1, 2, 2, 97, 97, 64, causal=True, key_mask=True), "general"),
    (CudaCase(1, 2, 2, 97, 97, 64, dropout_p=0.2), "general"),
    (CudaCase(1, 2, 2, 97, 97, 64, bias_shape=(1, 2, 97, 97)), "general"),
    (CudaCase(1, 2, 2, 97, 97, 64, causal=True, softcap=5.0), "modifiers"),
]


@pytest.mark.parametrize(("case", "path"), PATH_CASES, ids=str)
def test_kernel_paths(runner: Runner, case: Case, path: str):
    if runner.kernel_path is not None:
        assert runner.kernel_path(*forward_op_arguments(case, case.make_inputs())) == path
    check_case(runner, case)


# The field's sizes on a GPU (too slow to emulate): long sequences, every head dim.
LONG_CASES = [
    CudaCase(2, 4, 4, 1025, 1025, d, dtype=dt, causal=c)
    for d in (64, 128)
    for dt in (torch.bfloat16, torch.float16)
    for c in (False, True)
] + [
    CudaCase(1, 4, 2, 1025, 517, 256, causal="bottom_right"),
    CudaCase(1, 2, 2, 1025, 2049, 96, causal=True, layout="bshd"),
    CudaCase(2, 8, 2, 1025, 1025, 128, bias_shape=(1, 8, 1025, 1025), bias_dtype=F32),
    CudaCase(1, 4, 4, 1025, 1025, 64, dropout_p=0.1, key_mask=True, grad_lse=True),
    CudaCase(1, 4, 2, 1025, 2049, 128, causal="bottom_right", window_size=(256, -1), softcap=30.0, alibi="h"),
    CudaCase(2, 4, 4, 1025, 1025, 64, window_size=(128, 128), bias_shape=(1, 4, 1025, 1025), dropout_p=0.1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", LONG_CASES, ids=str)
def test_gpu_kernels_long(gpu: Runner, case: Case):
    check_case(gpu, case)


# ---------------------------------------------------------------------------
# Packed sequences (varlen): q (1, Hq, Tq, D) and k, v (1, Hkv, Tk, D) views of packed (T, H, D)
# tensors, each sequence held to the reference run on it alone (reference_varlen_attention: its
# own ALiBi slopes, causal and window alignment, and its block of the packed dropout mask).


@dataclass(frozen=True)
class CudaVarlenCase:
    """A VarlenCase through the ops, with the backward's deterministic flag and the max_seqlen
    bounds the ops get: "exact" (the longest sequences), "derived" (-1: the op derives them from
    the offsets) or "loose" (70 more: CTAs beyond every sequence)."""

    case: VarlenCase
    deterministic: bool = False
    bounds: str = "exact"

    def __str__(self) -> str:
        flags = ["det" if self.deterministic else "", self.bounds if self.bounds != "exact" else ""]
        return "-".join([str(self.case), *(f for f in flags if f)])


def varlen_case(lengths_q, lengths_k, *, deterministic=False, bounds="exact", **options) -> CudaVarlenCase:
    return CudaVarlenCase(
        VarlenCase(lengths_q, lengths_k, **{"dtype": torch.bfloat16, **options}), deterministic, bounds
    )


# Lengths 0 and 1, a sequence without keys and one without queries, lengths crossing the kernels'
# block sizes (64 and 128 rows), GQA, both causal alignments with Sq_n != Sk_n, windows, softcap,
# ALiBi per head and per sequence, dropout, both dQ paths (atomic and deterministic).
VARLEN_CASES = [
    varlen_case((1, 0, 130, 17), (3, 5, 129, 0), heads_kv=2, head_dim=64),
    varlen_case((1, 0, 130, 17), (3, 5, 129, 0), heads_kv=2, head_dim=64, deterministic=True, bounds="derived"),
    varlen_case((33, 70, 5), (50, 40, 5), heads_q=4, heads_kv=2, head_dim=64, causal=True, deterministic=True),
    varlen_case(
        (33, 70, 5), (50, 40, 5), heads_q=4, heads_kv=2, head_dim=128, dtype=torch.float16,
        causal="bottom_right", bounds="loose",
    ),
    varlen_case((97, 20), (60, 33), head_dim=64, window_size=(16, 4)),
    varlen_case((70, 9), (40, 30), head_dim=128, causal="bottom_right", window_size=(8, -1), deterministic=True),
    varlen_case((45, 66), (70, 30), heads_kv=2, head_dim=32, softcap=5.0, alibi="nh", causal="bottom_right"),
    varlen_case((40, 0, 65), (33, 7, 80), heads_kv=2, head_dim=64, dropout_p=0.3),
    varlen_case(
        (40, 65), (80, 33), heads_q=4, heads_kv=2, head_dim=96, dropout_p=0.2, causal=True, alibi="h",
        window_size=(20, -1), deterministic=True,
    ),
    varlen_case((20, 37), (45, 16), head_dim=256, causal="bottom_right"),
]  # fmt: skip


def check_varlen(runner: Runner, varlen: CudaVarlenCase) -> None:
    """The forward and backward ops on packed sequences; out, lse, dq, dk and dv of each sequence by
    the error rule against the float64 reference run on that sequence alone (grad_lse random)."""
    case = varlen.case
    inputs = case.make_inputs(runner.device)
    q, k, v = (inputs[n].detach() for n in ("q", "k", "v"))  # (T, H, D)
    cu_q, cu_k = inputs["cu_seqlens_q"], inputs["cu_seqlens_k"]
    longest_q, longest_k = inputs["max_seqlen_q"], inputs["max_seqlen_k"]
    bounds = {"exact": (longest_q, longest_k), "derived": (-1, -1), "loose": (longest_q + 70, longest_k + 70)}
    slopes = inputs["alibi_slopes"]
    seed = new_dropout_seed(torch.device(runner.device)) if case.dropout_p > 0 else None
    scale = 1.0 / math.sqrt(case.head_dim)
    causal = int(parse_causal(case.causal))
    left, right = case.window_size or (-1, -1)
    trailing = (
        None if slopes is None else slopes.reshape(-1, case.heads_q),  # (1 or N, Hq)
        left, right, case.softcap or 0.0, cu_q, cu_k, *bounds[varlen.bounds],
    )  # fmt: skip
    packed = [t.transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, T, D) views
    out, lse = runner.forward(*packed, None, None, seed, scale, causal, case.dropout_p, *trailing)
    grad_out = torch.randn(q.shape, device=q.device).to(case.dtype)  # (Tq, Hq, D)
    grad_lse = torch.randn(lse.shape[1:], device=q.device)  # (Hq, Tq)
    dq, dk, dv, _ = runner.backward(
        grad_out.transpose(0, 1)[None], grad_lse[None], *packed, None, None, seed, out, lse, scale, causal,
        case.dropout_p, False, varlen.deterministic, *trailing,
    )  # fmt: skip
    actual = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    actual = {name: t[0] if name == "lse" else t[0].transpose(0, 1) for name, t in actual.items()}

    def reference(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        copies = [inputs[n].detach().to(dtype).requires_grad_(True) for n in ("q", "k", "v")]
        ref_out, ref_lse = reference_varlen_attention(
            *copies, cu_q, cu_k, causal=case.causal, window_size=case.window_size, softcap=case.softcap,
            alibi_slopes=slopes, scale=scale, dropout_p=case.dropout_p, dropout_seed=seed, compute_dtype=dtype,
        )  # fmt: skip
        grads = torch.autograd.grad(
            [ref_out, ref_lse], copies, [grad_out.to(ref_out.dtype), grad_lse.to(ref_lse.dtype)]
        )
        return {"out": ref_out, "lse": ref_lse, **dict(zip(("dq", "dk", "dv"), grads))}

    exact, same_dtype = reference(torch.float64), reference(case.dtype)
    assert torch.equal(torch.isneginf(actual["lse"]), torch.isneginf(exact["lse"])), (
        "rows with lse = -inf differ"
    )
    offsets = {"q": cu_q.tolist(), "k": cu_k.tolist()}
    for n in range(len(offsets["q"]) - 1):
        for name in actual:
            dim = 1 if name == "lse" else 0  # lse (Hq, Tq), the others (T, H, D)
            sequence = offsets["k" if name in ("dk", "dv") else "q"]
            start, length = sequence[n], sequence[n + 1] - sequence[n]
            values = (t.narrow(dim, start, length) for t in (actual[name], exact[name], same_dtype[name]))
            assert_error_rule(f"{varlen} sequence {n} {name}", *values, case.dtype)


@pytest.mark.parametrize("varlen", VARLEN_CASES, ids=str)
def test_varlen(runner: Runner, varlen: CudaVarlenCase):
    check_varlen(runner, varlen)


def test_varlen_without_scores(runner: Runner) -> None:
    """No sequence (the packed rows belong to none), or no key in any: out 0, lse -inf, zero
    gradients, and no kernel launched."""
    for rows, offsets_q, keys, offsets_k in ((5, [0], 4, [0]), (5, [0, 3, 5], 0, [0, 0, 0])):
        q = torch.randn(rows, 2, 64).to(runner.device, torch.bfloat16).transpose(0, 1)[None]  # (1, Hq, Tq, D)
        k = torch.randn(keys, 1, 64).to(runner.device, torch.bfloat16).transpose(0, 1)[None]
        cu_q = torch.tensor(offsets_q, dtype=torch.int32, device=runner.device)
        cu_k = torch.tensor(offsets_k, dtype=torch.int32, device=runner.device)
        trailing = (None, -1, -1, 0.0, cu_q, cu_k, -1, -1)  # no modifiers; the packed sequences
        launches = runner.launch_count() if runner.launch_count else None
        out, lse = runner.forward(q, k, k, None, None, None, 0.125, 1, 0.0, *trailing)
        assert torch.all(out == 0) and torch.all(lse == float("-inf"))
        grad_out = torch.ones_like(q)
        arguments = (q, k, k, None, None, None, out, lse, 0.125, 1, 0.0, False, False, *trailing)
        dq, dk, dv, _ = runner.backward(grad_out, None, *arguments)
        assert torch.all(dq == 0) and torch.all(dk == 0) and torch.all(dv == 0)
        if launches is not None:
            assert runner.launch_count() == launches, "packed sequences without scores launched a kernel"


# ---------------------------------------------------------------------------
# Decoding against a KV cache (decode_forward): the append, split-KV and combine kernels against
# reference_decode_attention, the caches compared to the bit. Pages of 8 to 256 slots in random
# block tables (interleaved K/V storage: a page stride that is not page_size * Hkv * D), contiguous
# caches with leftpad and cache_batch_idx, GQA ratios 1 to 8 with 1 to 4 query rows (32 rows: four
# CTA row blocks), with and without new rows, the score modifiers, num_splits 0 (the heuristic,
# which splits these small batches: the emulator's 132 SMs), 1 and 3, an empty sequence.

CudaDecodeCase = functools.partial(DecodeCase, dtype=torch.bfloat16, head_dim=64)

DECODE_CASES = [
    CudaDecodeCase((37, 100)),
    CudaDecodeCase((37, 100), num_splits=1, dtype=torch.float16),
    CudaDecodeCase((90, 5, 63), page_size=16, heads_q=8, heads_kv=1, num_splits=3),
    CudaDecodeCase(
        (61, 20), page_size=8, heads_kv=4, new_rows=3, causal=True, interleaved=True, leftpad=True
    ),
    CudaDecodeCase((150, 9), new_rows=2, causal=True, window_size=(16, 0), batch_idx=True, leftpad=True),
    CudaDecodeCase((150, 9), new_rows=0, query_rows=2, batch_idx=True, interleaved=True, dtype=torch.float16),
    CudaDecodeCase(
        (45, 77), page_size=64, heads_q=8, heads_kv=2, new_rows=4, causal=True, softcap=30.0, alibi="bh"
    ),
    CudaDecodeCase(
        (120, 33), page_size=16, window_size=(20, 5), alibi="h", num_splits=3, dtype=torch.float16
    ),
    CudaDecodeCase((250,), page_size=256, interleaved=True, heads_q=8, heads_kv=1, new_rows=4, causal=True),
    CudaDecodeCase((0, 40), new_rows=0, query_rows=2, page_size=16),  # sequence 0 is empty: out 0, lse -inf
    CudaDecodeCase((0, 17), new_rows=2, causal=True, num_splits=3),  # sequence 0 has only its new rows
    CudaDecodeCase((70, 30), page_size=16, head_dim=32, num_splits=1),
    CudaDecodeCase((70, 30), page_size=8, head_dim=40, new_rows=2, causal=True, dtype=torch.float16),
    CudaDecodeCase((70, 30), head_dim=96, heads_q=2, heads_kv=2, softcap=5.0),
    CudaDecodeCase((50, 64), page_size=16, head_dim=128, dtype=torch.float16, alibi="h", causal=True),
    CudaDecodeCase((50, 21), page_size=32, head_dim=256, new_rows=0, query_rows=3, causal=True, num_splits=3),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode(runner: Runner, case: DecodeCase):
    def run(inputs: dict):
        return runner.decode(*decode_op_arguments(case, inputs))

    check_decode_against_reference(run, case, runner.device)


def test_decode_splits_agree(runner: Runner):
    """Any fixed num_splits (empty splits included: 7 splits of 4 key blocks) computes what one
    split does, to float32 rounding before out's own."""
    case = CudaDecodeCase((150, 70), page_size=16, heads_q=8, heads_kv=2, new_rows=2, causal=True, alibi="h")
    inputs = case.make_inputs(runner.device)
    results = []
    for splits in (1, 2, 3, 7, 0):
        arguments = decode_op_arguments(dataclasses.replace(case, num_splits=splits), inputs)
        results.append(runner.decode(*(a.clone() if isinstance(a, torch.Tensor) else a for a in arguments)))
    out_one, lse_one = results[0]
    for out, lse in results[1:]:
        torch.testing.assert_close(lse, lse_one, rtol=0, atol=1e-5)
        torch.testing.assert_close(out, out_one)


def test_emulated_decode_splits_by_wave_efficiency(emulated: Runner):
    """num_splits = 0 splits the keys (a combine launch follows the split kernel) while B x Hkv
    CTAs leave the emulator's 132 SMs idle, and not once they fill them: 2 x 66 = 132 units run
    one whole wave unsplit."""
    for lengths, heads_kv, launches in (((200,), 1, 3), ((3,) * 66, 2, 2)):
        case = CudaDecodeCase(lengths, heads_q=heads_kv, heads_kv=heads_kv)  # append, split[, combine]
        before = emulated.launch_count()
        emulated.decode(*decode_op_arguments(case, case.make_inputs()))
        assert emulated.launch_count() - before == launches, f"{case}"


def test_decode_empty(runner: Runner):
    """No sequence, or no query row: empty outputs and no kernel launched (but the append's)."""
    for batch, rows in ((0, 1), (2, 0)):
        q = torch.randn(batch, rows, 4, 64).to(runner.device, torch.bfloat16)
        cache = torch.randn(2, 16, 2, 64).to(runner.device, torch.bfloat16)
        seqlens = torch.zeros(batch, dtype=torch.int32, device=runner.device)
        launches = runner.launch_count() if runner.launch_count else None
        out, lse = runner.decode(
            q, cache, cache, None, None, seqlens, None, None, None, 0.125, True, None, -1, -1, 0.0, 0
        )
        assert out.shape == q.shape and lse.shape == (batch, 4, rows)
        if launches is not None:
            assert runner.launch_count() == launches, "an empty decode launched a kernel"


def test_emulated_decode_never_reads_outside_the_cache(emulated: Runner):
    """block_table entries, cache_seqlens and cache_leftpad out of range (the Python layer refuses
    them) are clamped: the emulator, which fails any access outside the tensors, runs it."""
    case = CudaDecodeCase((20, 9), page_size=16, leftpad=True, new_rows=2)
    inputs = case.make_inputs()
    arguments = list(decode_op_arguments(case, inputs))
    arguments[7] = torch.tensor([[1 << 20, -5], [3, 1 << 30]], dtype=torch.int32)  # block_table
    arguments[5] = torch.tensor([1000, -7], dtype=torch.int32)  # cache_seqlens
    arguments[6] = torch.tensor([-3, 50], dtype=torch.int32)  # cache_leftpad
    out, lse = emulated.decode(*arguments)
    assert out.shape == inputs["q"].shape and not out.isnan().any() and not lse.isnan().any()


def test_emulated_decode_refuses_what_the_kernels_cannot_read(emulated: Runner):
    case = CudaDecodeCase((20, 9), page_size=16)
    inputs = case.make_inputs()
    misaligned = (
        torch.randn(inputs["k_cache"].numel() + 1).to(torch.bfloat16)[1:].view(inputs["k_cache"].shape)
    )
    for position, value, message in (
        (8, torch.zeros(2, dtype=torch.int32), "cache_batch_idx goes with contiguous caches only"),
        (15, 129, "num_splits"),
        (1, misaligned, "16-byte"),
        (5, torch.zeros(2, dtype=torch.int64), "cache_seqlens"),
    ):
        arguments = list(decode_op_arguments(case, inputs))
        arguments[position] = value
        with pytest.raises(RuntimeError, match=message):
            emulated.decode(*arguments)


# ---------------------------------------------------------------------------
# Random problems through the kernel sources (hypothesis): CI runs a fixed set on
# the emulator, `--fuzz-examples N` N fresh draws (test_fuzz.py covers the GPU).

FUZZ_LENGTHS = [1, 2, 7, 16, 17, 33, 64, 65, 97, 130]
FUZZ_WINDOW_SIDES = [0, 1, 3, 16, -1]  # keys on each side of the diagonal; -1: unbounded


def refused_by_dispatch(case: Case) -> bool:
    """Whether dispatch refuses the cuda backend this case: its own reasons (_cuda_modifier_reasons,
    a broadcast bias's gradient with modifiers at kernel head dims of 128 and up, which the host
    code refuses too)."""
    inputs = case.make_inputs()
    problem = build_problem(inputs["q"], inputs["k"], inputs["v"], **attention_options(case, inputs))
    return bool(dispatch.BACKENDS["cuda"].extra_reasons(problem, True))


@st.composite
def fuzz_cases(draw) -> Case:
    batch, heads_kv, group = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 2)),
        draw(st.sampled_from([1, 2, 3])),
    )
    seqlen_q, seqlen_k = draw(st.sampled_from(FUZZ_LENGTHS)), draw(st.sampled_from(FUZZ_LENGTHS))
    heads_q = heads_kv * group
    full = (batch, heads_q, seqlen_q, seqlen_k)
    bias = None
    if draw(st.booleans()):  # each dim of the bias 1 or full
        bias = tuple(n if draw(st.booleans()) else 1 for n in full)
    window = st.tuples(st.sampled_from(FUZZ_WINDOW_SIDES), st.sampled_from(FUZZ_WINDOW_SIDES))
    case = CudaCase(
        batch,
        heads_q,
        heads_kv,
        seqlen_q,
        seqlen_k,
        head_dim=draw(st.sampled_from([32, 40, 64, 96, 128, 200, 256])),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        causal=draw(st.sampled_from([False, True, "bottom_right"])),
        bias_shape=bias,
        bias_dtype=F32 if bias is not None and draw(st.booleans()) else None,
        bias_inf_fraction=0.1 if bias is not None and draw(st.booleans()) else 0.0,
        key_mask=draw(st.booleans()),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.25])),
        layout=draw(st.sampled_from(["bhsd", "bshd"])),
        grad_lse=draw(st.booleans()),
        deterministic=draw(st.booleans()),
        # The score modifiers the ops take (sinks are applied to an op's result, see test_fuzz.py).
        window_size=draw(st.none() | window),
        softcap=draw(st.sampled_from([None, 5.0, 30.0])),
        alibi=draw(st.sampled_from([None, "h", "bh"])),
    )
    assume(not refused_by_dispatch(case))
    return case


def test_emulated_fuzz(emulated: Runner, pytestconfig, monkeypatch):
    requested = pytestconfig.getoption("--fuzz-examples")
    # dispatch's reasons read the compiled head dims: the emulator's (a build without CUDA has none).
    monkeypatch.setattr(dispatch, "CUDA_HEAD_DIMS", emulated.head_dims)

    @settings(
        max_examples=requested or 20,
        derandomize=not requested,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(fuzz_cases())
    def run(case: Case):
        check_case(emulated, case)

    run()


# ---------------------------------------------------------------------------
# Properties beyond the error rule


def test_deterministic(runner: Runner):
    case = CudaCase(
        2,
        4,
        2,
        193,
        161,
        64,
        bias_shape=(1, 4, 193, 161),
        causal="bottom_right",
        dropout_p=0.1,
        deterministic=True,
    )
    inputs = case.make_inputs(runner.device)
    grad_out = torch.randn(inputs["q"].shape).to(device=runner.device, dtype=case.dtype)
    _, _, first = runner.run(case, inputs, grad_out, None)
    _, _, second = runner.run(case, inputs, grad_out, None)
    for name in GRAD_INPUTS:
        assert torch.equal(first[name], second[name]), f"deterministic backward: d{name} differs in two runs"


# Deterministic mode's dq splits (backward_schedule.h): the dK/dV kernel's CTA of split s adds dq
# into partial s of dq_accum's rows, looping over the key blocks s, s + splits, ... of its (batch, kv
# head); the convert kernel sums a row's partials in order. The emulator's sm_count picks the split count: fewer
# splits than key blocks (a CTA loops over several) and one split, with GQA and MQA, both causal
# alignments, a window, dropout, D 32 to 256 (two warps per 16 keys at 256), packed sequences and a
# broadcast bias whose gradient the dK/dV kernel reduces in the same splits.
DETERMINISTIC_SPLIT_CASES = [
    # (case, sm_count, splits); key blocks of 128 keys (64 at D 256)
    (CudaCase(1, 2, 1, 150, 600, 64, causal="bottom_right", deterministic=True), 4, 2),  # 5 key blocks
    (CudaCase(1, 2, 1, 150, 600, 64, causal="bottom_right", deterministic=True), 1, 1),
    (CudaCase(1, 4, 2, 97, 420, 96, dtype=torch.float16, causal=True, deterministic=True), 12, 3),
    (CudaCase(1, 2, 2, 45, 200, 256, window_size=(30, 10), grad_lse=True, deterministic=True), 4, 2),
    (
        CudaCase(2, 3, 1, 33, 300, 32, dtype=torch.float16, causal=True, dropout_p=0.2, deterministic=True),
        12,
        2,
    ),
    (CudaCase(2, 2, 1, 70, 600, 64, bias_shape=(1, 2, 1, 600), key_mask=True, deterministic=True), 8, 2),
]


def _runner_with_sm_count(emulated: Runner, sm_count: int) -> Runner:
    return dataclasses.replace(
        emulated, backward=functools.partial(emulated.backward.func, sm_count=sm_count)
    )


def _emulated_splits(emulated: Runner, case: Case, sm_count: int) -> int:
    """The dK/dV kernel's split count for `case` as the host picks it (kernel head dim = case's)."""
    bias = (
        list(case.bias_shape)
        if case.bias_shape and case.bias_shape[2:] != (case.seqlen_q, case.seqlen_k)
        else []
    )
    return emulated.dkdv_splits(
        case.batch, case.heads_q, case.heads_kv, case.seqlen_q, case.seqlen_k, case.head_dim,
        case.batch * case.heads_q, case.deterministic, bias, sm_count,
    )  # fmt: skip


@pytest.mark.parametrize(("case", "sm_count", "splits"), DETERMINISTIC_SPLIT_CASES, ids=str)
def test_emulated_deterministic_splits(emulated: Runner, case: Case, sm_count: int, splits: int):
    """Every gradient against the reference, and the same bits in a second run."""
    assert _emulated_splits(emulated, case, sm_count) == splits
    runner = _runner_with_sm_count(emulated, sm_count)
    inputs = case.make_inputs()
    check_against_reference(runner.run, case, inputs=inputs, rounded_output="kernel")
    grad_out = torch.randn(inputs["q"].shape).to(case.dtype)
    grad_lse = torch.randn(inputs["q"].shape[:3]) if case.grad_lse else None
    _, _, first = runner.run(case, inputs, grad_out, grad_lse)
    _, _, second = runner.run(case, inputs, grad_out, grad_lse)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{case}: d{name} differs in two runs"


def test_emulated_deterministic_splits_varlen(emulated: Runner):
    """Packed sequences with 2 splits: each CTA loops over its sequence's key blocks 0, 2 or 1, 3."""
    varlen = varlen_case(
        (70, 33, 150),
        (400, 129, 300),
        heads_q=2,
        heads_kv=1,
        head_dim=64,
        causal="bottom_right",
        deterministic=True,
    )
    check_varlen(_runner_with_sm_count(emulated, 4), varlen)


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
@pytest.mark.parametrize("vector", [1, 4])
def test_emulated_dq_accum_layout(emulated: Runner, head_dim: int, vector: int):
    """The staged dK/dV kernels' blocked dq_accum (DqAccumLayout, csrc/cuda/kernel_api.h), for
    scalar atomics (sm_80) and red.global.add.v4.f32 (sm_90, what the emulator runs): each row and
    column of a block has its own place; register e of lane l of quad q of dQ warp w (the MMA C
    layout of the warp's 16 x 8 tile q, the warp grid queries fastest) lands where the convert
    kernel reads its row and column; and each warp instruction (4 / vector per quad) covers
    32 x vector contiguous floats, aligned to their size: 128 or 512 bytes, 4 or 16 whole sectors."""
    offsets, elements, query_warps = emulated.dq_accum_layout(head_dim, vector)
    block_m = offsets.shape[0]
    assert torch.equal(offsets.flatten().sort().values, torch.arange(block_m * head_dim))
    warps, quads = elements.shape[:2]
    warp_rows, warp_cols = block_m // query_warps, head_dim // (warps // query_warps)
    w, q, lane, e = torch.meshgrid(*(torch.arange(n) for n in elements.shape), indexing="ij")
    row = (w % query_warps) * warp_rows + q // (warp_cols // 8) * 16 + lane // 4 + 8 * (e // 2)
    col = (w // query_warps) * warp_cols + q % (warp_cols // 8) * 8 + 2 * (lane % 4) + e % 2
    assert torch.equal(offsets[row, col], elements)
    # (warp, instruction, lane, vector): one instruction's lanes, lane-major.
    instructions = elements.reshape(warps, quads, 32, 4 // vector, vector).permute(0, 1, 3, 2, 4)
    instructions = instructions.reshape(warps, quads * (4 // vector), 32, vector)
    first = instructions[..., :1, :1]
    assert torch.equal(
        instructions - first, torch.arange(32 * vector).reshape(32, vector).expand_as(instructions)
    )
    assert bool((first % (32 * vector) == 0).all())


def test_emulated_dkdv_splits(emulated: Runner):
    """The split count (choose_dkdv_splits): 1 without partial sums; enough CTAs for two per SM, at
    most one split per unit of an owner; deterministic dq_accum within max(B x Hq, SMs) (Sq, D)
    slices whatever Sk; dbias partial sums within half a full (B, Hq, Sq, Sk) tensor."""

    def count(b, hq, hkv, sq, sk, d, deterministic, bias=(), sm=132, dq_slices=None):
        return emulated.dkdv_splits(
            b, hq, hkv, sq, sk, d, b * hq if dq_slices is None else dq_slices, deterministic, list(bias), sm
        )

    assert count(2, 8, 8, 4096, 4096, 128, False) == 1  # atomics: no partial sums
    assert count(1, 1, 1, 4096, 4096, 64, True) == 32  # one split per key block: 32 slices <= 132
    assert count(1, 1, 1, 4096, 600, 64, True) == 5  # no more splits than key blocks
    assert count(1, 2, 1, 150, 600, 64, True, sm=4) == 2
    assert count(1, 2, 1, 150, 600, 64, True, sm=1) == 1
    assert count(4, 64, 64, 1024, 1024, 64, True) == 1  # 256 (Sq, D) slices already fill the SMs
    assert count(2, 32, 8, 1024, 1024, 64, True) == 2  # 264 CTAs for 16 owners: 17 splits, 132 / 64 slices
    # Packed sequences: 3 sequences, the dq slices are Hq (the packed q is (1, Hq, Tq, D)).
    assert count(3, 4, 2, 300, 600, 64, True, dq_slices=4) == 5
    # Long sequences: dq_accum stays within 4 max(B Hq, SMs) Sq D bytes whatever Sk.
    for b, hq, hkv, s, d in (
        (1, 32, 8, 131072, 128),
        (1, 1, 1, 131072, 64),
        (2, 16, 16, 65536, 256),
        (8, 4, 1, 32768, 32),
    ):
        n = count(b, hq, hkv, s, s, d, True)
        assert 1 <= n <= (s + 127) // 128
        assert 4 * n * b * hq * s * d <= 4 * max(b * hq, 132) * s * d, (b, hq, hkv, s, d, n)
    assert count(1, 32, 8, 131072, 131072, 128, True) == 4
    # dbias partial sums (split by key blocks only when deterministic or the bias broadcasts keys).
    assert count(2, 2, 2, 65, 70, 64, False, bias=(2, 2, 1, 70)) == 1  # 4 owners, 1 unit each
    assert count(2, 2, 2, 65, 70, 64, False, bias=(1, 1, 1, 1)) == 4  # 4 units of one owner
    assert count(1, 2, 2, 2048, 2048, 64, True, bias=(1, 2, 1, 2048)) == 16  # 16 key blocks, 66 dq slices
    assert count(1, 2, 2, 2, 4096, 64, True, bias=(1, 2, 1, 4096)) == 1  # partials <= half of (1, 2, 2, 4096)


def test_dropout_matches_reference_mask(runner: Runner):
    """With v = identity columns, out = dropped probabilities: zeros exactly where the shared hash drops."""
    from fast_attn.dropout import dropout_keep_mask

    case = CudaCase(1, 2, 2, 40, 16, 64, dropout_p=0.4, grads=())
    inputs = case.make_inputs(runner.device)
    v = torch.zeros(1, 2, 16, 64, device=runner.device, dtype=case.dtype)
    v[0, :, torch.arange(16), torch.arange(16)] = 1.0
    out, _ = runner.forward(*forward_op_arguments(case, {**inputs, "v": v}))
    device = torch.device(runner.device)
    keep = dropout_keep_mask(inputs["dropout_seed"], case.dropout_p, 1, 2, 40, 16, device)
    dropped = out[..., :16] == 0
    assert torch.equal(dropped, ~keep), "kernel dropout mask differs from fast_attn.dropout's"


def test_empty_problems(runner: Runner):
    for case in (
        CudaCase(0, 2, 2, 8, 8, 64, grads=()),
        CudaCase(1, 2, 2, 0, 8, 64, grads=()),
        CudaCase(1, 2, 2, 8, 0, 64, grads=()),
    ):
        inputs = case.make_inputs(runner.device)
        q, k = inputs["q"], inputs["k"]
        launches = runner.launch_count() if runner.launch_count else None
        out, lse = runner.forward(*forward_op_arguments(case, inputs))
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        if q.numel():
            assert torch.all(out == 0) and torch.all(lse == float("-inf"))
        dq, dk, dv, _ = runner.backward(*backward_op_arguments(case, inputs, out, lse, out, None))
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
        assert torch.all(dq == 0) and torch.all(dk == 0) and torch.all(dv == 0)
        if launches is not None:
            assert runner.launch_count() == launches, "an empty problem launched a kernel"


def test_emulated_refuses_broadcast_dbias_with_modifiers_above_d96(emulated: Runner):
    """The dK/dV kernel with dbias and score modifiers spills at D 128 and 256 (kernel_api.h)."""
    for head_dim in (128, 256):
        case = CudaCase(1, 2, 2, 33, 40, head_dim, softcap=5.0, bias_shape=(1, 2, 1, 40))
        inputs = case.make_inputs()
        with pytest.raises(RuntimeError, match="bias with a broadcast dim"):
            emulated.run(case, inputs, torch.randn_like(inputs["q"]), None)


def test_emulated_refuses_bad_head_dim(emulated: Runner):
    for head_dim, message in ((20, "multiple of 8"), (264, "head dims up to 256")):
        case = CudaCase(1, 1, 1, 8, 8, head_dim, grads=())
        with pytest.raises(RuntimeError, match=message):
            emulated.forward(*forward_op_arguments(case, case.make_inputs()))


# ---------------------------------------------------------------------------
# The compiled op on a GPU: registration, opcheck, torch.compile, the public API


@pytest.mark.gpu
def test_gpu_opcheck(gpu: Runner):
    case = CudaCase(
        1,
        4,
        2,
        65,
        70,
        64,
        "bottom_right",
        scale=0.125,
        bias_shape=(1, 4, 65, 70),
        key_mask=True,
        dropout_p=0.1,
        grads=(),
        deterministic=True,
    )
    ops = torch.ops.fast_attn
    opcheck_forward_and_backward(ops.attention_forward, ops.attention_backward, case, "cuda")


@pytest.mark.gpu
def test_gpu_torch_compile_forward_backward(gpu: Runner):
    import fast_attn

    inputs = CudaCase(2, 4, 2, 129, 129, 64, causal=True, bias_shape=(1, 4, 129, 129)).make_inputs("cuda")
    q, k, v, bias = (inputs[n] for n in GRAD_INPUTS)

    def loss_fn(q, k, v, bias):
        out = fast_attn.attention(q, k, v, bias=bias, causal=True, backend="cuda")
        return (out.float() ** 2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    loss = compiled(q, k, v, bias)
    grads = torch.autograd.grad(loss, (q, k, v, bias))
    eager_loss = loss_fn(q, k, v, bias)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v, bias))
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
def test_gpu_public_api_grads_on_a_subset(gpu: Runner):
    """fast_attn.attention on backend='cuda', gradients for q and v only, SDPA as the oracle."""
    import fast_attn

    q, k, v = random_qkv(2, 4, 4, 200, 200, 64, dtype=torch.bfloat16, device="cuda")
    q.requires_grad_(True)
    v.requires_grad_(True)
    out = fast_attn.attention(q, k, v, causal=True, backend="cuda")
    grad_out = torch.randn_like(out)
    dq, dv = torch.autograd.grad(out, (q, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    ref_dq, ref_dv = torch.autograd.grad(ref, (q64, v64), grad_out.double())
    q16, k16, v16 = (t.detach().requires_grad_(True) for t in (q, k, v))
    same = torch.nn.functional.scaled_dot_product_attention(q16, k16, v16, is_causal=True)
    same_dq, same_dv = torch.autograd.grad(same, (q16, v16), grad_out)
    assert_error_rule("out", out, ref, same, torch.bfloat16)
    assert_error_rule("dq", dq, ref_dq, same_dq, torch.bfloat16)
    assert_error_rule("dv", dv, ref_dv, same_dv, torch.bfloat16)
