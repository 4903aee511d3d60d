// The two matrix products of one forward key block for bfloat16 inputs, on
// bfloat16 dot products (tile_gemm_bf16.h): the products policy of
// ForwardKernel where the CPU has AVX512-BF16 and the layout allows it
// (attention_cpu.cpp: even head dim, even key strides).
//
//   S^T = scale * K_block q^T     exact products of the bf16 inputs
//   O  += P V_block               P rounded to bf16
//
// Rounding P to bf16 is what PyTorch's own bf16 math does; the softmax and the
// output accumulator stay in float. Keys are read in place as pairs along D,
// q is packed into pairs once per query block, values once per key block.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "aligned_buffer.h"
#include "bf16_pairs.h"
#include "cpu_kernels.h"
#include "storage_types.h"
#include "tile_gemm_bf16.h"

namespace fast_attn::cpu {
namespace {

class Bfloat16DotForwardProducts {
  static constexpr int W = 16;
  static constexpr int64_t kM = kBlockM;
  static constexpr int64_t kN = kBlockN;

 public:
  // Blocks of at most this many queries (decoding) get their scores from dot
  // products along D instead of the tile product over 16 query columns.
  static constexpr int64_t kFewQueries = 4;

  void carve(ScratchCarver& c, int64_t head_dim) {
    head_dim_ = head_dim;
    pairs_ = head_dim / 2;
    d_padded_ = (head_dim + W - 1) / W * W;
    q_pair_columns_ = c.take<uint32_t>(pairs_ * kM);
    v_pair_rows_ = c.take<uint32_t>(kN / 2 * d_padded_);
    probs_pair_rows_ = c.take<uint32_t>(kN / 2 * kM);
  }

  void load_query_block(const BFloat16Bits* q, int64_t q_ld, int64_t rows, int query_vectors, float scale) {
    q_ = q;
    q_ld_ = q_ld;
    rows_ = rows;
    query_columns_ = query_vectors * W;
    scale_ = scale;
    if (rows > kFewQueries) pack_pair_columns(q_pair_columns_, kM, query_columns_, q, q_ld, rows, pairs_);
  }

  void load_key_block(const BFloat16Bits* k, int64_t k_ld, const BFloat16Bits* v, int64_t v_ld, int64_t cols) {
    k_ = k;
    k_ld_ = k_ld;
    pack_pair_rows(v_pair_rows_, d_padded_, v, v_ld, cols, head_dim_);  // (ceil(cols/2), D)
  }

  // scores_t (cols x query columns, row stride kM) = S^T of the block.
  void scores(float* scores_t, int64_t cols) {
    if (rows_ <= kFewQueries) {
      few_query_scores(scores_t, cols);
      return;
    }
    gemm<Bf16PairDots, false>(cols, query_columns_, pairs_, reinterpret_cast<const uint32_t*>(k_), k_ld_ / 2,
                              q_pair_columns_, kM, scores_t, kM, false);
    const __m512 factor = _mm512_set1_ps(scale_);
    for (int64_t n = 0; n < cols; ++n) {
      for (int64_t m = 0; m < query_columns_; m += W) {
        float* s = scores_t + n * kM + m;
        _mm512_storeu_ps(s, _mm512_mul_ps(_mm512_loadu_ps(s), factor));
      }
    }
  }

  // out_acc (rows x D, row stride ld_out) += P V_block; P^T in probs_t (cols x kM).
  void accumulate_output(const float* probs_t, int64_t cols, float* out_acc, int64_t ld_out) {
    pack_float_pair_rows(probs_pair_rows_, kM, probs_t, kM, cols, query_columns_, 1.0f);  // (ceil(cols/2), kM)
    gemm<Bf16PairDots, true>(rows_, head_dim_, (cols + 1) / 2, probs_pair_rows_, kM, v_pair_rows_, d_padded_, out_acc,
                             ld_out, true);
  }

 private:
  // S^T of a block of at most kFewQueries queries: per (key, query) one dot
  // product along D, 32 elements per instruction, on the rows in place.
  // Columns rows..W-1 get 0.
  void few_query_scores(float* scores_t, int64_t cols) {
    for (int64_t n = 0; n < cols; ++n) {
      const BFloat16Bits* key = k_ + n * k_ld_;
      float* scores = scores_t + n * kM;
      _mm512_storeu_ps(scores, _mm512_setzero_ps());
      for (int64_t m = 0; m < rows_; ++m) {
        const BFloat16Bits* query = q_ + m * q_ld_;
        __m512 dot = _mm512_setzero_ps();
        for (int64_t kp = 0; kp < pairs_; kp += W) {
          const __mmask16 lanes =
              pairs_ - kp >= W ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (pairs_ - kp)) - 1u);
          const __m512i k_pairs = _mm512_maskz_loadu_epi32(lanes, key + 2 * kp);
          const __m512i q_pairs = _mm512_maskz_loadu_epi32(lanes, query + 2 * kp);
          dot = _mm512_dpbf16_ps(dot, (__m512bh)k_pairs, (__m512bh)q_pairs);
        }
        scores[m] = scale_ * _mm512_reduce_add_ps(dot);
      }
    }
  }

  int64_t head_dim_ = 0, pairs_ = 0, d_padded_ = 0, rows_ = 0, query_columns_ = 0;
  float scale_ = 1.0f;
  uint32_t* q_pair_columns_ = nullptr;   // (D/2, kM): pairs of q along D, transposed, zero-padded columns
  uint32_t* v_pair_rows_ = nullptr;      // (kN/2, D_padded): pairs of V rows
  uint32_t* probs_pair_rows_ = nullptr;  // (kN/2, kM): pairs of P^T rows
  const BFloat16Bits* q_ = nullptr;
  const BFloat16Bits* k_ = nullptr;
  int64_t q_ld_ = 0, k_ld_ = 0;
};

}  // namespace
}  // namespace fast_attn::cpu
