// TORCH_LIBRARY_IMPL(fast_attn, CPU): the decode_forward op on the CPU. Checks and
// allocates through decode_launch.h, writes the new keys and values into the caches,
// plans the split-KV tasks and runs the decode workers (decode_kernel.h) of the
// instruction set chosen at run time (kernel_selection.h) under at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "cpu/kernel_selection.h"
#include "decode_launch.h"
#include "op_signatures.h"

namespace fast_attn::cpu {
namespace {

// Automatic split-KV never cuts a (sequence, kv head)'s keys into splits shorter than this.
constexpr int64_t kMinSplitKeys = 256;

// rows (B, S_new, Hkv, D) into a cache at positions cache_seqlens[b] .. + S_new - 1 of sequence b.
void write_rows(const at::Tensor& rows, void* cache, int64_t page_stride, int64_t slot_stride, int64_t head_stride,
                const DecodeParams& p) {
  const int64_t element = rows.element_size();
  const char* source = static_cast<const char*>(rows.data_ptr());
  char* destination = static_cast<char*>(cache);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t s = 0; s < p.new_rows; ++s) {
      const int64_t position = p.cache_seqlens[b] + s;
      const int64_t slot = page_stride * cache_page(p, b, position) + slot_stride * (position % p.page_size);
      for (int64_t h = 0; h < p.heads_kv; ++h) {
        std::memcpy(destination + (slot + h * head_stride) * element,
                    source + (b * rows.stride(0) + s * rows.stride(1) + h * rows.stride(2)) * element,
                    p.head_dim * element);
      }
    }
  }
}

// The number of key splits of every (sequence, kv head): num_splits when given (at most
// kMaxDecodeSplits); else 1 when the (sequence, kv head) pairs already fill the threads,
// otherwise enough splits to occupy them, none shorter than kMinSplitKeys keys.
int64_t choose_splits(const DecodeParams& p, int64_t num_splits, int64_t most_keys) {
  if (num_splits > 0) return std::min(num_splits, kMaxDecodeSplits);
  const int64_t pairs = p.batch * p.heads_kv, threads = at::get_num_threads();
  if (pairs >= threads) return 1;
  return std::clamp<int64_t>(std::min(ceil_div(threads, pairs), most_keys / kMinSplitKeys), 1, kMaxDecodeSplits);
}

std::tuple<at::Tensor, at::Tensor> decode_forward_cpu(const DecodeInputs& in) {
  const at::Tensor& q = in.q;
  check_decode_inputs(in);
  auto [out, lse] = allocate_decode_outputs(q);
  const DecodeParams params = make_decode_params(in, out, lse);
  if (in.k_new) {
    write_rows(*in.k_new, in.k_cache.data_ptr(), params.k_page_stride, params.k_slot_stride, params.k_head_stride,
               params);
    write_rows(*in.v_new, in.v_cache.data_ptr(), params.v_page_stride, params.v_slot_stride, params.v_head_stride,
               params);
  }
  if (lse.numel() == 0) return {out, lse};

  // The sequences by decreasing number of visible keys: the longest tasks start first.
  std::vector<int64_t> keys(params.batch), order(params.batch);
  for (int64_t b = 0; b < params.batch; ++b) {
    const int64_t count = sequence_keys(params, b).count;
    const KeyRange visible = keys_of_rows(params, count, 0, params.seqlen_q - 1);
    keys[b] = std::max<int64_t>(0, visible.end - visible.begin);
  }
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[a] > keys[b]; });

  DecodePlan plan{};
  plan.dtype = element_type(q.scalar_type());
  plan.scales = ExactScales{in.scale, 1.0, in.softcap};
  const int64_t most_keys = *std::max_element(keys.begin(), keys.end());
  plan.num_splits = choose_splits(params, in.num_splits, most_keys);
  plan.num_tasks = params.batch * params.heads_kv * plan.num_splits;
  plan.sequence_order = order.data();
  at::Tensor partial_out, partial_lse;
  std::vector<std::atomic<int64_t>> splits_done(plan.num_splits > 1 ? params.batch * params.heads_kv : 0);
  if (plan.num_splits > 1) {
    const at::TensorOptions acc = q.options().dtype(lse.scalar_type());
    partial_out = at::empty({plan.num_splits, q.size(0), q.size(1), q.size(2), q.size(3)}, acc);
    partial_lse = at::empty({plan.num_splits, lse.size(0), lse.size(1), lse.size(2)}, acc);
    plan.partial_out = partial_out.data_ptr();
    plan.partial_lse = partial_lse.data_ptr();
    plan.partial_lse_split_stride = partial_lse.stride(0);
    plan.splits_done = splits_done.data();
  }
  // The products' multiply-adds (q k^T and P v) of every query row against the most keys a sequence sees.
  const int64_t multiply_adds = 2 * params.batch * params.heads_q * params.seqlen_q * most_keys * params.head_dim;
  run_workers(kernels_for(q.scalar_type()).decode, params, plan, multiply_adds);
  return {out, lse};
}

}  // namespace
}  // namespace fast_attn::cpu

TORCH_LIBRARY_IMPL(fast_attn, CPU, m) {
  m.impl("decode_forward", &fast_attn::decode_forward_op<&fast_attn::cpu::decode_forward_cpu>);
}
