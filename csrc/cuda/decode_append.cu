// The append step of decoding (decode_forward, csrc/schema.cpp): k_new and v_new (B, S_new, Hkv, D)
// written into the caches in place at positions cache_seqlens[b] .. cache_seqlens[b] + S_new - 1 of
// sequence b (decode_cache.cuh), and nothing else. A launch of its own, so that it completes
// before the decode kernel, next on the stream, reads any key. One CTA per (new row, sequence);
// threads copy 16-byte vectors (8 elements of either 16-bit dtype). A position past the
// sequence's capacity is not written.
#include "decode_cache.cuh"

namespace fast_attn::cuda {
namespace {

constexpr int kAppendThreads = 128;

FA_KERNEL(kAppendThreads, 1)
void decode_append_kernel(const DecodeParams params) {
  const int row = static_cast<int>(blockIdx.x);  // of the S_new new rows
  const int64_t b = blockIdx.y;
  const int64_t position = int64_t{load_global(params.cache_seqlens + b)} + row;
  if (position < 0 || position >= decode_capacity(params)) {
    return;
  }
  const DecodeSlot slot = decode_slot(params, b, static_cast<int>(position));
  const int chunks = static_cast<int>(params.head_dim / 8);
  // Vector `chunk` of kv head `kv_head` of the new row, from `rows` into `cache`.
  auto copy = [&](const DecodeRows& rows, const DecodeCache& cache, int64_t kv_head, int chunk) {
    const uint16_t* from = static_cast<const uint16_t*>(rows.data) + b * rows.batch_stride + row * rows.row_stride +
                           kv_head * rows.head_stride + chunk * 8;
    uint16_t* to = static_cast<uint16_t*>(cache.data) + decode_cache_offset(cache, slot, kv_head) + chunk * 8;
    store_global(reinterpret_cast<uint4*>(to), load_global(reinterpret_cast<const uint4*>(from)));
  };
  for (int item = static_cast<int>(threadIdx.x); item < params.heads_kv * chunks; item += kAppendThreads) {
    copy(params.k_new, params.k_cache, item / chunks, item % chunks);
    copy(params.v_new, params.v_cache, item / chunks, item % chunks);
  }
}

}  // namespace

LaunchStatus run_decode_append(const DecodeParams& params, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(params.new_rows), static_cast<unsigned>(params.batch));
  return launch_kernel(decode_append_kernel, grid, dim3(kAppendThreads), 0, stream, params);
}

}  // namespace fast_attn::cuda
