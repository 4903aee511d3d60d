// The two matrix products of one forward key block in the accumulation type
// (float, or double for float64 inputs): the products policy of ForwardKernel
// for every dtype and ISA. (forward_products_bf16.h is the bfloat16 one on
// AVX512-BF16 dot products.)
//
//   S^T = K_block (scale q)^T     keys x queries, q scaled while packed
//   O  += P V_block               P read from P^T
//
// 16-bit inputs are converted: the query block once, each key block once (the keys of a
// block of few queries are read in place, widened as they are loaded). Their key blocks may
// be gathered from several runs of rows (load_key_rows; the decode kernel's tiles across
// pages): the conversion copies each run into the block's buffers, and the keys read in
// place are read through a pointer per key row.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "aligned_buffer.h"
#include "cpu_kernels.h"
#include "tile_gemm.h"
#include "tile_ops.h"

namespace fast_attn::cpu {
namespace {

template <class V, class T>
class AccumulationTypeForwardProducts {
  using acc_t = typename V::value_type;
  static constexpr int W = V::kWidth;
  static constexpr int64_t kM = kBlockM;
  static constexpr int64_t kN = kBlockN;
  static constexpr bool kConvertInputs = !std::is_same<T, acc_t>::value;

 public:
  // Blocks of at most this many queries (decoding, or a sequence's last rows) get
  // their scores from dot products along D (few_query_scores).
  static constexpr int64_t kFewQueries = 4;
  static_assert(kFewQueries <= W, "a block of few queries fits one query vector");
  // Whether a key block may be loaded as several runs of rows (load_key_rows with n0 > 0):
  // only where its rows are copied (float and double rows are read in place, one row stride).
  static constexpr bool kGathersKeyRows = kConvertInputs;

  void carve(ScratchCarver& c, int64_t head_dim) {
    head_dim_ = head_dim;
    d_padded_ = (head_dim + W - 1) / W * W;
    q_t_ = c.take<acc_t>(head_dim * kM);
    q_rows_ = c.take<acc_t>(kFewQueries * d_padded_);
    k_block_ = c.take<acc_t>(kConvertInputs ? kN * head_dim : 0);
    v_block_ = c.take<acc_t>(kConvertInputs ? kN * head_dim : 0);
  }

  // The block's rows of q (rows x D, row stride q_ld); query columns up to
  // query_vectors * W are padding.
  void load_query_block(const T* q, int64_t q_ld, int64_t rows, int query_vectors, acc_t scale) {
    rows_ = rows;
    query_columns_ = query_vectors * W;
    if (rows > kFewQueries) {
      pack_transposed<V>(q_t_, kM, query_columns_, q, q_ld, rows, head_dim_, scale);
      return;
    }
    // A block of few queries reads only its rows (few_query_scores), each zero-padded to whole
    // vectors: no transposed copy (packing one row's D columns cost as much as its scores).
    for (int64_t m = 0; m < rows; ++m) {
      acc_t* row = q_rows_ + m * d_padded_;
      for (int64_t d = 0; d < head_dim_; ++d) row[d] = scale * static_cast<acc_t>(to_float(q[m * q_ld + d]));
      std::fill(row + head_dim_, row + d_padded_, acc_t(0));
    }
  }

  // Keys and values of one block (cols x D each).
  void load_key_block(const T* k, int64_t k_ld, const T* v, int64_t v_ld, int64_t cols) {
    load_key_rows(k, k_ld, v, v_ld, 0, cols);
  }

  // Rows n0 .. n0 + cols - 1 of a key block's keys and values (cols x D each, row strides k_ld and
  // v_ld), loaded in order from n0 = 0; n0 > 0 only where kGathersKeyRows.
  void load_key_rows(const T* k, int64_t k_ld, const T* v, int64_t v_ld, int64_t n0, int64_t cols) {
    if (rows_ <= kFewQueries) {
      for (int64_t n = 0; n < cols; ++n) key_rows_[n0 + n] = k + n * k_ld;
    }
    const int64_t offset = kConvertInputs ? n0 * head_dim_ : 0;
    if (rows_ > kFewQueries) {
      const Rows<acc_t> keys = rows_in_accumulation_type<V>(k_block_ + offset, k, k_ld, cols, head_dim_);
      if (n0 == 0) keys_ = keys;
    }
    const Rows<acc_t> values = rows_in_accumulation_type<V>(v_block_ + offset, v, v_ld, cols, head_dim_);
    if (n0 == 0) values_ = values;
  }

  // scores_t (cols x query columns, row stride kM) = S^T of the block.
  void scores(acc_t* scores_t, int64_t cols) {
    if (rows_ <= kFewQueries) {
      switch (rows_) {
        case 1: return few_query_scores<1>(scores_t, cols);
        case 2: return few_query_scores<2>(scores_t, cols);
        case 3: return few_query_scores<3>(scores_t, cols);
        default: return few_query_scores<kFewQueries>(scores_t, cols);
      }
    } else {
      gemm<V, false>(cols, query_columns_, head_dim_, keys_.data, keys_.ld, q_t_, kM, scores_t, kM, false);
    }
  }

  // out_acc (rows x D, row stride ld_out) += P V_block; P^T in probs_t (cols x kM).
  void accumulate_output(const acc_t* probs_t, int64_t cols, acc_t* out_acc, int64_t ld_out) {
    gemm<V, true>(rows_, head_dim_, cols, probs_t, kM, values_.data, values_.ld, out_acc, ld_out, true);
  }

 private:
  // S^T of a block of R <= kFewQueries queries: dot products along D, vectorized over D, each
  // key row read once (in place, widened on load) for all R queries. The tile product vectorizes
  // over W query columns, all but R of them padding here (W times the work at one query).
  // Columns R..W-1 get 0, what the product with the zero-padded q^T gives.
  template <int R>
  void few_query_scores(acc_t* scores_t, int64_t cols) {
    // kDotChains independent accumulators: KR keys x R queries per pass over D (one FMA chain
    // per accumulator would wait on the FMA latency).
    constexpr int KR = std::max(1, kDotChains / R);
    int64_t n = 0;
    for (; n + KR <= cols; n += KR) key_dots<R, KR>(scores_t, n);
    for (; n < cols; ++n) key_dots<R, 1>(scores_t, n);
  }

  // S^T rows n .. n + KR - 1: lane m of row n + k is key n + k times query m (scaled).
  template <int R, int KR>
  void key_dots(acc_t* scores_t, int64_t n) {
    const int64_t full = head_dim_ / W * W;
    const int tail = static_cast<int>(head_dim_ - full);
    V acc[KR][R];
    for (int k = 0; k < KR; ++k) {
      for (int m = 0; m < R; ++m) acc[k][m] = V::zero();
    }
    const T* rows[KR];
    for (int k = 0; k < KR; ++k) rows[k] = key_rows_[n + k];
    auto step = [&](int64_t d, auto load_key) {
      V key[KR];
      for (int k = 0; k < KR; ++k) key[k] = load_key(rows[k] + d);
      for (int m = 0; m < R; ++m) {
        const V query = V::load(q_rows_ + m * d_padded_ + d);
        for (int k = 0; k < KR; ++k) acc[k][m] = V::fma(key[k], query, acc[k][m]);
      }
    };
    for (int64_t d = 0; d < full; d += W) step(d, [](const T* key) { return V::load(key); });
    if (tail > 0) step(full, [tail](const T* key) { return V::load_first(key, tail); });
    for (int k = 0; k < KR; ++k) {
      acc_t* scores = scores_t + (n + k) * kM;
      if constexpr (R == 1) {
        V::zero().store(scores);
        scores[0] = acc[k][0].reduce_add();
      } else {
        V lanes[W];  // lane m of their sum_lanes: the sum of acc[k][m]'s lanes
        for (int m = 0; m < W; ++m) lanes[m] = m < R ? acc[k][m] : V::zero();
        V::sum_lanes(lanes).store(scores);
      }
    }
  }

  // Accumulators of few_query_scores: fill the FMA pipelines, fit the registers.
  static constexpr int kDotChains = 8;

  int64_t head_dim_ = 0, d_padded_ = 0, rows_ = 0, query_columns_ = 0;
  acc_t* q_t_ = nullptr;      // (D, kM): scale * q^T of a block of more than kFewQueries queries, zero-padded columns
  acc_t* q_rows_ = nullptr;   // (kFewQueries, D_padded): scale * q rows of a block of few queries, zero-padded
  const T* key_rows_[kN] = {};  // the block's key rows as given (read in place by few_query_scores)
  acc_t* k_block_ = nullptr;  // (kN, D) keys in acc_t (16-bit inputs only)
  acc_t* v_block_ = nullptr;  // (kN, D) values in acc_t (16-bit inputs only)
  // The block's keys (blocks of many queries) and values: k_block_ and v_block_, or the inputs in place.
  Rows<acc_t> keys_, values_;
};

}  // namespace
}  // namespace fast_attn::cpu
