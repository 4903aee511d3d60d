// The decoding problem of decode_forward (csrc/schema.cpp) as the CUDA decode kernels read it
// (decode_append.cu, decode_kernel.cuh, decode_combine.cu; their cache addressing is
// decode_cache.cuh), filled by decode_cuda_host.cpp.
// Plain C++ like attention_params.h: no ATen, no CUDA headers. Strides are in elements.
//
// Both cache layouts are read as pages (num_pages, page_size, Hkv, D): a paged cache through
// block_table (position p of sequence b in page block_table[b, p / page_size], slot
// p % page_size), a contiguous cache (Bc, S_cache, Hkv, D) as Bc pages of S_cache slots, sequence
// b owning all of page cache_batch_idx[b] (or b).
#pragma once

#include <cstdint>

#include "attention_params.h"

namespace fast_attn::cuda {

// (B, S, H, D) rows of q, k_new or v_new.
struct DecodeRows {
  const void* data;
  int64_t batch_stride, row_stride, head_stride;
};

// k_cache or v_cache, written in place by the append kernel.
struct DecodeCache {
  void* data;
  int64_t page_stride, slot_stride, head_stride;
};

struct DecodeParams {
  int64_t batch;
  int64_t heads_q;
  int64_t heads_kv;
  int64_t seqlen_q;  // Sq
  int64_t new_rows;  // S_new, 0 without k_new / v_new
  int64_t head_dim;

  DecodeRows q, k_new, v_new;
  DecodeCache k_cache, v_cache;
  int64_t num_pages;
  int64_t page_size;
  const int32_t* block_table;  // (B, pages_per_sequence) with row stride block_table_stride; nullptr: contiguous
  int64_t block_table_stride;
  int64_t pages_per_sequence;        // 1 for a contiguous cache
  const int32_t* cache_batch_idx;    // (B,) or nullptr (b)
  const int32_t* cache_seqlens;      // (B,)
  const int32_t* cache_leftpad;      // (B,) or nullptr (0)

  // scale, softcap, ALiBi (alibi_slopes, alibi_batch_stride, heads_q) and the band, for
  // score_context.cuh; the band's edges are relative to the top-left diagonal, the kernel adds
  // each sequence's Lk - Sq (causal and windows are bottom-right per sequence).
  AttentionForwardParams scores;

  int64_t num_splits;  // >= 1
  // num_splits > 1: each split's out (num_splits, B, Hq, Sq, D) and lse (num_splits, B, Hq, Sq),
  // float32 contiguous, merged by the combine kernel; unused with one split.
  float* out_partial;
  float* lse_partial;
  void* out;   // (B, Sq, Hq, D) contiguous, q's dtype
  float* lse;  // (B, Hq, Sq) contiguous
};

// Keys one CTA of the decode kernel streams per step (decode_kernel.cuh: groups of 16-byte lanes
// covering a key row, kDecodeKeysPerGroup keys each): also what the host counts key blocks in.
constexpr int kDecodeThreads = 128;
constexpr int kDecodeRows = 8;  // query rows per CTA, of the Hq / Hkv * Sq that share a kv head
constexpr int kDecodeKeysPerGroup = 4;
constexpr int decode_group_threads(int head_dim) {
  return head_dim <= 32 ? 4 : head_dim <= 64 ? 8 : head_dim <= 128 ? 16 : 32;
}
constexpr int decode_block_n(int head_dim) {
  return kDecodeThreads / decode_group_threads(head_dim) * kDecodeKeysPerGroup;
}

// The blocks of kDecodeRows rows that the Hq / Hkv * Sq rows of one kv head make.
FAST_ATTN_HOST_DEVICE int64_t decode_row_blocks(const DecodeParams& p) {
  return (p.heads_q / p.heads_kv * p.seqlen_q + kDecodeRows - 1) / kDecodeRows;
}

// The positions a sequence may use; the host keeps it below 2^31 - 2^16 (kMaxSequenceLength),
// so that the kernels' positions are 32-bit.
FAST_ATTN_HOST_DEVICE int64_t decode_capacity(const DecodeParams& p) { return p.pages_per_sequence * p.page_size; }

// The rows of lse (B, Hq, Sq), (b Hq + head) Sq + query, and of each split's partial results.
FAST_ATTN_HOST_DEVICE int64_t decode_lse_rows(const DecodeParams& p) { return p.batch * p.heads_q * p.seqlen_q; }

// The element offset of (b, query, head) in out (B, Sq, Hq, D).
FAST_ATTN_HOST_DEVICE int64_t decode_out_offset(const DecodeParams& p, int64_t b, int64_t query, int64_t head) {
  return ((b * p.seqlen_q + query) * p.heads_q + head) * p.head_dim;
}

}  // namespace fast_attn::cuda
