"""The compiled extension: build information, a clear refusal when it was built
against another torch (instead of an undefined-symbol error or a crash), no
private copy of the C++ runtime inside it, and the ops' typed entries (the same
ops as torch.ops', entered without boxing)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fast_attn
from fast_attn.reference import reference_attention


def test_build_info_describes_this_build():
    info = fast_attn._extension.build_info()
    assert info["built"] is True
    assert info["version"] == fast_attn.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["with_cuda"] == (info["cuda_version"] != "")


def test_build_info_names_the_cpu_instruction_set_in_use(monkeypatch):
    assert fast_attn._extension.build_info()["cpu_instruction_set"] in (
        "avx512+bf16",
        "avx512",
        "avx2",
        "generic",
    )
    monkeypatch.setenv("FAST_ATTN_CPU_ISA", "generic")
    assert fast_attn._extension.build_info()["cpu_instruction_set"] == "generic"
    monkeypatch.setenv("FAST_ATTN_CPU_ISA", "avx2")
    assert fast_attn._extension.build_info()["cpu_instruction_set"] in ("avx2", "generic")  # generic: no AVX2


def test_an_extension_built_for_another_torch_is_refused_clearly():
    code = textwrap.dedent(
        """
        import fast_attn._build_info as build
        build.TORCH_VERSION = "1.13.1"
        from fast_attn import _extension
        _extension.load.cache_clear()
        try:
            _extension.load()
        except ImportError as error:
            print(error)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout
    assert "built against torch 1.13.1" in message and torch.__version__ in message and "rebuild" in message


def test_info_command_lists_every_backend():
    done = subprocess.run(
        [sys.executable, "-m", "fast_attn.info"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("cuda", "triton", "cpu", "reference"):
        assert f"\n{name} " in done.stdout


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_extension_uses_the_shared_cpp_runtime():
    # An extension that links pieces of libstdc++.a carries its own, never
    # initialized, locale: formatting an error message (TORCH_CHECK(..., sizes))
    # then crashes the process. Seen on the GPU machine (SIGSEGV in
    # basic_ostream::_M_insert<long>); setup.py links the shared runtime first.
    module, why_not = fast_attn._extension.load()
    assert module is not None, why_not
    library = Path(module.__file__)
    symbols = subprocess.run(
        ["nm", "-DC", "--defined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout
    runtime = [
        line
        for line in symbols.splitlines()
        if any(
            name in line
            for name in ("std::locale::", "std::codecvt<", "std::basic_ostream<", "std::ios_base::")
        )
    ]
    assert not runtime, f"{library.name} defines C++ runtime symbols:\n" + "\n".join(runtime[:10])


needs_extension = pytest.mark.skipif(
    fast_attn._extension.load()[0] is None, reason="needs the compiled extension"
)


@needs_extension
def test_typed_entries_compute_what_torch_ops_computes():
    """Every argument passed on: the typed entries and torch.ops agree bit for bit, with and without the
    trailing (modifier, packed sequence) arguments, and on the decode op's in-place cache writes."""
    _C = fast_attn._extension.load()[0]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 32, generator=generator)
    k, v = (torch.randn(2, 2, 7, 32, generator=generator) for _ in range(2))
    bias = torch.randn(1, 4, 5, 7, generator=generator)
    slopes = torch.rand(1, 4, generator=generator)
    leading = (q, k, v, bias, None, None, 0.3, 2, 0.0)
    for arguments in (leading, (*leading, slopes, 3, 1, 5.0, None, None, -1, -1)):
        expected = torch.ops.fast_attn.attention_forward.default(*arguments)
        for got, want in zip(_C.attention_forward(*arguments), expected):
            assert torch.equal(got, want)

    caches = [torch.randn(2, 9, 2, 32, generator=generator) for _ in range(2)]
    new = [torch.randn(2, 1, 2, 32, generator=generator) for _ in range(2)]
    seqlens = torch.tensor([3, 6], dtype=torch.int32)
    step_q = torch.randn(2, 1, 4, 32, generator=generator)

    def decode(entry):
        k_cache, v_cache = (c.clone() for c in caches)
        out = entry(
            step_q, k_cache, v_cache, *new, seqlens, None, None, None, 0.2, True, None, -1, -1, 0.0, 2
        )
        return (*out, k_cache, v_cache)

    for got, want in zip(decode(_C.decode_forward), decode(torch.ops.fast_attn.decode_forward.default)):
        assert torch.equal(got, want)


class _RecordingMode(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@needs_extension
def test_torch_function_modes_still_see_the_ops():
    """Under a __torch_function__ mode the ops are entered through torch.ops, which the mode sees."""
    q, k, v = (torch.randn(1, 2, 3, 16) for _ in range(3))
    with _RecordingMode() as mode:
        fast_attn.attention(q, k, v, backend="cpu")
    assert torch.ops.fast_attn.attention_forward.default in mode.seen


@needs_extension
def test_gradients_and_fake_tensors_through_the_typed_entry():
    """The typed entry enters the dispatcher at the top: the op's C++ autograd and its fake kernel
    run as through torch.ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    generator = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(1, 2, 4, 16, dtype=torch.float64, generator=generator, requires_grad=True)
        for _ in range(3)
    )
    out = fast_attn.attention(q, k, v, causal=True, backend="cpu")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected_out, _ = reference_attention(q, k, v, causal=True)
    expected = torch.autograd.grad(expected_out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, expected_out)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)

    with FakeTensorMode():
        fake = fast_attn.attention(*(torch.empty(2, 4, 3, 16) for _ in range(3)), backend="cpu")
    assert fake.shape == (2, 4, 3, 16)
