// Portable 16-lane vector of float or double: the fallback of the CPU kernels
// (any x86-64 or other CPU) and the float64 path. Plain arrays and loops that
// the compiler vectorizes for whatever ISA its translation unit targets.
//
// It has exactly the interface of VecAvx512 (vec_avx512.h): the kernel bodies
// are templates over the vector type and are compiled once per ISA.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "attention_params.h"
#include "storage_types.h"

namespace fast_attn::cpu {
namespace {

template <class T>
struct VecGeneric {
  using value_type = T;
  using Mask = int;  // number of leading lanes
  static constexpr const char* kInstructionSet = "generic";
  static constexpr int kWidth = 16;
  static constexpr int kTileVectors = 4;  // register tile of the matrix products: 6 rows x 4 vectors
  T lane[kWidth];

  static Mask first_lanes(int count) { return count; }

  // Register operations of the matrix-product micro-kernel (tile_gemm.h).
  using Reg = VecGeneric;
  static Reg reg_zero() { return zero(); }
  static Reg reg_broadcast(T x) { return broadcast(x); }
  static Reg reg_load(const T* p) { return load(p); }
  static Reg reg_load_masked(const T* p, Mask count) { return load_first(p, count); }
  static Reg reg_fma(const Reg& a, const Reg& b, const Reg& c) { return fma(a, b, c); }
  static Reg reg_add(const Reg& a, const Reg& b) { return a + b; }
  static void reg_store(T* p, const Reg& x) { x.store(p); }
  static void reg_store_masked(T* p, Mask count, const Reg& x) { x.store_first(p, count); }

  static VecGeneric zero() { return broadcast(T(0)); }

  static VecGeneric broadcast(T value) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = value;
    return r;
  }

  // Lanes i of a vector loaded from storage of any supported element type.
  template <class S>
  static VecGeneric load(const S* p) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = static_cast<T>(to_float(p[i]));
    return r;
  }

  // Lanes >= count are zero and their memory is not touched.
  template <class S>
  static VecGeneric load_first(const S* p, int count) {
    VecGeneric r = zero();
    for (int i = 0; i < count && i < kWidth; ++i) r.lane[i] = static_cast<T>(to_float(p[i]));
    return r;
  }

  template <class S>
  void store(S* p) const {
    for (int i = 0; i < kWidth; ++i) store_scalar(p + i, lane[i]);
  }

  template <class S>
  void store_first(S* p, int count) const {
    for (int i = 0; i < count && i < kWidth; ++i) store_scalar(p + i, lane[i]);
  }

  void store_streaming(T* p) const { store(p); }

  VecGeneric operator+(const VecGeneric& b) const {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = lane[i] + b.lane[i];
    return r;
  }
  VecGeneric operator-(const VecGeneric& b) const {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = lane[i] - b.lane[i];
    return r;
  }
  VecGeneric operator*(const VecGeneric& b) const {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = lane[i] * b.lane[i];
    return r;
  }

  // a * b + c
  static VecGeneric fma(const VecGeneric& a, const VecGeneric& b, const VecGeneric& c) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = a.lane[i] * b.lane[i] + c.lane[i];
    return r;
  }

  // Lane-wise maximum; a NaN in b is returned (so NaN scores reach the output).
  static VecGeneric max(const VecGeneric& a, const VecGeneric& b) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = a.lane[i] > b.lane[i] ? a.lane[i] : b.lane[i];
    return r;
  }

  VecGeneric exp() const {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = std::exp(lane[i]);
    return r;
  }

  VecGeneric tanh() const {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) r.lane[i] = std::tanh(lane[i]);
    return r;
  }

  T reduce_add() const {
    T s = lane[0];
    for (int i = 1; i < kWidth; ++i) s += lane[i];
    return s;
  }

  VecGeneric replace_lanes_below(int count, T value) const {
    VecGeneric r = *this;
    for (int i = 0; i < count && i < kWidth; ++i) r.lane[i] = value;
    return r;
  }

  VecGeneric replace_lanes_from(int start, T value) const {
    VecGeneric r = *this;
    for (int i = start < 0 ? 0 : start; i < kWidth; ++i) r.lane[i] = value;
    return r;
  }

  VecGeneric replace_where_zero(const VecGeneric& flags, T value) const {
    VecGeneric r = *this;
    for (int i = 0; i < kWidth; ++i) {
      if (flags.lane[i] == T(0)) r.lane[i] = value;
    }
    return r;
  }

  VecGeneric replace_neg_inf(T value) const {
    VecGeneric r = *this;
    for (int i = 0; i < kWidth; ++i) {
      if (lane[i] == -std::numeric_limits<T>::infinity()) r.lane[i] = value;
    }
    return r;
  }

  bool all_equal(T value) const {
    bool same = true;
    for (int i = 0; i < kWidth; ++i) same &= lane[i] == value;
    return same;
  }

  // keep_scale where dropout_hash(seed, first_index + i * lane_stride) keeps the
  // score, else 0 (the rule of attention_params.h).
  static VecGeneric dropout_multiplier(uint64_t seed, uint64_t first_index, int64_t lane_stride,
                                       uint32_t keep_threshold, T keep_scale) {
    VecGeneric r;
    for (int i = 0; i < kWidth; ++i) {
      const uint64_t index = first_index + static_cast<uint64_t>(i) * static_cast<uint64_t>(lane_stride);
      r.lane[i] = dropout_hash(seed, index) >= keep_threshold ? keep_scale : T(0);
    }
    return r;
  }

  // Lane r: the sum of rows[r]'s lanes.
  static VecGeneric sum_lanes(VecGeneric (&rows)[kWidth]) {
    VecGeneric sum;
    for (int r = 0; r < kWidth; ++r) sum.lane[r] = rows[r].reduce_add();
    return sum;
  }

  // rows[r].lane[c] <-> rows[c].lane[r]
  static void transpose(VecGeneric (&rows)[kWidth]) {
    for (int r = 0; r < kWidth; ++r) {
      for (int c = r + 1; c < kWidth; ++c) {
        const T t = rows[r].lane[c];
        rows[r].lane[c] = rows[c].lane[r];
        rows[c].lane[r] = t;
      }
    }
  }
};

}  // namespace
}  // namespace fast_attn::cpu
