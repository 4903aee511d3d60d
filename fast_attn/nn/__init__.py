"""Drop-in attention modules running fast_attn's kernels."""

from .attention import Attention
from .kv_cache import KVCache
from .multihead_attention import MultiheadAttention

__all__ = ["Attention", "KVCache", "MultiheadAttention"]
