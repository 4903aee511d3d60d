"""Loading of the compiled extension fast_attn._C, with a clear refusal when it
was built against another torch (an ABI mismatch would otherwise surface as an
undefined-symbol error or a crash)."""

from __future__ import annotations

import functools
import importlib
import types

import torch


def _short(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


@functools.cache
def load() -> tuple[types.ModuleType | None, str | None]:
    """Return (module, None) when the extension loads, else (None, why not)."""
    try:
        build = importlib.import_module("fast_attn._build_info")
    except ImportError:
        return None, "the C++ extension is not built (pip install --no-build-isolation -e .)"
    if _short(build.TORCH_VERSION) != _short(torch.__version__):
        raise ImportError(
            f"fast_attn was built against torch {build.TORCH_VERSION} but torch {torch.__version__} "
            f"is installed; C++ extensions are tied to the torch minor version they were built with. "
            f"Install torch=={_short(build.TORCH_VERSION)}.* or rebuild fast_attn against this torch."
        )
    if build.CUDA_VERSION is not None and torch.version.cuda is None:
        raise ImportError(
            f"fast_attn was built with CUDA {build.CUDA_VERSION} kernels but the installed torch "
            f"{torch.__version__} has no CUDA; install a CUDA build of torch or a CPU build of fast_attn."
        )
    try:
        module = importlib.import_module("fast_attn._C")
    except ImportError as error:
        return None, f"the C++ extension failed to load: {error}"
    return module, None


def build_info() -> dict:
    module, reason = load()
    if module is None:
        return {"built": False, "reason": reason}
    return {"built": True, **module.build_info()}
