"""The GPU problems on which "auto" asks the C++ CUDA kernels before Triton (dispatch.auto_order):
where fast_attn.bench measured them faster at every sequence length it ran, forward only ("fwd",
calls without a gradient) or forward plus backward ("fwd_bwd"). Written by the command in
GENERATED_BY; regenerate it from a new GPU run instead of editing it.

A key: (compute capability, dtype, head dim, causal, mode). Calls with a bias, key mask, dropout,
window, softcap, ALiBi, sinks or packed sequences never consult it (the bench measures none).
"""

GENERATED_BY = "python tools/measured_order.py benchmarks/results/h100-20261126.json --capability sm_90"
CUDA_FASTER = frozenset()
