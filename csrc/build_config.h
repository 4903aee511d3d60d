// Facts fixed at build time, passed by setup.py / CMakeLists.txt as macros.
#pragma once

#include <vector>

#ifndef FAST_ATTN_VERSION
#define FAST_ATTN_VERSION "unknown"
#endif
#ifndef FAST_ATTN_TORCH_VERSION
#define FAST_ATTN_TORCH_VERSION "unknown"
#endif
#ifndef FAST_ATTN_CUDA_VERSION
#define FAST_ATTN_CUDA_VERSION ""
#endif
#ifndef FAST_ATTN_CUDA_ARCHS
#define FAST_ATTN_CUDA_ARCHS ""
#endif
#ifndef FAST_ATTN_CXX_FLAGS
#define FAST_ATTN_CXX_FLAGS ""
#endif

namespace fast_attn::build_config {

#ifdef FAST_ATTN_WITH_CUDA
inline constexpr bool kWithCuda = true;
// Head dims with a compiled CUDA kernel: those of csrc/cuda/build_matrix.json, or
// the subset the build was asked for (FAST_ATTN_CUDA_HEAD_DIMS).
std::vector<int> cuda_head_dims();
#else
inline constexpr bool kWithCuda = false;
inline std::vector<int> cuda_head_dims() { return {}; }
#endif

}  // namespace fast_attn::build_config
