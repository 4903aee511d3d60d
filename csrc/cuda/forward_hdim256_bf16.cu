// Instantiation: attention forward, bf16, head dim 256.
#include "forward_kernel.cuh"

namespace fast_attn::cuda {
template LaunchStatus run_attention_forward<ElementType::kBFloat16, 256>(const AttentionForwardParams&, cudaStream_t);
}  // namespace fast_attn::cuda
