"""The compiled extension: build information, a clear refusal when it was built
against another torch (instead of an undefined-symbol error or a crash), and
no private copy of the C++ runtime inside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fast_attn


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
