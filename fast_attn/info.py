"""`python -m fast_attn.info`: which backends can run here, why not, and what was built."""

from __future__ import annotations

import platform

import torch

from . import _extension
from .dispatch import BACKENDS, available_backends
from .version import __version__


def describe() -> str:
    lines = [f"fast_attn {__version__}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    lines.append(f"python {platform.python_version()} on {platform.machine()}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"device: {name} (compute capability {major}.{minor})")
    else:
        lines.append("device: CPU only (no CUDA device)")
    build = _extension.build_info()
    if build.get("built"):
        lines.append(
            f"extension: built with torch {build['torch_version']}, "
            f"CUDA {build['cuda_version'] or 'none'}, archs {build['cuda_archs'] or 'none'}, "
            f"CUDA head dims {build['cuda_head_dims'] or 'none'}"
        )
        lines.append(f"CPU kernels: {build['cpu_instruction_set']} instructions")
    else:
        lines.append(f"extension: {build['reason']}")
    lines.append("")
    lines.append(f"{'backend':<10} {'available':<10} {'dtypes':<34} {'head dims':<22} why not")
    for name, reason in available_backends().items():
        backend = BACKENDS[name]
        dtypes = ",".join(str(d).replace("torch.", "") for d in backend.dtypes)
        state = "yes" if reason is None else "no"
        lines.append(f"{name:<10} {state:<10} {dtypes:<34} {backend.head_dims_text[:22]:<22} {reason or ''}")
    return "\n".join(lines)


def main() -> None:
    print(describe())


if __name__ == "__main__":
    main()
