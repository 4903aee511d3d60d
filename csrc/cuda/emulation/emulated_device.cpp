// The CPU warp emulator declared in emulated_device.h. Single-threaded: CTAs
// run one after another, the threads of a CTA as fibers (fiber_context.h) that
// switch at barriers and warp collectives.
#include "emulated_device.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "fiber_context.h"

namespace fast_attn::emu {
namespace {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kMaxDynamicSharedBytes = 166912;  // sm_80's opt-in limit (163 KiB); sm_90 allows 227 KiB
constexpr uint32_t kNever = 0xffffffffu;

enum class FiberState { kRunnable, kAtBarrier, kInCollective, kExited };
enum class Collective { kNone, kLdmatrix, kLdmatrixTrans, kMma, kShuffle, kVoteAny };

const char* collective_name(Collective kind) {
  switch (kind) {
    case Collective::kLdmatrix: return "ldmatrix.x4";
    case Collective::kLdmatrixTrans: return "ldmatrix.x4.trans";
    case Collective::kMma: return "mma.sync.m16n8k16";
    case Collective::kShuffle: return "shfl.sync.bfly";
    case Collective::kVoteAny: return "vote.sync.any";
    default: return "none";
  }
}

struct CopyRequest {
  char* dst;
  const char* src;
  int bytes;
  bool fill;
};

struct Fiber {
  FiberContext context;
  std::unique_ptr<char[]> stack;
  uint3 index;
  int warp;
  int lane;
  FiberState state;
  std::vector<CopyRequest> open_group;
  std::vector<std::vector<CopyRequest>> committed_groups;
};

struct LaneSlot {
  // inputs
  const char* address;
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
  uint32_t value;
  int lane_mask;
  bool bf16;
  // outputs
  uint32_t r[4];
  float d[4];
};

struct WarpState {
  int arrived = 0;
  Collective kind = Collective::kNone;
  LaneSlot lanes[kWarpSize];
};

// Per shared-memory byte: who wrote / read it in which barrier epoch, and how
// many cp.async copies to it are in flight.
struct SharedShadow {
  std::vector<uint32_t> write_epoch;
  std::vector<int32_t> write_warp;
  std::vector<uint32_t> read_epoch;
  std::vector<uint32_t> read_warps;  // bit mask of warps (at most 32 warps per CTA)
  std::vector<uint16_t> pending;

  void reset(size_t bytes) {
    write_epoch.assign(bytes, kNever);
    write_warp.assign(bytes, -1);
    read_epoch.assign(bytes, kNever);
    read_warps.assign(bytes, 0);
    pending.assign(bytes, 0);
  }
};

// Global writes are tracked per 2 bytes, the smallest store of the kernels (one
// 16-bit element): CTAs may write neighbouring 16-bit elements.
constexpr uintptr_t kWriteGrain = 2;

struct WordOwner {
  uint64_t cta;
  bool atomic_only;
};

struct Runtime {
  dim3 grid{1, 1, 1};
  dim3 block{1, 1, 1};
  int threads = 0;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  std::vector<char> shared;
  size_t shared_bytes = 0;
  SharedShadow shadow;
  uint3 block_index{0, 0, 0};
  uint64_t cta = 0;
  uint32_t epoch = 0;
  int at_barrier = 0;
  FiberContext scheduler;
  Fiber* current = nullptr;
  bool failed = false;
  std::string error;
  std::unordered_map<uintptr_t, WordOwner> written_words;  // this launch's plain/atomic global writes
};

Runtime g_runtime;
std::map<uintptr_t, size_t> g_global_ranges;
int64_t g_launches = 0;

std::string describe_position() {
  const Runtime& rt = g_runtime;
  std::string where = "block (" + std::to_string(rt.block_index.x) + ", " + std::to_string(rt.block_index.y) +
                      ", " + std::to_string(rt.block_index.z) + ")";
  if (rt.current != nullptr) {
    where += " thread " + std::to_string(rt.current->index.x) + " (warp " + std::to_string(rt.current->warp) +
             ", lane " + std::to_string(rt.current->lane) + ")";
  }
  return where;
}

void record_failure(const std::string& message) {
  if (!g_runtime.failed) {
    g_runtime.failed = true;
    g_runtime.error = "fast_attn CUDA emulator: " + message + " at " + describe_position();
  }
}

// Called on a fiber: record the failure and never resume this fiber.
[[noreturn]] void fail(const std::string& message) {
  record_failure(message);
  Fiber* fiber = g_runtime.current;
  fiber->state = FiberState::kExited;
  switch_context(fiber->context, g_runtime.scheduler);
  __builtin_unreachable();
}

void yield_to_scheduler() {
  Fiber* fiber = g_runtime.current;
  switch_context(fiber->context, g_runtime.scheduler);
}

std::string hex(const void* p) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%p", p);
  return buffer;
}

size_t shared_offset(const void* address, size_t bytes, const char* what) {
  const char* p = static_cast<const char*>(address);
  const char* base = g_runtime.shared.data();
  if (p < base || p + bytes > base + g_runtime.shared_bytes) {
    fail(std::string(what) + " outside the " + std::to_string(g_runtime.shared_bytes) +
         " bytes of dynamic shared memory (offset " + std::to_string(p - base) + ", " + std::to_string(bytes) +
         " bytes)");
  }
  return static_cast<size_t>(p - base);
}

uint32_t warp_bit(int warp) { return 1u << warp; }

void shared_read(const void* address, size_t bytes, const char* what) {
  const size_t offset = shared_offset(address, bytes, what);
  SharedShadow& s = g_runtime.shadow;
  const uint32_t epoch = g_runtime.epoch;
  const int warp = g_runtime.current->warp;
  for (size_t i = offset; i < offset + bytes; ++i) {
    if (s.pending[i] != 0) {
      fail(std::string(what) + " reads shared offset " + std::to_string(i) +
           " while a cp.async to it is in flight (missing cp.async.wait_group or __syncthreads)");
    }
    if (s.write_epoch[i] == epoch && s.write_warp[i] != warp) {
      fail(std::string(what) + " reads shared offset " + std::to_string(i) + " written by warp " +
           std::to_string(s.write_warp[i]) + " since the last __syncthreads (race)");
    }
    if (s.read_epoch[i] != epoch) {
      s.read_epoch[i] = epoch;
      s.read_warps[i] = 0;
    }
    s.read_warps[i] |= warp_bit(warp);
  }
}

void check_shared_overwrite(size_t i, const char* what) {
  SharedShadow& s = g_runtime.shadow;
  const uint32_t epoch = g_runtime.epoch;
  const int warp = g_runtime.current->warp;
  if (s.read_epoch[i] == epoch && (s.read_warps[i] & ~warp_bit(warp)) != 0) {
    fail(std::string(what) + " overwrites shared offset " + std::to_string(i) +
         " that another warp read since the last __syncthreads (race)");
  }
  if (s.write_epoch[i] == epoch && s.write_warp[i] != warp) {
    fail(std::string(what) + " writes shared offset " + std::to_string(i) + " that warp " +
         std::to_string(s.write_warp[i]) + " wrote since the last __syncthreads (race)");
  }
}

void shared_write(const void* address, size_t bytes, const char* what) {
  const size_t offset = shared_offset(address, bytes, what);
  SharedShadow& s = g_runtime.shadow;
  for (size_t i = offset; i < offset + bytes; ++i) {
    if (s.pending[i] != 0) {
      fail(std::string(what) + " writes shared offset " + std::to_string(i) + " while a cp.async to it is in flight");
    }
    check_shared_overwrite(i, what);
    s.write_epoch[i] = g_runtime.epoch;
    s.write_warp[i] = g_runtime.current->warp;
  }
}

void check_global_range(const void* address, size_t bytes, const char* what) {
  if (g_global_ranges.empty()) {
    return;
  }
  const uintptr_t begin = reinterpret_cast<uintptr_t>(address);
  auto it = g_global_ranges.upper_bound(begin);
  if (it != g_global_ranges.begin()) {
    --it;
    if (begin >= it->first && begin + bytes <= it->first + it->second) {
      return;
    }
  }
  fail(std::string(what) + " of " + std::to_string(bytes) + " bytes at " + hex(address) +
       " outside every allocation the kernel was given");
}

uint16_t half_bits(uint32_t reg, int half) { return static_cast<uint16_t>(reg >> (16 * half)); }

float decode(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    return value;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

// ldmatrix .x4: lanes 8m .. 8m+7 address rows 0..7 of matrix m (16 bytes each).
// Without .trans, lane l receives in register m the elements
// (row l / 4, columns 2 (l % 4), 2 (l % 4) + 1) of matrix m; with .trans,
// (rows 2 (l % 4), 2 (l % 4) + 1, column l / 4). The lower element goes to the
// low half.
void execute_ldmatrix(WarpState& w, bool transpose) {
  uint16_t matrix[4][8][8];
  for (int m = 0; m < 4; ++m) {
    for (int row = 0; row < 8; ++row) {
      const char* address = w.lanes[8 * m + row].address;
      if (reinterpret_cast<uintptr_t>(address) % 16 != 0) {
        fail("ldmatrix row address " + hex(address) + " is not 16-byte aligned");
      }
      shared_read(address, 16, "ldmatrix");
      std::memcpy(matrix[m][row], address, 16);
    }
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int group = lane / 4;
    const int pair = 2 * (lane % 4);
    for (int m = 0; m < 4; ++m) {
      uint16_t lo, hi;
      if (transpose) {
        lo = matrix[m][pair][group];
        hi = matrix[m][pair + 1][group];
      } else {
        lo = matrix[m][group][pair];
        hi = matrix[m][group][pair + 1];
      }
      w.lanes[lane].r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

// mma.m16n8k16 floating point fragments (PTX ISA 9.7.14.5.8), with
// groupID = lane >> 2 and threadID_in_group = lane % 4:
//   A: a_i (i = 0..7, register i / 2, half i % 2):
//      row = groupID for i in {0, 1, 4, 5}, groupID + 8 otherwise;
//      col = threadID_in_group * 2 + (i & 1), + 8 for i >= 4.
//   B: b_i (i = 0..3, register i / 2, half i % 2):
//      row = threadID_in_group * 2 + (i & 1), + 8 for i >= 2; col = groupID.
//   C, D: c_i (i = 0..3): row = groupID for i < 2, groupID + 8 otherwise;
//      col = threadID_in_group * 2 + (i & 1).
void execute_mma(WarpState& w) {
  float a[16][16], b[16][8], c[16][8];
  int a_seen[16][16] = {}, b_seen[16][8] = {};
  const bool bf16 = w.lanes[0].bf16;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const LaneSlot& in = w.lanes[lane];
    if (in.bf16 != bf16) {
      fail("mma lanes disagree on the operand type");
    }
    const int group = lane >> 2;
    const int tig = lane % 4;
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      a[row][col] = decode(half_bits(in.a[i / 2], i % 2), bf16);
      ++a_seen[row][col];
    }
    for (int i = 0; i < 4; ++i) {
      const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      b[row][group] = decode(half_bits(in.b[i / 2], i % 2), bf16);
      ++b_seen[row][group];
    }
    for (int i = 0; i < 4; ++i) {
      c[i < 2 ? group : group + 8][tig * 2 + (i & 1)] = in.c[i];
    }
  }
  for (int row = 0; row < 16; ++row) {
    for (int col = 0; col < 16; ++col) {
      if (a_seen[row][col] != 1 || (col < 8 && b_seen[row][col] != 1)) {
        fail("emulator mma fragment tables do not cover each element once");
      }
    }
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int group = lane >> 2;
    const int tig = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? group : group + 8;
      const int col = tig * 2 + (i & 1);
      double sum = 0.0;
      for (int k = 0; k < 16; ++k) {
        sum += static_cast<double>(a[row][k]) * static_cast<double>(b[k][col]);
      }
      w.lanes[lane].d[i] = static_cast<float>(static_cast<double>(c[row][col]) + sum);
    }
  }
}

void execute_shuffle(WarpState& w) {
  const int mask = w.lanes[0].lane_mask;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    if (w.lanes[lane].lane_mask != mask) {
      fail("shfl.sync.bfly lanes disagree on the lane mask");
    }
  }
  uint32_t values[kWarpSize];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    values[lane] = w.lanes[lane].value;
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    w.lanes[lane].r[0] = values[lane ^ mask];
  }
}

// Deposits this lane's inputs; the last lane to arrive executes the collective
// for the whole warp and wakes the others. Returns this lane's slot.
void execute_vote_any(WarpState& w) {
  bool any = false;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    any = any || w.lanes[lane].value != 0;
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    w.lanes[lane].r[0] = any ? 1 : 0;
  }
}

LaneSlot& warp_collective(Collective kind, const LaneSlot& input) {
  Runtime& rt = g_runtime;
  Fiber* fiber = rt.current;
  WarpState& w = rt.warps[fiber->warp];
  if (w.arrived == 0) {
    w.kind = kind;
  } else if (w.kind != kind) {
    fail(std::string("divergent warp collective: ") + collective_name(kind) + " while other lanes are in " +
         collective_name(w.kind));
  }
  w.lanes[fiber->lane] = input;
  if (++w.arrived == kWarpSize) {
    switch (kind) {
      case Collective::kLdmatrix: execute_ldmatrix(w, false); break;
      case Collective::kLdmatrixTrans: execute_ldmatrix(w, true); break;
      case Collective::kMma: execute_mma(w); break;
      case Collective::kShuffle: execute_shuffle(w); break;
      case Collective::kVoteAny: execute_vote_any(w); break;
      default: break;
    }
    w.arrived = 0;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      Fiber& other = rt.fibers[fiber->warp * kWarpSize + lane];
      if (other.state == FiberState::kInCollective) {
        other.state = FiberState::kRunnable;
      }
    }
  } else {
    fiber->state = FiberState::kInCollective;
    yield_to_scheduler();
  }
  return w.lanes[fiber->lane];
}

void complete_copy(const CopyRequest& request) {
  Runtime& rt = g_runtime;
  const size_t offset = static_cast<size_t>(request.dst - rt.shared.data());
  for (size_t i = offset; i < offset + request.bytes; ++i) {
    --rt.shadow.pending[i];
    check_shared_overwrite(i, "cp.async (landing)");
    rt.shadow.write_epoch[i] = rt.epoch;
    rt.shadow.write_warp[i] = rt.current->warp;
  }
  if (request.fill) {
    std::memcpy(request.dst, request.src, request.bytes);
  } else {
    std::memset(request.dst, 0, request.bytes);
  }
}

[[noreturn]] void fiber_main() {
  (*g_runtime.body)();
  Fiber* fiber = g_runtime.current;
  if (!fiber->open_group.empty() || !fiber->committed_groups.empty()) {
    fail("thread exits with cp.async copies still in flight");
  }
  fiber->state = FiberState::kExited;
  switch_context(fiber->context, g_runtime.scheduler);
  __builtin_unreachable();
}

std::string deadlock_description() {
  int at_barrier = 0, in_collective = 0, exited = 0;
  for (const Fiber& f : g_runtime.fibers) {
    at_barrier += f.state == FiberState::kAtBarrier;
    in_collective += f.state == FiberState::kInCollective;
    exited += f.state == FiberState::kExited;
  }
  return "deadlock: " + std::to_string(at_barrier) + " threads wait at __syncthreads, " +
         std::to_string(in_collective) + " in a warp collective, " + std::to_string(exited) +
         " exited (barriers and collectives must be reached by all threads)";
}

bool run_block() {
  Runtime& rt = g_runtime;
  std::memset(rt.shared.data(), 0xff, rt.shared.size());  // unwritten shared memory reads as NaN
  rt.shadow.reset(rt.shared_bytes);
  rt.epoch = 0;
  rt.at_barrier = 0;
  for (WarpState& w : rt.warps) {
    w.arrived = 0;
    w.kind = Collective::kNone;
  }
  for (int t = 0; t < rt.threads; ++t) {
    Fiber& f = rt.fibers[t];
    f.index = {static_cast<unsigned>(t % rt.block.x), static_cast<unsigned>((t / rt.block.x) % rt.block.y),
               static_cast<unsigned>(t / (rt.block.x * rt.block.y))};
    f.warp = t / kWarpSize;
    f.lane = t % kWarpSize;
    f.state = FiberState::kRunnable;
    f.open_group.clear();
    f.committed_groups.clear();
    start_context(f.context, f.stack.get(), kStackBytes, fiber_main);
  }
  while (true) {
    bool ran = false;
    bool all_exited = true;
    for (int t = 0; t < rt.threads; ++t) {
      Fiber& f = rt.fibers[t];
      if (f.state == FiberState::kRunnable) {
        ran = true;
        rt.current = &f;
        switch_context(rt.scheduler, f.context);
        rt.current = nullptr;
        if (rt.failed) {
          return false;
        }
      }
      all_exited = all_exited && f.state == FiberState::kExited;
    }
    if (all_exited) {
      return true;
    }
    if (!ran) {
      record_failure(deadlock_description());
      return false;
    }
  }
}

Fiber& current_fiber() { return *g_runtime.current; }

}  // namespace

uint3 thread_idx() { return g_runtime.current->index; }
uint3 block_idx() { return g_runtime.block_index; }
dim3 block_dim() { return g_runtime.block; }
dim3 grid_dim() { return g_runtime.grid; }

char* dynamic_shared_memory() { return g_runtime.shared.data(); }

void block_sync() {
  Runtime& rt = g_runtime;
  Fiber& fiber = current_fiber();
  fiber.state = FiberState::kAtBarrier;
  if (++rt.at_barrier == rt.threads) {
    rt.at_barrier = 0;
    ++rt.epoch;
    for (int t = 0; t < rt.threads; ++t) {
      if (rt.fibers[t].state == FiberState::kAtBarrier) {
        rt.fibers[t].state = FiberState::kRunnable;
      }
    }
    return;
  }
  yield_to_scheduler();
}

void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool transpose) {
  LaneSlot input{};
  input.address = static_cast<const char*>(row_address);
  const LaneSlot& out = warp_collective(transpose ? Collective::kLdmatrixTrans : Collective::kLdmatrix, input);
  for (int i = 0; i < 4; ++i) {
    r[i] = out.r[i];
  }
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  LaneSlot input{};
  for (int i = 0; i < 4; ++i) {
    input.a[i] = a[i];
    input.c[i] = d[i];
  }
  input.b[0] = b0;
  input.b[1] = b1;
  input.bf16 = bf16;
  const LaneSlot& out = warp_collective(Collective::kMma, input);
  for (int i = 0; i < 4; ++i) {
    d[i] = out.d[i];
  }
}

uint32_t shfl_xor(uint32_t value, int lane_mask) {
  LaneSlot input{};
  input.value = value;
  input.lane_mask = lane_mask;
  return warp_collective(Collective::kShuffle, input).r[0];
}

bool vote_any(bool predicate) {
  LaneSlot input{};
  input.value = predicate ? 1 : 0;
  return warp_collective(Collective::kVoteAny, input).r[0] != 0;
}

void cp_async(void* smem, const void* gmem, int bytes, bool fill) {
  Runtime& rt = g_runtime;
  char* dst = static_cast<char*>(smem);
  const size_t offset = shared_offset(dst, bytes, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0) {
    fail("cp.async destination " + hex(dst) + " is not aligned to its " + std::to_string(bytes) + " bytes");
  }
  if (fill) {
    if (reinterpret_cast<uintptr_t>(gmem) % bytes != 0) {
      fail("cp.async source " + hex(gmem) + " is not aligned to its " + std::to_string(bytes) + " bytes");
    }
    check_global_read(gmem, bytes);
  }
  for (size_t i = offset; i < offset + bytes; ++i) {
    if (rt.shadow.pending[i] != 0) {
      fail("cp.async to shared offset " + std::to_string(i) + " while an earlier copy to it is in flight");
    }
    check_shared_overwrite(i, "cp.async (issue)");
    ++rt.shadow.pending[i];
  }
  current_fiber().open_group.push_back({dst, static_cast<const char*>(gmem), bytes, fill});
}

void cp_async_commit() {
  Fiber& fiber = current_fiber();
  fiber.committed_groups.push_back(std::move(fiber.open_group));
  fiber.open_group.clear();
}

void cp_async_wait(int pending_groups) {
  Fiber& fiber = current_fiber();
  while (static_cast<int>(fiber.committed_groups.size()) > pending_groups) {
    for (const CopyRequest& request : fiber.committed_groups.front()) {
      complete_copy(request);
    }
    fiber.committed_groups.erase(fiber.committed_groups.begin());
  }
}

void check_global_read(const void* address, size_t bytes) {
  check_global_range(address, bytes, "global read");
  Runtime& rt = g_runtime;
  if (rt.written_words.empty()) {
    return;
  }
  const uintptr_t begin = reinterpret_cast<uintptr_t>(address) & ~(kWriteGrain - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(address) + bytes;
  for (uintptr_t word = begin; word < end; word += kWriteGrain) {
    auto it = rt.written_words.find(word);
    if (it != rt.written_words.end() && it->second.cta != rt.cta) {
      fail("global read at " + hex(reinterpret_cast<void*>(word)) +
           " of bytes another CTA of this launch wrote (race)");
    }
  }
}

void check_global_write(const void* address, size_t bytes, bool atomic) {
  check_global_range(address, bytes, atomic ? "global atomic add" : "global write");
  if (atomic && reinterpret_cast<uintptr_t>(address) % bytes != 0) {
    fail("global atomic add of " + std::to_string(bytes) + " bytes at " + hex(address) + " is not aligned to them");
  }
  Runtime& rt = g_runtime;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(address) & ~(kWriteGrain - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(address) + bytes;
  for (uintptr_t word = begin; word < end; word += kWriteGrain) {
    auto [it, inserted] = rt.written_words.try_emplace(word, WordOwner{rt.cta, atomic});
    if (!inserted) {
      if (it->second.cta != rt.cta && !(atomic && it->second.atomic_only)) {
        fail("global bytes at " + hex(reinterpret_cast<void*>(word)) +
             " written by two CTAs of one launch without atomics (race)");
      }
      it->second.atomic_only = it->second.atomic_only && atomic;
    }
  }
}

void note_shared_read(const void* address, size_t bytes) { shared_read(address, bytes, "shared load"); }
void note_shared_write(const void* address, size_t bytes) { shared_write(address, bytes, "shared store"); }

cuda::LaunchStatus launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  static std::string last_error;
  Runtime& rt = g_runtime;
  ++g_launches;
  rt.failed = false;
  rt.error.clear();
  rt.current = nullptr;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  std::string config_error;
  if (threads == 0 || threads > 1024 || threads % kWarpSize != 0) {
    config_error = "block of " + std::to_string(threads) + " threads (must be a multiple of 32, at most 1024)";
  } else if (smem_bytes > kMaxDynamicSharedBytes) {
    config_error = std::to_string(smem_bytes) + " bytes of dynamic shared memory exceed sm_80's " +
                   std::to_string(kMaxDynamicSharedBytes);
  } else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
             grid.z > 65535) {
    config_error = "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                   std::to_string(grid.z) + ") outside CUDA's limits";
  }
  if (!config_error.empty()) {
    last_error = "fast_attn CUDA emulator: invalid launch: " + config_error;
    return {false, last_error.c_str()};
  }
  rt.grid = grid;
  rt.block = block;
  rt.threads = static_cast<int>(threads);
  rt.body = &body;
  if (rt.fibers.size() < threads) {
    rt.fibers.resize(threads);
  }
  for (int t = 0; t < rt.threads; ++t) {
    if (!rt.fibers[t].stack) {
      rt.fibers[t].stack.reset(new char[kStackBytes]);
    }
  }
  rt.warps.assign(threads / kWarpSize, WarpState{});
  rt.shared_bytes = smem_bytes;
  rt.shared.assign(smem_bytes + 16, 0);  // +16 keeps data() valid for 0 bytes
  rt.written_words.clear();
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        rt.block_index = {x, y, z};
        rt.cta = x + static_cast<uint64_t>(grid.x) * (y + static_cast<uint64_t>(grid.y) * z);
        if (!run_block()) {
          last_error = rt.error;
          rt.written_words.clear();
          return {false, last_error.c_str()};
        }
      }
    }
  }
  rt.written_words.clear();
  return cuda::launch_ok();
}

void register_global_range(const void* begin, size_t bytes) {
  g_global_ranges[reinterpret_cast<uintptr_t>(begin)] = bytes;
}

void unregister_global_range(const void* begin) { g_global_ranges.erase(reinterpret_cast<uintptr_t>(begin)); }

void clear_global_ranges() { g_global_ranges.clear(); }

int64_t launch_count() { return g_launches; }

}  // namespace fast_attn::emu
