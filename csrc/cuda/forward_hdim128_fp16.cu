// Instantiation: attention forward, fp16, head dim 128.
#include "forward_kernel.cuh"

namespace fast_attn::cuda {
template LaunchStatus run_attention_forward<ElementType::kFloat16, 128>(const AttentionForwardParams&, cudaStream_t);
}  // namespace fast_attn::cuda
