#include "attention_cuda_host.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <limits>
#include <type_traits>

#include "attention_launch.h"
#include "backward_schedule.h"
#include "cuda_host_common.h"
#include "kernel_api.h"
#include "tile_configs.h"

namespace fast_attn::cuda {
namespace {

void check_sizes(const ForwardInputs& in) {
  const at::Tensor& q = in.q;
  const at::Tensor& k = in.k;
  TORCH_CHECK(q.size(2) <= kMaxSequenceLength && k.size(2) <= kMaxSequenceLength,
              "fast_attn CUDA kernels support sequences shorter than ", kMaxSequenceLength, ", got Sq = ", q.size(2),
              " and Sk = ", k.size(2));
  const int64_t batch = in.cu_seqlens_q ? in.cu_seqlens_q->numel() - 1 : q.size(0);
  TORCH_CHECK(batch <= kMaxGridDim && q.size(1) <= kMaxGridDim, "fast_attn CUDA kernels support at most ", kMaxGridDim,
              " batches (or packed sequences) and query heads, got ", batch, " and ", q.size(1));
}

// Whether the kernels' grids are empty: no batch (varlen: no sequence), query row or key.
// Without varlen has_no_scores(q, k) answers it before any work; with it, the sequences'
// length bounds in the params do.
bool launches_nothing(const AttentionForwardParams& params) {
  return params.batch * params.heads_q * params.seqlen_q == 0 || params.seqlen_k == 0;
}

// launch(std::integral_constant<KernelPath, P>{}) for the kernel path P of params.
template <typename Launch>
LaunchStatus launch_for_path(const AttentionForwardParams& params, const Launch& launch) {
  switch (kernel_path(params)) {
    case KernelPath::kFast: return launch(std::integral_constant<KernelPath, KernelPath::kFast>{});
    case KernelPath::kCausal: return launch(std::integral_constant<KernelPath, KernelPath::kCausal>{});
    case KernelPath::kGeneral: return launch(std::integral_constant<KernelPath, KernelPath::kGeneral>{});
    case KernelPath::kModifiers: return launch(std::integral_constant<KernelPath, KernelPath::kModifiers>{});
  }
  return {false, "no kernel path"};
}

template <ElementType kElement>
LaunchStatus forward_for(int head_dim, const AttentionForwardParams& params, cudaStream_t stream) {
  return launch_for_head_dim(head_dim, [&](auto dim) {
    constexpr int kHeadDim = decltype(dim)::value;
    return launch_for_path(params, [&](auto path) {
      return run_attention_forward<kElement, kHeadDim, decltype(path)::value>(params, stream);
    });
  });
}

// dK, dV and dq_accum by the dK/dV kernel of the problem's path, then dbias by its own kernel
// when dbias.data is set (a bias of full rows and columns).
template <ElementType kElement, int kHeadDim, KernelPath kPath>
LaunchStatus backward_kernels(const AttentionBackwardParams& params, const BackwardWorkspace& workspace,
                              const DbiasTiles& dbias, cudaStream_t stream) {
  constexpr bool kModifiers = kPath == KernelPath::kModifiers;
  LaunchStatus status = run_attention_backward_dkdv<kElement, kHeadDim, kPath>(params, workspace, stream);
  if (status.ok && dbias.data != nullptr) {
    status = run_attention_backward_dbias<kElement, kHeadDim, kModifiers>(params, dbias, stream);
  }
  return status;
}

template <ElementType kElement>
LaunchStatus backward_for(int head_dim, const AttentionBackwardParams& params, const BackwardWorkspace& workspace,
                          const DbiasTiles& dbias, cudaStream_t stream) {
  return launch_for_head_dim(head_dim, [&](auto dim) {
    constexpr int kHeadDim = decltype(dim)::value;
    return launch_for_path(params, [&](auto path) {
      return backward_kernels<kElement, kHeadDim, decltype(path)::value>(params, workspace, dbias, stream);
    });
  });
}

}  // namespace

int64_t dkdv_splits(const DkdvSplitSizes& sizes, int sm_count) {
  const int64_t block_n = dkdv_tile_config(sizes.head_dim).block_n;
  const bool dbias = sizes.dbias_batch > 0;
  const DkdvSchedule single(sizes.batch, sizes.heads_kv, (sizes.seqlen_k + block_n - 1) / block_n, dbias,
                            sizes.dbias_batch, sizes.dbias_heads, sizes.dbias_cols, 1, sizes.deterministic);
  const int64_t dbias_numel = dbias ? sizes.dbias_batch * sizes.dbias_heads * sizes.dbias_rows * sizes.dbias_cols : 0;
  return choose_dkdv_splits(single, sm_count, sizes.deterministic ? sizes.dq_slices : 0, dbias_numel,
                            sizes.batch * sizes.heads_q * sizes.seqlen_q * sizes.seqlen_k);
}

namespace {

// `in` with other (aligned) q, k, v.
ForwardInputs with_qkv(const ForwardInputs& in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q, k, v, in.bias, in.key_mask, in.alibi_slopes, in.dropout_seed, in.scale, in.causal,
          in.window_left, in.window_right, in.softcap, in.dropout_p, in.cu_seqlens_q, in.cu_seqlens_k,
          in.max_seqlen_q, in.max_seqlen_k};
}

void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.sizes() == q.sizes() && t.scalar_type() == q.scalar_type() && t.device() == q.device(),
              "fast_attn: ", name, " must match q (", q.sizes(), ", ", q.scalar_type(), "), got ", t.sizes(), ", ",
              t.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, "fast_attn: ", name, " must have a contiguous last dim");
}

void check_row_vector(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(2) &&
                  t.scalar_type() == at::kFloat && t.device() == q.device(),
              "fast_attn: ", name, " must be float32 (B, Hq, Sq) = (", q.size(0), ", ", q.size(1), ", ", q.size(2),
              ") on q's device, got ", t.sizes(), " ", t.scalar_type());
}

}  // namespace

// dq_accum's layout for the dK/dV kernel that backward_for launches at kernel head dim head_dim:
// blocked for the staged kernels (the kFast and kCausal paths at the head dims of dkdv_staged), with
// their dQ warp grid (DkdvStagedTraits::kDqLayout); else row-major.
DqAccumLayout dq_accum_layout(const AttentionBackwardParams& params, int head_dim) {
  if (!is_specialized(kernel_path(params)) || !dkdv_staged(head_dim)) {
    return {};
  }
  const DkdvStagedTileConfig tile = dkdv_staged_tile_config(head_dim);
  return {tile.block_m, head_dim, tile.dq_query_warps, tile.warps / tile.dq_query_warps};
}

std::vector<int> compiled_head_dims() {
  std::vector<int> dims(std::begin(kCompiledHeadDims), std::end(kCompiledHeadDims));
  std::sort(dims.begin(), dims.end());
  return dims;
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const ForwardInputs& in, const DeviceContext& device) {
  check_forward_inputs(in);
  const at::Tensor& q = in.q;
  const at::Tensor& k = in.k;
  const ElementType element = element_type(q);
  const int head_dim = kernel_head_dim(q.size(3));
  check_sizes(in);
  auto [out, lse] = allocate_forward_outputs(q);
  if (has_no_scores(q, k)) {
    fill_forward_without_scores(out, lse);
    return {out, lse};
  }
  const at::Tensor q_ready = aligned_for_vector_loads(q);
  const at::Tensor k_ready = aligned_for_vector_loads(k);
  const at::Tensor v_ready = aligned_for_vector_loads(in.v);
  const AttentionForwardParams params = make_forward_params(with_qkv(in, q_ready, k_ready, v_ready), out, lse);
  if (launches_nothing(params)) {
    fill_forward_without_scores(out, lse);
    return {out, lse};
  }
  const LaunchStatus status = element == ElementType::kFloat16
                                  ? forward_for<ElementType::kFloat16>(head_dim, params, device.stream)
                                  : forward_for<ElementType::kBFloat16>(head_dim, params, device.stream);
  check_launch(status, "forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(const ForwardInputs& in,
                                                                              const BackwardInputs& grads,
                                                                              const DeviceContext& device) {
  check_forward_inputs(in);
  const at::Tensor& q = in.q;
  const at::Tensor& k = in.k;
  const std::optional<at::Tensor>& bias = in.bias;
  const bool compute_dbias = grads.compute_dbias;
  const bool deterministic = grads.deterministic;
  const ElementType element = element_type(q);
  const int head_dim = kernel_head_dim(q.size(3));
  check_sizes(in);
  check_like_q(grads.grad_out, q, "grad_out");
  check_like_q(grads.out, q, "out");
  check_row_vector(grads.lse, q, "lse");
  if (grads.grad_lse) {
    check_row_vector(*grads.grad_lse, q, "grad_lse");
  }
  TORCH_CHECK(!compute_dbias || bias.has_value(), "fast_attn: compute_dbias needs a bias");

  if (has_no_scores(q, k)) return backward_without_scores(q, k, in.v, bias, compute_dbias);
  at::Tensor dq = empty_bshd_like(q);
  at::Tensor dk = empty_bshd_like(k);
  at::Tensor dv = empty_bshd_like(in.v);

  const at::Tensor q_ready = aligned_for_vector_loads(q);
  const at::Tensor k_ready = aligned_for_vector_loads(k);
  const at::Tensor v_ready = aligned_for_vector_loads(in.v);
  const at::Tensor grad_out_ready = aligned_for_vector_loads(grads.grad_out);
  const at::Tensor out_ready = aligned_for_vector_loads(grads.out);
  const at::Tensor lse_ready = grads.lse.contiguous();
  const std::optional<at::Tensor> grad_lse_ready =
      grads.grad_lse ? std::optional<at::Tensor>(grads.grad_lse->contiguous()) : std::nullopt;
  const at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  // A bias of full rows and columns (T5's) gets its gradient from the dbias
  // kernel, in its own dtype; any other from partial sums of the dK/dV kernel.
  const bool dbias_by_tiles = compute_dbias && bias->size(2) == q.size(2) && bias->size(3) == k.size(2);
  const bool dbias_by_dkdv = compute_dbias && !dbias_by_tiles;
  at::Tensor dbias_tiles;
  if (dbias_by_tiles) {
    dbias_tiles = at::empty(bias->sizes(), bias->options().memory_format(at::MemoryFormat::Contiguous));
  } else if (compute_dbias) {
    const bool modifiers = in.window_left >= 0 || in.softcap > 0.0 || in.alibi_slopes;
    TORCH_CHECK(dkdv_dbias_with_modifiers(head_dim) || !modifiers,
                "fast_attn CUDA kernels do not implement the gradient of a bias with a broadcast dim together ",
                "with window_left, softcap or alibi_slopes at head dims above 96 (kernel head dim ", head_dim,
                "); use backend='cpu' or 'reference', or a bias of full (Sq, Sk) rows and columns");
  }

  const std::optional<at::Tensor> no_partials;  // set below, once the params size them
  const BackwardTensors tensors{grad_out_ready, out_ready, lse_ready, delta, dq, dk, dv, no_partials};
  AttentionBackwardParams params = make_backward_params(with_qkv(in, q_ready, k_ready, v_ready), tensors);
  if (launches_nothing(params)) return backward_without_scores(q, k, in.v, bias, compute_dbias);
  // The dK/dV kernel's splits, sized from the params (packed sequences: their number and
  // longest key length): those of its dbias partial sums, and when deterministic of dq_accum.
  const DkdvSplitSizes sizes{params.batch,
                             params.heads_q,
                             params.heads_kv,
                             params.seqlen_q,
                             params.seqlen_k,
                             head_dim,
                             q.size(0) * q.size(1),
                             deterministic,
                             dbias_by_dkdv ? bias->size(0) : 0,
                             dbias_by_dkdv ? bias->size(1) : 0,
                             dbias_by_dkdv ? bias->size(2) : 0,
                             dbias_by_dkdv ? bias->size(3) : 0};
  const int64_t splits = dkdv_splits(sizes, device.sm_count);
  std::optional<at::Tensor> dbias_partials;
  if (dbias_by_dkdv) {
    dbias_partials = allocate_dbias_partials(*bias, splits);
    set_dbias_partials(params, *dbias_partials);
  }
  const int64_t dq_splits = deterministic ? splits : 1;
  // Blocked for the staged dK/dV kernels and zeroed here; else row-major, zeroed by the preprocess kernel.
  const DqAccumLayout dq_layout = dq_accum_layout(params, head_dim);
  const at::Tensor dq_accum =
      dq_layout.block_m == 0
          ? at::empty({q.size(0), q.size(1), q.size(2), dq_splits, q.size(3)}, q.options().dtype(at::kFloat))
          : at::zeros({q.size(0), q.size(1), (q.size(2) + dq_layout.block_m - 1) / dq_layout.block_m, dq_splits,
                       dq_layout.block_floats()},
                      q.options().dtype(at::kFloat));
  BackwardWorkspace workspace{};
  workspace.dq_accum = dq_accum.data_ptr<float>();
  workspace.dq_splits = dq_splits;
  workspace.dq_layout = dq_layout;
  workspace.deterministic = deterministic;
  workspace.grad_lse = grad_lse_ready ? grad_lse_ready->data_ptr<float>() : nullptr;

  const bool fp16 = element == ElementType::kFloat16;
  check_launch(fp16 ? run_attention_backward_preprocess<ElementType::kFloat16>(params, workspace, device.stream)
                    : run_attention_backward_preprocess<ElementType::kBFloat16>(params, workspace, device.stream),
               "backward preprocess");
  const DbiasTiles tiles{dbias_by_tiles ? dbias_tiles.data_ptr() : nullptr, bias ? bias->size(0) : 1,
                         bias ? bias->size(1) : 1};
  check_launch(fp16 ? backward_for<ElementType::kFloat16>(head_dim, params, workspace, tiles, device.stream)
                    : backward_for<ElementType::kBFloat16>(head_dim, params, workspace, tiles, device.stream),
               "backward");
  check_launch(fp16 ? run_attention_backward_convert_dq<ElementType::kFloat16>(params, workspace, device.stream)
                    : run_attention_backward_convert_dq<ElementType::kBFloat16>(params, workspace, device.stream),
               "backward dq conversion");
  if (dbias_by_tiles) {
    return {dq, dk, dv, dbias_tiles};
  }
  at::Tensor dbias = compute_dbias ? finish_dbias(*dbias_partials, *bias) : q.new_empty({0});
  return {dq, dk, dv, dbias};
}

}  // namespace fast_attn::cuda
