// Host-side glue of the decode_forward op (csrc/schema.cpp): invariant checks, output
// allocation and the DecodeParams of decode_params.h from tensors. Kernels never see an
// at::Tensor.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "decode_params.h"

namespace fast_attn {

// The decode_forward op's arguments, named as in its schema.
struct DecodeInputs {
  const at::Tensor& q;                                // (B, Sq, Hq, D)
  const at::Tensor& k_cache;                          // (Bc, S_cache, Hkv, D) or (num_pages, page_size, Hkv, D)
  const at::Tensor& v_cache;                          // k_cache's shape
  const std::optional<at::Tensor>& k_new;             // (B, S_new, Hkv, D)
  const std::optional<at::Tensor>& v_new;             // (B, S_new, Hkv, D)
  const at::Tensor& cache_seqlens;                    // int32 (B,)
  const std::optional<at::Tensor>& cache_leftpad;     // int32 (B,)
  const std::optional<at::Tensor>& block_table;       // int32 (B, max_pages)
  const std::optional<at::Tensor>& cache_batch_idx;   // int32 (B,)
  double scale;
  bool causal;
  const std::optional<at::Tensor>& alibi_slopes;  // float32 (B or 1, Hq)
  int64_t window_left;   // -1 = unbounded
  int64_t window_right;  // -1 = unbounded
  double softcap;        // 0 = none
  int64_t num_splits;    // 0 = chosen by the kernel
};

// What every backend's kernels rely on that the tensors' metadata shows: ranks, shapes, dtypes
// (float32, float64, float16 or bfloat16), devices, contiguous last dims, the options' ranges.
void check_decode_shapes(const DecodeInputs& in);

// check_decode_shapes, and the values that place keys in the caches (cache_seqlens,
// cache_leftpad, block_table, cache_batch_idx), read on the host, so that no key is read or
// written outside the caches (the CPU op's checks). The Python layer checks most of it first
// with friendlier messages; these checks keep a direct torch.ops call from reading or writing out
// of bounds.
void check_decode_inputs(const DecodeInputs& in);

// out (B, Sq, Hq, D) contiguous in q's dtype, lse (B, Hq, Sq) float32 (float64 for float64).
std::tuple<at::Tensor, at::Tensor> allocate_decode_outputs(const at::Tensor& q);

DecodeParams make_decode_params(const DecodeInputs& in, const at::Tensor& out, const at::Tensor& lse);

}  // namespace fast_attn
