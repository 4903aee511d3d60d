// The five matrix products of one backward tile, with operands in the
// accumulation type (float, or double for float64): the products policy of
// BackwardKernel for every dtype and ISA. (backward_products_bf16.h is the
// bfloat16 dot-product alternative.)
//
//   S = Q (scale K)^T,  dP = dO V^T,  dV += P^T dO,  dK += dS^T Q,  dQ += dS (scale K)
//
// The key block is packed once (transposed for S and dP, scaled rows for dQ)
// and reused by every query block of every head in the group; 16-bit query
// rows are converted once per tile.
#pragma once

#include <cstdint>
#include <type_traits>

#include "aligned_buffer.h"
#include "cpu_kernels.h"
#include "tile_gemm.h"
#include "tile_ops.h"

namespace fast_attn::cpu {
namespace {

template <class V, class T>
class AccumulationTypeProducts {
  using acc_t = typename V::value_type;
  static constexpr int W = V::kWidth;
  static constexpr int64_t kM = kBackwardBlockM;
  static constexpr int64_t kN = kBackwardBlockN;
  static constexpr bool kConvertInputs = !std::is_same<T, acc_t>::value;

 public:
  // dK comes out of accumulate_gradients unscaled: the kernel scales it when storing.
  static constexpr bool kKeyGradientScaled = false;

  void carve(ScratchCarver& c, int64_t head_dim) {
    head_dim_ = head_dim;
    d_padded_ = (head_dim + W - 1) / W * W;
    k_t_ = c.take<acc_t>(head_dim * kN);
    v_t_ = c.take<acc_t>(head_dim * kN);
    k_scaled_ = c.take<acc_t>(kN * d_padded_);
    q_buffer_ = c.take<acc_t>(kConvertInputs ? kM * head_dim : 0);
    grad_buffer_ = c.take<acc_t>(kConvertInputs ? kM * head_dim : 0);
  }

  // k, v: the block's cols key/value rows.
  void load_key_block(const T* k, int64_t k_ld, const T* v, int64_t v_ld, int64_t cols, acc_t scale) {
    const int64_t padded_cols = (cols + W - 1) / W * W;
    pack_transposed<V>(k_t_, kN, padded_cols, k, k_ld, cols, head_dim_, scale);  // (D, kN)
    pack_transposed<V>(v_t_, kN, padded_cols, v, v_ld, cols, head_dim_, acc_t(1));
    load_rows<V>(k_scaled_, d_padded_, k, k_ld, cols, head_dim_, scale);  // (kN, D)
  }

  // q, grad: the tile's rows query and grad_out rows.
  void load_query_block(const T* q, int64_t q_ld, const T* grad, int64_t grad_ld, int64_t rows) {
    rows_ = rows;
    queries_ = rows_in_accumulation_type<V>(q_buffer_, q, q_ld, rows, head_dim_);
    grads_ = rows_in_accumulation_type<V>(grad_buffer_, grad, grad_ld, rows, head_dim_);
  }

  // scores (rows x padded_cols, row stride kN) = scale * Q K^T
  void scores(acc_t* scores, int64_t padded_cols) {
    gemm<V, false>(rows_, padded_cols, head_dim_, queries_.data, queries_.ld, k_t_, kN, scores, kN, false);
  }

  // dprobs (rows x padded_cols, row stride kN) = dO V^T
  void dprobs(acc_t* dprobs, int64_t padded_cols) {
    gemm<V, false>(rows_, padded_cols, head_dim_, grads_.data, grads_.ld, v_t_, kN, dprobs, kN, false);
  }

  // dV += P^T dO, dK += dS^T Q, dQ += dS (scale K); probs and dscores are
  // (rows x cols) with row stride kN; dk_acc, dv_acc (cols x D) with row stride acc_ld.
  void accumulate_gradients(const acc_t* probs, const acc_t* dscores, int64_t cols, acc_t* dk_acc, acc_t* dv_acc,
                            int64_t acc_ld, acc_t* dq, int64_t dq_ld) {
    gemm<V, true>(cols, head_dim_, rows_, probs, kN, grads_.data, grads_.ld, dv_acc, acc_ld, true);
    gemm<V, true>(cols, head_dim_, rows_, dscores, kN, queries_.data, queries_.ld, dk_acc, acc_ld, true);
    gemm<V, false>(rows_, head_dim_, cols, dscores, kN, k_scaled_, d_padded_, dq, dq_ld, true);
  }

 private:
  int64_t head_dim_ = 0, d_padded_ = 0, rows_ = 0;
  acc_t* k_t_ = nullptr;          // (D, kN): scale * K^T, zero-padded columns
  acc_t* v_t_ = nullptr;          // (D, kN): V^T
  acc_t* k_scaled_ = nullptr;     // (kN, D_padded): scale * K
  acc_t* q_buffer_ = nullptr;     // (kM, D): converted queries (16-bit inputs)
  acc_t* grad_buffer_ = nullptr;  // (kM, D): converted grad_out (16-bit inputs)
  Rows<acc_t> queries_, grads_;  // the tile's queries and grad_out rows: the buffers, or the inputs in place
};

}  // namespace
}  // namespace fast_attn::cpu
