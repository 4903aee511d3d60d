// Where a decoding sequence's keys live in the KV cache (decode_params.h's page view of both
// layouts), for the append kernel (decode_append.cu) and the decode kernel (decode_kernel.cuh).
//
// Out-of-range indices: a block_table entry or cache_batch_idx outside [0, num_pages) is clamped
// into it, and positions are clamped into the sequence's capacity (pages_per_sequence *
// page_size), so the kernels never read or write outside the caches and the block table whatever
// the indices hold. Such inputs give wrong results, not faults: the Python layer validates the
// indices on the host, which a kernel cannot do without a device-to-host copy.
#pragma once

#include "decode_params.h"
#include "device_runtime.cuh"

namespace fast_attn::cuda {

// The cache positions sequence b attends, [begin, end): its keys end at cache_seqlens[b] + S_new
// and start at cache_leftpad[b] (both clamped into the capacity). Key j of the sequence is
// position begin + j.
struct DecodeKeyRange {
  int begin, end;
  FA_DEVICE int length() const { return end - begin; }
};

FA_DEVICE DecodeKeyRange decode_key_range(const DecodeParams& p, int64_t b) {
  const int64_t new_end = int64_t{load_global(p.cache_seqlens + b)} + p.new_rows;
  const int64_t capacity = decode_capacity(p);
  const int end = static_cast<int>(new_end < 0 ? 0 : (new_end > capacity ? capacity : new_end));
  const int leftpad = p.cache_leftpad == nullptr ? 0 : load_global(p.cache_leftpad + b);
  return {leftpad < 0 ? 0 : (leftpad > end ? end : leftpad), end};
}

// Where cache position `position` (in [0, capacity)) of sequence b lives: the page and its slot.
struct DecodeSlot {
  int64_t page;
  int slot;
};

FA_DEVICE DecodeSlot decode_slot(const DecodeParams& p, int64_t b, int position) {
  const int page_size = static_cast<int>(p.page_size);
  int64_t page = b;
  if (p.block_table != nullptr) {
    page = load_global(p.block_table + b * p.block_table_stride + position / page_size);
  } else if (p.cache_batch_idx != nullptr) {
    page = load_global(p.cache_batch_idx + b);
  }
  return {page < 0 ? 0 : (page >= p.num_pages ? p.num_pages - 1 : page), position % page_size};
}

// Element offset of (slot, kv head, column 0) in a cache.
FA_DEVICE int64_t decode_cache_offset(const DecodeCache& cache, const DecodeSlot& slot, int64_t kv_head) {
  return slot.page * cache.page_stride + slot.slot * cache.slot_stride + kv_head * cache.head_stride;
}

}  // namespace fast_attn::cuda
