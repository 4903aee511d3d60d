"""Build of fast_attn: the C++ CPU kernels always, the CUDA kernels when torch has CUDA.

Build against the torch already installed:

    pip install --no-build-isolation -e .

Environment:
    FAST_ATTN_BUILD_CUDA       auto (default) | 0 | 1   build the CUDA kernels
    TORCH_CUDA_ARCH_LIST       default: the archs of csrc/cuda/build_matrix.json
    FAST_ATTN_CUDA_HEAD_DIMS   CUDA head dims to compile, e.g. "64,128" (default: all of build_matrix.json);
                               the CMake build's variable of the same name. FAST_ATTN_HEAD_DIMS, its old
                               name, still works with a deprecation message.
    MAX_JOBS                   parallel compile jobs (default: by cores and memory)
    NVCC_THREADS               nvcc --threads (default 4)

The CUDA head dims, dtypes, default archs and nvcc flags are csrc/cuda/build_matrix.json's;
after editing it, `python tools/generate_kernels.py` rewrites the instantiation units.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "fast_attn" / "version.py").read_text()).group(1)
# The CUDA head dims, dtypes, archs and nvcc flags, shared with CMakeLists.txt and tools/.
CUDA_BUILD_MATRIX = json.loads((ROOT / "csrc" / "cuda" / "build_matrix.json").read_text())
CUDA_HEAD_DIMS = tuple(CUDA_BUILD_MATRIX["head_dims"])


def fail(message: str) -> None:
    sys.exit(f"fast_attn build: {message}")


try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    fail(
        "torch is not installed in this environment. Install torch first, then build with "
        "`pip install --no-build-isolation .` (an isolated build would pull another torch)."
    )


def torch_short_version() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def cuda_toolkit_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def want_cuda() -> bool:
    choice = os.environ.get("FAST_ATTN_BUILD_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        fail(f"FAST_ATTN_BUILD_CUDA must be auto, 0 or 1, got {choice!r}")
    if choice == "0":
        return False
    has_nvcc = cuda_toolkit_home() is not None
    if choice == "1":
        if torch.version.cuda is None:
            fail(f"FAST_ATTN_BUILD_CUDA=1 but torch {torch.__version__} was built without CUDA")
        if not has_nvcc:
            fail("FAST_ATTN_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return torch.version.cuda is not None and has_nvcc


def cuda_head_dims() -> list[int]:
    requested = os.environ.get("FAST_ATTN_CUDA_HEAD_DIMS")
    if requested is None and "FAST_ATTN_HEAD_DIMS" in os.environ:
        print(
            "fast_attn: FAST_ATTN_HEAD_DIMS is deprecated, set FAST_ATTN_CUDA_HEAD_DIMS (as for CMake)",
            file=sys.stderr,
        )
        requested = os.environ["FAST_ATTN_HEAD_DIMS"]
    if not requested:
        return list(CUDA_HEAD_DIMS)
    dims = sorted({int(d) for d in requested.replace(";", ",").split(",") if d.strip()})
    unknown = [d for d in dims if d not in CUDA_HEAD_DIMS]
    if unknown:
        fail(f"FAST_ATTN_CUDA_HEAD_DIMS has {unknown}; the build matrix's head dims are {CUDA_HEAD_DIMS}")
    return dims


def default_max_jobs(with_cuda: bool) -> int:
    # nvcc on a large attention kernel peaks around 4 GB; C++ files around 1 GB.
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8.0
    per_job_gb = 4.0 if with_cuda else 1.0
    return max(1, min(cores, int(mem_gb // per_job_gb)))


def local_version(with_cuda: bool) -> str:
    device = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
    return f"{VERSION}+{device}.torch{torch_short_version()}"


def cuda_sources(head_dims: tuple[int, ...]) -> list[str]:
    """csrc/cuda's units (not the CPU emulation under csrc/cuda/emulation, built by the
    tests only) and the generated instantiation units of these head dims."""
    sources = glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")
    for unit in glob.glob("csrc/cuda/instantiations/*.cu"):
        if int(re.search(r"_hdim(\d+)_", unit).group(1)) in head_dims:
            sources.append(unit)
    return sorted(sources)


@dataclass(frozen=True)
class BuildChoice:
    """What this build compiles, decided once from the environment."""

    with_cuda: bool
    archs: str  # TORCH_CUDA_ARCH_LIST, "" without CUDA
    head_dims: tuple[int, ...]  # CUDA head dims, () without CUDA

    @staticmethod
    def from_environment() -> BuildChoice:
        with_cuda = want_cuda()
        default_archs = ";".join(CUDA_BUILD_MATRIX["archs"])
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_archs) if with_cuda else ""
        return BuildChoice(with_cuda, archs, tuple(cuda_head_dims()) if with_cuda else ())

    def build_info_text(self) -> str:
        # Read at import time, before _C is loaded, to refuse a mismatched torch clearly.
        return (
            "# Generated by setup.py; do not edit.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"CUDA_VERSION = {(torch.version.cuda if self.with_cuda else None)!r}\n"
            f"CUDA_ARCHS = {self.archs!r}\n"
            f"CUDA_HEAD_DIMS = {self.head_dims!r}\n"
        )


class BuildExtensionWithInfo(cpp_extension.BuildExtension):
    """Writes fast_attn/_build_info.py beside the extension it describes: into the
    build directory (what a wheel packs), and into the source tree only for an
    in-place build (an editable install), so that building a wheel for another
    torch never changes what an editable install of this checkout reads.

    Every build of this checkout (editable install, wheel) compiles into build/temp.*,
    where ninja recompiles only the sources whose command or headers changed: an
    editable install would otherwise start from an empty temporary folder each time."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = str(
            ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        )

    def run(self) -> None:
        super().run()
        package_dirs = [Path(self.build_lib) / "fast_attn"]
        if self.inplace or getattr(self, "editable_mode", False):
            package_dirs.append(ROOT / "fast_attn")
        for package_dir in package_dirs:
            package_dir.mkdir(parents=True, exist_ok=True)
            (package_dir / "_build_info.py").write_text(CHOICE.build_info_text())


def extension_modules(choice: BuildChoice):
    if shutil.which("ninja") is None and not cpp_extension.is_ninja_available():
        fail("ninja is required to build the kernels: `pip install ninja`")
    with_cuda, archs, head_dims = choice.with_cuda, choice.archs, choice.head_dims
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs(with_cuda)))

    # The language standard is left to torch's cpp_extension, which adds the one
    # its headers need (from torch 2.14 ATen refuses anything below C++20).
    cxx_flags = ["-O3", "-fopenmp", "-g0"]
    macros = [
        ("FAST_ATTN_VERSION", f'"{VERSION}"'),
        ("FAST_ATTN_TORCH_VERSION", f'"{torch.__version__}"'),
        ("FAST_ATTN_CXX_FLAGS", f'"{" ".join(cxx_flags)}"'),
    ]
    sources = [
        "csrc/bindings.cpp",
        "csrc/schema.cpp",
        "csrc/attention_autograd.cpp",
        "csrc/attention_launch.cpp",
        "csrc/decode_launch.cpp",
    ]
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [str(ROOT / "csrc")]
    # The shared C++ runtime is named first, so that nothing is taken from libstdc++.a
    # where a toolchain offers only the archive: a private copy of its locale
    # machinery crashes the first error message formatted in the extension.
    common = dict(include_dirs=include_dirs, extra_link_args=["-fopenmp", "-s", "-l:libstdc++.so.6"])

    if not with_cuda:
        return [
            cpp_extension.CppExtension(
                "fast_attn._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx_flags}, **common
            )
        ]

    os.environ.setdefault("CUDA_HOME", cuda_toolkit_home())
    if (ROOT / "csrc" / "cuda" / "tile_overrides.h").exists():
        print(
            "fast_attn: csrc/cuda/tile_overrides.h exists: building TUNING tile configs "
            "(benchmarks/cuda_tile_sweep.py); delete it for the released ones",
            file=sys.stderr,
        )
    # pip's CUDA torch brings the cuBLAS/cuSPARSE headers that a bare nvcc toolkit may lack.
    for site_dir in site.getsitepackages():
        extra = Path(site_dir) / "nvidia" / f"cu{torch.version.cuda.split('.')[0]}" / "include"
        if extra.is_dir():
            include_dirs.append(str(extra))
    macros += [
        ("FAST_ATTN_WITH_CUDA", None),
        ("FAST_ATTN_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ("FAST_ATTN_CUDA_ARCHS", f'"{archs}"'),
    ]
    # FAST_ATTN_CUDA_HEAD_DIMS (read by the host launcher only) goes to the host
    # compiler alone: nvcc splits -D values at commas.
    cuda_cxx_flags = cxx_flags + ["-DFAST_ATTN_CUDA_HEAD_DIMS=" + ",".join(str(d) for d in head_dims)]
    nvcc_flags = CUDA_BUILD_MATRIX["nvcc_flags"] + ["--threads", os.environ.get("NVCC_THREADS", "4")]
    return [
        cpp_extension.CUDAExtension(
            "fast_attn._C",
            sources + cuda_sources(head_dims),
            define_macros=macros,
            extra_compile_args={"cxx": cuda_cxx_flags, "nvcc": nvcc_flags},
            **common,
        )
    ]


CHOICE = BuildChoice.from_environment()
setup(
    name="fast_attn",
    version=local_version(CHOICE.with_cuda),
    packages=find_packages(include=["fast_attn", "fast_attn.*"]),
    ext_modules=extension_modules(CHOICE),
    cmdclass={"build_ext": BuildExtensionWithInfo},
    zip_safe=False,
)
