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
  if (workspace.dq_layout.block_m != 0) {
    return;  // blocked: zeroed when allocated
  }
  const int row_floats = static_cast<int>(workspace.dq_splits) * head_dim;  // the row's splits
  float* dq_accum = workspace.dq_accum + c.row * row_floats;
  for (int col = sub * 4; col < row_floats; col += kThreadsPerRow * 4) {
    store_global(reinterpret_cast<float4*>(dq_accum + col), make_float4(0.0f, 0.0f, 0.0f, 0.0f));
  }
}

// Columns col .. col + 7 of split `split` of dq_accum's row c: row-major, two float4; blocked
// (DqAccumLayout, kernel_api.h), 8 floats from their places in the row's block, whose offsets the
// layout of kDqAccumVector (device_runtime.cuh) gives: that of the dK/dV kernel of the same arch.
FA_DEVICE void load_dq_accum8(const AttentionBackwardParams& params, const BackwardWorkspace& workspace,
                              const RowCoordinates& c, int64_t split, int col, float (&values)[8]) {
  const DqAccumLayout& layout = workspace.dq_layout;
  if (layout.block_m == 0) {
    const float* part = workspace.dq_accum + (c.row * workspace.dq_splits + split) * params.head_dim + col;
    const float4 lo = load_global(reinterpret_cast<const float4*>(part));
    const float4 hi = load_global(reinterpret_cast<const float4*>(part + 4));
    values[0] = lo.x, values[1] = lo.y, values[2] = lo.z, values[3] = lo.w;
    values[4] = hi.x, values[5] = hi.y, values[6] = hi.z, values[7] = hi.w;
    return;
  }
  const int64_t m_blocks = ceil_div(params.packed_seqlen_q, layout.block_m);
  const int64_t block = ((c.batch * params.heads_q + c.head) * m_blocks + c.query / layout.block_m) *
                        workspace.dq_splits + split;
  const float* part = workspace.dq_accum + block * layout.block_floats();
  const int r = static_cast<int>(c.query % layout.block_m);
  for (int i = 0; i < 8; ++i) {
    values[i] = load_global(part + layout.offset<kDqAccumVector>(r, col + i));
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
  Element* dq = static_cast<Element*>(params.dq) + c.batch * params.dq_batch_stride + c.head * params.dq_head_stride +
                c.query * params.dq_row_stride;
  for (int col = sub * 8; col < head_dim; col += kThreadsPerRow * 8) {
    // Split 0, then the others in split order.
    float sum[8];
    load_dq_accum8(params, workspace, c, 0, col, sum);
    for (int64_t split = 1; kSplits && split < workspace.dq_splits; ++split) {
      float part[8];
      load_dq_accum8(params, workspace, c, split, col, part);
      for (int i = 0; i < 8; ++i) {
        sum[i] += part[i];
      }
    }
    for (int i = 0; i < 8; ++i) {
      sum[i] *= params.scale;
    }
    store_global(reinterpret_cast<uint4*>(dq + col), pack8<Element>(sum));
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
