// Instantiation: attention forward, bf16, head dim 64.
#include "forward_kernel.cuh"

namespace fast_attn::cuda {
template LaunchStatus run_attention_forward<ElementType::kBFloat16, 64>(const AttentionForwardParams&, cudaStream_t);
}  // namespace fast_attn::cuda
