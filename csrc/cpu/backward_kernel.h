// Fused attention backward on the CPU. A task owns a chunk of (batch, kv head)
// units and one split of the key blocks (blocks s, s + kv_splits, ...). For
// each of its key blocks it loops over every query head of the kv head's group
// and every query block, recomputes P = exp(S - lse) and accumulates
//
//   dV += P^T dO,   dS = P * (dP - delta) with dP = dO V^T,
//   dK += dS^T Q * scale,   dQ += dS K * scale,   dbias += dS (reduced to its shape)
//
// with softcap, score = c tanh(s / c) of the scaled product s, dK and dQ take
// dS (1 - tanh^2) while dbias takes dS itself. Query blocks wholly outside the
// band of the key block's keys are never visited; rows whose band is empty
// have lse = -inf, so P = 0 and their gradients are zero.
//
// dK/dV of the block are complete when the loop ends (the group's heads are
// summed inside the task: no atomics) and written once; dQ goes to the
// accumulator of the task's split. Score tiles are (queries x keys), the
// layout in which the bias and dropout indices are read contiguously. The
// matrix products themselves come from a policy (backward_products*.h): in the
// accumulation type, or bfloat16 dot products. Varlen problems run each
// sequence as a problem of batch 1 (sequence_view).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "aligned_buffer.h"
#include "attention_params.h"
#include "cpu_kernels.h"
#include "task_loop.h"
#include "tile_ops.h"

namespace fast_attn::cpu {
namespace {

template <class V, class T, class Products>
class BackwardKernel {
  using acc_t = typename V::value_type;
  static constexpr int W = V::kWidth;
  static constexpr int64_t kM = kBackwardBlockM;
  static constexpr int64_t kN = kBackwardBlockN;

 public:
  BackwardKernel(const AttentionBackwardParams& p, const BackwardPlan& plan) : params_(p), plan_(plan), p_(p) {
    for (int64_t n = 0; n < kN; ++n) s_.key_index[n] = static_cast<acc_t>(n);
  }

  // One call of run_kv_block for both kinds of task: a second call site changes GCC's inlining (and
  // with it the FMA contractions, so the rounding) of the whole kernel.
  void run(int64_t task) {
    // The task's (batch, kv head) units [unit_begin, unit_end), its chunk and its split of the key blocks.
    int64_t unit_begin, unit_end, chunk, split;
    if (is_varlen(params_)) {
      // One kv head and one split of a sequence, from the plan's list (heaviest first); no chunks.
      const SequenceSplit& entry = plan_.sequence_splits[task / params_.heads_kv];
      p_ = sequence_view<T>(params_, entry.sequence);
      unit_begin = task % params_.heads_kv;  // in the view's batch 0
      unit_end = unit_begin + 1;
      chunk = 0;
      split = entry.kv_split;
    } else {
      chunk = task / plan_.kv_splits;
      split = task % plan_.kv_splits;
      unit_begin = chunk * plan_.units_per_chunk;
      unit_end = std::min(p_.batch * p_.heads_kv, unit_begin + plan_.units_per_chunk);
    }
    for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
      for (int64_t j0 = split * kN; j0 < p_.seqlen_k; j0 += plan_.kv_splits * kN) {
        run_kv_block(unit / p_.heads_kv, unit % p_.heads_kv, j0, chunk, split);
      }
    }
  }

 private:
  struct Scratch {
    acc_t* dk_acc;       // (kN, D_padded)
    acc_t* dv_acc;       // (kN, D_padded)
    acc_t* probs;        // (kM, kN): P, then P * dropout
    acc_t* dscores;      // (kM, kN): dP, then dS
    acc_t* key_flags;    // (kN)
    acc_t* lse_rows;     // (kM): lse, +inf for rows with no visible key
    acc_t* delta_rows;   // (kM)
    acc_t* softcap_slope;  // (kM, kN): 1 - tanh^2 of the capped scores, d score / d s
    acc_t* key_index;    // (kN): 0, 1, ..., kN - 1, ALiBi's distances per lane
    int64_t d_padded;

    void carve(ScratchCarver& c, int64_t head_dim) {
      d_padded = (head_dim + W - 1) / W * W;
      dk_acc = c.take<acc_t>(kN * d_padded);
      dv_acc = c.take<acc_t>(kN * d_padded);
      probs = c.take<acc_t>(kM * kN);
      dscores = c.take<acc_t>(kM * kN);
      key_flags = c.take<acc_t>(kN);
      lse_rows = c.take<acc_t>(kM);
      delta_rows = c.take<acc_t>(kM);
      softcap_slope = c.take<acc_t>(kM * kN);
      key_index = c.take<acc_t>(kN);
    }
  };

  static constexpr acc_t neg_inf() { return -std::numeric_limits<acc_t>::infinity(); }

  void carve(ScratchCarver& carver) {
    s_.carve(carver, p_.head_dim);
    products_.carve(carver, p_.head_dim);
  }

  void run_kv_block(int64_t b, int64_t kv_head, int64_t j0, int64_t chunk, int64_t split) {
    const int64_t cols = std::min(kN, p_.seqlen_k - j0);
    const T* k = static_cast<const T*>(p_.k) + b * p_.k_batch_stride + kv_head * p_.k_head_stride +
                 j0 * p_.k_row_stride;
    const T* v = static_cast<const T*>(p_.v) + b * p_.v_batch_stride + kv_head * p_.v_head_stride +
                 j0 * p_.v_row_stride;
    std::fill(s_.dk_acc, s_.dk_acc + kN * s_.d_padded, acc_t(0));
    std::fill(s_.dv_acc, s_.dv_acc + kN * s_.d_padded, acc_t(0));

    // The query rows that have some key of the block in their band.
    const IndexRange band_rows = band_rows_of_keys(p_, j0, cols);
    bool any_visible = band_rows.begin < band_rows.end;
    if (any_visible && p_.key_mask != nullptr) {
      const uint8_t* mask_row = p_.key_mask + b * p_.key_mask_batch_stride;
      any_visible = load_key_flags<V>(s_.key_flags, mask_row, p_.key_mask_col_stride, j0, cols) > 0;
    }
    // The tiles computed: query rows [first_tile_row, tile_row_end), whole kM blocks.
    const int64_t first_tile_row = any_visible ? band_rows.begin / kM * kM : p_.seqlen_q;
    const int64_t tile_row_end = any_visible ? std::min(p_.seqlen_q, ceil_div(band_rows.end, kM) * kM) : p_.seqlen_q;
    const int64_t group = p_.heads_q / p_.heads_kv;
    if (p_.dbias != nullptr && plan_.dbias_store_direct) {
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        zero_dbias_rows(b, h, 0, first_tile_row, j0, cols);
        zero_dbias_rows(b, h, tile_row_end, p_.seqlen_q, j0, cols);
      }
    }
    if (any_visible) {
      products_.load_key_block(k, p_.k_row_stride, v, p_.v_row_stride, cols,
                               static_cast<acc_t>(plan_.scales.scale));
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        for (int64_t i0 = first_tile_row; i0 < tile_row_end; i0 += kM) run_tile(b, h, i0, j0, cols, chunk, split);
      }
    }
    store_key_gradients(b, kv_head, j0, cols);
  }

  // Direct dbias stores: rows [row_begin, row_end) of key columns [j0, j0 + cols), which no tile computes.
  void zero_dbias_rows(int64_t b, int64_t h, int64_t row_begin, int64_t row_end, int64_t j0, int64_t cols) {
    acc_t* base = static_cast<acc_t*>(p_.dbias) + ((b * p_.dbias_heads + h) * p_.dbias_rows) * p_.dbias_cols + j0;
    for (int64_t i = row_begin; i < row_end; ++i) {
      std::fill(base + i * p_.dbias_cols, base + i * p_.dbias_cols + cols, acc_t(0));
    }
  }

  void run_tile(int64_t b, int64_t h, int64_t i0, int64_t j0, int64_t cols, int64_t chunk, int64_t split) {
    const int64_t rows = std::min(kM, p_.seqlen_q - i0);
    const int col_vectors = static_cast<int>((cols + W - 1) / W);
    const T* q = static_cast<const T*>(p_.q) + b * p_.q_batch_stride + h * p_.q_head_stride + i0 * p_.q_row_stride;
    const T* grad = static_cast<const T*>(p_.grad_out) + b * p_.grad_out_batch_stride +
                    h * p_.grad_out_head_stride + i0 * p_.grad_out_row_stride;
    products_.load_query_block(q, p_.q_row_stride, grad, p_.grad_out_row_stride, rows);
    const acc_t* lse = static_cast<const acc_t*>(p_.lse) + lse_index(p_, b, h, i0);
    const acc_t* delta = static_cast<const acc_t*>(p_.delta) + lse_index(p_, b, h, i0);
    for (int64_t m = 0; m < rows; ++m) {
      // exp(S - (+inf)) = 0: rows with no visible key get P = 0 and zero gradients.
      s_.lse_rows[m] = lse[m] == neg_inf() ? std::numeric_limits<acc_t>::infinity() : lse[m];
      s_.delta_rows[m] = delta[m];
    }

    products_.scores(s_.probs, col_vectors * W);  // S (rows x cols)
    const bool softcap = plan_.scales.softcap > 0.0;
    if (softcap) apply_softcap(rows, col_vectors);
    if (p_.bias != nullptr) add_bias(b, h, i0, rows, j0, cols);
    if (p_.alibi_slopes != nullptr) add_alibi(b, h, i0, rows, j0, col_vectors);
    compute_probs(i0, j0, rows, cols, col_vectors);
    products_.dprobs(s_.dscores, col_vectors * W);  // dP (rows x cols)
    compute_dscores(b, h, i0, j0, rows, col_vectors);
    if (p_.dbias != nullptr) accumulate_dbias(b, h, i0, rows, j0, cols, chunk, split);
    if (softcap) apply_softcap_slope(rows, col_vectors);
    // The accumulator's rows are the packed problem's (p_.dq is moved to a sequence, plan_.dq_accum is not).
    acc_t* dq = static_cast<acc_t*>(plan_.dq_accum) + split * plan_.dq_accum_split_stride +
                b * plan_.dq_accum_batch_stride + h * plan_.dq_accum_head_stride +
                (p_.packed_offset_q + i0) * plan_.dq_accum_row_stride;
    products_.accumulate_gradients(s_.probs, s_.dscores, cols, s_.dk_acc, s_.dv_acc, s_.d_padded, dq,
                                   plan_.dq_accum_row_stride);
  }

  // S = c t with t = tanh(S / c), and softcap_slope = 1 - t^2 for the backward through it.
  void apply_softcap(int64_t rows, int col_vectors) {
    const V cap = V::broadcast(static_cast<acc_t>(plan_.scales.softcap));
    const V inverse_cap = V::broadcast(static_cast<acc_t>(1.0 / plan_.scales.softcap));
    const V one = V::broadcast(acc_t(1));
    for (int64_t m = 0; m < rows; ++m) {
      acc_t* s = s_.probs + m * kN;
      acc_t* slope = s_.softcap_slope + m * kN;
      for (int nv = 0; nv < col_vectors; ++nv) {
        const V t = (V::load(s + nv * W) * inverse_cap).tanh();
        (cap * t).store(s + nv * W);
        (one - t * t).store(slope + nv * W);
      }
    }
  }

  // dS *= 1 - t^2: the gradient of the scaled product under the cap (dbias has taken dS itself).
  void apply_softcap_slope(int64_t rows, int col_vectors) {
    for (int64_t m = 0; m < rows; ++m) {
      acc_t* ds = s_.dscores + m * kN;
      const acc_t* slope = s_.softcap_slope + m * kN;
      for (int nv = 0; nv < col_vectors; ++nv) (V::load(ds + nv * W) * V::load(slope + nv * W)).store(ds + nv * W);
    }
  }

  // S[m][n] -= slope * |i0 + m + Sk - Sq - (j0 + n)|
  void add_alibi(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int col_vectors) {
    const V minus_slope = V::broadcast(-static_cast<acc_t>(p_.alibi_slopes[b * p_.alibi_batch_stride + h]));
    for (int64_t m = 0; m < rows; ++m) {
      // Distance of lane n: |n - query_diagonal| (exact in acc_t: integers below 2^24).
      const V query_diagonal = V::broadcast(static_cast<acc_t>(i0 + m + (p_.seqlen_k - p_.seqlen_q) - j0));
      acc_t* s = s_.probs + m * kN;
      for (int nv = 0; nv < col_vectors; ++nv) {
        const V signed_distance = V::load(s_.key_index + nv * W) - query_diagonal;
        const V distance = V::max(signed_distance, V::zero() - signed_distance);
        V::fma(distance, minus_slope, V::load(s + nv * W)).store(s + nv * W);
      }
    }
  }

  // S[m][n] += bias(b, h, i0 + m, j0 + n)
  void add_bias(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    if (p_.bias_is_fp32) {
      add_bias_typed(static_cast<const float*>(p_.bias), b, h, i0, rows, j0, cols);
    } else {
      add_bias_typed(static_cast<const T*>(p_.bias), b, h, i0, rows, j0, cols);
    }
  }

  template <class B>
  void add_bias_typed(const B* bias, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    const B* base = bias + b * p_.bias_batch_stride + h * p_.bias_head_stride + i0 * p_.bias_row_stride +
                    j0 * p_.bias_col_stride;
    if (p_.bias_row_stride != 0 && p_.bias_col_stride == 1 && i0 + kM < p_.seqlen_q) {
      // The next query block's rows of this key block, during this tile's softmax.
      const int64_t next_rows = std::min(kM, p_.seqlen_q - i0 - kM);
      bias_prefetch_.start(base + kM * p_.bias_row_stride, p_.bias_row_stride * sizeof(B), next_rows,
                           cols * sizeof(B));
    }
    for (int64_t m = 0; m < rows; ++m) {
      const B* src = base + m * p_.bias_row_stride;
      acc_t* s = s_.probs + m * kN;
      if (p_.bias_col_stride == 1) {
        for (int64_t n = 0; n < cols; n += W) {
          const int count = static_cast<int>(std::min<int64_t>(W, cols - n));
          (V::load(s + n) + V::load_first(src + n, count)).store(s + n);
        }
      } else {
        for (int64_t n = 0; n < cols; ++n) s[n] += static_cast<acc_t>(to_float(src[n * p_.bias_col_stride]));
      }
    }
  }

  // P = exp(S - lse) with masked scores (key mask, outside the band, padding
  // past the block's last key) set to -inf first, so they give exactly 0.
  void compute_probs(int64_t i0, int64_t j0, int64_t rows, int64_t cols, int col_vectors) {
    for (int64_t m = 0; m < rows; ++m) {
      // Columns [visible_begin, visible_end) are in row i0 + m's band.
      int64_t visible_begin = 0, visible_end = cols;
      if (band_bounds_left(p_)) visible_begin = std::clamp<int64_t>(i0 + m + band_first_key_offset(p_) - j0, 0, cols);
      if (band_bounds_right(p_)) visible_end = std::clamp<int64_t>(i0 + m + band_last_key_offset(p_) - j0 + 1, 0, cols);
      const V lse = V::broadcast(s_.lse_rows[m]);
      acc_t* s = s_.probs + m * kN;
      for (int nv = 0; nv < col_vectors; ++nv) {
        V x = V::load(s + nv * W);
        if (p_.key_mask != nullptr) x = x.replace_where_zero(V::load(s_.key_flags + nv * W), neg_inf());
        if (visible_begin > nv * W) {
          x = x.replace_lanes_below(static_cast<int>(std::min<int64_t>(visible_begin - nv * W, W)), neg_inf());
        }
        if (visible_end < (nv + 1) * W) {
          x = x.replace_lanes_from(static_cast<int>(std::max<int64_t>(visible_end - nv * W, 0)), neg_inf());
        }
        (x - lse).exp().store(s + nv * W);
        bias_prefetch_.step();
      }
    }
    bias_prefetch_.finish();
  }

  // dS = P * (dP * Z - delta) and then P *= Z, where Z = keep / (1 - p) is the
  // dropout multiplier (1 without dropout): dV needs the dropped P, dS the plain one.
  void compute_dscores(int64_t b, int64_t h, int64_t i0, int64_t j0, int64_t rows, int col_vectors) {
    const bool dropout = p_.dropout_seed != nullptr;
    const uint64_t seed = dropout ? static_cast<uint64_t>(*p_.dropout_seed) : 0;
    for (int64_t m = 0; m < rows; ++m) {
      const V delta = V::broadcast(s_.delta_rows[m]);
      acc_t* prob_row = s_.probs + m * kN;
      acc_t* ds_row = s_.dscores + m * kN;
      const uint64_t row_index = dropout_index(p_, b, h, i0 + m, j0);
      for (int nv = 0; nv < col_vectors; ++nv) {
        const V prob = V::load(prob_row + nv * W);
        V dprob = V::load(ds_row + nv * W);
        if (dropout) {
          const V keep = V::dropout_multiplier(seed, row_index + nv * W, 1, p_.dropout_keep_threshold,
                                               static_cast<acc_t>(plan_.scales.dropout_keep_scale));
          dprob = dprob * keep;
          (prob * keep).store(prob_row + nv * W);
        }
        (prob * (dprob - delta)).store(ds_row + nv * W);
      }
    }
  }

  // Adds dS of this tile into the task's dbias partial sum, summed over the
  // dims along which the bias is broadcast (in a fixed order: deterministic).
  void accumulate_dbias(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols, int64_t chunk,
                        int64_t split) {
    const int64_t bias_rows = p_.dbias_rows, bias_cols = p_.dbias_cols;
    int64_t partial = plan_.dbias_partial_per_chunk ? chunk : 0;
    if (plan_.dbias_partial_per_kv_split) partial = partial * plan_.kv_splits + split;
    const int64_t bb = p_.dbias_batch == 1 ? 0 : b;
    const int64_t hb = p_.dbias_heads == 1 ? 0 : h;
    acc_t* base = static_cast<acc_t*>(p_.dbias) +
                  ((partial * p_.dbias_batch + bb) * p_.dbias_heads + hb) * bias_rows * bias_cols;
    const int64_t col_vectors = (cols + W - 1) / W;
    auto ds_vector = [&](int64_t m, int64_t nv) {
      const V ds = V::load(s_.dscores + m * kN + nv * W);
      return (nv + 1) * W <= cols ? ds : ds.replace_lanes_from(static_cast<int>(cols - nv * W), acc_t(0));
    };
    if (plan_.dbias_store_direct) {
      // dbias is written once and not read here, so the cache lines a tile row covers whole go
      // around the cache (non-temporal stores: no read for ownership), every vector of such a
      // line so; the lines it shares with a neighbouring tile take ordinary stores. Lines written
      // both ways (an AVX2 vector is half a line) made a forward+backward with a (1, 8, 1024,
      // 1024) trainable bias 2.6x slower on a Zen 3 (AVX2).
      constexpr uintptr_t kLineBytes = 64;
      constexpr uintptr_t kVectorBytes = W * sizeof(acc_t);
      for (int64_t m = 0; m < rows; ++m) {
        acc_t* dst = base + (i0 + m) * bias_cols + j0;
        const uintptr_t row_begin = reinterpret_cast<uintptr_t>(dst);
        const uintptr_t row_end = reinterpret_cast<uintptr_t>(dst + cols);
        for (int64_t nv = 0; nv < col_vectors; ++nv) {
          const int count = static_cast<int>(std::min<int64_t>(W, cols - nv * W));
          const uintptr_t at = reinterpret_cast<uintptr_t>(dst + nv * W);
          const uintptr_t line = at / kLineBytes * kLineBytes;
          if (count == W && at % kVectorBytes == 0 && line >= row_begin && line + kLineBytes <= row_end) {
            ds_vector(m, nv).store_streaming(dst + nv * W);
          } else {
            ds_vector(m, nv).store_first(dst + nv * W, count);
          }
        }
      }
      return;
    }
    if (bias_cols > 1) {
      if (bias_rows > 1) {
        for (int64_t m = 0; m < rows; ++m) {
          acc_t* dst = base + (i0 + m) * bias_cols + j0;
          for (int64_t nv = 0; nv < col_vectors; ++nv) {
            const int count = static_cast<int>(std::min<int64_t>(W, cols - nv * W));
            (V::load_first(dst + nv * W, count) + ds_vector(m, nv)).store_first(dst + nv * W, count);
          }
        }
      } else {
        for (int64_t nv = 0; nv < col_vectors; ++nv) {
          V column_sum = V::zero();
          for (int64_t m = 0; m < rows; ++m) column_sum = column_sum + ds_vector(m, nv);
          const int count = static_cast<int>(std::min<int64_t>(W, cols - nv * W));
          acc_t* dst = base + j0 + nv * W;
          (V::load_first(dst, count) + column_sum).store_first(dst, count);
        }
      }
      return;
    }
    acc_t total = 0;
    for (int64_t m = 0; m < rows; ++m) {
      V row_sum = V::zero();
      for (int64_t nv = 0; nv < col_vectors; ++nv) row_sum = row_sum + ds_vector(m, nv);
      if (bias_rows > 1) {
        base[i0 + m] += row_sum.reduce_add();
      } else {
        total += row_sum.reduce_add();
      }
    }
    if (bias_rows == 1) base[0] += total;
  }

  void store_key_gradients(int64_t b, int64_t kv_head, int64_t j0, int64_t cols) {
    T* dk = static_cast<T*>(p_.dk) + b * p_.dk_batch_stride + kv_head * p_.dk_head_stride + j0 * p_.dk_row_stride;
    T* dv = static_cast<T*>(p_.dv) + b * p_.dv_batch_stride + kv_head * p_.dv_head_stride + j0 * p_.dv_row_stride;
    const V scale = V::broadcast(Products::kKeyGradientScaled ? acc_t(1) : static_cast<acc_t>(plan_.scales.scale));
    const int64_t head_dim = p_.head_dim;
    for (int64_t n = 0; n < cols; ++n) {
      const acc_t* dk_src = s_.dk_acc + n * s_.d_padded;
      const acc_t* dv_src = s_.dv_acc + n * s_.d_padded;
      for (int64_t d = 0; d < head_dim; d += W) {
        const int count = static_cast<int>(std::min<int64_t>(W, head_dim - d));
        (V::load(dk_src + d) * scale).store_first(dk + n * p_.dk_row_stride + d, count);
        V::load(dv_src + d).store_first(dv + n * p_.dv_row_stride + d, count);
      }
    }
  }

  const AttentionBackwardParams& params_;  // the call's problem
  const BackwardPlan& plan_;
  AttentionBackwardParams p_;  // the task's problem: params_, or one sequence of it (varlen)
  Scratch s_;
  Products products_;
  LinePrefetcher bias_prefetch_;  // the next query block's bias tile
  CarvedScratch scratch_{[this](ScratchCarver& carver) { carve(carver); }};  // last: holds the arrays above
};

// Runs backward tasks from `counter` until none is left.
template <class V, class T, class Products>
void backward_worker(const AttentionBackwardParams& p, const BackwardPlan& plan, TaskCounter& counter) {
  run_tasks<BackwardKernel<V, T, Products>>(p, plan, counter);
  std::atomic_thread_fence(std::memory_order_seq_cst);  // completes the streaming dbias stores
}

}  // namespace
}  // namespace fast_attn::cpu
