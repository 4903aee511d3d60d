"""fast_attn: fused attention kernels for PyTorch (CUDA, Triton, C++ CPU) behind one contract."""

from . import _extension
from .dispatch import BackendNotSupportedError, available_backends
from .functional import attention, scaled_dot_product_attention
from .version import __version__

_extension.load()  # registers torch.ops.fast_attn.* when the extension is built
from .ops import cpp_ops as _cpp_ops  # noqa: E402,F401  (fake kernels and autograd)
from .swap import swap_attention  # noqa: E402

__all__ = [
    "BackendNotSupportedError",
    "__version__",
    "attention",
    "available_backends",
    "scaled_dot_product_attention",
    "swap_attention",
]
