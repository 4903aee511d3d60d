// The plain-function boundary between the ATen launcher (attention_cuda_host.cpp,
// compiled by the host compiler) and the kernel translation units (*.cu,
// compiled by nvcc with no ATen). Nothing here needs torch, so the kernels can
// be compiled with `nvcc -c` on a machine whose torch has no CUDA, and a future
// Hopper path (wgmma/TMA) can add its own run_* functions beside these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention_params.h"
#include "decode_params.h"

namespace fast_attn::cuda {

enum class ElementType : int { kFloat16 = 0, kBFloat16 = 1 };

// What a launch reports back: ok, or the CUDA (or emulator) error text.
struct LaunchStatus {
  bool ok;
  const char* message;  // static string; nullptr when ok
};

inline LaunchStatus launch_ok() { return {true, nullptr}; }

// dq_accum's blocked layout, which the kFast and kCausal dK/dV kernels at the head dims of
// dkdv_staged (tile_configs.h, backward_dkdv_kernel.cuh) write and the convert kernel reads: per
// (batch, head, query block of block_m rows, split) one block of block_m x head_dim floats
// (head_dim: the kernel's; rows past Sq and columns past the problem's head dim are written and
// never read), in the order of the kernel's dQ atomics so that each warp instruction covers
// 32 x kVector contiguous floats (FlashAttention-2's permuted dq_accum): warp w of the dQ warp
// grid (query_warps x col_warps, queries fastest) holds quads() quads of the MMA C layout, quad
// q = 16-row tile (q / n8 tiles) x 8-column tile (q % n8 tiles), lane l of it the elements
// e = 0..3 at row l / 4 + 8 (e / 2), column 2 (l % 4) + e % 2 of the tile. The warp's
// instructions (quad, then e / kVector) follow one another, each 32 lanes x kVector floats.
struct DqAccumLayout {
  int32_t block_m;  // 0: not blocked, dq_accum is row-major (see BackwardWorkspace)
  int32_t head_dim;
  int32_t query_warps;
  int32_t col_warps;

  FAST_ATTN_HOST_DEVICE constexpr int warp_rows() const { return block_m / query_warps; }
  FAST_ATTN_HOST_DEVICE constexpr int warp_cols() const { return head_dim / col_warps; }
  FAST_ATTN_HOST_DEVICE constexpr int quads() const { return warp_rows() / 16 * (warp_cols() / 8); }
  FAST_ATTN_HOST_DEVICE constexpr int64_t block_floats() const { return int64_t{block_m} * head_dim; }

  // The offset in its block of element e of quad `quad` of lane `lane` of warp `warp`, when a
  // warp instruction adds kVector floats per lane (4: red.global.add.v4.f32; 1: scalar): the
  // lane's first element, lane_offset, plus instruction_offset, the same for every lane.
  template <int kVector>
  FAST_ATTN_HOST_DEVICE constexpr int lane_offset(int warp, int lane) const {
    return (warp * quads() * (4 / kVector) * 32 + lane) * kVector;
  }
  template <int kVector>
  FAST_ATTN_HOST_DEVICE static constexpr int instruction_offset(int quad, int e) {
    return (quad * (4 / kVector) + e / kVector) * 32 * kVector + e % kVector;
  }
  template <int kVector>
  FAST_ATTN_HOST_DEVICE constexpr int element_offset(int warp, int quad, int lane, int e) const {
    return lane_offset<kVector>(warp, lane) + instruction_offset<kVector>(quad, e);
  }

  // The offset in its block of row r, column c of the block (the inverse: which warp, quad,
  // lane and element hold it).
  template <int kVector>
  FAST_ATTN_HOST_DEVICE constexpr int offset(int r, int c) const {
    const int warp = r / warp_rows() + query_warps * (c / warp_cols());
    const int row = r % warp_rows();
    const int col = c % warp_cols();
    const int quad = row / 16 * (warp_cols() / 8) + col / 8;
    const int lane = row % 8 * 4 + col % 8 / 2;
    const int e = row % 16 / 8 * 2 + col % 2;
    return element_offset<kVector>(warp, quad, lane, e);
  }
};

// Buffers of the backward pass that the contract's params struct does not name.
struct BackwardWorkspace {
  // dq accumulated in float32 by the dK/dV kernel, (B, Hq, Sq, dq_splits, head_dim)
  // ((1, Hq, Tq, dq_splits, head_dim) for packed sequences) contiguous: dq_splits partial
  // sums per row, zeroed by the preprocess kernel, summed in split order and scaled into dq
  // by the convert kernel. With dq_layout.block_m != 0 blocked instead, (B, Hq,
  // ceil(Sq / block_m), dq_splits, block_m x kernel head dim) in dq_layout's order, zeroed
  // when allocated. Default mode: one, float atomics. Deterministic mode: the dK/dV kernel's
  // splits, split s of every row written by split s's CTA alone with plain
  // read-modify-writes (backward_schedule.h). Never nullptr (the kernel's test of it
  // keeps ptxas's register allocation of the default mode, see backward_dkdv_kernel.cuh).
  float* dq_accum;
  int64_t dq_splits;
  DqAccumLayout dq_layout;
  bool deterministic;
  // (B, Hq, Sq) float32 contiguous gradient of lse, nullptr when absent.
  const float* grad_lse;
};

// The output of the dbias kernel: the gradient of a bias with full rows and
// columns, (batch, heads, Sq, Sk) contiguous in the bias's dtype (float32 when
// params.bias_is_fp32, else the inputs' dtype). batch is 1 or B and heads is 1
// or Hq; a 1 where the problem is larger is summed over.
struct DbiasTiles {
  void* data;  // nullptr: no dbias kernel (no bias gradient, or the dK/dV kernel reduces it)
  int64_t batch;
  int64_t heads;
};

// kModifiers (in run_attention_backward_dbias): the kernels for
// problems with the band's left edge, a softcap or ALiBi (has_score_modifiers in
// attention_params.h); the others run the kernels without that code.
//
// The forward and dK/dV kernels are compiled for one path each (kernel_path picks it):
//   kFast:      no bias, key mask, dropout, band edge or score modifier, scale > 0; only the
//               key tile that crosses Sk masks scores;
//   kCausal:    kFast with the band's right edge (causal, or a window without a left edge):
//               only the key tiles that the edge or Sk crosses mask scores;
//   kGeneral:   every other problem without score modifiers (bias, key mask, dropout, packed
//               sequences, scale <= 0), each tile testing at run time what it needs;
//   kModifiers: kGeneral with the band's left edge, softcap and ALiBi.
enum class KernelPath : int { kFast = 0, kCausal = 1, kGeneral = 2, kModifiers = 3 };

constexpr bool is_specialized(KernelPath path) { return path == KernelPath::kFast || path == KernelPath::kCausal; }

inline KernelPath kernel_path(const AttentionForwardParams& p) {
  if (has_score_modifiers(p)) {
    return KernelPath::kModifiers;
  }
  if (p.bias != nullptr || p.key_mask != nullptr || p.dropout_seed != nullptr || is_varlen(p) || !(p.scale > 0.0f)) {
    return KernelPath::kGeneral;
  }
  return band_bounds_right(p) ? KernelPath::kCausal : KernelPath::kFast;
}
// Packed sequences (is_varlen(params)) run kernels of their own (kVarlen), chosen
// inside the run_* functions: the grids are sized by the sequences' length bounds
// params.seqlen_q / seqlen_k, and batch is the number of sequences.

// The dK/dV kernel reduces dbias of a bias with a broadcast dim (a bias of full
// rows and columns has the dbias kernel). With kModifiers as well it spills on
// sm_80 at head dims 128 (16 bytes) and 256 (8 bytes): not instantiated there,
// and the host refuses those problems.
constexpr bool dkdv_dbias_with_modifiers(int head_dim) { return head_dim < 128; }

// Forward: out and lse of params. kHeadDim is the compiled kernel head dim
// (>= params.head_dim; the columns beyond params.head_dim are zero-filled).
template <ElementType kElement, int kHeadDim, KernelPath kPath>
LaunchStatus run_attention_forward(const AttentionForwardParams& params, cudaStream_t stream);

// Backward step 1: delta = rowsum(grad_out * out) - grad_lse, and zero dq_accum.
template <ElementType kElement>
LaunchStatus run_attention_backward_preprocess(const AttentionBackwardParams& params,
                                               const BackwardWorkspace& workspace, cudaStream_t stream);

// Backward step 2: dk, dv, dq_accum (and dbias partials).
template <ElementType kElement, int kHeadDim, KernelPath kPath>
LaunchStatus run_attention_backward_dkdv(const AttentionBackwardParams& params,
                                         const BackwardWorkspace& workspace, cudaStream_t stream);

// Backward, for a bias with full rows and columns (params.dbias is then nullptr
// and the dK/dV kernel leaves dbias alone): dbias, one CTA per tile of it.
template <ElementType kElement, int kHeadDim, bool kModifiers>
LaunchStatus run_attention_backward_dbias(const AttentionBackwardParams& params, const DbiasTiles& dbias,
                                          cudaStream_t stream);

// Backward step 3: dq = scale * (the sum of dq_accum's splits in split order) in the inputs' dtype.
template <ElementType kElement>
LaunchStatus run_attention_backward_convert_dq(const AttentionBackwardParams& params,
                                               const BackwardWorkspace& workspace, cudaStream_t stream);

// Decoding against a KV cache (decode_params.h), three launches in stream order:
// 1. (new_rows > 0) k_new, v_new written into the caches in place (decode_append.cu);
LaunchStatus run_decode_append(const DecodeParams& params, cudaStream_t stream);

// 2. the split-KV kernel (decode_kernel.cuh): out and lse with one split, else each split's
//    partial results;
template <ElementType kElement, int kHeadDim>
LaunchStatus run_decode(const DecodeParams& params, cudaStream_t stream);

// 3. (num_splits > 1) the splits merged into out and lse (decode_combine.cu).
template <ElementType kElement>
LaunchStatus run_decode_combine(const DecodeParams& params, cudaStream_t stream);

}  // namespace fast_attn::cuda
