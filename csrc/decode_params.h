// The description of one decoding step against a KV cache (the decode_forward op,
// csrc/schema.cpp) that a decode kernel reads, filled by decode_launch.cpp. Plain
// C++ only, as attention_params.h.
//
// Layouts (strides in elements, every last dim contiguous):
//   q                : (B, Sq, Hq, D)
//   k_cache, v_cache : (pages, slots, Hkv, D). Paged (block_table given): (num_pages,
//                      page_size, Hkv, D), position p of sequence b at page
//                      block_table[b][p / page_size], slot p % page_size. Contiguous:
//                      (Bc, S_cache, Hkv, D), read as pages of S_cache slots, sequence b's
//                      one page being cache_batch_idx[b] (or b).
//   out              : (B, Sq, Hq, D) in q's dtype
//   lse              : (B, Hq, Sq) contiguous, float32 (float64 for float64)
// The new keys and values (k_new, v_new) are written into the caches by the launcher
// before a kernel runs; a kernel reads them from the caches like every other key.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fast_attn {

struct DecodeParams {
  int64_t batch;
  int64_t heads_q;
  int64_t heads_kv;
  int64_t seqlen_q;
  int64_t head_dim;
  int64_t new_rows;  // S_new: keys appended at cache_seqlens[b] before attending

  const void* q;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  const void* k_cache;
  int64_t k_page_stride, k_slot_stride, k_head_stride;
  const void* v_cache;
  int64_t v_page_stride, v_slot_stride, v_head_stride;
  int64_t page_size;  // slots per page (S_cache for a contiguous cache)

  const int32_t* block_table;  // (B, max_pages) page ids through block_table_stride; nullptr: contiguous
  int64_t block_table_stride;
  const int32_t* cache_batch_idx;  // (B,) cache row of each sequence; nullptr: row b (contiguous only)
  const int32_t* cache_seqlens;    // (B,) keys before the new ones
  const int32_t* cache_leftpad;    // (B,) first key position; nullptr: 0

  float scale;  // multiplies q.k before the softcap
  // The window around the diagonal d = i + Lk - Sq of query i (bottom-right, per sequence):
  // query i sees key j iff (!has_left || j >= d - window_left) and (!has_right || j <= d + window_right);
  // causal is has_right with window_right 0.
  bool has_left, has_right;
  int64_t window_left, window_right;
  float softcap;  // 0 = none
  // ALiBi: score += -slope(b, h) * |i + Lk - Sq - j|; float32 (B or 1, Hq), batch stride 0 for one row.
  const float* alibi_slopes;
  int64_t alibi_batch_stride;

  void* out;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  void* lse;
};

// Sequence b's keys: Lk = cache_seqlens[b] + S_new - cache_leftpad[b] of them (none if that is
// negative), key j at cache position first_position + j.
struct SequenceKeys {
  int64_t first_position;
  int64_t count;
};

inline SequenceKeys sequence_keys(const DecodeParams& p, int64_t b) {
  const int64_t first = p.cache_leftpad != nullptr ? p.cache_leftpad[b] : 0;
  return {first, std::max<int64_t>(0, p.cache_seqlens[b] + p.new_rows - first)};
}

// Keys [begin, end) of a sequence of `count` keys that some query row in [first_row, last_row]
// sees: the union of their bands, whose diagonal is i + count - Sq.
struct KeyRange {
  int64_t begin;
  int64_t end;
};

inline KeyRange keys_of_rows(const DecodeParams& p, int64_t count, int64_t first_row, int64_t last_row) {
  const int64_t diagonal = count - p.seqlen_q;
  KeyRange keys{0, count};
  if (p.has_left) keys.begin = std::clamp<int64_t>(first_row + diagonal - p.window_left, 0, count);
  if (p.has_right) keys.end = std::clamp<int64_t>(last_row + diagonal + p.window_right + 1, 0, count);
  return keys;
}

// The page (a cache row for contiguous caches) that holds cache position `position` of sequence b;
// the slot in it is position % page_size.
inline int64_t cache_page(const DecodeParams& p, int64_t b, int64_t position) {
  if (p.block_table != nullptr) return p.block_table[b * p.block_table_stride + position / p.page_size];
  return p.cache_batch_idx != nullptr ? p.cache_batch_idx[b] : b;
}

}  // namespace fast_attn
