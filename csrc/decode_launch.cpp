#include "decode_launch.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "attention_launch.h"

namespace fast_attn {
namespace {

constexpr const char* kOp = "fast_attn decode_forward: ";

// A 4-D floating tensor of q's dtype and device with a contiguous last dim.
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 4, kOp, name, " must be 4-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kOp, name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), kOp, name, " must be on q's device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, kOp, name, " must have a contiguous last dim, got strides ",
              t.strides());
}

// An int32 tensor of `dim` dims on q's device whose last dim is contiguous.
void check_indices(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kInt, kOp, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, kOp, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == q.device(), kOp, name, " must be on q's device ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.size(dim - 1) <= 1 || t.stride(dim - 1) == 1, kOp, name, " must have a contiguous last dim");
  TORCH_CHECK(t.size(0) == q.size(0), kOp, name, " must have one row per sequence (", q.size(0), "), got shape ",
              t.sizes());
}

}  // namespace

void check_decode_shapes(const DecodeInputs& in) {
  const at::Tensor& q = in.q;
  TORCH_CHECK(q.dim() == 4, kOp, "q must be 4-D (B, Sq, Hq, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble || q.scalar_type() == at::kHalf ||
                  q.scalar_type() == at::kBFloat16,
              kOp, "q must be float32, float64, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) <= 1 || q.stride(3) == 1, kOp, "q must have a contiguous last dim, got strides ",
              q.strides());
  check_rows(in.k_cache, "k_cache", q);
  check_rows(in.v_cache, "v_cache", q);
  TORCH_CHECK(in.k_cache.sizes() == in.v_cache.sizes(), kOp, "k_cache and v_cache must have one shape, got ",
              in.k_cache.sizes(), " and ", in.v_cache.sizes());
  const int64_t heads_kv = in.k_cache.size(2), head_dim = q.size(3);
  TORCH_CHECK(in.k_cache.size(3) == head_dim, kOp, "k_cache's head dim must be q's (", head_dim, "), got shape ",
              in.k_cache.sizes());
  TORCH_CHECK(heads_kv >= 1 && q.size(2) % heads_kv == 0, kOp, "q's heads (", q.size(2),
              ") must be a multiple of the caches' (", heads_kv, ")");
  TORCH_CHECK(in.k_new.has_value() == in.v_new.has_value(), kOp, "k_new and v_new go together");
  if (in.k_new) {
    check_rows(*in.k_new, "k_new", q);
    check_rows(*in.v_new, "v_new", q);
    TORCH_CHECK(in.k_new->size(0) == q.size(0) && in.k_new->size(2) == heads_kv && in.k_new->size(3) == head_dim &&
                    in.v_new->sizes() == in.k_new->sizes(),
                kOp, "k_new and v_new must have shape (B, S_new, Hkv, D) = (", q.size(0), ", S_new, ", heads_kv, ", ",
                head_dim, "), got ", in.k_new->sizes(), " and ", in.v_new->sizes());
  }
  check_indices(in.cache_seqlens, "cache_seqlens", 1, q);
  if (in.cache_leftpad) check_indices(*in.cache_leftpad, "cache_leftpad", 1, q);
  if (in.cache_batch_idx) {
    TORCH_CHECK(!in.block_table, kOp, "cache_batch_idx goes with contiguous caches only, got a block_table too");
    check_indices(*in.cache_batch_idx, "cache_batch_idx", 1, q);
  }
  if (in.block_table) check_indices(*in.block_table, "block_table", 2, q);
  if (in.alibi_slopes) {
    const at::Tensor& slopes = *in.alibi_slopes;
    TORCH_CHECK(slopes.scalar_type() == at::kFloat, kOp, "alibi_slopes must be float32, got ", slopes.scalar_type());
    TORCH_CHECK(slopes.device() == q.device(), kOp, "alibi_slopes must be on q's device");
    TORCH_CHECK(slopes.dim() == 2 && (slopes.size(0) == 1 || slopes.size(0) == q.size(0)) &&
                    slopes.size(1) == q.size(2) && slopes.is_contiguous(),
                kOp, "alibi_slopes must be contiguous of shape (B or 1, Hq) = (", q.size(0), " or 1, ", q.size(2),
                "), got ", slopes.sizes());
  }
  TORCH_CHECK(in.window_left >= -1 && in.window_right >= -1, kOp,
              "window_left and window_right must be >= -1 (-1 = unbounded), got ", in.window_left, " and ",
              in.window_right);
  TORCH_CHECK(std::isfinite(in.softcap) && in.softcap >= 0.0, kOp, "softcap must be finite and >= 0 (0 = none), got ",
              in.softcap);
  TORCH_CHECK(in.num_splits >= 0, kOp, "num_splits must be >= 0 (0 = chosen by the kernel), got ", in.num_splits);
}

namespace {

// t itself on the CPU (no op call), else a copy on the host.
at::Tensor on_host(const at::Tensor& t) { return t.is_cpu() ? t : t.cpu(); }

// Every cache position a sequence writes (cache_seqlens[b] .. + S_new - 1) or reads (from
// cache_leftpad[b] on) lies in the cache, and so does its page or cache row.
void check_positions(const DecodeInputs& in) {
  const int64_t batch = in.q.size(0), new_rows = in.k_new ? in.k_new->size(1) : 0;
  const int64_t rows = in.k_cache.size(0), slots = in.k_cache.size(1);
  const at::Tensor seqlens = on_host(in.cache_seqlens);
  const at::Tensor leftpad = in.cache_leftpad ? on_host(*in.cache_leftpad) : at::Tensor();
  const at::Tensor batch_idx = in.cache_batch_idx ? on_host(*in.cache_batch_idx) : at::Tensor();
  const at::Tensor table = in.block_table ? on_host(*in.block_table) : at::Tensor();
  const int64_t capacity = in.block_table ? table.size(1) * slots : slots;
  if (!in.block_table && !in.cache_batch_idx) {
    TORCH_CHECK(batch <= rows, kOp, "k_cache has ", rows, " rows for ", batch, " sequences (and no cache_batch_idx)");
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = seqlens.accessor<int32_t, 1>()[b];
    const int64_t first = leftpad.defined() ? leftpad.accessor<int32_t, 1>()[b] : 0;
    TORCH_CHECK(length >= 0, kOp, "cache_seqlens[", b, "] = ", length, " is negative");
    TORCH_CHECK(first >= 0, kOp, "cache_leftpad[", b, "] = ", first, " is negative");
    TORCH_CHECK(length + new_rows <= capacity, kOp, "the cache is too short for sequence ", b, ": cache_seqlens[", b,
                "] + S_new = ", length, " + ", new_rows, " > ", capacity,
                in.block_table ? " slots of its block_table row" : " slots of a cache row");
    if (in.block_table) {
      // The pages of positions min(first, length) .. length + S_new - 1.
      const auto pages = table.accessor<int32_t, 2>()[b];
      for (int64_t page = std::min(first, length) / slots; page * slots < length + new_rows; ++page) {
        TORCH_CHECK(pages[page] >= 0 && pages[page] < rows, kOp, "block_table[", b, ", ", page, "] = ", pages[page],
                    " is not a page of the caches (", rows, " pages)");
      }
    } else if (batch_idx.defined()) {
      const int64_t row = batch_idx.accessor<int32_t, 1>()[b];
      TORCH_CHECK(row >= 0 && row < rows, kOp, "cache_batch_idx[", b, "] = ", row, " is not a row of the caches (",
                  rows, " rows)");
    }
  }
}

}  // namespace

void check_decode_inputs(const DecodeInputs& in) {
  check_decode_shapes(in);
  check_positions(in);
}

std::tuple<at::Tensor, at::Tensor> allocate_decode_outputs(const at::Tensor& q) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse =
      at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(accumulation_dtype(q.scalar_type())));
  return {out, lse};
}

DecodeParams make_decode_params(const DecodeInputs& in, const at::Tensor& out, const at::Tensor& lse) {
  DecodeParams p{};
  p.batch = in.q.size(0);
  p.seqlen_q = in.q.size(1);
  p.heads_q = in.q.size(2);
  p.head_dim = in.q.size(3);
  p.heads_kv = in.k_cache.size(2);
  p.new_rows = in.k_new ? in.k_new->size(1) : 0;

  set_data_and_strides(in.q, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_data_and_strides(in.k_cache, p.k_cache, p.k_page_stride, p.k_slot_stride, p.k_head_stride);
  set_data_and_strides(in.v_cache, p.v_cache, p.v_page_stride, p.v_slot_stride, p.v_head_stride);
  p.page_size = in.k_cache.size(1);

  p.block_table = in.block_table ? in.block_table->data_ptr<int32_t>() : nullptr;
  p.block_table_stride = in.block_table ? in.block_table->stride(0) : 0;
  p.cache_batch_idx = in.cache_batch_idx ? in.cache_batch_idx->data_ptr<int32_t>() : nullptr;
  p.cache_seqlens = in.cache_seqlens.data_ptr<int32_t>();
  p.cache_leftpad = in.cache_leftpad ? in.cache_leftpad->data_ptr<int32_t>() : nullptr;

  p.scale = static_cast<float>(in.scale);
  // Bottom-right per sequence: the band's offset Lk - Sq is each sequence's own (decode_params.h).
  const Band band = band_of(in.causal ? static_cast<int64_t>(CausalMode::kBottomRight) : 0, in.window_left,
                            in.window_right, 0, 0);
  p.has_left = band.left >= 0;
  p.has_right = band.right >= 0;
  p.window_left = band.left;
  p.window_right = band.right;
  p.softcap = static_cast<float>(in.softcap);
  p.alibi_slopes = in.alibi_slopes ? in.alibi_slopes->data_ptr<float>() : nullptr;
  p.alibi_batch_stride = in.alibi_slopes && in.alibi_slopes->size(0) > 1 ? in.alibi_slopes->stride(0) : 0;

  set_data_and_strides(out, p.out, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  p.lse = lse.data_ptr();
  return p;
}

}  // namespace fast_attn
