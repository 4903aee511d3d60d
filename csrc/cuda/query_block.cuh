// The set-up of the kernel with one CTA per query block (the forward,
// attention_forward_kernel): which query block, head and sequence the CTA owns,
// the key tiles it visits, where its rows start in the tensors, and the loads of
// its Q-side and K/V tiles.
#pragma once

#include "device_runtime.cuh"
#include "score_context.cuh"
#include "shared_tile.cuh"

namespace fast_attn::cuda {

// Grid: x the query block, reversed so that the causal blocks with the most key
// tiles start first; y the query head; z the batch or (kVarlen) the packed
// sequence, whose query blocks beyond its length have nothing to do (past_end).
// Traits: kBlockM, kBlockN, kHeadDim, kThreads. load_kv_tile copies into double-buffered
// K/V tiles, stage s of K at k_smem + s * KvTile::kElements (likewise V); load_k_tile and
// load_v_tile into the tile they are given.
template <typename Traits, bool kModifiers, bool kVarlen>
struct QueryBlock {
  using Element = typename Traits::Element;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;
  static constexpr int kThreads = Traits::kThreads;

  const AttentionForwardParams& params;
  Sequence<kVarlen> sequence;
  int64_t batch;
  int64_t head;
  int64_t kv_head;
  int m0;  // the block's first row
  int seqlen_q;
  int seqlen_k;
  int head_dim;
  // Key tiles [end_tile - num_tiles, end_tile) hold the keys some row of the block
  // sees; tiles outside are skipped entirely.
  int end_tile;
  int num_tiles;
  // Row 0 of the sequence in q, k, v.
  const Element* q;
  const Element* k;
  const Element* v;

  FA_DEVICE explicit QueryBlock(const AttentionForwardParams& p)
      : params(p), sequence(sequence_of<Element, kVarlen>(p, blockIdx.z)) {
    const int64_t m_block = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
    head = blockIdx.y;
    batch = sequence.batch;
    kv_head = head / (p.heads_q / p.heads_kv);
    m0 = static_cast<int>(m_block) * kBlockM;
    seqlen_q = static_cast<int>(sequence.seqlen_q(p));
    seqlen_k = static_cast<int>(sequence.seqlen_k(p));
    head_dim = static_cast<int>(p.head_dim);

    // The band's right edge at the block's last row ends the keys; its left edge
    // (kModifiers) at the block's first row begins them.
    int64_t key_end = seqlen_k;
    if (band_bounds_right(p)) {
      const int64_t last_row = (m0 + kBlockM < seqlen_q ? m0 + kBlockM : seqlen_q) - 1;
      const int64_t band_end = last_row + sequence.band_last_key(p) + 1;
      key_end = band_end < key_end ? band_end : key_end;
    }
    end_tile = key_end > 0 ? static_cast<int>(ceil_div(key_end, kBlockN)) : 0;
    int first_tile = 0;
    if (kModifiers && band_bounds_left(p)) {
      const int64_t band_begin = m0 + sequence.band_first_key(p);
      first_tile = band_begin <= 0 ? 0
                   : band_begin < seqlen_k ? static_cast<int>(band_begin / kBlockN)
                                           : static_cast<int>(ceil_div(seqlen_k, kBlockN));
    }
    num_tiles = kModifiers ? (end_tile > first_tile ? end_tile - first_tile : 0) : end_tile;

    q = query_rows(static_cast<const Element*>(p.q), p.q_batch_stride, p.q_head_stride, p.q_row_stride);
    k = static_cast<const Element*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride +
        sequence.k_begin() * p.k_row_stride;
    v = static_cast<const Element*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride +
        sequence.k_begin() * p.v_row_stride;
  }

  FA_DEVICE bool past_end() const { return kVarlen && m0 >= seqlen_q; }

  // Row 0 of the sequence in a (batch, query head, row) tensor at `data`.
  template <typename T>
  FA_DEVICE T* query_rows(T* data, int64_t batch_stride, int64_t head_stride, int64_t row_stride) const {
    return data + batch * batch_stride + head * head_stride + sequence.q_begin() * row_stride;
  }

  // The block's rows of a (batch, query head, row) tensor into `tile`: rows is its
  // query_rows, data the tensor (the bound of the reads).
  FA_DEVICE void load_query_tile(Element* tile, const Element* rows, int64_t row_stride, const void* data) const {
    load_tile_async<kBlockM, kHeadDim, kThreads>(tile, rows + m0 * row_stride, row_stride, seqlen_q - m0, head_dim,
                                                 static_cast<const Element*>(data));
  }

  // Key tile n_block of K and V into stage `stage`.
  FA_DEVICE void load_kv_tile(Element* k_smem, Element* v_smem, int n_block, int stage) const {
    using KvTile = typename Traits::KvTile;
    const int n0 = n_block * kBlockN;
    load_tile_async<kBlockN, kHeadDim, kThreads>(k_smem + stage * KvTile::kElements, k + n0 * params.k_row_stride,
                                                 params.k_row_stride, seqlen_k - n0, head_dim,
                                                 static_cast<const Element*>(params.k));
    load_tile_async<kBlockN, kHeadDim, kThreads>(v_smem + stage * KvTile::kElements, v + n0 * params.v_row_stride,
                                                 params.v_row_stride, seqlen_k - n0, head_dim,
                                                 static_cast<const Element*>(params.v));
  }

  // Key tile n_block of K (load_k_tile) or V (load_v_tile) alone into `tile`. kFull: a tile
  // whose keys all lie below seqlen_k, every tile but the block's last (end_tile - 1), copied
  // without a bound per row (load_full_tile_async).
  template <bool kFull>
  FA_DEVICE void load_k_tile(Element* tile, int n_block) const {
    load_key_rows<kFull>(tile, k, params.k_row_stride, params.k, n_block);
  }
  template <bool kFull>
  FA_DEVICE void load_v_tile(Element* tile, int n_block) const {
    load_key_rows<kFull>(tile, v, params.v_row_stride, params.v, n_block);
  }

 private:
  template <bool kFull>
  FA_DEVICE void load_key_rows(Element* tile, const Element* rows, int64_t row_stride, const void* data,
                               int n_block) const {
    const int n0 = n_block * kBlockN;
    if constexpr (kFull) {
      load_full_tile_async<kBlockN, kHeadDim, kThreads>(tile, rows + n0 * row_stride, row_stride, head_dim);
    } else {
      load_tile_async<kBlockN, kHeadDim, kThreads>(tile, rows + n0 * row_stride, row_stride, seqlen_k - n0, head_dim,
                                                   static_cast<const Element*>(data));
    }
  }
};

// Launches kernel, or varlen_kernel for packed sequences, on the grid QueryBlock reads:
// the query blocks of params.seqlen_q (the sequences' bound with varlen) x the query heads
// x the batch (or the sequences).
template <typename Traits, typename Params>
LaunchStatus launch_per_query_block(void (*kernel)(const Params), void (*varlen_kernel)(const Params),
                                    const Params& params, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(params.seqlen_q, Traits::kBlockM)),
                  static_cast<unsigned>(params.heads_q), static_cast<unsigned>(params.batch));
  return launch_kernel(is_varlen(params) ? varlen_kernel : kernel, grid, dim3(Traits::kThreads), Traits::kSmemBytes,
                       stream, params);
}

// Row r (0: the C fragment's row group, 1: group + 8) of this thread's accumulators
// acc (n8 tiles of head-dim columns), times scale, into the output row `row`: columns
// pair + 8 j, those below head_dim.
template <typename Element, int kDimTiles>
FA_DEVICE void store_accumulator_row(Element* row, const float (&acc)[kDimTiles][4], int r, float scale, int pair,
                                     int head_dim) {
  const int cols_left = head_dim - pair;
  FA_UNROLL
  for (int j = 0; j < kDimTiles; ++j) {
    if (j * 8 < cols_left) {
      store_global(reinterpret_cast<uint32_t*>(row + pair + j * 8),
                   ElementOps<Element>::pack(acc[j][2 * r] * scale, acc[j][2 * r + 1] * scale));
    }
  }
}

}  // namespace fast_attn::cuda
