// TORCH_LIBRARY_IMPL(fast_attn, CPU): host side of the fused CPU kernels.
// Checks and allocates through attention_launch.h, plans the tasks (from
// shapes only, so results do not depend on the thread count), picks the
// instruction set at run time (kernel_selection.h) and runs the workers under
// at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "attention_launch.h"
#include "cpu/cpu_kernels.h"
#include "cpu/kernel_selection.h"
#include "op_signatures.h"

namespace fast_attn::cpu {
namespace {

// Backward parallelism: at least this many tasks when shapes allow, by
// splitting key blocks (each split has its own dq accumulator). A constant, not
// the thread count, so the result is the same on any machine setting.
constexpr int64_t kMinBackwardTasks = 8;
// Cap on the dq accumulators' memory from key splits (beyond one dq-sized one).
constexpr int64_t kMaxDqAccumulatorBytes = int64_t{256} << 20;
// When the bias is broadcast over batch or kv heads, units that share bias
// elements are grouped into at most this many chunks, each with its own dbias
// partial sum: bounds that memory to a few copies of the bias.
constexpr int64_t kMaxDbiasChunks = 4;

bool even_strides_and_aligned(const at::Tensor& t) {
  return t.stride(0) % 2 == 0 && t.stride(1) % 2 == 0 && t.stride(2) % 2 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0;
}

// Whether the bfloat16 dot-product kernels run: bfloat16 inputs, a CPU allowed
// AVX512-BF16, an even head dim, and the tensors whose rows they read in place
// as bf16 pairs with even strides and aligned data.
bool bf16_dot_products_apply(const at::Tensor& q, std::initializer_list<at::Tensor> read_as_pairs) {
  if (q.scalar_type() != at::kBFloat16 || !allowed_features().avx512_bf16 || q.size(3) % 2 != 0) return false;
  return std::all_of(read_as_pairs.begin(), read_as_pairs.end(), even_strides_and_aligned);
}

ForwardWorker forward_worker_for(const at::Tensor& q, const at::Tensor& k) {
  return bf16_dot_products_apply(q, {k}) ? avx512_bf16_dot_forward() : kernels_for(q.scalar_type()).forward;
}

BackwardWorker backward_worker_for(const at::Tensor& q, const at::Tensor& grad_out) {
  return bf16_dot_products_apply(q, {q, grad_out}) ? avx512_bf16_dot_backward()
                                                   : kernels_for(q.scalar_type()).backward;
}

// Sequence n of a varlen problem, for planning: its lengths, band and place in the packed rows
// (sequence_view's; its pointers, moved as bytes, stay inside the tensors and are not used).
AttentionForwardParams sequence_shape(const AttentionForwardParams& p, int64_t n) {
  return sequence_view<unsigned char>(p, n);
}

// Whether the sequences, as sequence_view cuts them, take the packed rows of q (of k and v
// with `keys`) in order and each once. Otherwise some rows are in no sequence: no task writes them.
bool sequences_cover_rows(const AttentionForwardParams& p, bool keys) {
  int64_t end = 0;
  for (int64_t n = 0; n < p.batch; ++n) {
    const AttentionForwardParams s = sequence_shape(p, n);
    if ((keys ? s.packed_offset_k : s.packed_offset_q) != end) return false;
    end += keys ? s.seqlen_k : s.seqlen_q;
  }
  return end == (keys ? p.packed_seqlen_k : p.packed_seqlen_q);
}

// The entries by decreasing cost, ties in their given order: the longest tasks start first
// (a balanced finish), in an order that depends on the shapes only.
template <class Entry>
std::vector<Entry> heaviest_first(std::vector<std::pair<int64_t, Entry>> weighted) {
  std::stable_sort(weighted.begin(), weighted.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<Entry> entries;
  entries.reserve(weighted.size());
  for (const auto& [cost, entry] : weighted) entries.push_back(entry);
  return entries;
}

// Varlen forward: every query head's query blocks of every sequence. The sequences go by decreasing
// cost (rows x keys in the band of each block), and within one, head after head, each head's blocks
// heaviest first: consecutive tasks read the same keys and values while they are in cache (blocks of
// all sequences and heads interleaved by cost alone took 1.08-1.12x the time on one thread), and
// the list still ends with the lightest blocks of the lightest sequence (a balanced finish).
std::vector<SequenceBlock> plan_sequence_blocks(const AttentionForwardParams& p) {
  std::vector<std::pair<int64_t, std::vector<SequenceBlock>>> sequences;
  for (int64_t n = 0; n < p.batch; ++n) {
    const AttentionForwardParams s = sequence_shape(p, n);
    std::vector<std::pair<int64_t, SequenceBlock>> blocks;  // head 0's
    int64_t cost = 0;
    for (int64_t q_block = 0; q_block * kBlockM < s.seqlen_q; ++q_block) {
      const int64_t i0 = q_block * kBlockM, rows = std::min(kBlockM, s.seqlen_q - i0);
      const IndexRange keys = band_keys_of_rows(s, i0, rows);
      blocks.push_back({rows * std::max<int64_t>(0, keys.end - keys.begin), SequenceBlock{n, 0, q_block}});
      cost += blocks.back().first;
    }
    const std::vector<SequenceBlock> head_blocks = heaviest_first(std::move(blocks));
    std::vector<SequenceBlock> tasks;
    tasks.reserve(head_blocks.size() * p.heads_q);
    for (int64_t h = 0; h < p.heads_q; ++h) {
      for (SequenceBlock block : head_blocks) tasks.push_back({block.sequence, h, block.q_block});
    }
    sequences.push_back({cost, std::move(tasks)});
  }
  std::vector<SequenceBlock> ordered;
  for (const std::vector<SequenceBlock>& tasks : heaviest_first(std::move(sequences))) {
    ordered.insert(ordered.end(), tasks.begin(), tasks.end());
  }
  return ordered;
}

// The multiply-adds of a forward's two products (S = q k^T, P v) over every query row and key (an
// estimate from the shapes that ignores bands and masks; the backward's are about twice as many).
int64_t product_multiply_adds(const at::Tensor& q, const at::Tensor& k) {
  return 2 * q.size(0) * q.size(1) * q.size(2) * k.size(2) * q.size(3);
}

ExactScales exact_scales(double scale, double dropout_p, double softcap) {
  return ExactScales{scale, dropout_p > 0.0 ? 1.0 / (1.0 - dropout_p) : 1.0, softcap};
}

// A new buffer of tens of MiB costs one page fault per 4 KiB on first touch:
// 13.7 ms for 32 MiB here, as long as the T5 case's whole backward math takes.
// Asking for transparent huge pages before the first touch (THP "madvise"
// mode) turns that into a few 2 MiB faults.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t aligned_begin = (begin + kHugePage - 1) / kHugePage * kHugePage;
  const uintptr_t aligned_end = end / kHugePage * kHugePage;
  if (aligned_end > aligned_begin) {
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const ForwardInputs& in) {
  const at::Tensor& q = in.q;
  const at::Tensor& k = in.k;
  check_forward_inputs(in);
  auto [out, lse] = allocate_forward_outputs(q);
  if (has_no_scores(q, k)) {
    fill_forward_without_scores(out, lse);
    return {out, lse};
  }
  const AttentionForwardParams params = make_forward_params(in, out, lse);
  ForwardPlan plan{};
  plan.dtype = element_type(q.scalar_type());
  plan.scales = exact_scales(in.scale, in.dropout_p, in.softcap);
  std::vector<SequenceBlock> sequence_blocks;
  if (is_varlen(params)) {
    if (!sequences_cover_rows(params, /*keys=*/false)) fill_forward_without_scores(out, lse);
    sequence_blocks = plan_sequence_blocks(params);
    plan.sequence_blocks = sequence_blocks.data();
    plan.num_tasks = static_cast<int64_t>(sequence_blocks.size());
  } else {
    plan.num_q_blocks = ceil_div(q.size(2), kBlockM);
    plan.num_tasks = q.size(0) * q.size(1) * plan.num_q_blocks;
    plan.last_query_block_first = !(band_bounds_left(params) && !band_bounds_right(params));
  }
  run_workers(forward_worker_for(q, k), params, plan, product_multiply_adds(q, k));
  return {out, lse};
}

struct BackwardSetup {
  BackwardPlan plan{};
  at::Tensor dq_accum;  // undefined when dq itself accumulates
  int64_t dbias_num_splits = 1;
  std::vector<SequenceSplit> sequence_splits;  // varlen: plan.sequence_splits points here (a move keeps it)
};

// The most kv splits whose dq accumulators fit in kMaxDqAccumulatorBytes (at least 1).
int64_t max_kv_splits(const at::Tensor& q) {
  const int64_t dq_bytes = q.numel() * static_cast<int64_t>(c10::elementSize(accumulation_dtype(q.scalar_type())));
  return std::max<int64_t>(1, kMaxDqAccumulatorBytes / std::max<int64_t>(1, dq_bytes));
}

// The dq accumulator of the plan's kv splits: dq itself (zeroed) when one split accumulates in
// dq's own type, else zeros (kv_splits, B, Hq, Sq, D) in the accumulation type.
void allocate_dq_accumulator(const at::Tensor& q, const at::Tensor& dq, BackwardSetup& setup) {
  BackwardPlan& plan = setup.plan;
  const at::ScalarType acc = accumulation_dtype(q.scalar_type());
  if (plan.kv_splits == 1 && q.scalar_type() == acc) {
    dq.zero_();
    plan.dq_accum = dq.data_ptr();
    plan.dq_accum_split_stride = 0;
    plan.dq_accum_batch_stride = dq.stride(0);
    plan.dq_accum_head_stride = dq.stride(1);
    plan.dq_accum_row_stride = dq.stride(2);
  } else {
    setup.dq_accum = at::zeros({plan.kv_splits, q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(acc));
    plan.dq_accum = setup.dq_accum.data_ptr();
    plan.dq_accum_split_stride = setup.dq_accum.stride(0);
    plan.dq_accum_batch_stride = setup.dq_accum.stride(1);
    plan.dq_accum_head_stride = setup.dq_accum.stride(2);
    plan.dq_accum_row_stride = setup.dq_accum.stride(3);
  }
}

BackwardSetup plan_backward(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& bias,
                            bool compute_dbias, const at::Tensor& dq, ExactScales scales) {
  const int64_t batch = q.size(0), heads_q = q.size(1), heads_kv = k.size(1);
  BackwardSetup setup;
  BackwardPlan& plan = setup.plan;
  plan.dtype = element_type(q.scalar_type());
  plan.scales = scales;
  const int64_t num_kv_blocks = ceil_div(k.size(2), kBackwardBlockN);

  const int64_t units = batch * heads_kv;
  const bool units_share_bias =
      compute_dbias && ((bias->size(0) == 1 && batch > 1) || (bias->size(1) == 1 && heads_kv > 1));
  plan.num_chunks = units_share_bias ? std::min(units, kMaxDbiasChunks) : units;
  plan.units_per_chunk = ceil_div(units, plan.num_chunks);
  plan.num_chunks = ceil_div(units, plan.units_per_chunk);

  const int64_t kv_splits = std::min(ceil_div(kMinBackwardTasks, plan.num_chunks), num_kv_blocks);
  plan.kv_splits = std::max<int64_t>(1, std::min(kv_splits, max_kv_splits(q)));
  plan.num_tasks = plan.num_chunks * plan.kv_splits;

  plan.dbias_partial_per_chunk = units_share_bias;
  plan.dbias_partial_per_kv_split = compute_dbias && bias->size(3) == 1 && plan.kv_splits > 1;
  setup.dbias_num_splits = (plan.dbias_partial_per_chunk ? plan.num_chunks : 1) *
                           (plan.dbias_partial_per_kv_split ? plan.kv_splits : 1);
  plan.dbias_store_direct = compute_dbias && bias->size(0) == batch && bias->size(1) == heads_q &&
                            bias->size(2) == q.size(2) && bias->size(3) == k.size(2);
  allocate_dq_accumulator(q, dq, setup);
  return setup;
}

// Varlen backward (no bias): tasks of one kv head and one split of one sequence's key blocks.
// Enough kv splits that each split of the heaviest (sequence, kv head) unit costs at most
// 1 / kMinBackwardTasks of the whole, where its blocks allow (for sequences of one length, the
// ceil(kMinBackwardTasks / units) of plan_backward), then every nonempty split of every
// sequence, heaviest first. Costs: keys x query rows in their band.
BackwardSetup plan_sequences_backward(const AttentionForwardParams& p, const at::Tensor& q, const at::Tensor& dq,
                                      ExactScales scales) {
  std::vector<std::vector<int64_t>> block_costs(p.batch);  // of each sequence's key blocks
  int64_t total = 0, heaviest = 0, most_blocks = 1;
  for (int64_t n = 0; n < p.batch; ++n) {
    const AttentionForwardParams s = sequence_shape(p, n);
    int64_t sequence_cost = 0;
    for (int64_t j0 = 0; j0 < s.seqlen_k; j0 += kBackwardBlockN) {
      const int64_t cols = std::min(kBackwardBlockN, s.seqlen_k - j0);
      const IndexRange rows = band_rows_of_keys(s, j0, cols);
      block_costs[n].push_back(cols * std::max<int64_t>(0, rows.end - rows.begin));
      sequence_cost += block_costs[n].back();
    }
    total += sequence_cost * p.heads_kv;
    heaviest = std::max(heaviest, sequence_cost);
    most_blocks = std::max(most_blocks, static_cast<int64_t>(block_costs[n].size()));
  }
  BackwardSetup setup;
  BackwardPlan& plan = setup.plan;
  plan.dtype = element_type(q.scalar_type());
  plan.scales = scales;
  const int64_t wanted_splits = total > 0 ? ceil_div(kMinBackwardTasks * heaviest, total) : 1;
  plan.kv_splits = std::max<int64_t>(1, std::min({wanted_splits, most_blocks, max_kv_splits(q)}));

  std::vector<std::pair<int64_t, SequenceSplit>> splits;
  for (int64_t n = 0; n < p.batch; ++n) {
    const int64_t blocks = static_cast<int64_t>(block_costs[n].size());
    for (int64_t split = 0; split < std::min(plan.kv_splits, blocks); ++split) {
      int64_t cost = 0;
      for (int64_t block = split; block < blocks; block += plan.kv_splits) cost += block_costs[n][block];
      splits.push_back({cost, SequenceSplit{n, split}});
    }
  }
  setup.sequence_splits = heaviest_first(std::move(splits));
  plan.sequence_splits = setup.sequence_splits.data();
  plan.num_tasks = static_cast<int64_t>(setup.sequence_splits.size()) * p.heads_kv;
  allocate_dq_accumulator(q, dq, setup);
  return setup;
}

// dbias partial sums (num_splits, Bb, Hb, Sqb, Skb) in the accumulation type;
// zeroed unless every element is stored directly.
at::Tensor dbias_partials_for(const at::Tensor& bias, const BackwardSetup& setup) {
  const at::Tensor partials =
      at::empty({setup.dbias_num_splits, bias.size(0), bias.size(1), bias.size(2), bias.size(3)},
                bias.options().dtype(accumulation_dtype(bias.scalar_type())));
  advise_huge_pages(partials);
  if (!setup.plan.dbias_store_direct) partials.zero_();
  return partials;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const ForwardInputs& in,
                                                                                 const BackwardInputs& grads) {
  const at::Tensor& q = in.q;
  const at::Tensor& k = in.k;
  const at::Tensor& v = in.v;
  const std::optional<at::Tensor>& bias = in.bias;
  const bool compute_dbias = grads.compute_dbias;  // grads.deterministic: this backward always is
  check_forward_inputs(in);
  TORCH_CHECK(!compute_dbias || bias.has_value(), "fast_attn: compute_dbias needs a bias");
  TORCH_CHECK(grads.grad_out.sizes() == q.sizes() && grads.out.sizes() == q.sizes(),
              "fast_attn: grad_out and out must have q's shape ", q.sizes());
  TORCH_CHECK(grads.lse.sizes() == q.sizes().slice(0, 3), "fast_attn: lse must have shape (B, Hq, Sq)");
  const at::Tensor grad_out = grads.grad_out.scalar_type() == q.scalar_type() && grads.grad_out.stride(3) == 1
                                  ? grads.grad_out
                                  : grads.grad_out.to(q.scalar_type()).contiguous();

  if (has_no_scores(q, k)) return backward_without_scores(q, k, v, bias, compute_dbias);
  at::Tensor dq = empty_bshd_like(q);
  at::Tensor dk = empty_bshd_like(k);
  at::Tensor dv = empty_bshd_like(v);

  const at::ScalarType acc = accumulation_dtype(q.scalar_type());
  const at::Tensor delta = compute_delta(grad_out, grads.out, grads.grad_lse);
  const at::Tensor lse_acc = grads.lse.to(acc).contiguous();
  const ExactScales scales = exact_scales(in.scale, in.dropout_p, in.softcap);
  // Varlen plans from the sequences (the forward params; the backward's are made once the
  // dbias partials, which other plans size, exist).
  BackwardSetup setup = in.cu_seqlens_q
                            ? plan_sequences_backward(make_forward_params(in, grads.out, lse_acc), q, dq, scales)
                            : plan_backward(q, k, bias, compute_dbias, dq, scales);
  std::optional<at::Tensor> dbias_partials;
  if (compute_dbias) dbias_partials = dbias_partials_for(*bias, setup);

  const BackwardTensors tensors{grad_out, grads.out, lse_acc, delta, dq, dk, dv, dbias_partials};
  const AttentionBackwardParams params = make_backward_params(in, tensors);
  if (is_varlen(params) && !sequences_cover_rows(params, /*keys=*/true)) {
    dk.zero_();  // keys in no sequence: no task writes them
    dv.zero_();
  }
  run_workers(backward_worker_for(q, grad_out), params, setup.plan, 2 * product_multiply_adds(q, k));

  if (setup.dq_accum.defined()) {
    dq.copy_(setup.plan.kv_splits == 1 ? setup.dq_accum[0] : setup.dq_accum.sum(0));
  }
  at::Tensor dbias = compute_dbias ? finish_dbias(*dbias_partials, *bias) : q.new_empty({0});
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace fast_attn::cpu

TORCH_LIBRARY_IMPL(fast_attn, CPU, m) {
  m.impl("attention_forward", &fast_attn::attention_forward_op<&fast_attn::cpu::attention_forward_cpu>);
  m.impl("attention_backward", &fast_attn::attention_backward_op<&fast_attn::cpu::attention_backward_cpu>);
}
