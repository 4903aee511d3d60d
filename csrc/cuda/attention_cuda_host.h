// The tensor-level CUDA implementation of the fast_attn ops: checks, output
// and workspace allocation, alignment of the inputs for cp.async, and the
// sequence of kernel launches. It needs ATen but none of ATen's CUDA headers:
// the device, its stream and SM count come in a DeviceContext, so the same
// code also drives the CPU emulation of the kernels in tests
// (emulation/emulation_module.cpp). attention_cuda_ops.cpp registers it.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <tuple>
#include <vector>

#include "attention_launch.h"
#include "decode_launch.h"
#include "op_signatures.h"

namespace fast_attn::cuda {

struct DeviceContext {
  cudaStream_t stream;
  int sm_count;  // sizes the dK/dV kernel's splits and the decode splits (CTAs to fill the device)
};

// attention_forward's schema (csrc/schema.cpp): (out, lse).
std::tuple<at::Tensor, at::Tensor> attention_forward(const ForwardInputs& in, const DeviceContext& device);

// attention_backward's schema: (dq, dk, dv, dbias), dbias empty unless compute_dbias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(const ForwardInputs& in,
                                                                              const BackwardInputs& grads,
                                                                              const DeviceContext& device);

// decode_forward's schema (its arguments: DecodeInputs, decode_launch.h; num_splits 0 is chosen by
// decode_cuda_host.cpp): (out (B, Sq, Hq, D), lse (B, Hq, Sq)), the new rows written into the caches.
std::tuple<at::Tensor, at::Tensor> decode_forward(const DecodeInputs& in, const DeviceContext& device);

// The sizes that set the dK/dV kernel's splits (choose_dkdv_splits, backward_schedule.h).
struct DkdvSplitSizes {
  int64_t batch, heads_q, heads_kv, seqlen_q, seqlen_k;  // packed sequences: their number, length bounds
  int head_dim;                                          // the kernel head dim
  int64_t dq_slices;                                     // the (Sq, D) slices of dq: B x Hq (packed: Hq)
  bool deterministic;
  int64_t dbias_batch, dbias_heads, dbias_rows, dbias_cols;  // 0 unless the dK/dV kernel reduces dbias
};

// The dK/dV kernel's splits: of its dbias partial sums and, when deterministic, of dq_accum.
int64_t dkdv_splits(const DkdvSplitSizes& sizes, int sm_count);

// Head dims with compiled kernels (FAST_ATTN_CUDA_HEAD_DIMS), ascending.
std::vector<int> compiled_head_dims();

}  // namespace fast_attn::cuda
