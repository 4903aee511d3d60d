"""Integrations of fast_attn with other libraries (transformers).

Each submodule imports its library lazily, so `import fast_attn` never needs it.
"""
