// Small tile operations shared by the forward and backward CPU kernels:
// loading blocks of rows into the accumulation type (or reading them in
// place), packing transposed blocks, key-mask flags of a key block. Templates
// over the vector type V, compiled once per instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "storage_types.h"

namespace fast_attn::cpu {
namespace {

// dst (rows x cols, row stride ld_dst) = scale * src (rows x cols of T, row stride ld_src).
template <class V, class T>
void load_rows(typename V::value_type* dst, int64_t ld_dst, const T* src, int64_t ld_src, int64_t rows,
               int64_t cols, typename V::value_type scale) {
  constexpr int W = V::kWidth;
  const V factor = V::broadcast(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld_src;
    typename V::value_type* d = dst + r * ld_dst;
    int64_t c = 0;
    for (; c + W <= cols; c += W) (V::load(s + c) * factor).store(d + c);
    if (c < cols) {
      const int rest = static_cast<int>(cols - c);
      (V::load_first(s + c, rest) * factor).store_first(d + c, rest);
    }
  }
}

// Rows of a matrix in the accumulation type, with their row stride.
template <class A>
struct Rows {
  const A* data = nullptr;
  int64_t ld = 0;
};

// An input's rows (rows x cols of T, row stride ld_src) in the accumulation type:
// float and double rows are read where they are; 16-bit rows are converted into
// `buffer` (row stride cols).
template <class V, class T>
Rows<typename V::value_type> rows_in_accumulation_type(typename V::value_type* buffer, const T* src,
                                                       int64_t ld_src, int64_t rows, int64_t cols) {
  using acc_t = typename V::value_type;
  if constexpr (std::is_same<T, acc_t>::value) {
    return {src, ld_src};
  } else {
    load_rows<V>(buffer, cols, src, ld_src, rows, cols, acc_t(1));
    return {buffer, cols};
  }
}

// dst (cols x padded_rows, row stride ld_dst) = scale * transpose(src (rows x cols of T));
// columns rows..padded_rows-1 of dst are zero, so whole vectors can be read (padded_rows is a
// multiple of the vector width). The vectors that hold padding are zeroed whole before the rows are
// written: one store each instead of a loop of up to W - 1 scalar ones (one query row's block, as
// decoding has, was mostly that loop).
template <class V, class T>
void pack_transposed(typename V::value_type* dst, int64_t ld_dst, int64_t padded_rows, const T* src,
                     int64_t ld_src, int64_t rows, int64_t cols, typename V::value_type scale) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  const int64_t first_padding_vector = rows / W * W;
  for (int64_t c = 0; c < cols; ++c) {
    acc_t* d = dst + c * ld_dst;
    for (int64_t r = first_padding_vector; r < padded_rows; r += W) V::zero().store(d + r);
    for (int64_t r = 0; r < rows; ++r) d[r] = scale * static_cast<acc_t>(to_float(src[r * ld_src + c]));
  }
}

// flags[n] = 1 where key j0 + n may be attended, 0 elsewhere, for n < cols;
// 0 up to the next multiple of the vector width. Returns the number of visible keys.
template <class V>
int64_t load_key_flags(typename V::value_type* flags, const uint8_t* mask_row, int64_t col_stride, int64_t j0,
                       int64_t cols) {
  using acc_t = typename V::value_type;
  constexpr int W = V::kWidth;
  int64_t visible = 0;
  for (int64_t n = 0; n < cols; ++n) {
    const bool keep = mask_row[(j0 + n) * col_stride] != 0;
    flags[n] = keep ? acc_t(1) : acc_t(0);
    visible += keep;
  }
  for (int64_t n = cols; n % W != 0; ++n) flags[n] = acc_t(0);
  return visible;
}

// Prefetches the cache lines of a block of rows into L2, one line per step(),
// so the requests are spread over other work. Used on bias tiles a step
// ahead: their rows are Sk * 4 bytes apart, too many streams for the
// hardware prefetchers, and a burst of 256 prefetches (a 64 x 64 float tile)
// fills the miss queue (measured: ~1 us stall per tile, 2.3 ms of a 22 ms T5
// forward). L2, not L1: rows 4 KiB apart all map to the same L1 sets.
class LinePrefetcher {
 public:
  void start(const void* base, int64_t row_stride_bytes, int64_t rows, int64_t row_bytes) {
    base_ = static_cast<const char*>(base);
    row_stride_ = row_stride_bytes;
    rows_ = rows;
    lines_per_row_ = (row_bytes + 63) / 64;
    row_ = line_ = 0;
    if (lines_per_row_ == 0) rows_ = 0;
  }

  void step() {
    if (row_ >= rows_) return;
    __builtin_prefetch(base_ + row_ * row_stride_ + line_ * 64, 0, 2);
    if (++line_ == lines_per_row_) {
      line_ = 0;
      ++row_;
    }
  }

  void finish() {
    while (row_ < rows_) step();
  }

 private:
  const char* base_ = nullptr;
  int64_t row_stride_ = 0, rows_ = 0, lines_per_row_ = 0, row_ = 0, line_ = 0;
};

}  // namespace
}  // namespace fast_attn::cpu
