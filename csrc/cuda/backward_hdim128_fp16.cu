// Instantiation: attention backward (dK/dV kernel, deterministic dQ kernel, dbias kernel), fp16, head dim 128.
#include "backward_dbias_kernel.cuh"
#include "backward_dkdv_kernel.cuh"
#include "backward_dq_kernel.cuh"

namespace fast_attn::cuda {
template LaunchStatus run_attention_backward_dkdv<ElementType::kFloat16, 128>(const AttentionBackwardParams&,
                                                                           const BackwardWorkspace&, cudaStream_t);
template LaunchStatus run_attention_backward_dq<ElementType::kFloat16, 128>(const AttentionBackwardParams&,
                                                                         cudaStream_t);
template LaunchStatus run_attention_backward_dbias<ElementType::kFloat16, 128>(const AttentionBackwardParams&,
                                                                            const DbiasTiles&, cudaStream_t);
}  // namespace fast_attn::cuda
