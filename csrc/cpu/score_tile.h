// The score tile of the CPU forward and decode kernels (forward_kernel.h,
// decode_kernel.h) and the online softmax on it.
//
// The tile is S^T (keys x query lanes, row stride kBlockM): lane l of a key's row
// is one query row of the task. In the forward kernel lane l is query i0 + l; in
// the decode kernel it is one of the GQA rows of a kv head, query (m0 + l) / g
// (decode_kernel.h). Per lane, the running max and sum of the online softmax and
// a row of the unnormalized output accumulator.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "aligned_buffer.h"
#include "cpu_kernels.h"

namespace fast_attn::cpu {
namespace {

// The keys the lanes of a tile may see. Lane l is query row i = (lane0 + l) / lanes_per_row
// (the forward: lane0 = i0, one lane per row; decoding: g lanes per row, the GQA heads), and
// query i sees key j iff (!has_first || j >= i + first) && (!has_last || j <= i + last).
struct LaneBand {
  bool has_first;
  bool has_last;
  int64_t first;
  int64_t last;
  int64_t lane0;
  int64_t lanes_per_row;
};

template <class V>
class ScoreTile {
  using acc_t = typename V::value_type;
  static constexpr int W = V::kWidth;
  static constexpr int64_t kM = kBlockM;
  static constexpr int64_t kN = kBlockN;

 public:
  acc_t* scores_t;        // (kN, kM): S^T, then P^T
  acc_t* out_acc;         // (kM, D_padded): unnormalized output
  acc_t* row_max;         // (kM)
  acc_t* row_sum;         // (kM)
  acc_t* alpha;           // (kM): rescale factor of this key block
  acc_t* lane_position;   // (kM): each lane's query row, for ALiBi's distances
  acc_t* lane_minus_slope;  // (kM): -(ALiBi slope) of each lane's head
  int64_t d_padded;

  void carve(ScratchCarver& c, int64_t head_dim) {
    d_padded = (head_dim + W - 1) / W * W;
    scores_t = c.take<acc_t>(kN * kM);
    out_acc = c.take<acc_t>(kM * d_padded);
    row_max = c.take<acc_t>(kM);
    row_sum = c.take<acc_t>(kM);
    alpha = c.take<acc_t>(kM);
    lane_position = c.take<acc_t>(kM);
    lane_minus_slope = c.take<acc_t>(kM);
  }

  static constexpr acc_t neg_inf() { return -std::numeric_limits<acc_t>::infinity(); }

  // Before the first key block of a task's query_vectors * W lanes: nothing seen, output 0.
  // `lanes` of them hold query rows (the others are padding). Only those rows of the output are
  // zeroed: the products, rescale_output and finish_lane touch no other (one query row of a
  // decoding step would otherwise clear W rows, or all kM).
  void start(int query_vectors, int64_t lanes) {
    one_lane_ = lanes == 1;
    std::fill(out_acc, out_acc + lanes * d_padded, acc_t(0));
    for (int mv = 0; mv < query_vectors; ++mv) {
      V::broadcast(neg_inf()).store(row_max + mv * W);
      V::zero().store(row_sum + mv * W);
    }
  }

  // S^T = softcap * tanh(S^T / softcap)
  void apply_softcap(int64_t cols, int query_vectors, double softcap) {
    const V cap = V::broadcast(static_cast<acc_t>(softcap));
    const V inverse_cap = V::broadcast(static_cast<acc_t>(1.0 / softcap));
    for (int64_t n = 0; n < cols; ++n) {
      acc_t* s = scores_t + n * kM;
      for (int mv = 0; mv < query_vectors; ++mv) (cap * (V::load(s + mv * W) * inverse_cap).tanh()).store(s + mv * W);
    }
  }

  // S^T[n][l] += lane_minus_slope[l] * |lane_position[l] - (first_key_diagonal + n)|, where key
  // n's diagonal is its index minus the alignment Sk - Sq (minus i0 in the forward, whose lane
  // positions count from its block's first row). Exact in acc_t: integers below 2^24.
  void add_alibi(int64_t cols, int query_vectors, int64_t first_key_diagonal) {
    for (int64_t n = 0; n < cols; ++n) {
      const V key_diagonal = V::broadcast(static_cast<acc_t>(first_key_diagonal + n));
      acc_t* s = scores_t + n * kM;
      for (int mv = 0; mv < query_vectors; ++mv) {
        const V signed_distance = V::load(lane_position + mv * W) - key_diagonal;
        const V distance = V::max(signed_distance, V::zero() - signed_distance);
        V::fma(distance, V::load(lane_minus_slope + mv * W), V::load(s + mv * W)).store(s + mv * W);
      }
    }
  }

  // Scores of keys j0 .. j0 + cols - 1 outside the band of their lane's row become -inf
  // (only tiles that cross one of the band's edges have any).
  void mask_band(const LaneBand& band, int64_t rows, int64_t j0, int64_t cols, int query_vectors) {
    const int64_t g = band.lanes_per_row;
    if (band.has_last && j0 + cols - 1 > band.lane0 / g + band.last) {
      for (int64_t n = 0; n < cols; ++n) {
        // Lane l sees key j0 + n only if its row is >= j0 + n - last, i.e. l >= hidden.
        const int64_t hidden = (j0 + n - band.last) * g - band.lane0;
        if (hidden <= 0) continue;
        acc_t* s = scores_t + n * kM;
        for (int mv = 0; mv < query_vectors && hidden > mv * W; ++mv) {
          V::load(s + mv * W)
              .replace_lanes_below(static_cast<int>(std::min<int64_t>(hidden - mv * W, W)), neg_inf())
              .store(s + mv * W);
        }
      }
    }
    if (band.has_first && j0 < (band.lane0 + rows - 1) / g + band.first) {
      for (int64_t n = 0; n < cols; ++n) {
        // Lane l sees key j0 + n only if its row is <= j0 + n - first, i.e. l < visible_end.
        const int64_t visible_end = (j0 + n - band.first + 1) * g - band.lane0;
        if (visible_end >= rows) continue;
        acc_t* s = scores_t + n * kM;
        for (int mv = static_cast<int>(std::max<int64_t>(visible_end, 0) / W); mv < query_vectors; ++mv) {
          V::load(s + mv * W)
              .replace_lanes_from(static_cast<int>(std::max<int64_t>(visible_end - mv * W, 0)), neg_inf())
              .store(s + mv * W);
        }
      }
    }
  }

  // Online softmax across key blocks, one lane per query row: new running max,
  // P^T = exp(S^T - max), running sum rescaled by alpha = exp(old - new max).
  // A max of -inf (nothing visible yet) is replaced by 0 so exp gives 0, not NaN.
  // per_key() runs once per key and query vector (the forward spreads prefetches over it).
  template <class PerKey>
  void softmax_update(int64_t cols, int query_vectors, PerKey&& per_key) {
    if (one_lane_) return softmax_update_one_lane(cols, per_key);
    for (int mv = 0; mv < query_vectors; ++mv) {
      acc_t* s = scores_t + mv * W;
      V block_max = V::broadcast(neg_inf());
      for (int64_t n = 0; n < cols; ++n) block_max = V::max(block_max, V::load(s + n * kM));
      const V old_max = V::load(row_max + mv * W);
      const V new_max = V::max(old_max, block_max);
      const V shift = new_max.replace_neg_inf(acc_t(0));
      const V block_alpha = (old_max - shift).exp();
      V sum = V::zero();
      for (int64_t n = 0; n < cols; ++n) {
        const V prob = (V::load(s + n * kM) - shift).exp();
        prob.store(s + n * kM);
        sum = sum + prob;
        per_key();
      }
      V::fma(V::load(row_sum + mv * W), block_alpha, sum).store(row_sum + mv * W);
      new_max.store(row_max + mv * W);
      block_alpha.store(alpha + mv * W);
    }
  }

  // softmax_update of a tile whose one lane holds a query row (a task of one row: decoding without
  // GQA). Its scores, lane 0 of each key's row, are gathered W keys to a vector, so that exp runs
  // once per W keys instead of once per key on W - 1 padding lanes. Every lane of the running max,
  // sum and alpha gets lane 0's value.
  template <class PerKey>
  void softmax_update_one_lane(int64_t cols, PerKey&& per_key) {
    alignas(64) acc_t keys[W];
    auto gather = [&](int64_t n0) {
      for (int i = 0; i < W; ++i) keys[i] = n0 + i < cols ? scores_t[(n0 + i) * kM] : neg_inf();
      return V::load(keys);
    };
    V block_max = V::broadcast(neg_inf());
    for (int64_t n0 = 0; n0 < cols; n0 += W) block_max = V::max(block_max, gather(n0));
    block_max.store(keys);
    const acc_t old_max = row_max[0];
    acc_t new_max = old_max;
    for (int i = 0; i < W; ++i) new_max = std::max(new_max, keys[i]);
    const V shift = V::broadcast(new_max).replace_neg_inf(acc_t(0));
    const V block_alpha = (V::broadcast(old_max) - shift).exp();
    V sum = V::zero();
    for (int64_t n0 = 0; n0 < cols; n0 += W) {
      const V prob = (gather(n0) - shift).exp();
      prob.store(keys);
      for (int i = 0; i < W && n0 + i < cols; ++i) {
        scores_t[(n0 + i) * kM] = keys[i];
        per_key();
      }
      sum = sum + prob;
    }
    V::fma(V::load(row_sum), block_alpha, V::broadcast(sum.reduce_add())).store(row_sum);
    V::broadcast(new_max).store(row_max);
    block_alpha.store(alpha);
  }

  // out_acc's rows *= alpha, unless every alpha is 1.
  void rescale_output(int64_t rows, int query_vectors) {
    bool unchanged = true;
    for (int mv = 0; mv < query_vectors; ++mv) unchanged &= V::load(alpha + mv * W).all_equal(acc_t(1));
    if (unchanged) return;
    for (int64_t m = 0; m < rows; ++m) {
      const V factor = V::broadcast(alpha[m]);
      acc_t* o = out_acc + m * d_padded;
      for (int64_t d = 0; d < d_padded; d += W) (V::load(o + d) * factor).store(o + d);
    }
  }

  // dst (head_dim of Out) = lane m's output out_acc / sum; returns its lse = max + log(sum).
  // A lane that saw no visible key (sum == 0) gets 0 and -inf. A NaN sum propagates.
  template <class Out>
  acc_t finish_lane(int64_t m, Out* dst, int64_t head_dim) const {
    const acc_t sum = row_sum[m];
    const bool empty = sum == acc_t(0);
    const V inv = V::broadcast(empty ? acc_t(0) : acc_t(1) / sum);
    const acc_t* o = out_acc + m * d_padded;
    int64_t d = 0;
    for (; d + W <= head_dim; d += W) (V::load(o + d) * inv).store(dst + d);
    if (d < head_dim) (V::load(o + d) * inv).store_first(dst + d, static_cast<int>(head_dim - d));
    return empty ? neg_inf() : row_max[m] + std::log(sum);
  }

 private:
  bool one_lane_ = false;  // the task's tile has one query row (softmax_update_one_lane)
};

}  // namespace
}  // namespace fast_attn::cpu
