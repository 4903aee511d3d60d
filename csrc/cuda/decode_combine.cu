// The combine step of split-KV decoding (decode_kernel.cuh): for each row of lse (B, Hq, Sq), the
// num_splits partial results (out_s, lse_s) merged by the lse rule
//   lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) out_s,
// into out (B, Sq, Hq, D) and lse. A split without visible keys has lse_s = -inf (weight 0, out_s
// 0); a row without any keeps lse -inf and out 0. One warp per row, lane c merging columns
// 8c .. 8c + 7 (head dims up to 256), the weights taken relative to the largest lse_s.
#include "decode_merge.cuh"
#include "decode_params.h"

namespace fast_attn::cuda {
namespace {

constexpr int kCombineThreads = 128;
constexpr int kCombineRowsPerCta = kCombineThreads / kWarpSize;

template <typename Element>
FA_KERNEL(kCombineThreads, 1)
void decode_combine_kernel(const DecodeParams params) {
  const int64_t rows = decode_lse_rows(params);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCombineRowsPerCta + threadIdx.x / kWarpSize;
  const int chunk = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t head_dim = params.head_dim;
  if (row >= rows || chunk * 8 >= head_dim) {
    return;
  }
  float max = negative_infinity();
  for (int64_t s = 0; s < params.num_splits; ++s) {
    max = fmaxf(max, load_global(params.lse_partial + s * rows + row));
  }
  SoftmaxMerge merged;
  if (max != negative_infinity()) {
    for (int64_t s = 0; s < params.num_splits; ++s) {
      const float* partial = params.out_partial + (s * rows + row) * head_dim + chunk * 8;
      merged.add(exp2f((load_global(params.lse_partial + s * rows + row) - max) * kLog2e), 1.0f,
                 load_global(reinterpret_cast<const float4*>(partial)),
                 load_global(reinterpret_cast<const float4*>(partial + 4)));
    }
  }
  merged.normalize();
  // row = (b Hq + head) Sq + query; out is (B, Sq, Hq, D).
  const int64_t query = row % params.seqlen_q;
  const int64_t head = row / params.seqlen_q % params.heads_q;
  const int64_t b = row / (params.seqlen_q * params.heads_q);
  merged.store(static_cast<Element*>(params.out) + decode_out_offset(params, b, query, head) + chunk * 8);
  if (chunk == 0) {
    store_global(params.lse + row, merged.sum == 0.0f ? negative_infinity() : max + logf(merged.sum));
  }
}

}  // namespace

template <ElementType kElement>
LaunchStatus run_decode_combine(const DecodeParams& params, cudaStream_t stream) {
  using Element = typename ElementOf<kElement>::type;
  const dim3 grid(static_cast<unsigned>(ceil_div(decode_lse_rows(params), kCombineRowsPerCta)));
  return launch_kernel(decode_combine_kernel<Element>, grid, dim3(kCombineThreads), 0, stream, params);
}

template LaunchStatus run_decode_combine<ElementType::kFloat16>(const DecodeParams&, cudaStream_t);
template LaunchStatus run_decode_combine<ElementType::kBFloat16>(const DecodeParams&, cudaStream_t);

}  // namespace fast_attn::cuda
