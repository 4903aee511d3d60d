// The five matrix products of one backward tile for bfloat16 inputs, on
// bfloat16 dot products (tile_gemm_bf16.h): the products policy of
// BackwardKernel where the CPU has AVX512-BF16 and the layout allows it
// (attention_cpu.cpp: even head dim, even strides).
//
//   S = scale * Q K^T,  dP = dO V^T        exact products of the bf16 inputs
//   dV += P^T dO,  dK += (scale dS)^T Q,  dQ += (scale dS) K
//                                          P and scale * dS rounded to bf16
//
// Rounding P and dS to bf16 is what PyTorch's own bf16 math does; softmax
// statistics, dS itself (for dbias) and all accumulators stay in float.
// Operands are packed into k-pairs (see tile_gemm_bf16.h): the key block once
// per block, the query block once per tile; q and grad_out rows are read in
// place as pairs along D.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "aligned_buffer.h"
#include "bf16_pairs.h"
#include "cpu_kernels.h"
#include "storage_types.h"
#include "tile_gemm_bf16.h"

namespace fast_attn::cpu {
namespace {

class Bfloat16DotProducts {
  static constexpr int64_t kM = kBackwardBlockM;
  static constexpr int64_t kN = kBackwardBlockN;

 public:
  // dK and dQ come out scaled (the products use scale * dS).
  static constexpr bool kKeyGradientScaled = true;

  void carve(ScratchCarver& c, int64_t head_dim) {
    head_dim_ = head_dim;
    pairs_ = head_dim / 2;
    d_padded_ = (head_dim + 15) / 16 * 16;
    k_pair_columns_ = c.take<uint32_t>(pairs_ * kN);
    v_pair_columns_ = c.take<uint32_t>(pairs_ * kN);
    k_pair_rows_ = c.take<uint32_t>(kN / 2 * d_padded_);
    q_pair_rows_ = c.take<uint32_t>(kM / 2 * d_padded_);
    grad_pair_rows_ = c.take<uint32_t>(kM / 2 * d_padded_);
    probs_pair_rows_ = c.take<uint32_t>(kM / 2 * kN);
    dscores_pair_rows_ = c.take<uint32_t>(kM / 2 * kN);
    dscores_bf16_ = c.take<BFloat16Bits>(kM * kN);
  }

  void load_key_block(const BFloat16Bits* k, int64_t k_ld, const BFloat16Bits* v, int64_t v_ld, int64_t cols,
                      float scale) {
    scale_ = scale;
    const int64_t padded_cols = (cols + 15) / 16 * 16;
    pack_pair_columns(k_pair_columns_, kN, padded_cols, k, k_ld, cols, pairs_);  // (D/2, kN)
    pack_pair_columns(v_pair_columns_, kN, padded_cols, v, v_ld, cols, pairs_);
    pack_pair_rows(k_pair_rows_, d_padded_, k, k_ld, cols, head_dim_);  // (ceil(cols/2), D)
  }

  void load_query_block(const BFloat16Bits* q, int64_t q_ld, const BFloat16Bits* grad, int64_t grad_ld,
                        int64_t rows) {
    rows_ = rows;
    q_ = q;
    grad_ = grad;
    q_ld_ = q_ld;
    grad_ld_ = grad_ld;
    pack_pair_rows(q_pair_rows_, d_padded_, q, q_ld, rows, head_dim_);  // (rows/2, D)
    pack_pair_rows(grad_pair_rows_, d_padded_, grad, grad_ld, rows, head_dim_);
  }

  // scores (rows x padded_cols, row stride kN) = scale * Q K^T; q rows read in place as pairs.
  void scores(float* scores, int64_t padded_cols) {
    gemm<Bf16PairDots, false>(rows_, padded_cols, pairs_, reinterpret_cast<const uint32_t*>(q_), q_ld_ / 2,
                              k_pair_columns_, kN, scores, kN, false);
    const __m512 factor = _mm512_set1_ps(scale_);
    for (int64_t m = 0; m < rows_; ++m) {
      for (int64_t n = 0; n < padded_cols; n += 16) {
        _mm512_storeu_ps(scores + m * kN + n, _mm512_mul_ps(_mm512_loadu_ps(scores + m * kN + n), factor));
      }
    }
  }

  // dprobs (rows x padded_cols, row stride kN) = dO V^T
  void dprobs(float* dprobs, int64_t padded_cols) {
    gemm<Bf16PairDots, false>(rows_, padded_cols, pairs_, reinterpret_cast<const uint32_t*>(grad_), grad_ld_ / 2,
                              v_pair_columns_, kN, dprobs, kN, false);
  }

  // dV += P^T dO, dK += (scale dS)^T Q, dQ += (scale dS) K.
  void accumulate_gradients(const float* probs, const float* dscores, int64_t cols, float* dk_acc, float* dv_acc,
                            int64_t acc_ld, float* dq, int64_t dq_ld) {
    const int64_t padded_cols = (cols + 15) / 16 * 16;
    const int64_t row_pairs = (rows_ + 1) / 2;
    pack_float_pair_rows(probs_pair_rows_, kN, probs, kN, rows_, padded_cols, 1.0f);
    pack_float_pair_rows(dscores_pair_rows_, kN, dscores, kN, rows_, padded_cols, scale_);
    store_bf16_rows(dscores_bf16_, kN, dscores, kN, rows_, padded_cols, scale_);
    gemm<Bf16PairDots, true>(cols, head_dim_, row_pairs, probs_pair_rows_, kN, grad_pair_rows_, d_padded_, dv_acc,
                             acc_ld, true);
    gemm<Bf16PairDots, true>(cols, head_dim_, row_pairs, dscores_pair_rows_, kN, q_pair_rows_, d_padded_, dk_acc,
                             acc_ld, true);
    gemm<Bf16PairDots, false>(rows_, head_dim_, (cols + 1) / 2, reinterpret_cast<const uint32_t*>(dscores_bf16_),
                              kN / 2, k_pair_rows_, d_padded_, dq, dq_ld, true);
  }

 private:
  int64_t head_dim_ = 0, pairs_ = 0, d_padded_ = 0, rows_ = 0;
  float scale_ = 1.0f;
  uint32_t* k_pair_columns_ = nullptr;     // (D/2, kN): pairs of K along D, transposed
  uint32_t* v_pair_columns_ = nullptr;     // (D/2, kN)
  uint32_t* k_pair_rows_ = nullptr;        // (kN/2, D_padded): pairs of K rows
  uint32_t* q_pair_rows_ = nullptr;        // (kM/2, D_padded)
  uint32_t* grad_pair_rows_ = nullptr;     // (kM/2, D_padded)
  uint32_t* probs_pair_rows_ = nullptr;    // (kM/2, kN): pairs of P rows (after dropout)
  uint32_t* dscores_pair_rows_ = nullptr;  // (kM/2, kN): pairs of scale * dS rows
  BFloat16Bits* dscores_bf16_ = nullptr;   // (kM, kN): scale * dS
  const BFloat16Bits* q_ = nullptr;
  const BFloat16Bits* grad_ = nullptr;
  int64_t q_ld_ = 0, grad_ld_ = 0;
};

}  // namespace
}  // namespace fast_attn::cpu
