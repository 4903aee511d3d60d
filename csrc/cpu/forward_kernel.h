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
// (forward_products.h, forward_products_bf16.h), which owns the packed operands;
// the tile and its online softmax are score_tile.h's, shared with the decode kernel.
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
#include "score_tile.h"
#include "task_loop.h"
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
  ForwardKernel(const AttentionForwardParams& p, const ForwardPlan& plan) : params_(p), plan_(plan), p_(p) {
    for (int64_t m = 0; m < kM; ++m) tile_.lane_position[m] = static_cast<acc_t>(m);
  }

  // One call of run_block for both kinds of task: a second call site changes GCC's inlining (and
  // with it the FMA contractions, so the rounding) of the whole kernel.
  void run(int64_t task) {
    int64_t b, h, q_block;
    if (is_varlen(params_)) {
      // One query head of a sequence's query block, from the plan's list (plan_sequence_blocks).
      const SequenceBlock& block = plan_.sequence_blocks[task];
      p_ = sequence_view<T>(params_, block.sequence);
      b = 0;
      h = block.head;
      q_block = block.q_block;
    } else {
      // A (batch, head)'s query blocks are handed out together, so its keys and values stay in
      // cache, and heaviest first (the plan says which end sees the most keys).
      const int64_t bh = task / plan_.num_q_blocks;
      const int64_t order = task % plan_.num_q_blocks;
      b = bh / p_.heads_q;
      h = bh % p_.heads_q;
      q_block = plan_.last_query_block_first ? plan_.num_q_blocks - 1 - order : order;
    }
    run_block(b, h, q_block * kM);
  }

 private:
  static constexpr acc_t neg_inf() { return ScoreTile<V>::neg_inf(); }

  void carve(ScratchCarver& carver) {
    tile_.carve(carver, p_.head_dim);
    key_flags_ = carver.take<acc_t>(kN);
    products_.carve(carver, p_.head_dim);
  }

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
    tile_.start(query_vectors, rows);
    if (p_.alibi_slopes != nullptr) {
      const acc_t slope = static_cast<acc_t>(p_.alibi_slopes[b * p_.alibi_batch_stride + h]);
      std::fill(tile_.lane_minus_slope, tile_.lane_minus_slope + kM, -slope);
    }
    const LaneBand band{band_bounds_left(p_), band_bounds_right(p_), band_first_key_offset(p_),
                        band_last_key_offset(p_), i0, 1};

    for (int64_t j0 = keys.begin; j0 < kv_end_; j0 += kN) {
      const int64_t cols = std::min(kN, kv_end_ - j0);
      if (p_.key_mask != nullptr) {
        const uint8_t* mask_row = p_.key_mask + b * p_.key_mask_batch_stride;
        if (load_key_flags<V>(key_flags_, mask_row, p_.key_mask_col_stride, j0, cols) == 0) continue;
      }
      products_.load_key_block(k + j0 * p_.k_row_stride, p_.k_row_stride, v + j0 * p_.v_row_stride,
                               p_.v_row_stride, cols);
      // S^T (cols x queries) = scale * K_block (cols x D) q^T (D x queries)
      products_.scores(tile_.scores_t, cols);
      if (plan_.scales.softcap > 0.0) tile_.apply_softcap(cols, query_vectors, plan_.scales.softcap);
      if (p_.bias != nullptr) add_bias(b, h, i0, rows, j0, cols, query_vectors);
      if (p_.alibi_slopes != nullptr) tile_.add_alibi(cols, query_vectors, j0 - i0 - (p_.seqlen_k - p_.seqlen_q));
      if (p_.key_mask != nullptr) mask_keys(cols, query_vectors);
      tile_.mask_band(band, rows, j0, cols, query_vectors);
      tile_.softmax_update(cols, query_vectors, [this] { bias_prefetch_.step(); });
      bias_prefetch_.finish();
      if (p_.dropout_seed != nullptr) apply_dropout(b, h, i0, j0, cols, query_vectors);
      tile_.rescale_output(rows, query_vectors);
      // out_acc (rows x D) += P (rows x cols) * V_block (cols x D); P is read from P^T.
      products_.accumulate_output(tile_.scores_t, cols, tile_.out_acc, tile_.d_padded);
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
        acc_t* s = tile_.scores_t + n * kM;
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
            acc_t* s = tile_.scores_t + (n0 + c) * kM + m0;
            (V::load(s) + tile[c]).store(s);
          }
        }
      }
      return;
    }
    for (int64_t n = 0; n < cols; ++n) {
      for (int64_t m = 0; m < rows; ++m) {
        tile_.scores_t[n * kM + m] += static_cast<acc_t>(to_float(base[m * row_stride + n * col_stride]));
      }
    }
  }

  // Scores of keys the key mask hides become -inf.
  void mask_keys(int64_t cols, int query_vectors) {
    const V masked = V::broadcast(neg_inf());
    for (int64_t n = 0; n < cols; ++n) {
      if (key_flags_[n] != acc_t(0)) continue;
      for (int mv = 0; mv < query_vectors; ++mv) masked.store(tile_.scores_t + n * kM + mv * W);
    }
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
        acc_t* s = tile_.scores_t + n * kM + mv * W;
        (V::load(s) * keep).store(s);
      }
    }
  }

  // out = out_acc / sum and lse = max + log(sum) (score_tile.h's finish_lane).
  void store_outputs(int64_t b, int64_t h, int64_t i0, int64_t rows) {
    T* out = static_cast<T*>(p_.out) + b * p_.out_batch_stride + h * p_.out_head_stride + i0 * p_.out_row_stride;
    acc_t* lse = static_cast<acc_t*>(p_.lse) + lse_index(p_, b, h, i0);
    for (int64_t m = 0; m < rows; ++m) lse[m] = tile_.finish_lane(m, out + m * p_.out_row_stride, p_.head_dim);
  }

  const AttentionForwardParams& params_;  // the call's problem
  const ForwardPlan& plan_;
  AttentionForwardParams p_;  // the task's problem: params_, or one sequence of it (varlen)
  int64_t kv_end_ = 0;  // the current query block's keys end here (the band's right edge)
  ScoreTile<V> tile_;
  acc_t* key_flags_;  // (kN): 1 = key visible (key mask)
  Products products_;
  LinePrefetcher bias_prefetch_;  // the next key block's bias tile
  CarvedScratch scratch_{[this](ScratchCarver& carver) { carve(carver); }};  // last: holds the arrays above
};

// Runs forward tasks from `counter` until none is left.
template <class V, class T, class Products>
void forward_worker(const AttentionForwardParams& p, const ForwardPlan& plan, TaskCounter& counter) {
  run_tasks<ForwardKernel<V, T, Products>>(p, plan, counter);
}

}  // namespace
}  // namespace fast_attn::cpu
