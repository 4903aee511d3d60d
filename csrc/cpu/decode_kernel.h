// Decoding against a KV cache on the CPU (the decode_forward op, decode_params.h).
//
// One task = one (sequence b, kv head hk, split s). The g = Hq / Hkv query heads
// times Sq query rows that share kv head hk are the lanes of one score tile
// (score_tile.h): lane l is row m = m0 + l of the group, query i = m / g of head
// hk * g + m % g, so each key and value row of the split is read once for all of them
// (once per kBlockM rows of the group). Keys come in tiles of at most kBlockN. A 16-bit
// cache's tile is gathered across pages: the products policy (forward_products.h) converts
// its rows once per tile, page run by page run, into its buffers (the keys of a few-lane tile
// are read in place, a pointer per row), so pages of 16 keys still make tiles of kBlockN. A
// float cache's rows are read in place through the slot stride, so its tiles never cross a
// page. key_rows() is where a key's rows are. Each tile goes through the forward kernel's
// score steps: softcap, ALiBi, the band (bottom-right per sequence), online softmax, P V.
// The rows of the next 2 kBlockN keys, on whatever pages, are prefetched meanwhile.
//
// Split-KV: the keys some query row sees are cut into num_splits chunks of whole key
// tiles. With one split a task stores out and lse; otherwise it stores its normalized
// partial output and its lse in the accumulation type, and the last task of a
// (sequence, kv head) to finish merges the splits in split order:
//   lse = log sum_s exp(lse_s),  out = sum_s exp(lse_s - lse) out_s
// so the result does not depend on which thread ran what.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>

#include "aligned_buffer.h"
#include "cpu_kernels.h"
#include "decode_params.h"
#include "forward_products.h"
#include "score_tile.h"
#include "task_loop.h"

namespace fast_attn::cpu {
namespace {

template <class V, class T>
class DecodeKernel {
  using acc_t = typename V::value_type;
  using Products = AccumulationTypeForwardProducts<V, T>;
  static constexpr int W = V::kWidth;
  static constexpr int64_t kM = kBlockM;
  static constexpr int64_t kN = kBlockN;

 public:
  DecodeKernel(const DecodeParams& p, const DecodePlan& plan) : p_(p), plan_(plan), groups_(p.heads_q / p.heads_kv) {}

  void run(int64_t task) {
    const int64_t group = task / plan_.num_splits;  // (sequence, kv head), heaviest sequences first
    const int64_t split = task % plan_.num_splits;
    const int64_t b = plan_.sequence_order[group / p_.heads_kv];
    const int64_t kv_head = group % p_.heads_kv;
    const SequenceKeys keys = sequence_keys(p_, b);
    const int64_t group_rows = groups_ * p_.seqlen_q;
    for (int64_t m0 = 0; m0 < group_rows; m0 += kM) {
      run_rows(b, kv_head, split, keys, m0, std::min(kM, group_rows - m0));
    }
    if (plan_.num_splits > 1 && plan_.splits_done[b * p_.heads_kv + kv_head].fetch_add(1, std::memory_order_acq_rel) ==
                                    plan_.num_splits - 1) {
      merge_splits(b, kv_head);
    }
  }

 private:
  void carve(ScratchCarver& carver) {
    tile_.carve(carver, p_.head_dim);
    products_.carve(carver, p_.head_dim);
    q_rows_ = carver.take<T>(kM * p_.head_dim);
    split_weights_ = carver.take<acc_t>(kMaxDecodeSplits);
  }

  // Split `split`'s keys: a chunk of whole key tiles of the keys some query row sees.
  KeyRange split_keys(int64_t count, int64_t split) const {
    const KeyRange all = keys_of_rows(p_, count, 0, p_.seqlen_q - 1);
    const int64_t tiles = ceil_div(std::max<int64_t>(0, all.end - all.begin), kN);
    const int64_t chunk = ceil_div(tiles, plan_.num_splits) * kN;
    return {std::min(all.end, all.begin + split * chunk), std::min(all.end, all.begin + (split + 1) * chunk)};
  }

  // Lanes [0, rows) = rows m0 .. m0 + rows - 1 of the group of kv head kv_head of sequence b.
  void run_rows(int64_t b, int64_t kv_head, int64_t split, const SequenceKeys& sequence, int64_t m0, int64_t rows) {
    const int query_vectors = static_cast<int>((rows + W - 1) / W);
    const int64_t diagonal = sequence.count - p_.seqlen_q;  // of query 0
    load_rows(b, kv_head, m0, rows, query_vectors);

    const KeyRange split_range = split_keys(sequence.count, split);
    const KeyRange row_range = keys_of_rows(p_, sequence.count, m0 / groups_, (m0 + rows - 1) / groups_);
    const int64_t begin = std::max(split_range.begin, row_range.begin);
    const int64_t end = std::min(split_range.end, row_range.end);
    const LaneBand band{p_.has_left, p_.has_right, diagonal - p_.window_left, diagonal + p_.window_right, m0, groups_};
    int64_t next = begin;  // the next key whose rows to prefetch
    for (int64_t j0 = begin; j0 < end;) {
      // The tile's keys j0 .. j0 + cols - 1, one run of rows per page (one run in all unless gathered).
      const int64_t tile_end = std::min(end, j0 + kN);
      int64_t cols = 0;
      do {
        const KeyRows run = key_rows(b, kv_head, sequence, j0 + cols, tile_end);
        products_.load_key_rows(run.k, p_.k_slot_stride, run.v, p_.v_slot_stride, cols, run.count);
        cols += run.count;
      } while (Products::kGathersKeyRows && j0 + cols < tile_end);
      // Keys up to 2 kN past this tile are requested during its softmax, one key per step: the next
      // tile's rows were requested a tile earlier still.
      next = std::max(next, j0 + cols);
      const int64_t ahead = std::min(end, j0 + cols + 2 * kN);
      auto prefetch_next = [&] {
        if (next >= ahead) return;
        prefetch(key_rows(b, kv_head, sequence, next, next + 1));
        ++next;
      };
      // S^T (cols x lanes) = scale * K_tile (cols x D) q^T (D x lanes)
      products_.scores(tile_.scores_t, cols);
      if (plan_.scales.softcap > 0.0) tile_.apply_softcap(cols, query_vectors, plan_.scales.softcap);
      if (p_.alibi_slopes != nullptr) tile_.add_alibi(cols, query_vectors, j0 - diagonal);
      tile_.mask_band(band, rows, j0, cols, query_vectors);
      tile_.softmax_update(cols, query_vectors, prefetch_next);
      while (next < ahead) prefetch_next();
      tile_.rescale_output(rows, query_vectors);
      // out_acc (lanes x D) += P (lanes x cols) * V_tile (cols x D)
      products_.accumulate_output(tile_.scores_t, cols, tile_.out_acc, tile_.d_padded);
      j0 += cols;
    }
    store_rows(b, kv_head, split, m0, rows);
  }

  // Keys j0 .. j0 + count - 1 of a sequence, the run of them before `end` on key j0's page, and
  // key j0's key and value rows (the run's rows are a slot stride apart).
  struct KeyRows {
    const T* k;
    const T* v;
    int64_t count;
  };

  KeyRows key_rows(int64_t b, int64_t kv_head, const SequenceKeys& sequence, int64_t j0, int64_t end) const {
    const int64_t position = sequence.first_position + j0;
    const int64_t page = cache_page(p_, b, position);
    const int64_t slot = position % p_.page_size;
    const T* k = static_cast<const T*>(p_.k_cache) + page * p_.k_page_stride + slot * p_.k_slot_stride +
                 kv_head * p_.k_head_stride;
    const T* v = static_cast<const T*>(p_.v_cache) + page * p_.v_page_stride + slot * p_.v_slot_stride +
                 kv_head * p_.v_head_stride;
    return {k, v, std::min(end - j0, p_.page_size - slot)};
  }

  // Requests the lines of a key's key and value rows into L2. Consecutive rows of one kv head
  // are Hkv * D elements apart (and pages anywhere), a pattern the hardware prefetchers do
  // not follow.
  void prefetch(const KeyRows& key) const {
    const int64_t row_bytes = p_.head_dim * static_cast<int64_t>(sizeof(T));
    for (int64_t line = 0; line < row_bytes; line += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(key.k) + line, 0, 2);
      __builtin_prefetch(reinterpret_cast<const char*>(key.v) + line, 0, 2);
    }
  }

  // The lanes' scaled query rows into the products' packed q, the tile reset, and the lanes'
  // query rows and ALiBi slopes (padding lanes: those of the last row, never stored).
  void load_rows(int64_t b, int64_t kv_head, int64_t m0, int64_t rows, int query_vectors) {
    const T* q = static_cast<const T*>(p_.q) + b * p_.q_batch_stride + kv_head * groups_ * p_.q_head_stride;
    for (int64_t l = 0; l < query_vectors * W; ++l) {
      const int64_t m = m0 + std::min(l, rows - 1);
      const int64_t i = m / groups_, head = m % groups_;
      if (l < rows) {
        std::copy_n(q + i * p_.q_row_stride + head * p_.q_head_stride, p_.head_dim, q_rows_ + l * p_.head_dim);
      }
      tile_.lane_position[l] = static_cast<acc_t>(i);
      if (p_.alibi_slopes != nullptr) {
        const float slope = p_.alibi_slopes[b * p_.alibi_batch_stride + kv_head * groups_ + head];
        tile_.lane_minus_slope[l] = -static_cast<acc_t>(slope);
      }
    }
    products_.load_query_block(q_rows_, p_.head_dim, rows, query_vectors, static_cast<acc_t>(plan_.scales.scale));
    tile_.start(query_vectors, rows);
  }

  // out and lse of the lanes' rows (one split), or the split's partial out and lse.
  void store_rows(int64_t b, int64_t kv_head, int64_t split, int64_t m0, int64_t rows) {
    for (int64_t l = 0; l < rows; ++l) {
      const int64_t i = (m0 + l) / groups_, h = kv_head * groups_ + (m0 + l) % groups_;
      const int64_t lse_index = (b * p_.heads_q + h) * p_.seqlen_q + i;
      if (plan_.num_splits == 1) {
        T* out = static_cast<T*>(p_.out) + b * p_.out_batch_stride + i * p_.out_row_stride + h * p_.out_head_stride;
        static_cast<acc_t*>(p_.lse)[lse_index] = tile_.finish_lane(l, out, p_.head_dim);
      } else {
        acc_t* partial = static_cast<acc_t*>(plan_.partial_out) + partial_row(split, b, i, h) * p_.head_dim;
        static_cast<acc_t*>(plan_.partial_lse)[split * plan_.partial_lse_split_stride + lse_index] =
            tile_.finish_lane(l, partial, p_.head_dim);
      }
    }
  }

  // Row of split s's partial out (num_splits, B, Sq, Hq, D) for query i of head h of sequence b.
  int64_t partial_row(int64_t split, int64_t b, int64_t i, int64_t h) const {
    return ((split * p_.batch + b) * p_.seqlen_q + i) * p_.heads_q + h;
  }

  // out and lse of every row of the group from the splits' partials, in split order.
  void merge_splits(int64_t b, int64_t kv_head) {
    const acc_t* partial_lse = static_cast<const acc_t*>(plan_.partial_lse);
    const acc_t* partial_out = static_cast<const acc_t*>(plan_.partial_out);
    acc_t* weights = split_weights_;
    const int64_t head_dim = p_.head_dim;
    for (int64_t m = 0; m < groups_ * p_.seqlen_q; ++m) {
      const int64_t i = m / groups_, h = kv_head * groups_ + m % groups_;
      const int64_t lse_index = (b * p_.heads_q + h) * p_.seqlen_q + i;
      acc_t max_lse = ScoreTile<V>::neg_inf();
      for (int64_t s = 0; s < plan_.num_splits; ++s) {
        max_lse = std::max(max_lse, partial_lse[s * plan_.partial_lse_split_stride + lse_index]);
      }
      acc_t sum = 0;
      for (int64_t s = 0; s < plan_.num_splits; ++s) {
        const acc_t lse_s = partial_lse[s * plan_.partial_lse_split_stride + lse_index];
        weights[s] = max_lse == ScoreTile<V>::neg_inf() ? acc_t(0) : std::exp(lse_s - max_lse);
        sum += weights[s];
      }
      const acc_t lse = sum == acc_t(0) ? ScoreTile<V>::neg_inf() : max_lse + std::log(sum);
      static_cast<acc_t*>(p_.lse)[lse_index] = lse;
      for (int64_t s = 0; s < plan_.num_splits; ++s) weights[s] = sum == acc_t(0) ? acc_t(0) : weights[s] / sum;
      T* out = static_cast<T*>(p_.out) + b * p_.out_batch_stride + i * p_.out_row_stride + h * p_.out_head_stride;
      for (int64_t d = 0; d < head_dim; d += W) {
        const int lanes = static_cast<int>(std::min<int64_t>(W, head_dim - d));
        V acc = V::zero();
        for (int64_t s = 0; s < plan_.num_splits; ++s) {
          const acc_t* row = partial_out + partial_row(s, b, i, h) * head_dim + d;
          acc = V::fma(V::broadcast(weights[s]), lanes == W ? V::load(row) : V::load_first(row, lanes), acc);
        }
        if (lanes == W) {
          acc.store(out + d);
        } else {
          acc.store_first(out + d, lanes);
        }
      }
    }
  }

  const DecodeParams& p_;
  const DecodePlan& plan_;
  const int64_t groups_;  // g = Hq / Hkv query heads per kv head
  ScoreTile<V> tile_;
  Products products_;
  T* q_rows_;             // (kM, D): the lanes' query rows, gathered
  acc_t* split_weights_;  // (kMaxDecodeSplits): exp(lse_s - lse) while merging
  CarvedScratch scratch_{[this](ScratchCarver& carver) { carve(carver); }};  // last: holds the arrays above
};

// Runs decode tasks from `counter` until none is left.
template <class V, class T>
void decode_worker(const DecodeParams& p, const DecodePlan& plan, TaskCounter& counter) {
  run_tasks<DecodeKernel<V, T>>(p, plan, counter);
}

}  // namespace
}  // namespace fast_attn::cpu
