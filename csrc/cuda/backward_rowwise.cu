// The row-wise kernels around the backward matmul kernels, for every head dim:
// preprocess (delta = rowsum(dO * O) - grad_lse, zeroing dq_accum) and the
// conversion of the float32 dq accumulator (the sum of each row's splits) to the inputs' dtype.
//
// 16 threads per (batch, head, query) row, 16 rows per 256-thread CTA; each
// thread moves 16-byte vectors (8 elements), so a row of D = 128 is one
// vector per thread and the loads of a warp cover two rows contiguously.
#include "device_runtime.cuh"

namespace fast_attn::cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kThreadsPerRow = 16;
constexpr int kRowsPerCta = kRowThreads / kThreadsPerRow;

// The number of rows of the (B, Hq, Sq) tensors lse and delta; for varlen of the packed
// (1, Hq, Tq) ones, every sequence's rows (and rows outside every sequence) alike.
FAST_ATTN_HOST_DEVICE int64_t row_count(const AttentionBackwardParams& params) {
  return (is_varlen(params) ? 1 : params.batch) * params.heads_q * params.packed_seqlen_q;
}

struct RowCoordinates {
  int64_t row;  // (b * Hq + h) * Sq + i, the index into (B, Hq, Sq) tensors
  int64_t batch, head, query;
  bool valid;
};

FA_DEVICE RowCoordinates row_of_thread(const AttentionBackwardParams& params) {
  const int64_t seqlen_q = params.packed_seqlen_q;
  RowCoordinates c;
  c.row = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kThreadsPerRow;
  c.valid = c.row < row_count(params);
  c.query = c.row % seqlen_q;
  c.head = (c.row / seqlen_q) % params.heads_q;
  c.batch = c.row / (seqlen_q * params.heads_q);
  return c;
}

template <typename Element>
FA_KERNEL(kRowThreads, 1)
void attention_backward_preprocess_kernel(const AttentionBackwardParams params, const BackwardWorkspace workspace) {
  const RowCoordinates c = row_of_thread(params);
  const int sub = static_cast<int>(threadIdx.x) % kThreadsPerRow;
  const int head_dim = static_cast<int>(params.head_dim);
  float dot = 0.0f;
  if (c.valid) {
    const Element* out = static_cast<const Element*>(params.out) + c.batch * params.out_batch_stride +
                         c.head * params.out_head_stride + c.query * params.out_row_stride;
    const Element* grad_out = static_cast<const Element*>(params.grad_out) + c.batch * params.grad_out_batch_stride +
                              c.head * params.grad_out_head_stride + c.query * params.grad_out_row_stride;
    for (int col = sub * 8; col < head_dim; col += kThreadsPerRow * 8) {
      dot += dot8<Element>(load_global(reinterpret_cast<const uint4*>(out + col)),
                           load_global(reinterpret_cast<const uint4*>(grad_out + col)));
    }
  }
  FA_UNROLL
  for (int mask = kThreadsPerRow / 2; mask >= 1; mask /= 2) {
    dot += shfl_xor(dot, mask);
  }
  if (!c.valid) {
    return;
  }
  if (sub == 0) {
    const float grad_lse = workspace.grad_lse == nullptr ? 0.0f : load_global(workspace.grad_lse + c.row);
    store_global(static_cast<float*>(params.delta) + c.row, dot - grad_lse);
  }
  const int row_floats = static_cast<int>(workspace.dq_splits) * head_dim;  // the row's splits
  float* dq_accum = workspace.dq_accum + c.row * row_floats;
  for (int col = sub * 4; col < row_floats; col += kThreadsPerRow * 4) {
    store_global(reinterpret_cast<float4*>(dq_accum + col), make_float4(0.0f, 0.0f, 0.0f, 0.0f));
  }
}

// kSplits: dq_accum has workspace.dq_splits partial sums per row (deterministic mode), else one
// (a loop over one split took 72 registers instead of 32).
template <typename Element, bool kSplits>
FA_KERNEL(kRowThreads, 1)
void attention_backward_convert_dq_kernel(const AttentionBackwardParams params, const BackwardWorkspace workspace) {
  const RowCoordinates c = row_of_thread(params);
  if (!c.valid) {
    return;
  }
  const int sub = static_cast<int>(threadIdx.x) % kThreadsPerRow;
  const int head_dim = static_cast<int>(params.head_dim);
  const float* dq_accum = workspace.dq_accum + c.row * workspace.dq_splits * head_dim;
  Element* dq = static_cast<Element*>(params.dq) + c.batch * params.dq_batch_stride + c.head * params.dq_head_stride +
                c.query * params.dq_row_stride;
  for (int col = sub * 8; col < head_dim; col += kThreadsPerRow * 8) {
    // Split 0, then the others in split order.
    float4 lo = load_global(reinterpret_cast<const float4*>(dq_accum + col));
    float4 hi = load_global(reinterpret_cast<const float4*>(dq_accum + col + 4));
    for (int64_t split = 1; kSplits && split < workspace.dq_splits; ++split) {
      const float* part = dq_accum + split * head_dim + col;
      const float4 lo_s = load_global(reinterpret_cast<const float4*>(part));
      const float4 hi_s = load_global(reinterpret_cast<const float4*>(part + 4));
      lo = make_float4(lo.x + lo_s.x, lo.y + lo_s.y, lo.z + lo_s.z, lo.w + lo_s.w);
      hi = make_float4(hi.x + hi_s.x, hi.y + hi_s.y, hi.z + hi_s.z, hi.w + hi_s.w);
    }
    const float s = params.scale;
    uint4 packed;
    packed.x = ElementOps<Element>::pack(lo.x * s, lo.y * s);
    packed.y = ElementOps<Element>::pack(lo.z * s, lo.w * s);
    packed.z = ElementOps<Element>::pack(hi.x * s, hi.y * s);
    packed.w = ElementOps<Element>::pack(hi.z * s, hi.w * s);
    store_global(reinterpret_cast<uint4*>(dq + col), packed);
  }
}

// Launches kernel with kRowsPerCta (batch, head, query) rows per CTA, CTAs enough for every row.
LaunchStatus launch_per_row(void (*kernel)(const AttentionBackwardParams, const BackwardWorkspace),
                            const AttentionBackwardParams& params, const BackwardWorkspace& workspace,
                            cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(row_count(params), kRowsPerCta)));
  return launch_kernel(kernel, grid, dim3(kRowThreads), 0, stream, params, workspace);
}

}  // namespace

template <ElementType kElement>
LaunchStatus run_attention_backward_preprocess(const AttentionBackwardParams& params,
                                               const BackwardWorkspace& workspace, cudaStream_t stream) {
  return launch_per_row(attention_backward_preprocess_kernel<typename ElementOf<kElement>::type>, params, workspace,
                        stream);
}

template <ElementType kElement>
LaunchStatus run_attention_backward_convert_dq(const AttentionBackwardParams& params,
                                               const BackwardWorkspace& workspace, cudaStream_t stream) {
  using Element = typename ElementOf<kElement>::type;
  return launch_per_row(workspace.deterministic ? attention_backward_convert_dq_kernel<Element, true>
                                                : attention_backward_convert_dq_kernel<Element, false>,
                        params, workspace, stream);
}

template LaunchStatus run_attention_backward_preprocess<ElementType::kFloat16>(const AttentionBackwardParams&,
                                                                              const BackwardWorkspace&, cudaStream_t);
template LaunchStatus run_attention_backward_preprocess<ElementType::kBFloat16>(const AttentionBackwardParams&,
                                                                               const BackwardWorkspace&, cudaStream_t);
template LaunchStatus run_attention_backward_convert_dq<ElementType::kFloat16>(const AttentionBackwardParams&,
                                                                              const BackwardWorkspace&, cudaStream_t);
template LaunchStatus run_attention_backward_convert_dq<ElementType::kBFloat16>(const AttentionBackwardParams&,
                                                                               const BackwardWorkspace&, cudaStream_t);

}  // namespace fast_attn::cuda
