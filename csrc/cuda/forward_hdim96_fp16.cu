// Instantiation: attention forward, fp16, head dim 96.
#include "forward_kernel.cuh"

namespace fast_attn::cuda {
template LaunchStatus run_attention_forward<ElementType::kFloat16, 96>(const AttentionForwardParams&, cudaStream_t);
}  // namespace fast_attn::cuda
