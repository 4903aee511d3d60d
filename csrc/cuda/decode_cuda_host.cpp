// The tensor-level CUDA implementation of decode_forward (csrc/schema.cpp): invariant checks (so
// that a direct torch.ops call cannot make a kernel read or write out of bounds; the Python layer
// validates the values with friendlier messages), outputs and the split buffers, DecodeParams,
// and the launches: append, split-KV kernel, combine. Registered by attention_cuda_ops.cpp and
// driven on the CPU warp emulator by emulation/emulation_module.cpp, like attention_cuda_host.cpp.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "attention_cuda_host.h"
#include "attention_launch.h"
#include "cuda_host_common.h"
#include "decode_launch.h"
#include "decode_params.h"
#include "kernel_api.h"

namespace fast_attn::cuda {
namespace {

constexpr int64_t kMaxDecodeSplits = 128;

// The caches are written in place, so they cannot be copied into aligned memory as q can.
void check_cache_alignment(const at::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.numel() == 0 || aligned_for_vectors(cache), "fast_attn CUDA decode kernels read ", name,
              " with 16-byte vectors: it needs a 16-byte aligned base and page, slot and head strides that are ",
              "multiples of 8 elements, got strides ", cache.strides());
}

// check_decode_shapes (decode_launch.h), and what the CUDA kernels add: aligned caches, what fits
// their grids and index types, at most kMaxDecodeSplits splits, and the checks of cache rows and
// pages that need no values read (a GPU reads none here: the kernels clamp to the caches' bounds).
void check_cuda_decode_inputs(const DecodeInputs& in) {
  check_decode_shapes(in);
  check_cache_alignment(in.k_cache, "k_cache");
  check_cache_alignment(in.v_cache, "v_cache");
  const int64_t batch = in.q.size(0);
  if (in.block_table) {
    TORCH_CHECK(in.k_cache.size(1) > 0 && (in.block_table->size(1) == 0 || in.k_cache.size(0) > 0),
                "fast_attn: a paged cache needs pages of at least one slot");
  } else {
    TORCH_CHECK(in.cache_batch_idx || in.k_cache.size(0) >= batch || in.k_cache.size(1) == 0,
                "fast_attn: a contiguous cache without cache_batch_idx needs a row per sequence, got ",
                in.k_cache.size(0), " rows for ", batch, " sequences");
  }
  const int64_t capacity = in.block_table ? in.block_table->size(1) * in.k_cache.size(1) : in.k_cache.size(1);
  TORCH_CHECK(capacity <= kMaxSequenceLength, "fast_attn CUDA kernels support sequences shorter than ",
              kMaxSequenceLength, ", got a cache of ", capacity, " positions per sequence");
  TORCH_CHECK(batch <= kMaxGridDim, "fast_attn CUDA decode kernels support at most ", kMaxGridDim,
              " sequences, got ", batch);
  TORCH_CHECK(in.num_splits <= kMaxDecodeSplits, "fast_attn: num_splits must be in [0, ", kMaxDecodeSplits,
              "], got ", in.num_splits);
}

DecodeRows rows_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

DecodeCache cache_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// The scores' part of AttentionForwardParams (score_context.cuh): scale, softcap, ALiBi and the
// band with its edges relative to the top-left diagonal (band_of with Sk = Sq puts them there),
// which the kernel moves by each sequence's Lk - Sq.
AttentionForwardParams score_params(const DecodeInputs& in) {
  AttentionForwardParams p{};
  p.heads_q = in.q.size(2);
  p.seqlen_q = in.q.size(1);
  p.head_dim = in.q.size(3);
  p.scale = static_cast<float>(in.scale);
  p.softcap = static_cast<float>(in.softcap);
  const int64_t causal = static_cast<int64_t>(in.causal ? CausalMode::kBottomRight : CausalMode::kNone);
  const Band band = band_of(causal, in.window_left, in.window_right, p.seqlen_q, p.seqlen_q);
  p.band_has_first_key = band.left >= 0;
  p.band_has_last_key = band.right >= 0;
  p.band_first_key = band.offset - band.left;
  p.band_last_key = band.offset + band.right;
  if (in.alibi_slopes) {
    p.alibi_slopes = in.alibi_slopes->data_ptr<float>();
    p.alibi_batch_stride = in.alibi_slopes->size(0) == 1 ? 0 : in.alibi_slopes->stride(0);
  }
  return p;
}

// FlashAttention-2's split rule: with `work_units` CTAs per split (here B x Hkv x row blocks)
// on `sm_count` SMs, s splits fill waves = work_units * s / sm_count waves of the device, with
// efficiency waves / ceil(waves). The choice is the smallest s whose efficiency is at least 0.85
// of the best over s = 1 .. min(128, key_blocks): more splits only add combine work, and a split
// needs a block of keys. key_blocks counts the cache's capacity (the largest sequence it holds:
// the lengths themselves are on the device) in the decode kernel's key blocks.
int64_t choose_decode_splits(int64_t work_units, int64_t key_blocks, int sm_count) {
  const int64_t most = std::min(kMaxDecodeSplits, key_blocks);
  if (work_units <= 0 || sm_count <= 0 || most <= 1) {
    return 1;
  }
  auto efficiency = [&](int64_t splits) {
    const double waves = static_cast<double>(work_units * splits) / sm_count;
    return waves / std::ceil(waves);
  };
  double best = 0.0;
  for (int64_t s = 1; s <= most; ++s) {
    best = std::max(best, efficiency(s));
  }
  int64_t splits = 1;
  while (efficiency(splits) < 0.85 * best) {
    ++splits;
  }
  return splits;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_forward(const DecodeInputs& in, const DeviceContext& device) {
  check_cuda_decode_inputs(in);
  const at::Tensor& q = in.q;
  const ElementType element = element_type(q);
  const int head_dim = kernel_head_dim(q.size(3));
  const int64_t batch = q.size(0);
  const int64_t seqlen_q = q.size(1);
  const int64_t heads_q = q.size(2);
  at::Tensor out = at::empty({batch, seqlen_q, heads_q, q.size(3)}, q.options());
  at::Tensor lse = at::empty({batch, heads_q, seqlen_q}, q.options().dtype(at::kFloat));

  DecodeParams p{};
  p.batch = batch;
  p.heads_q = heads_q;
  p.heads_kv = in.k_cache.size(2);
  p.seqlen_q = seqlen_q;
  p.new_rows = in.k_new ? in.k_new->size(1) : 0;
  p.head_dim = q.size(3);
  TORCH_CHECK(p.heads_kv * decode_row_blocks(p) <= kMaxGridDim, "fast_attn CUDA decode kernels support at most ",
              kMaxGridDim, " blocks of ", kDecodeRows, " query rows (Hq x Sq), got Hq = ", heads_q, ", Sq = ",
              seqlen_q);
  const at::Tensor q_ready = aligned_for_vector_loads(q);
  const at::Tensor k_new = in.k_new ? aligned_for_vector_loads(*in.k_new) : at::Tensor();
  const at::Tensor v_new = in.v_new ? aligned_for_vector_loads(*in.v_new) : at::Tensor();
  p.q = rows_of(q_ready);
  if (p.new_rows > 0) {
    p.k_new = rows_of(k_new);
    p.v_new = rows_of(v_new);
  }
  p.k_cache = cache_of(in.k_cache);
  p.v_cache = cache_of(in.v_cache);
  p.num_pages = in.k_cache.size(0);
  p.page_size = in.k_cache.size(1);
  const at::Tensor block_table = in.block_table ? in.block_table->contiguous() : at::Tensor();
  p.block_table = in.block_table ? block_table.data_ptr<int32_t>() : nullptr;
  p.block_table_stride = in.block_table ? block_table.size(1) : 0;
  p.pages_per_sequence = in.block_table ? block_table.size(1) : 1;
  const at::Tensor cache_seqlens = in.cache_seqlens.contiguous();
  const at::Tensor cache_leftpad = in.cache_leftpad ? in.cache_leftpad->contiguous() : at::Tensor();
  const at::Tensor cache_batch_idx = in.cache_batch_idx ? in.cache_batch_idx->contiguous() : at::Tensor();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.cache_leftpad = in.cache_leftpad ? cache_leftpad.data_ptr<int32_t>() : nullptr;
  p.cache_batch_idx = in.cache_batch_idx ? cache_batch_idx.data_ptr<int32_t>() : nullptr;
  p.scores = score_params(in);

  const int64_t work_units = batch * p.heads_kv * decode_row_blocks(p);
  const int64_t key_blocks = (decode_capacity(p) + decode_block_n(head_dim) - 1) / decode_block_n(head_dim);
  p.num_splits = in.num_splits > 0 ? in.num_splits : choose_decode_splits(work_units, key_blocks, device.sm_count);
  at::Tensor out_partial, lse_partial;
  if (p.num_splits > 1) {
    out_partial = at::empty({p.num_splits, batch, heads_q, seqlen_q, q.size(3)}, lse.options());
    lse_partial = at::empty({p.num_splits, batch, heads_q, seqlen_q}, lse.options());
    p.out_partial = out_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();

  if (batch == 0) {
    return {out, lse};
  }
  if (p.new_rows > 0) {
    check_launch(run_decode_append(p, device.stream), "decode append");
  }
  if (seqlen_q * heads_q == 0) {
    return {out, lse};
  }
  const bool fp16 = element == ElementType::kFloat16;
  const auto split_kernel = [&](auto dim) {
    constexpr int kHeadDim = decltype(dim)::value;
    return fp16 ? run_decode<ElementType::kFloat16, kHeadDim>(p, device.stream)
                : run_decode<ElementType::kBFloat16, kHeadDim>(p, device.stream);
  };
  check_launch(launch_for_head_dim(head_dim, split_kernel), "decode");
  if (p.num_splits > 1) {
    check_launch(fp16 ? run_decode_combine<ElementType::kFloat16>(p, device.stream)
                      : run_decode_combine<ElementType::kBFloat16>(p, device.stream),
                 "decode combine");
  }
  return {out, lse};
}

}  // namespace fast_attn::cuda
