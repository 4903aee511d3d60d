// Packing bfloat16 operands into k-pairs (one 32-bit word per two consecutive
// k, the even one in the low half) for the dot products of tile_gemm_bf16.h,
// shared by the forward and backward products on AVX512-BF16.
// Include only inside a target region that enables avx512bf16.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "storage_types.h"

namespace fast_attn::cpu {
namespace {

// The 32-bit word holding elements 2kp and 2kp + 1 of a bf16 row.
inline uint32_t bf16_pair(const BFloat16Bits* row, int64_t kp) {
  uint32_t pair;
  std::memcpy(&pair, row + 2 * kp, sizeof(pair));
  return pair;
}

// dst[kp][n] = pair kp of src row n (a 32-bit transpose); columns n in
// [rows, padded_rows) are zero.
inline void pack_pair_columns(uint32_t* dst, int64_t ld_dst, int64_t padded_rows, const BFloat16Bits* src,
                              int64_t ld_src, int64_t rows, int64_t pairs) {
  for (int64_t kp = 0; kp < pairs; ++kp) {
    uint32_t* d = dst + kp * ld_dst;
    for (int64_t n = 0; n < rows; ++n) d[n] = bf16_pair(src + n * ld_src, kp);
    for (int64_t n = rows; n < padded_rows; ++n) d[n] = 0;
  }
}

// dst[m / 2][d] = (src[m][d], src[m + 1][d]) for m even, d < cols; a missing
// last row (rows odd) is zero.
inline void pack_pair_rows(uint32_t* dst, int64_t ld_dst, const BFloat16Bits* src, int64_t ld_src, int64_t rows,
                           int64_t cols) {
  for (int64_t m = 0; m < rows; m += 2) {
    const BFloat16Bits* even = src + m * ld_src;
    const BFloat16Bits* odd = src + (m + 1) * ld_src;
    const bool has_odd = m + 1 < rows;
    uint32_t* d = dst + (m / 2) * ld_dst;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 lanes = cols - c >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (cols - c)) - 1u);
      const __m512i low = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, even + c));
      const __m512i high =
          has_odd ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, odd + c)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(d + c, lanes, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
    }
  }
}

// 16 floats * scale -> 16 bf16 (round to nearest even) in the low halves of 16 words.
inline __m512i bf16_words(const float* src, __m512 scale) {
  const __m256bh packed = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src), scale));
  return _mm512_cvtepu16_epi32((__m256i)packed);
}

// dst[m / 2][n] = (bf16(scale src[m][n]), bf16(scale src[m + 1][n])), n < cols
// (a multiple of 16); a missing last row is zero.
inline void pack_float_pair_rows(uint32_t* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                                 int64_t cols, float scale) {
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t m = 0; m < rows; m += 2) {
    uint32_t* d = dst + (m / 2) * ld_dst;
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512i low = bf16_words(src + m * ld_src + c, factor);
      const __m512i high = m + 1 < rows ? bf16_words(src + (m + 1) * ld_src + c, factor) : _mm512_setzero_si512();
      _mm512_storeu_si512(d + c, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
    }
  }
}

// dst rows (bf16) = bf16(scale * src rows), n < cols (a multiple of 16).
inline void store_bf16_rows(BFloat16Bits* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                            int64_t cols, float scale) {
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t c = 0; c < cols; c += 16) {
      const __m256bh packed = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + m * ld_src + c), factor));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + m * ld_dst + c), (__m256i)packed);
    }
  }
}

}  // namespace
}  // namespace fast_attn::cpu
