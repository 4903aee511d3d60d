// 8 floats in one AVX2 register: the CPU kernels on x86 CPUs with AVX2, FMA and
// F16C but no AVX-512.
//
// Include only inside a `#pragma GCC target("avx2,fma,f16c")` region
// (kernels_avx2.cpp), after <immintrin.h>; attention_cpu.cpp calls the kernels
// built from it only where the CPU reports those features. Same interface as
// VecAvx512 (vec_avx512.h), whose comments say what each member computes; here
// the lane masks are vectors (AVX2 has no mask registers) and the register tile
// of the matrix products is 6 rows x 2 vectors: 12 accumulators of the 16 ymm
// registers.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attention_params.h"
#include "exp_polynomial.h"
#include "storage_types.h"

namespace fast_attn::cpu {
namespace {

struct VecAvx2 {
  using value_type = float;
  using Mask = __m256i;  // all ones in the lanes that count
  static constexpr const char* kInstructionSet = "avx2";
  static constexpr int kWidth = 8;
  static constexpr int kTileVectors = 2;
  __m256 v;

  static __m256i first_lanes(int count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }

  static VecAvx2 zero() { return {_mm256_setzero_ps()}; }
  static VecAvx2 broadcast(float value) { return {_mm256_set1_ps(value)}; }

  static __m256 widen_bfloat16(__m128i raw) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  // The first `count` 16-bit values of p, zero beyond; nothing past them is read.
  static __m128i load_first_16bit(const void* p, int count) {
    uint16_t lanes[kWidth] = {};
    std::memcpy(lanes, p, static_cast<size_t>(count < 0 ? 0 : (count > kWidth ? kWidth : count)) * 2);
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(lanes));
  }

  static VecAvx2 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static VecAvx2 load(const BFloat16Bits* p) {
    return {widen_bfloat16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static VecAvx2 load(const Float16Bits* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }

  // load_first and store_first move whole vectors (count >= kWidth, most calls) without a mask:
  // vmaskmovps and the 16-bit copies are slow on AMD cores (a forward with a (1, 8, 1024, 1024)
  // bias, added a load_first at a time, ran 1.36x faster so on a Zen 3).
  static VecAvx2 load_first(const float* p, int count) {
    return count >= kWidth ? load(p) : VecAvx2{_mm256_maskload_ps(p, first_lanes(count))};
  }
  static VecAvx2 load_first(const BFloat16Bits* p, int count) {
    return count >= kWidth ? load(p) : VecAvx2{widen_bfloat16(load_first_16bit(p, count))};
  }
  static VecAvx2 load_first(const Float16Bits* p, int count) {
    return count >= kWidth ? load(p) : VecAvx2{_mm256_cvtph_ps(load_first_16bit(p, count))};
  }

  using Reg = __m256;
  static Reg reg_zero() { return _mm256_setzero_ps(); }
  static Reg reg_broadcast(float x) { return _mm256_set1_ps(x); }
  static Reg reg_load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg reg_load_masked(const float* p, Mask mask) { return _mm256_maskload_ps(p, mask); }
  static Reg reg_fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg reg_add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static void reg_store(float* p, Reg x) { _mm256_storeu_ps(p, x); }
  static void reg_store_masked(float* p, Mask mask, Reg x) { _mm256_maskstore_ps(p, mask, x); }

  static __m128i to_bfloat16(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb);
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    const __m256i quiet_nan = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
    const __m256i result = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet_nan, is_nan), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(result), _mm256_extracti128_si256(result, 1));
  }
  static __m128i to_float16(__m256 x) { return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(BFloat16Bits* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bfloat16(v)); }
  void store(Float16Bits* p) const { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_float16(v)); }

  void store_first(float* p, int count) const {
    if (count >= kWidth) return store(p);
    _mm256_maskstore_ps(p, first_lanes(count), v);
  }
  void store_streaming(float* p) const { _mm256_stream_ps(p, v); }
  static void store_first_16bit(void* p, __m128i packed, int count) {
    uint16_t lanes[kWidth];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lanes), packed);
    std::memcpy(p, lanes, static_cast<size_t>(count < 0 ? 0 : (count > kWidth ? kWidth : count)) * 2);
  }
  void store_first(BFloat16Bits* p, int count) const {
    if (count >= kWidth) return store(p);
    store_first_16bit(p, to_bfloat16(v), count);
  }
  void store_first(Float16Bits* p, int count) const {
    if (count >= kWidth) return store(p);
    store_first_16bit(p, to_float16(v), count);
  }

  VecAvx2 operator+(VecAvx2 b) const { return {_mm256_add_ps(v, b.v)}; }
  VecAvx2 operator-(VecAvx2 b) const { return {_mm256_sub_ps(v, b.v)}; }
  VecAvx2 operator*(VecAvx2 b) const { return {_mm256_mul_ps(v, b.v)}; }

  static VecAvx2 fma(VecAvx2 a, VecAvx2 b, VecAvx2 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static VecAvx2 max(VecAvx2 a, VecAvx2 b) { return {_mm256_max_ps(a.v, b.v)}; }

  // The reduction and polynomial of exp_polynomial.h, as VecAvx512::exp. AVX2
  // has no scalef: 2^n is built in the exponent field as two halves, 2^(n/2) 2^(n - n/2), each a normal
  // float for n in [-150, 128], so that results below FLT_MIN become denormals
  // or 0 exactly as scaling by 2^n would (e^-inf = 0).
  VecAvx2 exp() const {
    using E = ExpPolynomial;
    const __m256 x = _mm256_min_ps(_mm256_set1_ps(E::kMaxInput), _mm256_max_ps(_mm256_set1_ps(E::kMinInput), v));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(E::kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(E::kLn2High), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(E::kLn2Low), r);
    __m256 p = _mm256_set1_ps(E::kCoefficients[0]);
    for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(E::kCoefficients[i]));
    const __m256i exponent = _mm256_cvtps_epi32(n);
    const __m256i half = _mm256_srai_epi32(exponent, 1);
    const __m256i rest = _mm256_sub_epi32(exponent, half);
    auto power_of_two = [](__m256i e) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
    };
    // A NaN input passed the clamps as NaN and made p NaN: the result stays NaN.
    return {_mm256_mul_ps(_mm256_mul_ps(p, power_of_two(half)), power_of_two(rest))};
  }

  // tanh(x) = 1 - 2 / (e^(2x) + 1) on exp above: e^(2x) = inf gives 1 and 0 gives -1 (x = +-inf),
  // NaN stays NaN. Accurate to a few ulp of 1 in absolute terms (near 0 the
  // subtraction cancels), which is what softcap * tanh needs.
  VecAvx2 tanh() const {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 exp2x = VecAvx2{_mm256_add_ps(v, v)}.exp().v;
    return {_mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(exp2x, one)))};
  }

  float reduce_add() const {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
  }

  VecAvx2 select(__m256i lanes, float value) const {
    return {_mm256_blendv_ps(v, _mm256_set1_ps(value), _mm256_castsi256_ps(lanes))};
  }
  VecAvx2 replace_lanes_below(int count, float value) const { return select(first_lanes(count), value); }
  VecAvx2 replace_lanes_from(int start, float value) const {
    return select(_mm256_xor_si256(first_lanes(start), _mm256_set1_epi32(-1)), value);
  }
  VecAvx2 replace_where_zero(VecAvx2 flags, float value) const {
    return {_mm256_blendv_ps(v, _mm256_set1_ps(value), _mm256_cmp_ps(flags.v, _mm256_setzero_ps(), _CMP_EQ_OQ))};
  }
  VecAvx2 replace_neg_inf(float value) const {
    const __m256 neg_inf = _mm256_cmp_ps(v, _mm256_set1_ps(-__builtin_inff()), _CMP_EQ_OQ);
    return {_mm256_blendv_ps(v, _mm256_set1_ps(value), neg_inf)};
  }
  bool all_equal(float value) const {
    return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(value), _CMP_EQ_OQ)) == 0xff;
  }

  static __m256i mix32(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bu)));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  }

  // The 64-bit indices are formed in scalar code (AVX2 has no 64-bit multiply),
  // the hash on 8 lanes.
  static VecAvx2 dropout_multiplier(uint64_t seed, uint64_t first_index, int64_t lane_stride, uint32_t keep_threshold,
                                    float keep_scale) {
    alignas(32) uint32_t low[kWidth];
    alignas(32) uint32_t high[kWidth];
    for (int i = 0; i < kWidth; ++i) {
      const uint64_t index = first_index + static_cast<uint64_t>(i) * static_cast<uint64_t>(lane_stride);
      low[i] = static_cast<uint32_t>(index);
      high[i] = static_cast<uint32_t>(index >> 32);
    }
    const __m256i seed_low = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed)));
    const __m256i seed_high = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed >> 32)));
    __m256i h = mix32(_mm256_xor_si256(seed_low, _mm256_load_si256(reinterpret_cast<const __m256i*>(low))));
    h = mix32(_mm256_xor_si256(_mm256_xor_si256(h, _mm256_load_si256(reinterpret_cast<const __m256i*>(high))),
                               seed_high));
    // h >= threshold (unsigned) iff max(h, threshold) == h.
    const __m256i threshold = _mm256_set1_epi32(static_cast<int>(keep_threshold));
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(h, threshold), h);
    return {_mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_set1_ps(keep_scale))};
  }

  // Lane r: the sum of rows[r]'s lanes (rows may be clobbered, as on the other vector types).
  // Horizontal adds: pairs of lanes, then quads (rows 0-3 and 4-7 of each 128-bit half), then the halves.
  static VecAvx2 sum_lanes(VecAvx2 (&rows)[kWidth]) {
    const __m256 rows0123 = _mm256_hadd_ps(_mm256_hadd_ps(rows[0].v, rows[1].v), _mm256_hadd_ps(rows[2].v, rows[3].v));
    const __m256 rows4567 = _mm256_hadd_ps(_mm256_hadd_ps(rows[4].v, rows[5].v), _mm256_hadd_ps(rows[6].v, rows[7].v));
    return {_mm256_add_ps(_mm256_permute2f128_ps(rows0123, rows4567, 0x20),
                          _mm256_permute2f128_ps(rows0123, rows4567, 0x31))};
  }

  // rows[r] lane c <-> rows[c] lane r: 32-bit pairs, 64-bit pairs, then 128-bit halves.
  static void transpose(VecAvx2 (&rows)[kWidth]) {
    __m256 pairs[kWidth];
    for (int i = 0; i < kWidth; i += 2) {
      pairs[i] = _mm256_unpacklo_ps(rows[i].v, rows[i + 1].v);
      pairs[i + 1] = _mm256_unpackhi_ps(rows[i].v, rows[i + 1].v);
    }
    __m256 quads[kWidth];
    for (int g = 0; g < 2; ++g) {
      const __m256 p0 = pairs[4 * g], p1 = pairs[4 * g + 1], p2 = pairs[4 * g + 2], p3 = pairs[4 * g + 3];
      quads[4 * g + 0] = _mm256_shuffle_ps(p0, p2, 0x44);
      quads[4 * g + 1] = _mm256_shuffle_ps(p0, p2, 0xee);
      quads[4 * g + 2] = _mm256_shuffle_ps(p1, p3, 0x44);
      quads[4 * g + 3] = _mm256_shuffle_ps(p1, p3, 0xee);
    }
    for (int c = 0; c < 4; ++c) {
      rows[c].v = _mm256_permute2f128_ps(quads[c], quads[4 + c], 0x20);
      rows[c + 4].v = _mm256_permute2f128_ps(quads[c], quads[4 + c], 0x31);
    }
  }
};

}  // namespace
}  // namespace fast_attn::cpu
