"""fast_attn: fused attention kernels for PyTorch (CUDA, Triton, C++ CPU) behind one contract.

Importing fast_attn registers the ops, in this order, on the lines below that name the steps:
1. the compiled extension fast_attn._C is loaded: the C++ ops torch.ops.fast_attn.attention_forward /
   attention_backward, their CPU and CUDA kernels and their C++ autograd;
2. the C++ ops' fake kernels are registered (for torch.compile) by fast_attn.ops.cpp_ops, which dispatch
   imports first (its backends call the ops through it);
3. dispatch evaluates each backend's availability once, which imports triton when it is installed and
   registers the Triton ops (fast_attn.ops.triton_ops); compiled code then never imports anything.
"""

from . import _extension

_extension.load()  # 1.
from .decode import decode_attention  # noqa: E402
from .dispatch import BackendNotSupportedError, available_backends  # noqa: E402  2. and 3.
from .functional import attention, scaled_dot_product_attention  # noqa: E402
from .swap import swap_attention  # noqa: E402
from .varlen import varlen_attention  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "BackendNotSupportedError",
    "__version__",
    "attention",
    "available_backends",
    "decode_attention",
    "scaled_dot_product_attention",
    "swap_attention",
    "varlen_attention",
]
