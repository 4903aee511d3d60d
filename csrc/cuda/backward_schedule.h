// Which CTA of the dK/dV kernel processes which work units, so that the partial
// sums it writes (dbias; dq in deterministic mode) are reduced deterministically
// and without atomics. Plain C++ shared by the host launcher (to size the
// partial sums) and the kernel.
//
// A unit is one key block of one (batch, kv head): its CTA computes dK, dV of
// those keys over every query head of the kv head's GQA group and every query
// block, so dS for the scores (b, h in group, all i, keys of the block), and
// adds dS K to the dq rows (b, h in group, all i).
// dbias (num_splits, Bb, Hb, Sqb, Skb) sums dS over its broadcast dims: units
// that differ only in a broadcast dim (batch when Bb = 1, kv head when Hb = 1,
// key block when Skb = 1) write the same dbias elements. Those units form one
// "owner" group and run one after another in one CTA, in a fixed order;
// num_splits > 1 deals an owner's units round-robin to that many CTAs (split s
// takes the owner's units s, s + num_splits, ...), each writing its own slice
// of the partial sums, which the launcher then sums in split order. Without
// dbias every unit is its own owner.
// Deterministic mode: the units of one (batch, kv head), which all add to the
// same dq rows, are always units of one owner (the key block is a unit dim, as
// for Skb = 1), and dq_accum holds num_splits partial sums per dq row: the CTA
// of split s is the only one that writes partial s of its owner's rows, its
// units in index order (key block fastest), and the convert kernel sums a row's
// partials in split order. Every dq element is thus the same sum in the same order whatever
// the CTAs' timing.
#pragma once

#include <cstdint>

#include "attention_params.h"

namespace fast_attn::cuda {

struct DkdvUnit {
  int64_t batch;
  int64_t kv_head;
  int64_t key_block;
};

struct DkdvSchedule {
  // Each dim (batch, kv head, key block) is split into an owner extent and a
  // per-owner unit extent; one of the two is 1. 32-bit (the launcher bounds
  // batch and heads by the grid limits and sequences below 2^31): the kernel
  // keeps them in registers across its whole loop.
  int32_t owner_batches, owner_heads, owner_blocks;
  int32_t unit_batches, unit_heads, unit_blocks;
  int32_t num_splits;

  FAST_ATTN_HOST_DEVICE DkdvSchedule(int64_t batch, int64_t heads_kv, int64_t key_blocks, bool dbias,
                                     int64_t dbias_batch, int64_t dbias_heads, int64_t dbias_cols,
                                     int64_t splits, bool deterministic) {
    const bool reduce_batch = dbias && dbias_batch == 1;
    const bool reduce_heads = dbias && dbias_heads == 1;
    const bool reduce_blocks = deterministic || (dbias && dbias_cols == 1);
    owner_batches = static_cast<int32_t>(reduce_batch ? 1 : batch);
    unit_batches = static_cast<int32_t>(reduce_batch ? batch : 1);
    owner_heads = static_cast<int32_t>(reduce_heads ? 1 : heads_kv);
    unit_heads = static_cast<int32_t>(reduce_heads ? heads_kv : 1);
    owner_blocks = static_cast<int32_t>(reduce_blocks ? 1 : key_blocks);
    unit_blocks = static_cast<int32_t>(reduce_blocks ? key_blocks : 1);
    num_splits = static_cast<int32_t>(splits);
  }

  FAST_ATTN_HOST_DEVICE int64_t owners() const {
    return static_cast<int64_t>(owner_batches) * owner_heads * owner_blocks;
  }
  FAST_ATTN_HOST_DEVICE int64_t units_per_owner() const {
    return static_cast<int64_t>(unit_batches) * unit_heads * unit_blocks;
  }
  FAST_ATTN_HOST_DEVICE int64_t ctas() const { return owners() * num_splits; }

  // Owner index: key block fastest, so that neighbouring CTAs share the Q and
  // dO of one (batch, head) in L2, and causal's heaviest blocks (first keys) start first.
  FAST_ATTN_HOST_DEVICE DkdvUnit unit(int64_t owner, int64_t index) const {
    const int64_t owner_block = owner % owner_blocks;
    const int64_t owner_head = (owner / owner_blocks) % owner_heads;
    const int64_t owner_batch = owner / (owner_blocks * owner_heads);
    const int64_t unit_block = index % unit_blocks;
    const int64_t unit_head = (index / unit_blocks) % unit_heads;
    const int64_t unit_batch = index / (unit_blocks * unit_heads);
    return {owner_batch * unit_batches + unit_batch, owner_head * unit_heads + unit_head,
            owner_block * unit_blocks + unit_block};
  }
};

// The splits of the dK/dV kernel's partial sums (dbias; dq when deterministic), for its
// schedule `single` with one split; 1 when it writes none. Enough CTAs to fill the GPU
// (two per SM), at most one per unit of an owner, and within two bounds:
// - dbias (dbias_numel > 0, the bias's elements): the partial sums never reach half the
//   size of a full (B, Hq, Sq, Sk) tensor (full_numel), unless one split does;
// - dq when deterministic (dq_slices > 0: the (Sq, D) slices of dq, B x Hq, or Hq for
//   packed sequences): splits x dq_slices <= max(dq_slices, sm_count), so that dq_accum
//   takes at most 4 x max(B x Hq, num_SMs) x Sq x D bytes whatever Sk: the default
//   mode's one partial per row, or one (Sq, D) head slice per SM (FlashAttention-2's
//   num_SMs / (B x H) splits), never a partial per key block.
inline int64_t choose_dkdv_splits(const DkdvSchedule& single, int sm_count, int64_t dq_slices, int64_t dbias_numel,
                                  int64_t full_numel) {
  if (dq_slices == 0 && dbias_numel == 0) {
    return 1;
  }
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  int64_t splits = (2 * sms + single.owners() - 1) / single.owners();
  if (splits > single.units_per_owner()) {
    splits = single.units_per_owner();
  }
  if (dq_slices > 0 && splits * dq_slices > sms) {
    splits = sms / dq_slices;
  }
  const int64_t max_partial_numel = full_numel / 2 > dbias_numel ? full_numel / 2 : dbias_numel;
  while (splits > 1 && splits * dbias_numel > max_partial_numel) {
    --splits;
  }
  return splits < 1 ? 1 : splits;
}

}  // namespace fast_attn::cuda
