// Interface between the host code of the CPU ops (attention_cpu.cpp, which
// uses ATen) and the kernels (kernels_<isa>.cpp, which must not: each is
// compiled for one instruction set). Plain C++ only.
//
// Work is cut into independent tasks whose results do not depend on which
// thread runs them or in what order; workers pull task indices from a shared
// counter. So results are bitwise identical for any number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "attention_params.h"
#include "decode_params.h"

namespace fast_attn::cpu {

enum class ElementType { kFloat32, kBFloat16, kFloat16, kFloat64 };

// Forward tiles: query rows per task and key rows per step. 64 x 64 float
// tiles (16 KB) keep a forward task's working set (q^T, scores, output
// accumulator) in L1/L2.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;
// Backward tiles: query rows x key rows of one score tile.
constexpr int64_t kBackwardBlockM = 64;
constexpr int64_t kBackwardBlockN = 128;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Indices [begin, end); empty when end <= begin.
struct IndexRange {
  int64_t begin;
  int64_t end;
};

// Keys in the band of some query row of [i0, i0 + rows): those a forward block visits.
inline IndexRange band_keys_of_rows(const AttentionForwardParams& p, int64_t i0, int64_t rows) {
  IndexRange keys{0, p.seqlen_k};
  if (band_bounds_left(p)) keys.begin = std::clamp<int64_t>(i0 + band_first_key_offset(p), 0, p.seqlen_k);
  if (band_bounds_right(p)) keys.end = std::clamp<int64_t>(i0 + rows - 1 + band_last_key_offset(p) + 1, 0, p.seqlen_k);
  return keys;
}

// Query rows whose band holds some key of [j0, j0 + cols): those a backward key block visits.
inline IndexRange band_rows_of_keys(const AttentionForwardParams& p, int64_t j0, int64_t cols) {
  IndexRange rows{0, p.seqlen_q};
  if (band_bounds_right(p)) rows.begin = std::clamp<int64_t>(j0 - band_last_key_offset(p), 0, p.seqlen_q);
  if (band_bounds_left(p)) rows.end = std::clamp<int64_t>(j0 + cols - 1 - band_first_key_offset(p) + 1, 0, p.seqlen_q);
  return rows;
}

// The params struct holds scale, the dropout scale and softcap as float; the
// float64 kernels need them exact, so the plans carry them in double.
struct ExactScales {
  double scale;               // multiplies q.k
  double dropout_keep_scale;  // 1 / (1 - dropout_p)
  double softcap;             // 0 = none
};

// Varlen: a forward task, one query head's query block of one sequence.
struct SequenceBlock {
  int64_t sequence;
  int64_t head;
  int64_t q_block;
};

// Varlen: a backward task's split of one sequence's key blocks (with one kv head).
struct SequenceSplit {
  int64_t sequence;
  int64_t kv_split;
};

// Forward: one task per (batch, query head, block of kBlockM query rows).
struct ForwardPlan {
  ElementType dtype;
  ExactScales scales;
  int64_t num_q_blocks;
  int64_t num_tasks;  // batch * heads_q * num_q_blocks; varlen: the number of sequence_blocks
  // Hand out the last query block first (it sees the most keys under a band
  // bounded on the right, e.g. causal), else the first (a band bounded on the left only).
  bool last_query_block_first;
  // Varlen: every query head's query blocks of every sequence (plan_sequence_blocks' order); task t
  // is sequence_blocks[t] (num_q_blocks and last_query_block_first unused).
  const SequenceBlock* sequence_blocks;
};

// Backward: units are (batch, kv head) pairs; a task takes a chunk of
// consecutive units and one split of the key blocks (blocks s, s + kv_splits,
// ...), computes dk/dv of those blocks over all query heads of the group, and
// adds its share of dq to a float accumulator of its own split.
struct BackwardPlan {
  ElementType dtype;
  ExactScales scales;
  int64_t kv_splits;
  int64_t units_per_chunk;
  int64_t num_chunks;
  int64_t num_tasks;  // num_chunks * kv_splits; varlen: heads_kv * number of sequence_splits
  // Varlen (no bias, no chunks): the nonempty splits of every sequence's key blocks, heaviest
  // first; task t is kv head t % heads_kv of sequence_splits[t / heads_kv].
  const SequenceSplit* sequence_splits;

  // dq accumulator in the accumulation type, (kv_splits, B, Hq, Sq, D) through
  // these strides (elements); it may be dq itself when kv_splits == 1. Its rows
  // are the packed problem's, as lse's (varlen: (kv_splits, 1, Hq, Tq, D)).
  void* dq_accum;
  int64_t dq_accum_split_stride, dq_accum_batch_stride, dq_accum_head_stride, dq_accum_row_stride;

  // Which dbias partial sum (params.dbias, params.dbias_num_splits of them) a
  // task adds into: chunk index when chunks share bias elements (the bias is
  // broadcast over batch or kv heads), times kv split when the bias is
  // broadcast over keys. Tasks with the same partial never touch the same element.
  bool dbias_partial_per_chunk;
  bool dbias_partial_per_kv_split;
  // The bias is broadcast along no dim: each dbias element belongs to exactly
  // one tile, which stores it (no zero-fill, no read-modify-write); tiles that
  // are skipped store zeros.
  bool dbias_store_direct;
};

// Decoding (decode_kernel.h): one task per (sequence, kv head, split of its keys); task t is
// split t % num_splits of kv head (t / num_splits) % Hkv of sequence
// sequence_order[t / (num_splits * Hkv)].
constexpr int64_t kMaxDecodeSplits = 64;

struct DecodePlan {
  ElementType dtype;
  ExactScales scales;  // scale and softcap (no dropout)
  int64_t num_splits;  // 1 .. kMaxDecodeSplits
  int64_t num_tasks;   // B * Hkv * num_splits
  const int64_t* sequence_order;  // (B): the sequences, those with the most visible keys first
  // num_splits > 1: each split's normalized output (num_splits, B, Sq, Hq, D) and lse
  // (num_splits, B, Hq, Sq), contiguous in the accumulation type, and per (sequence, kv head)
  // (b * Hkv + kv head) the number of its splits done: the last one merges them.
  void* partial_out;
  void* partial_lse;
  int64_t partial_lse_split_stride;
  std::atomic<int64_t>* splits_done;
};

struct TaskCounter {
  std::atomic<int64_t> next{0};
};

// Each worker runs tasks taken from `counter` until none is left.
using ForwardWorker = void (*)(const AttentionForwardParams&, const ForwardPlan&, TaskCounter&);
using BackwardWorker = void (*)(const AttentionBackwardParams&, const BackwardPlan&, TaskCounter&);
using DecodeWorker = void (*)(const DecodeParams&, const DecodePlan&, TaskCounter&);

struct KernelSet {
  const char* isa;
  ForwardWorker forward;
  BackwardWorker backward;
  DecodeWorker decode;
};

// AVX-512 (float32, bfloat16, float16): needs avx512f/bw/vl/dq at run time.
const KernelSet& avx512_kernels();
// AVX2 + FMA + F16C (float32, bfloat16, float16), for x86 CPUs without AVX-512.
const KernelSet& avx2_kernels();
// Portable code for every dtype, float64 included.
const KernelSet& generic_kernels();

// The instruction set the CPU kernels use for float32 and 16-bit inputs on this CPU
// (under FAST_ATTN_CPU_ISA): "avx512+bf16", "avx512", "avx2" or "generic".
const char* instruction_set_in_use();

// bfloat16 forward and backward on AVX512-BF16 dot products (2x the float FMA
// rate): need avx512bf16 at run time, an even head dim, and even strides and
// 4-byte aligned data for the tensors whose rows are read in place as bf16
// pairs (forward: k; backward: q and grad_out).
ForwardWorker avx512_bf16_dot_forward();
BackwardWorker avx512_bf16_dot_backward();

}  // namespace fast_attn::cpu
