// What the host launchers of the CUDA ops (attention_cuda_host.cpp, decode_cuda_host.cpp) share:
// the compiled head dims, the element type, the limits of the kernels' indices and grids,
// vector-load alignment and launch errors.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_cuda_host.h"
#include "instantiations/head_dims.h"
#include "kernel_api.h"

// The head dims this build compiles, comma-separated: the subset that setup.py or
// CMake pass as FAST_ATTN_CUDA_HEAD_DIMS, else all of instantiations/head_dims.h.
#ifndef FAST_ATTN_CUDA_HEAD_DIMS
#define FAST_ATTN_HEAD_DIM_ITEM(D) D,
#define FAST_ATTN_CUDA_HEAD_DIMS FAST_ATTN_FOR_EACH_HEAD_DIM(FAST_ATTN_HEAD_DIM_ITEM)
#endif

namespace fast_attn::cuda {

inline constexpr int kCompiledHeadDims[] = {FAST_ATTN_CUDA_HEAD_DIMS};

constexpr bool head_dim_compiled(int head_dim) {
  for (int compiled : kCompiledHeadDims) {
    if (compiled == head_dim) {
      return true;
    }
  }
  return false;
}

// Kernels index query and key positions with 32-bit integers (plus a block of slack).
constexpr int64_t kMaxSequenceLength = std::numeric_limits<int32_t>::max() - (1 << 16);
// Query heads and batch (varlen: sequences) are grid dims y and z of the forward and dQ kernels.
constexpr int64_t kMaxGridDim = 65535;

inline ElementType element_type(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "fast_attn CUDA kernels support float16 and bfloat16, got ", q.scalar_type());
  return q.scalar_type() == at::kHalf ? ElementType::kFloat16 : ElementType::kBFloat16;
}

// The smallest compiled kernel head dim that holds head_dim (its extra columns are zero-filled).
inline int kernel_head_dim(int64_t head_dim) {
  TORCH_CHECK(head_dim % 8 == 0, "fast_attn CUDA kernels need a head dim that is a multiple of 8, got ", head_dim);
  const std::vector<int> dims = compiled_head_dims();
  const auto fits = std::find_if(dims.begin(), dims.end(), [&](int d) { return d >= head_dim; });
  TORCH_CHECK(fits != dims.end(), "fast_attn CUDA kernels were compiled for head dims up to ", dims.back(), ", got ",
              head_dim);
  return *fits;
}

// Whether cp.async and the 16-byte vector loads can read t (4-D, last dim contiguous) in place:
// a 16-byte aligned base and strides of dims 0..2 that are multiples of 8 elements.
inline bool aligned_for_vectors(const at::Tensor& t) {
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d < 3; ++d) {
    aligned = aligned && (t.size(d) == 1 || t.stride(d) % 8 == 0);
  }
  return aligned;
}

// t, or a fresh (aligned, contiguous) copy of it when it is not aligned_for_vectors.
inline at::Tensor aligned_for_vector_loads(const at::Tensor& t) {
  return aligned_for_vectors(t) ? t : at::empty_like(t, at::MemoryFormat::Contiguous).copy_(t);
}

inline void check_launch(const LaunchStatus& status, const char* what) {
  TORCH_CHECK(status.ok, "fast_attn CUDA ", what, " failed: ", status.message);
}

// launch(std::integral_constant<int, D>{}) for the kernel head dim D == head_dim, when compiled.
template <typename Launch>
LaunchStatus launch_for_head_dim(int head_dim, const Launch& launch) {
  switch (head_dim) {
#define FAST_ATTN_HEAD_DIM_CASE(D)                        \
  case D:                                                 \
    if constexpr (head_dim_compiled(D)) {                 \
      return launch(std::integral_constant<int, D>{});    \
    } else {                                              \
      return {false, "head dim not compiled"};            \
    }
    FAST_ATTN_FOR_EACH_HEAD_DIM(FAST_ATTN_HEAD_DIM_CASE)
#undef FAST_ATTN_HEAD_DIM_CASE
    default: return {false, "no kernel for this head dim"};
  }
}

}  // namespace fast_attn::cuda
