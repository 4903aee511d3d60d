// Fused attention forward on the CPU: one task = one (batch, query head,
// block of kBlockM query rows); online softmax over blocks of kBlockN keys.
// Varlen problems run each sequence as a problem of batch 1 (sequence_view).
//
// Scores: scale q.k, then softcap, bias, ALiBi, then the masks (key mask and
// the band's edges, only in blocks that cross an edge); key blocks wholly
// outside the band of every row of the query block are never visited.
//
// The score tile is kept transposed, S^T (keys x queries): it is computed as
// K (keys x D) times q^T (D x queries), so only the task's own q block is
// transposed (once), keys are read in place, and the per-query softmax
// statistics (running max, running sum) are plain vectors across queries.
// The two matrix products (S^T and P V) come from a products policy
// (forward_products.h, forward_products_bf16.h), which owns the packed operands.
// Memory per task: the policy's packed q and key/value blocks, S^T and the
// output accumulator: O(kBlockM * D + kBlockM * kBlockN), never O(S^2).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "aligned_buffer.h"
#include "attention_params.h"
#include "cpu_kernels.h"
#include "tile_ops.h"

namespace fast_attn::cpu {
namespace {

template <class V, class T, class Products>
class ForwardKernel {
  using acc_t = typename V::value_type;
  static constexpr int W = V::kWidth;
  static constexpr int64_t kM = kBlockM;
  static constexpr int64_t kN = kBlockN;

 public:
  static size_t scratch_bytes(const AttentionForwardParams& p) {
    ScratchCarver carver(nullptr);
    Scratch s;
    s.carve(carver, p.head_dim);
    Products products;
    products.carve(carver, p.head_dim);
    return carver.bytes();
  }

  ForwardKernel(const AttentionForwardParams& p, const ForwardPlan& plan, unsigned char* scratch)
      : params_(p), plan_(plan), p_(p) {
    ScratchCarver carver(scratch);
    s_.carve(carver, p.head_dim);
    products_.carve(carver, p.head_dim);
    for (int64_t m = 0; m < kM; ++m) s_.query_index[m] = static_cast<acc_t>(m);
  }

  // One call of run_block for both kinds of task: a second call site changes GCC's inlining (and
  // with it the FMA contractions, so the rounding) of the whole kernel.
  void run(int64_t task) {
    int64_t b, h, q_block;
    if (is_varlen(params_)) {
      // One query head of a sequence's query block, from the plan's list (heaviest first).
      const SequenceBlock& block = plan_.sequence_blocks[task / params_.heads_q];
      p_ = sequence_view<T>(params_, block.sequence);
      b = 0;
      h = task % params_.heads_q;
      q_block = block.q_block;
    } else {
      const int64_t batch_heads = p_.batch * p_.heads_q;
      const int64_t bh = task % batch_heads;
      // Tasks are handed out heaviest query blocks first (the plan says which
      // end sees the most keys), so the long tasks start early (balanced finish).
      const int64_t order = task / batch_heads;
      b = bh / p_.heads_q;
      h = bh % p_.heads_q;
      q_block = plan_.last_query_block_first ? plan_.num_q_blocks - 1 - order : order;
    }
    run_block(b, h, q_block * kM);
  }

 private:
  struct Scratch {
    acc_t* scores_t;   // (kN, kM): S^T, then P^T
    acc_t* out_acc;    // (kM, D_padded): unnormalized output
    acc_t* key_flags;  // (kN): 1 = key visible
    acc_t* row_max;    // (kM)
    acc_t* row_sum;    // (kM)
    acc_t* alpha;      // (kM): rescale factor of this key block
    acc_t* query_index;  // (kM): 0, 1, ..., kM - 1, ALiBi's distances per lane
    int64_t d_padded;

    void carve(ScratchCarver& c, int64_t head_dim) {
      d_padded = (head_dim + W - 1) / W * W;
      scores_t = c.take<acc_t>(kN * kM);
      out_acc = c.take<acc_t>(kM * d_padded);
      key_flags = c.take<acc_t>(kN);
      row_max = c.take<acc_t>(kM);
      row_sum = c.take<acc_t>(kM);
      alpha = c.take<acc_t>(kM);
      query_index = c.take<acc_t>(kM);
    }
  };

  static constexpr acc_t neg_inf() { return -std::numeric_limits<acc_t>::infinity(); }

  void run_block(int64_t b, int64_t h, int64_t i0) {
    const int64_t rows = std::min(kM, p_.seqlen_q - i0);
    const int query_vectors = static_cast<int>((rows + W - 1) / W);
    const int64_t kv_head = h / (p_.heads_q / p_.heads_kv);
    const T* q = static_cast<const T*>(p_.q) + b * p_.q_batch_stride + h * p_.q_head_stride + i0 * p_.q_row_stride;
    const T* k = static_cast<const T*>(p_.k) + b * p_.k_batch_stride + kv_head * p_.k_head_stride;
    const T* v = static_cast<const T*>(p_.v) + b * p_.v_batch_stride + kv_head * p_.v_head_stride;

    // Keys [keys.begin, kv_end_) are in the band of some row of the block.
    const IndexRange keys = band_keys_of_rows(p_, i0, rows);
    kv_end_ = keys.end;

    products_.load_query_block(q, p_.q_row_stride, rows, query_vectors, static_cast<acc_t>(plan_.scales.scale));
    std::fill(s_.out_acc, s_.out_acc + kM * s_.d_padded, acc_t(0));
    for (int mv = 0; mv < query_vectors; ++mv) {
      V::broadcast(neg_inf()).store(s_.row_max + mv * W);
      V::zero().store(s_.row_sum + mv * W);
    }

    for (int64_t j0 = keys.begin; j0 < kv_end_; j0 += kN) {
      const int64_t cols = std::min(kN, kv_end_ - j0);
      if (p_.key_mask != nullptr) {
        const uint8_t* mask_row = p_.key_mask + b * p_.key_mask_batch_stride;
        if (load_key_flags<V>(s_.key_flags, mask_row, p_.key_mask_col_stride, j0, cols) == 0) continue;
      }
      products_.load_key_block(k + j0 * p_.k_row_stride, p_.k_row_stride, v + j0 * p_.v_row_stride,
                               p_.v_row_stride, cols);
      // S^T (cols x queries) = scale * K_block (cols x D) q^T (D x queries)
      products_.scores(s_.scores_t, cols);
      if (plan_.scales.softcap > 0.0) apply_softcap(cols, query_vectors);
      if (p_.bias != nullptr) add_bias(b, h, i0, rows, j0, cols, query_vectors);
      if (p_.alibi_slopes != nullptr) add_alibi(b, h, i0, j0, cols, query_vectors);
      apply_masks(i0, rows, j0, cols, query_vectors);
      softmax_update(cols, query_vectors);
      if (p_.dropout_seed != nullptr) apply_dropout(b, h, i0, j0, cols, query_vectors);
      rescale_output(rows, query_vectors);
      // out_acc (rows x D) += P (rows x cols) * V_block (cols x D); P is read from P^T.
      products_.accumulate_output(s_.scores_t, cols, s_.out_acc, s_.d_padded);
    }
    store_outputs(b, h, i0, rows);
  }

  // S^T[n][m] += bias(b, h, i0 + m, j0 + n)
  void add_bias(int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols, int query_vectors) {
    if (p_.bias_is_fp32) {
      add_bias_typed(static_cast<const float*>(p_.bias), b, h, i0, rows, j0, cols, query_vectors);
    } else {
      add_bias_typed(static_cast<const T*>(p_.bias), b, h, i0, rows, j0, cols, query_vectors);
    }
  }

  template <class B>
  void add_bias_typed(const B* bias, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                      int query_vectors) {
    const B* base = bias + b * p_.bias_batch_stride + h * p_.bias_head_stride + i0 * p_.bias_row_stride +
                    j0 * p_.bias_col_stride;
    const int64_t row_stride = p_.bias_row_stride;
    const int64_t col_stride = p_.bias_col_stride;
    if (row_stride == 0) {
      // One value per key, the same for every query: a broadcast per S^T row.
      for (int64_t n = 0; n < cols; ++n) {
        const V value = V::broadcast(static_cast<acc_t>(to_float(base[n * col_stride])));
        acc_t* s = s_.scores_t + n * kM;
        for (int mv = 0; mv < query_vectors; ++mv) (V::load(s + mv * W) + value).store(s + mv * W);
      }
      return;
    }
    if (col_stride == 1) {
      if (j0 + kN < kv_end_) {
        // The same query rows in the next key block, during this block's softmax.
        const int64_t next_cols = std::min(kN, kv_end_ - j0 - kN);
        bias_prefetch_.start(base + kN, row_stride * sizeof(B), rows, next_cols * sizeof(B));
      }
      // Keys contiguous: load 16 query rows x 16 keys, transpose in registers, add.
      for (int mv = 0; mv < query_vectors; ++mv) {
        const int64_t m0 = mv * W;
        const int64_t valid_rows = std::min<int64_t>(W, rows - m0);
        for (int64_t n0 = 0; n0 < cols; n0 += W) {
          const int valid_cols = static_cast<int>(std::min<int64_t>(W, cols - n0));
          V tile[W];
          for (int r = 0; r < W; ++r) {
            tile[r] = r < valid_rows ? V::load_first(base + (m0 + r) * row_stride + n0, valid_cols) : V::zero();
          }
          V::transpose(tile);
          for (int c = 0; c < valid_cols; ++c) {
            acc_t* s = s_.scores_t + (n0 + c) * kM + m0;
            (V::load(s) + tile[c]).store(s);
          }
        }
      }
      return;
    }
    for (int64_t n = 0; n < cols; ++n) {
      for (int64_t m = 0; m < rows; ++m) {
        s_.scores_t[n * kM + m] += static_cast<acc_t>(to_float(base[m * row_stride + n * col_stride]));
      }
    }
  }

  // S^T = softcap * tanh(S^T / softcap)
  void apply_softcap(int64_t cols, int query_vectors) {
    const V cap = V::broadcast(static_cast<acc_t>(plan_.scales.softcap));
    const V inverse_cap = V::broadcast(static_cast<acc_t>(1.0 / plan_.scales.softcap));
    for (int64_t n = 0; n < cols; ++n) {
      acc_t* s = s_.scores_t + n * kM;
      for (int mv = 0; mv < query_vectors; ++mv) (cap * (V::load(s + mv * W) * inverse_cap).tanh()).store(s + mv * W);
    }
  }

  // S^T[n][m] -= slope * |i0 + m + Sk - Sq - (j0 + n)|
  void add_alibi(int64_t b, int64_t h, int64_t i0, int64_t j0, int64_t cols, int query_vectors) {
    const V minus_slope = V::broadcast(-static_cast<acc_t>(p_.alibi_slopes[b * p_.alibi_batch_stride + h]));
    for (int64_t n = 0; n < cols; ++n) {
      // Distance of lane m: |m - key_diagonal| (exact in acc_t: integers below 2^24).
      const V key_diagonal = V::broadcast(static_cast<acc_t>(j0 + n - i0 - (p_.seqlen_k - p_.seqlen_q)));
      acc_t* s = s_.scores_t + n * kM;
      for (int mv = 0; mv < query_vectors; ++mv) {
        const V signed_distance = V::load(s_.query_index + mv * W) - key_diagonal;
        const V distance = V::max(signed_distance, V::zero() - signed_distance);
        V::fma(distance, minus_slope, V::load(s + mv * W)).store(s + mv * W);
      }
    }
  }

  // Masked scores become -inf: keys the key mask hides, and keys outside the
  // band (only blocks that cross one of its edges need it).
  void apply_masks(int64_t i0, int64_t rows, int64_t j0, int64_t cols, int query_vectors) {
    if (p_.key_mask != nullptr) {
      const V masked = V::broadcast(neg_inf());
      for (int64_t n = 0; n < cols; ++n) {
        if (s_.key_flags[n] != acc_t(0)) continue;
        for (int mv = 0; mv < query_vectors; ++mv) masked.store(s_.scores_t + n * kM + mv * W);
      }
    }
    if (band_bounds_right(p_) && j0 + cols - 1 > i0 + band_last_key_offset(p_)) {
      for (int64_t n = 0; n < cols; ++n) {
        // Query m sees key j0 + n only if m >= j0 + n - last_key_offset - i0.
        const int64_t hidden = j0 + n - band_last_key_offset(p_) - i0;
        if (hidden <= 0) continue;
        acc_t* s = s_.scores_t + n * kM;
        for (int mv = 0; mv < query_vectors && hidden > mv * W; ++mv) {
          V::load(s + mv * W)
              .replace_lanes_below(static_cast<int>(std::min<int64_t>(hidden - mv * W, W)), neg_inf())
              .store(s + mv * W);
        }
      }
    }
    if (band_bounds_left(p_) && j0 < i0 + rows - 1 + band_first_key_offset(p_)) {
      for (int64_t n = 0; n < cols; ++n) {
        // Query m sees key j0 + n only if m < visible_end = j0 + n - first_key_offset - i0 + 1.
        const int64_t visible_end = j0 + n - band_first_key_offset(p_) - i0 + 1;
        if (visible_end >= rows) continue;
        acc_t* s = s_.scores_t + n * kM;
        for (int mv = static_cast<int>(std::max<int64_t>(visible_end, 0) / W); mv < query_vectors; ++mv) {
          V::load(s + mv * W)
              .replace_lanes_from(static_cast<int>(std::max<int64_t>(visible_end - mv * W, 0)), neg_inf())
              .store(s + mv * W);
        }
      }
    }
  }

  // Online softmax across key blocks, one lane per query: new running max,
  // P^T = exp(S^T - max), running sum rescaled by alpha = exp(old - new max).
  // A max of -inf (nothing visible yet) is replaced by 0 so exp gives 0, not NaN.
  void softmax_update(int64_t cols, int query_vectors) {
    for (int mv = 0; mv < query_vectors; ++mv) {
      acc_t* s = s_.scores_t + mv * W;
      V block_max = V::broadcast(neg_inf());
      for (int64_t n = 0; n < cols; ++n) block_max = V::max(block_max, V::load(s + n * kM));
      const V old_max = V::load(s_.row_max + mv * W);
      const V new_max = V::max(old_max, block_max);
      const V shift = new_max.replace_neg_inf(acc_t(0));
      const V alpha = (old_max - shift).exp();
      V sum = V::zero();
      for (int64_t n = 0; n < cols; ++n) {
        const V prob = (V::load(s + n * kM) - shift).exp();
        prob.store(s + n * kM);
        sum = sum + prob;
        bias_prefetch_.step();
      }
      V::fma(V::load(s_.row_sum + mv * W), alpha, sum).store(s_.row_sum + mv * W);
      new_max.store(s_.row_max + mv * W);
      alpha.store(s_.alpha + mv * W);
    }
    bias_prefetch_.finish();
  }

  // After the sums (lse is of the pre-dropout scores): P^T *= keep / (1 - p).
  // Lane m of query vector mv is row i0 + mv * W + m: its dropout index is m * packed_seqlen_k past lane 0's.
  void apply_dropout(int64_t b, int64_t h, int64_t i0, int64_t j0, int64_t cols, int query_vectors) {
    const uint64_t seed = static_cast<uint64_t>(*p_.dropout_seed);
    for (int64_t n = 0; n < cols; ++n) {
      for (int mv = 0; mv < query_vectors; ++mv) {
        const uint64_t first = dropout_index(p_, b, h, i0 + mv * W, j0 + n);
        const V keep = V::dropout_multiplier(seed, first, p_.packed_seqlen_k, p_.dropout_keep_threshold,
                                             static_cast<acc_t>(plan_.scales.dropout_keep_scale));
        acc_t* s = s_.scores_t + n * kM + mv * W;
        (V::load(s) * keep).store(s);
      }
    }
  }

  void rescale_output(int64_t rows, int query_vectors) {
    bool unchanged = true;
    for (int mv = 0; mv < query_vectors; ++mv) unchanged &= V::load(s_.alpha + mv * W).all_equal(acc_t(1));
    if (unchanged) return;
    for (int64_t m = 0; m < rows; ++m) {
      const V factor = V::broadcast(s_.alpha[m]);
      acc_t* o = s_.out_acc + m * s_.d_padded;
      for (int64_t d = 0; d < s_.d_padded; d += W) (V::load(o + d) * factor).store(o + d);
    }
  }

  // out = out_acc / sum and lse = max + log(sum); a row that saw no visible key
  // (sum == 0) gets 0 and -inf. A NaN sum propagates.
  void store_outputs(int64_t b, int64_t h, int64_t i0, int64_t rows) {
    T* out = static_cast<T*>(p_.out) + b * p_.out_batch_stride + h * p_.out_head_stride + i0 * p_.out_row_stride;
    acc_t* lse = static_cast<acc_t*>(p_.lse) + lse_index(p_, b, h, i0);
    const int64_t head_dim = p_.head_dim;
    for (int64_t m = 0; m < rows; ++m) {
      const acc_t sum = s_.row_sum[m];
      const bool empty = sum == acc_t(0);
      const V inv = V::broadcast(empty ? acc_t(0) : acc_t(1) / sum);
      lse[m] = empty ? neg_inf() : s_.row_max[m] + std::log(sum);
      const acc_t* o = s_.out_acc + m * s_.d_padded;
      T* dst = out + m * p_.out_row_stride;
      int64_t d = 0;
      for (; d + W <= head_dim; d += W) (V::load(o + d) * inv).store(dst + d);
      if (d < head_dim) (V::load(o + d) * inv).store_first(dst + d, static_cast<int>(head_dim - d));
    }
  }

  const AttentionForwardParams& params_;  // the call's problem
  const ForwardPlan& plan_;
  AttentionForwardParams p_;  // the task's problem: params_, or one sequence of it (varlen)
  int64_t kv_end_ = 0;  // the current query block's keys end here (the band's right edge)
  Scratch s_;
  Products products_;
  LinePrefetcher bias_prefetch_;  // the next key block's bias tile
};

// Runs forward tasks from `counter` until none is left, with scratch of its own.
template <class V, class T, class Products>
void forward_worker(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  AlignedBuffer scratch(ForwardKernel<V, T, Products>::scratch_bytes(p));
  ForwardKernel<V, T, Products> kernel(p, plan, scratch.data());
  for (int64_t task = counter.next.fetch_add(1); task < plan.num_tasks; task = counter.next.fetch_add(1)) {
    kernel.run(task);
  }
}

}  // namespace
}  // namespace fast_attn::cpu
