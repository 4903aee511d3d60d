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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fast_attn.dropout import new_dropout_seed
from fast_attn.reference import reference_attention
from fast_attn.testing import assert_error_rule, random_key_mask, random_qkv, rounded_output_reference

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
SM_COUNT = 132  # the emulator sizes the dbias split as for an H100
CAUSAL_NAMES = {0: False, 1: "top_left", 2: "bottom_right"}


# ---------------------------------------------------------------------------
# Runners


@dataclass(frozen=True)
class Runner:
    name: str
    device: str
    forward: Callable  # (q, k, v, bias, key_mask, seed, scale, causal, dropout_p) -> (out, lse)
    backward: Callable  # (grad_out, grad_lse, q, k, v, bias, key_mask, seed, out, lse, scale, causal,
    #                      dropout_p, compute_dbias, deterministic) -> (dq, dk, dv, dbias)
    launch_count: Callable[[], int] | None = None


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
    build_dir = Path(tempfile.gettempdir()) / f"fast_attn_cuda_emulator_torch{torch.__version__}_{checkout:08x}"
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [
        CUDA_SOURCES / "emulation" / "emulation_module.cpp",
        CUDA_SOURCES / "emulation" / "emulated_device.cpp",
        CUDA_SOURCES / "attention_cuda_host.cpp",
        ROOT / "csrc" / "attention_launch.cpp",
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
        forward=lambda *args: module.forward(*args, SM_COUNT),
        backward=lambda *args: module.backward(*args, SM_COUNT),
        launch_count=module.launch_count,
    )


@pytest.fixture(scope="session")
def gpu() -> Runner:
    from fast_attn.ops.cpp_ops import has_kernel_for

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not has_kernel_for("CUDA"):
        pytest.fail("a CUDA GPU is present but fast_attn was built without CUDA kernels")
    return Runner(
        name="gpu",
        device="cuda",
        forward=torch.ops.fast_attn.attention_forward,
        backward=torch.ops.fast_attn.attention_backward,
    )


# ---------------------------------------------------------------------------
# One checked problem


@dataclass(frozen=True)
class Case:
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    causal: int = 0  # 0 none, 1 top-left, 2 bottom-right
    bias: tuple[int, int, int, int] | None = None  # the bias's own shape, each dim 1 or full
    bias_fp32: bool = False
    bias_masks: bool = False  # some bias entries are -inf (and whole rows, when the bias has rows)
    key_mask: bool = False  # with batch row 0 attending nothing
    dropout_p: float = 0.0
    layout: str = "bhsd"
    grad_lse: bool = False
    deterministic: bool = False
    misaligned: bool = False  # q, k, v views that start 1 element into their storage

    def __str__(self) -> str:
        parts = [
            f"B{self.batch}H{self.heads_q}/{self.heads_kv}",
            f"S{self.seqlen_q}x{self.seqlen_k}",
            f"D{self.head_dim}",
            str(self.dtype).replace("torch.", ""),
        ]
        flags = {
            "causal": ["", "tl", "br"][self.causal],
            "bias": "x".join(map(str, self.bias)) if self.bias else "",
            "fp32bias": "fp32bias" if self.bias_fp32 else "",
            "inf": "inf" if self.bias_masks else "",
            "mask": "mask" if self.key_mask else "",
            "drop": f"p{self.dropout_p}" if self.dropout_p else "",
            "bshd": "bshd" if self.layout == "bshd" else "",
            "glse": "glse" if self.grad_lse else "",
            "det": "det" if self.deterministic else "",
            "misaligned": "misaligned" if self.misaligned else "",
        }
        return "-".join(parts + [v for v in flags.values() if v])


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


def _make_inputs(case: Case, device: str) -> dict:
    q, k, v = random_qkv(
        case.batch, case.heads_q, case.heads_kv, case.seqlen_q, case.seqlen_k, case.head_dim,
        dtype=case.dtype, device=device, layout=case.layout,
    )
    if case.misaligned:
        q, k, v = (_misaligned_copy(t) for t in (q, k, v))
    bias = None
    if case.bias is not None:
        bias = torch.randn(case.bias, dtype=torch.float32)
        if case.bias_masks:
            bias = bias.masked_fill(torch.rand(case.bias) < 0.1, float("-inf"))
            if case.bias[2] > 1:
                bias[..., 0, :] = float("-inf")  # query row 0 sees no key through the bias
        bias = bias.to(device=device, dtype=torch.float32 if case.bias_fp32 else case.dtype)
    key_mask = None
    if case.key_mask:
        key_mask = random_key_mask(case.batch, case.seqlen_k, device=device, empty_rows=(0,))
    seed = new_dropout_seed(torch.device(device)) if case.dropout_p > 0 else None
    return {"q": q, "k": k, "v": v, "bias": bias, "key_mask": key_mask, "seed": seed}


def _reference(case: Case, inputs: dict, grad_out, grad_lse, compute_dtype: torch.dtype, scale: float):
    """(out, lse, {name: grad}) of the reference computed in compute_dtype."""
    leaves = {}
    for name in ("q", "k", "v", "bias"):
        t = inputs[name]
        if t is not None:
            leaves[name] = t.detach().to(compute_dtype).requires_grad_(True)
    out, lse = reference_attention(
        leaves["q"], leaves["k"], leaves["v"], bias=leaves.get("bias"), key_mask=inputs["key_mask"],
        causal=CAUSAL_NAMES[case.causal], scale=scale, dropout_p=case.dropout_p, dropout_seed=inputs["seed"],
        compute_dtype=compute_dtype,
    )
    outputs, grads_in = [out], [grad_out.to(out.dtype)]
    if grad_lse is not None:
        outputs.append(lse)
        grads_in.append(grad_lse.to(lse.dtype))
    grads = torch.autograd.grad(outputs, list(leaves.values()), grads_in)
    return out.detach(), lse.detach(), dict(zip(leaves.keys(), grads))


def _rounded_output_grads(case: Case, inputs: dict, grad_out, grad_lse, scale: float, out) -> dict:
    """Float64 gradients of the flash-style backward fed `out`, the kernel's own
    forward output (fast_attn.testing.rounded_output_reference), the contract's
    second baseline for gradients. Fed the kernel's output, it holds the
    backward to what it can do with that output: the forward's error is checked
    on out itself. (Found by the fuzz below: a bias constant along the keys has
    an exact gradient of 0, softmax being shift-invariant, and every flash-style
    kernel returns sum_i dO_i . (O_i - exact O_i) instead.)"""
    leaves = {name: inputs[name].detach().requires_grad_(True) for name in ("q", "k", "v", "bias")
              if inputs[name] is not None}
    return rounded_output_reference(
        {**leaves, "key_mask": inputs["key_mask"]}, out_dtype=case.dtype, grad_out=grad_out, grad_lse=grad_lse,
        fed_out=out, causal=CAUSAL_NAMES[case.causal], scale=scale, dropout_p=case.dropout_p,
        dropout_seed=inputs["seed"],
    ).grads


def check_case(runner: Runner, case: Case) -> None:
    inputs = _make_inputs(case, runner.device)
    scale = 1.0 / math.sqrt(case.head_dim)
    q, k, v, bias, key_mask, seed = (inputs[n] for n in ("q", "k", "v", "bias", "key_mask", "seed"))

    out, lse = runner.forward(q, k, v, bias, key_mask, seed, scale, case.causal, case.dropout_p)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32

    grad_out = torch.randn(q.shape, device=runner.device).to(case.dtype)
    grad_lse = torch.randn(q.shape[:3], device=runner.device) if case.grad_lse else None
    dq, dk, dv, dbias = runner.backward(
        grad_out, grad_lse, q, k, v, bias, key_mask, seed, out, lse, scale, case.causal, case.dropout_p,
        bias is not None, case.deterministic,
    )

    exact_out, exact_lse, exact_grads = _reference(case, inputs, grad_out, grad_lse, torch.float64, scale)
    same_out, same_lse, same_grads = _reference(case, inputs, grad_out, grad_lse, case.dtype, scale)
    rounded_grads = _rounded_output_grads(case, inputs, grad_out, grad_lse, scale, out)
    assert_error_rule(f"{case} out", out, exact_out, same_out, case.dtype)
    assert_error_rule(f"{case} lse", lse, exact_lse, same_lse, case.dtype)
    actual = {"q": dq, "k": dk, "v": dv, "bias": dbias}
    for name, exact in exact_grads.items():
        assert actual[name].shape == exact.shape, f"{case} d{name} shape {tuple(actual[name].shape)}"
        assert actual[name].dtype == inputs[name].dtype, f"{case} d{name} dtype {actual[name].dtype}"
        assert_error_rule(f"{case} d{name}", actual[name], exact, same_grads[name], case.dtype,
                          rounded_output=rounded_grads[name])
    if bias is None:
        assert dbias.numel() == 0


# ---------------------------------------------------------------------------
# The grid

BASE = Case(batch=1, heads_q=2, heads_kv=2, seqlen_q=97, seqlen_k=97, head_dim=64)


def _grid(base: Case, **axes) -> list[Case]:
    """One case per value of each axis, the others at base (not the cartesian product)."""
    cases = [base]
    for field, values in axes.items():
        cases += [dataclasses.replace(base, **{field: value}) for value in values]
    return cases


# Sequence lengths, head dims (40 and 80 run padded in the 64 and 96 kernels), dtypes, layouts.
SHAPE_CASES = [
    *_grid(BASE, head_dim=[32, 40, 80, 96, 128, 256], dtype=[torch.float16], layout=["bshd"], misaligned=[True]),
    *[Case(1, 1, 1, sq, sk, 64, causal=c) for sq, sk in [(1, 1), (1, 17), (17, 1), (17, 97), (128, 128), (257, 130),
                                                         (130, 257)] for c in (0, 2)],
    Case(1, 1, 1, 257, 130, 64, causal=1),
    Case(2, 2, 2, 129, 129, 128, dtype=torch.float16, causal=1, layout="bshd"),
    Case(1, 2, 2, 70, 45, 256, causal=2),
    Case(1, 2, 2, 33, 65, 96, dtype=torch.float16, causal=1),
]

# GQA (including MQA), both causal alignments with Sq != Sk, fully masked rows.
MASK_CASES = [
    Case(2, 4, 2, 97, 65, 64, causal=1),
    Case(1, 4, 1, 65, 97, 64, causal=2),
    Case(1, 8, 2, 33, 33, 32, dtype=torch.float16),
    Case(3, 2, 2, 65, 80, 64, key_mask=True),
    Case(2, 4, 2, 70, 33, 128, key_mask=True, causal=2),  # bottom-right with Sq > Sk: leading rows see nothing
    Case(1, 2, 2, 33, 70, 64, causal=1, grad_lse=True),
    Case(2, 2, 1, 65, 65, 64, key_mask=True, grad_lse=True, deterministic=True),
]

# Biases: full, broadcast over each dim and all of them, float32 with bf16 inputs, -inf entries.
BIAS_CASES = [
    Case(2, 2, 2, 65, 70, 64, bias=(2, 2, 65, 70)),
    Case(2, 2, 2, 65, 70, 64, bias=(1, 2, 65, 70), bias_fp32=True),  # T5's relative position bias
    Case(2, 4, 2, 65, 70, 64, bias=(2, 1, 65, 70), dtype=torch.float16),
    Case(2, 2, 2, 65, 70, 64, bias=(2, 2, 1, 70), causal=1),
    Case(2, 2, 2, 65, 70, 32, bias=(2, 2, 65, 1)),
    Case(2, 2, 2, 33, 40, 64, bias=(1, 1, 1, 1), dtype=torch.float16),
    Case(2, 2, 2, 65, 70, 64, bias=(1, 2, 65, 70), bias_masks=True, key_mask=True),
    Case(1, 2, 2, 97, 97, 128, bias=(1, 2, 97, 97), causal=2, deterministic=True),
    Case(2, 2, 2, 40, 33, 256, bias=(2, 1, 1, 33), bias_fp32=True),
    # Full rows and columns (the dbias kernel) at each of its tile shapes: summed over
    # batch and heads with GQA and an odd Sk (neighbouring 16-bit stores of two CTAs),
    # not summed with fully masked causal tiles, a single query row, bottom-right at D 256.
    Case(2, 4, 2, 33, 47, 32, bias=(1, 1, 33, 47), dtype=torch.float16),
    Case(2, 2, 2, 130, 100, 96, bias=(2, 2, 130, 100), causal=1),
    Case(3, 2, 2, 1, 50, 64, bias=(1, 2, 1, 50)),
    Case(1, 2, 2, 70, 45, 256, bias=(1, 2, 70, 45), causal=2, bias_masks=True),
    # Found by the fuzz: a bias constant along the keys, whose exact gradient is 0.
    Case(2, 6, 2, 7, 7, 128, dtype=torch.float16, causal=2, bias=(1, 1, 1, 1), bias_fp32=True),
    Case(1, 1, 1, 1, 1, 32, bias=(1, 1, 1, 1), dropout_p=0.25),
]

DROPOUT_CASES = [
    Case(1, 2, 2, 65, 97, 64, dropout_p=0.2),
    Case(2, 2, 1, 97, 65, 128, dropout_p=0.5, causal=1, dtype=torch.float16),
    Case(1, 2, 2, 65, 65, 64, dropout_p=0.3, bias=(1, 2, 65, 65), key_mask=True, deterministic=True),
]

ALL_CASES = SHAPE_CASES + MASK_CASES + BIAS_CASES + DROPOUT_CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_emulated_kernels(emulated: Runner, case: Case):
    check_case(emulated, case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_gpu_kernels(gpu: Runner, case: Case):
    check_case(gpu, case)


# The field's sizes on a GPU (too slow to emulate): long sequences, every head dim.
LONG_CASES = [
    Case(2, 4, 4, 1025, 1025, d, dtype=dt, causal=c)
    for d in (64, 128) for dt in (torch.bfloat16, torch.float16) for c in (0, 1)
] + [
    Case(1, 4, 2, 1025, 517, 256, causal=2),
    Case(1, 2, 2, 1025, 2049, 96, causal=1, layout="bshd"),
    Case(2, 8, 2, 1025, 1025, 128, bias=(1, 8, 1025, 1025), bias_fp32=True),
    Case(1, 4, 4, 1025, 1025, 64, dropout_p=0.1, key_mask=True, grad_lse=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", LONG_CASES, ids=str)
def test_gpu_kernels_long(gpu: Runner, case: Case):
    check_case(gpu, case)


# ---------------------------------------------------------------------------
# Random problems through the kernel sources (hypothesis): CI runs a fixed set on
# the emulator, `--fuzz-examples N` N fresh draws (test_fuzz.py covers the GPU).

FUZZ_LENGTHS = [1, 2, 7, 16, 17, 33, 64, 65, 97, 130]


@st.composite
def fuzz_cases(draw) -> Case:
    batch, heads_kv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    seqlen_q, seqlen_k = draw(st.sampled_from(FUZZ_LENGTHS)), draw(st.sampled_from(FUZZ_LENGTHS))
    heads_q = heads_kv * group
    full = (batch, heads_q, seqlen_q, seqlen_k)
    bias = None
    if draw(st.booleans()):  # each dim of the bias 1 or full
        bias = tuple(n if draw(st.booleans()) else 1 for n in full)
    return Case(
        batch, heads_q, heads_kv, seqlen_q, seqlen_k,
        head_dim=draw(st.sampled_from([32, 40, 64, 96, 128, 200, 256])),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        causal=draw(st.sampled_from([0, 1, 2])),
        bias=bias,
        bias_fp32=bias is not None and draw(st.booleans()),
        bias_masks=bias is not None and draw(st.booleans()),
        key_mask=draw(st.booleans()),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.25])),
        layout=draw(st.sampled_from(["bhsd", "bshd"])),
        grad_lse=draw(st.booleans()),
        deterministic=draw(st.booleans()),
    )


def test_emulated_fuzz(emulated: Runner, pytestconfig):
    requested = pytestconfig.getoption("--fuzz-examples")

    @settings(max_examples=requested or 20, derandomize=not requested, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(fuzz_cases())
    def run(case: Case):
        check_case(emulated, case)

    run()


# ---------------------------------------------------------------------------
# Properties beyond the error rule


def _run_backward(runner: Runner, case: Case, inputs: dict, deterministic: bool):
    q, k, v, bias, key_mask, seed = (inputs[n] for n in ("q", "k", "v", "bias", "key_mask", "seed"))
    scale = 1.0 / math.sqrt(case.head_dim)
    out, lse = runner.forward(q, k, v, bias, key_mask, seed, scale, case.causal, case.dropout_p)
    generator = torch.Generator(device="cpu").manual_seed(7)
    grad_out = torch.randn(q.shape, generator=generator).to(device=runner.device, dtype=case.dtype)
    return runner.backward(grad_out, None, q, k, v, bias, key_mask, seed, out, lse, scale, case.causal,
                           case.dropout_p, bias is not None, deterministic)


def check_deterministic(runner: Runner) -> None:
    case = Case(2, 4, 2, 193, 161, 64, bias=(1, 4, 193, 161), causal=2, dropout_p=0.1)
    inputs = _make_inputs(case, runner.device)
    first = _run_backward(runner, case, inputs, deterministic=True)
    second = _run_backward(runner, case, inputs, deterministic=True)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), first, second):
        assert torch.equal(a, b), f"deterministic backward: {name} differs between two runs"


def test_emulated_deterministic(emulated: Runner):
    check_deterministic(emulated)


@pytest.mark.gpu
def test_gpu_deterministic(gpu: Runner):
    check_deterministic(gpu)


def check_dropout_matches_reference_mask(runner: Runner) -> None:
    """With v = identity columns, out = dropped probabilities: zeros exactly where the shared hash drops."""
    case = Case(1, 2, 2, 40, 16, 64, dropout_p=0.4)
    inputs = _make_inputs(case, runner.device)
    v = torch.zeros(1, 2, 16, 64, device=runner.device, dtype=case.dtype)
    v[0, :, torch.arange(16), torch.arange(16)] = 1.0
    out, _ = runner.forward(inputs["q"], inputs["k"], v, None, None, inputs["seed"], 0.125, 0, case.dropout_p)
    from fast_attn.dropout import dropout_keep_mask

    keep = dropout_keep_mask(inputs["seed"], case.dropout_p, 1, 2, 40, 16, torch.device(runner.device))
    dropped = out[..., :16] == 0
    assert torch.equal(dropped, ~keep), "kernel dropout mask differs from fast_attn.dropout's"


def test_emulated_dropout_mask(emulated: Runner):
    check_dropout_matches_reference_mask(emulated)


@pytest.mark.gpu
def test_gpu_dropout_mask(gpu: Runner):
    check_dropout_matches_reference_mask(gpu)


def check_empty(runner: Runner) -> None:
    for shape_q, shape_k in [((0, 2, 8, 64), (0, 2, 8, 64)), ((1, 2, 0, 64), (1, 2, 8, 64)),
                             ((1, 2, 8, 64), (1, 2, 0, 64))]:
        q = torch.randn(shape_q, device=runner.device).to(torch.bfloat16)
        k = torch.randn(shape_k, device=runner.device).to(torch.bfloat16)
        launches = runner.launch_count() if runner.launch_count else None
        out, lse = runner.forward(q, k, k, None, None, None, 0.125, 0, 0.0)
        assert out.shape == q.shape and lse.shape == q.shape[:3]
        if q.numel():
            assert torch.all(out == 0) and torch.all(lse == float("-inf"))
        dq, dk, dv, _ = runner.backward(out, None, q, k, k, None, None, None, out, lse, 0.125, 0, 0.0, False, False)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
        assert torch.all(dq == 0) and torch.all(dk == 0) and torch.all(dv == 0)
        if launches is not None:
            assert runner.launch_count() == launches, "an empty problem launched a kernel"


def test_emulated_empty(emulated: Runner):
    check_empty(emulated)


@pytest.mark.gpu
def test_gpu_empty(gpu: Runner):
    check_empty(gpu)


def test_emulated_refuses_bad_head_dim(emulated: Runner):
    q = torch.randn(1, 1, 8, 20).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        emulated.forward(q, q, q, None, None, None, 0.125, 0, 0.0)
    q = torch.randn(1, 1, 8, 264).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        emulated.forward(q, q, q, None, None, None, 0.125, 0, 0.0)


# ---------------------------------------------------------------------------
# The compiled op on a GPU: registration, opcheck, torch.compile, the public API


@pytest.mark.gpu
def test_gpu_opcheck(gpu: Runner):
    case = Case(1, 4, 2, 65, 70, 64, bias=(1, 4, 65, 70), key_mask=True, causal=2)
    inputs = _make_inputs(case, "cuda")
    q, k, v, bias, key_mask = (inputs[n] for n in ("q", "k", "v", "bias", "key_mask"))
    seed = new_dropout_seed(torch.device("cuda"))
    forward_args = (q, k, v, bias, key_mask, seed, 0.125, 2, 0.1)
    torch.library.opcheck(torch.ops.fast_attn.attention_forward.default, forward_args)
    out, lse = torch.ops.fast_attn.attention_forward(*forward_args)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse)
    backward_args = (grad_out, grad_lse, q, k, v, bias, key_mask, seed, out, lse, 0.125, 2, 0.1, True, True)
    torch.library.opcheck(torch.ops.fast_attn.attention_backward.default, backward_args)


@pytest.mark.gpu
def test_gpu_torch_compile_forward_backward(gpu: Runner):
    import fast_attn

    case = Case(2, 4, 2, 129, 129, 64, bias=(1, 4, 129, 129), causal=1)
    inputs = _make_inputs(case, "cuda")
    q, k, v, bias = (inputs[n].requires_grad_(True) for n in ("q", "k", "v", "bias"))

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
