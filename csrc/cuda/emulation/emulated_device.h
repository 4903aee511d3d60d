// A CPU emulator of the few device features fast_attn's CUDA kernels use, so
// that the kernels' own source (compiled by a host compiler with
// FAST_ATTN_CUDA_EMULATION) runs in tests on machines without a GPU.
//
// Each CTA runs its threads as cooperative fibers. Warp collectives (ldmatrix,
// mma.sync, shuffles) gather all 32 lanes and apply the PTX ISA definitions
// (fragment layouts of mma.m16n8k16 and ldmatrix .x4 / .x4.trans); the
// definitions live in this emulator only, never shared with the kernels, so a
// wrong kernel index shows up as a wrong result. cp.async copies land when the
// issuing thread waits for their group, not before. The emulator fails the
// launch (never crashes) on:
//   - shared-memory races: a read or write of bytes that another warp wrote or
//     read since the last __syncthreads, a read of bytes with a copy in flight,
//   - shared or global accesses out of bounds (global: outside every
//     registered allocation), misaligned ldmatrix / cp.async / atomic add
//     addresses (a vector atomic add is aligned to all its bytes),
//   - two CTAs of one launch writing the same global bytes without atomics, or
//     one reading what another wrote,
//   - barriers or collectives that not all threads reach, divergent
//     collectives, cp.async groups left in flight at exit,
//   - launch configurations an A100 (sm_80) would refuse: more than 1024
//     threads, more than 163 KiB of dynamic shared memory, grid limits.
#pragma once

#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <functional>

#include "../kernel_api.h"

namespace fast_attn::emu {

uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

char* dynamic_shared_memory();
void block_sync();

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16
void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool transpose);
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, d += a * b
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
// cp.async of `bytes` (4 or 16) bytes; zero-fill without reading when !fill.
void cp_async(void* smem, const void* gmem, int bytes, bool fill);
void cp_async_commit();
void cp_async_wait(int pending_groups);
uint32_t shfl_xor(uint32_t value, int lane_mask);
// vote.sync.any.pred over the whole warp
bool vote_any(bool predicate);

void check_global_read(const void* address, size_t bytes);
void check_global_write(const void* address, size_t bytes, bool atomic);
void note_shared_read(const void* address, size_t bytes);
void note_shared_write(const void* address, size_t bytes);

// Runs body once per thread of every CTA of the grid, CTAs one after another.
cuda::LaunchStatus launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

// Global memory the kernels may touch. With no range registered, global
// accesses are not bounds-checked.
void register_global_range(const void* begin, size_t bytes);
void unregister_global_range(const void* begin);
void clear_global_ranges();

// Launches emulated so far (tests check that empty problems launch nothing).
int64_t launch_count();

}  // namespace fast_attn::emu

#define threadIdx (::fast_attn::emu::thread_idx())
#define blockIdx (::fast_attn::emu::block_idx())
#define blockDim (::fast_attn::emu::block_dim())
#define gridDim (::fast_attn::emu::grid_dim())
