// TORCH_LIBRARY_IMPL(fast_attn, CUDA): the CUDA kernels behind the op schemas
// of csrc/schema.cpp, on the current device and stream. Also the build-time
// list of compiled head dims (csrc/build_config.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_cuda_host.h"
#include "build_config.h"

namespace fast_attn {

std::vector<int> build_config::cuda_head_dims() { return cuda::compiled_head_dims(); }

namespace {

cuda::DeviceContext device_context(const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), "fast_attn CUDA kernels need CUDA tensors, got q on ", q.device());
  const cudaDeviceProp* properties = at::cuda::getDeviceProperties(q.get_device());
  TORCH_CHECK(properties->major >= 8, "fast_attn CUDA kernels need compute capability 8.0 or newer, device ",
              q.get_device(), " has ", properties->major, ".", properties->minor);
  return {at::cuda::getCurrentCUDAStream(q.get_device()).stream(), properties->multiProcessorCount};
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& key_mask,
                                                          const std::optional<at::Tensor>& dropout_seed, double scale,
                                                          int64_t causal, double dropout_p,
                                                          const std::optional<at::Tensor>& alibi_slopes,
                                                          int64_t window_left, int64_t window_right, double softcap,
                                                          const std::optional<at::Tensor>& cu_seqlens_q,
                                                          const std::optional<at::Tensor>& cu_seqlens_k,
                                                          int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const c10::cuda::CUDAGuard guard(q.device());
  const ForwardInputs in{q, k, v, bias, key_mask, alibi_slopes, dropout_seed, scale, causal, window_left,
                         window_right, softcap, dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  return cuda::attention_forward(in, device_context(q));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_mask,
    const std::optional<at::Tensor>& dropout_seed, const at::Tensor& out, const at::Tensor& lse, double scale,
    int64_t causal, double dropout_p, bool compute_dbias, bool deterministic,
    const std::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k) {
  const c10::cuda::CUDAGuard guard(q.device());
  const ForwardInputs in{q, k, v, bias, key_mask, alibi_slopes, dropout_seed, scale, causal, window_left,
                         window_right, softcap, dropout_p, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k};
  return cuda::attention_backward(in, {grad_out, grad_lse, out, lse, compute_dbias, deterministic},
                                  device_context(q));
}

std::tuple<at::Tensor, at::Tensor> decode_forward_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& cache_leftpad, const std::optional<at::Tensor>& block_table,
    const std::optional<at::Tensor>& cache_batch_idx, double scale, bool causal,
    const std::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, double softcap,
    int64_t num_splits) {
  const c10::cuda::CUDAGuard guard(q.device());
  const DecodeInputs in{q, k_cache, v_cache, k_new, v_new, cache_seqlens, cache_leftpad, block_table,
                              cache_batch_idx, scale, causal, alibi_slopes, window_left, window_right, softcap,
                              num_splits};
  return cuda::decode_forward(in, device_context(q));
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_attn, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("decode_forward", &decode_forward_cuda);
}

}  // namespace fast_attn
