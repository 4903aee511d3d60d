// The tensor-level CUDA implementation of the fast_attn ops: checks, output
// and workspace allocation, alignment of the inputs for cp.async, and the
// sequence of kernel launches. It needs ATen but none of ATen's CUDA headers:
// the device, its stream and SM count come in a DeviceContext, so the same
// code also drives the CPU emulation of the kernels in tests
// (emulation/emulation_module.cpp). attention_cuda_ops.cpp registers it.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fast_attn::cuda {

struct DeviceContext {
  cudaStream_t stream;
  int sm_count;  // sizes the dbias split (CTAs to fill the device)
};

// attention_forward's schema (csrc/schema.cpp): (out, lse).
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& key_mask,
                                                     const std::optional<at::Tensor>& dropout_seed, double scale,
                                                     int64_t causal, double dropout_p,
                                                     const std::optional<at::Tensor>& alibi_slopes, int64_t window_left,
                                                     int64_t window_right, double softcap, const DeviceContext& device);

// attention_backward's schema: (dq, dk, dv, dbias), dbias empty unless compute_dbias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_mask,
    const std::optional<at::Tensor>& dropout_seed, const at::Tensor& out, const at::Tensor& lse, double scale,
    int64_t causal, double dropout_p, bool compute_dbias, bool deterministic,
    const std::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, double softcap,
    const DeviceContext& device);

// Head dims with compiled kernels (FAST_ATTN_CUDA_HEAD_DIMS), ascending.
std::vector<int> compiled_head_dims();

}  // namespace fast_attn::cuda
