// Everything a fast_attn kernel does besides plain arithmetic goes through this
// header: tensor-core fragments (ldmatrix, mma.sync m16n8k16), cp.async, warp
// shuffles, barriers, global and shared memory accesses, kernel launches.
//
// Compiled by nvcc these are thin inline PTX. Compiled by a host compiler with
// FAST_ATTN_CUDA_EMULATION defined (tests on machines without a GPU), the same
// names run on a CPU warp emulator (emulation/emulated_device.h) that models
// the PTX fragment layouts, cp.async groups and barriers, and checks memory
// bounds and shared-memory races: the kernel source itself is what is tested.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kernel_api.h"

#if defined(FAST_ATTN_CUDA_EMULATION)
#include "emulation/emulated_device.h"
#define FA_DEVICE inline
#define FA_KERNEL(max_threads, min_blocks)
#define FA_UNROLL
#define FA_NO_UNROLL
#else
#define FA_DEVICE __device__ __forceinline__
#define FA_KERNEL(max_threads, min_blocks) __global__ __launch_bounds__(max_threads, min_blocks)
#define FA_UNROLL _Pragma("unroll")
#define FA_NO_UNROLL _Pragma("unroll 1")
#endif

namespace fast_attn::cuda {

constexpr int kWarpSize = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

FAST_ATTN_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

FA_DEVICE float negative_infinity() { return -__builtin_huge_valf(); }

// Floats per lane of one dq atomic (or, deterministic, read-modify-write) instruction of the
// kernels that write dq_accum's blocked layout (DqAccumLayout, kernel_api.h): 4 on sm_90
// (red.global.add.v4.f32, REDG.E.ADD.F32x4), 1 before it (scalar red, a warp's 32 floats
// contiguous). The emulator runs the sm_90 code. The convert kernel, compiled for the same
// arch, reads the same layout.
#if defined(FAST_ATTN_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
constexpr int kDqAccumVector = 4;
#else
constexpr int kDqAccumVector = 1;
#endif

// ---------------------------------------------------------------------------
// 16-bit element types: packing two floats into the 32-bit registers of MMA
// operands (the lower-index element in the low half, as PTX orders a0, a1).

template <typename Element>
struct ElementOps;

template <>
struct ElementOps<__half> {
  static constexpr ElementType kType = ElementType::kFloat16;
  static FA_DEVICE uint32_t pack(float lo, float hi) {
    const __half2 pair = __floats2half2_rn(lo, hi);
    uint32_t bits;
    std::memcpy(&bits, &pair, sizeof(bits));
    return bits;
  }
  static FA_DEVICE float to_float(__half x) { return __half2float(x); }
  static FA_DEVICE __half from_float(float x) { return __float2half_rn(x); }
  static FA_DEVICE float bits_to_float(uint16_t bits) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
};

template <>
struct ElementOps<__nv_bfloat16> {
  static constexpr ElementType kType = ElementType::kBFloat16;
  static FA_DEVICE uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    std::memcpy(&bits, &pair, sizeof(bits));
    return bits;
  }
  static FA_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static FA_DEVICE __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static FA_DEVICE float bits_to_float(uint16_t bits) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
};

template <ElementType kElement>
struct ElementOf;
template <>
struct ElementOf<ElementType::kFloat16> {
  using type = __half;
};
template <>
struct ElementOf<ElementType::kBFloat16> {
  using type = __nv_bfloat16;
};

// Vectors of 8 16-bit elements, moved as one 16-byte uint4 (lower index in the lower bytes).

template <typename Element>
FA_DEVICE float dot8(const uint4& x, const uint4& y) {
  uint16_t xs[8], ys[8];
  std::memcpy(xs, &x, sizeof(xs));
  std::memcpy(ys, &y, sizeof(ys));
  float sum = 0.0f;
  FA_UNROLL
  for (int i = 0; i < 8; ++i) {
    sum += ElementOps<Element>::bits_to_float(xs[i]) * ElementOps<Element>::bits_to_float(ys[i]);
  }
  return sum;
}

template <typename Element>
FA_DEVICE void unpack8(const uint4& x, float (&values)[8]) {
  uint16_t xs[8];
  std::memcpy(xs, &x, sizeof(xs));
  FA_UNROLL
  for (int i = 0; i < 8; ++i) {
    values[i] = ElementOps<Element>::bits_to_float(xs[i]);
  }
}

template <typename Element>
FA_DEVICE uint4 pack8(const float (&values)[8]) {
  uint32_t words[4];
  FA_UNROLL
  for (int i = 0; i < 4; ++i) {
    words[i] = ElementOps<Element>::pack(values[2 * i], values[2 * i + 1]);
  }
  uint4 packed;
  std::memcpy(&packed, words, sizeof(packed));
  return packed;
}

#if defined(FAST_ATTN_CUDA_EMULATION)

// ---------------------------------------------------------------------------
// Emulated device: see emulation/emulated_device.h.

FA_DEVICE char* dynamic_shared_memory() { return emu::dynamic_shared_memory(); }
FA_DEVICE void block_sync() { emu::block_sync(); }
FA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) { emu::ldmatrix_x4(r, row_address, false); }
FA_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) { emu::ldmatrix_x4(r, row_address, true); }
template <typename Element>
FA_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::mma_m16n8k16(d, a, b0, b1, ElementOps<Element>::kType == ElementType::kBFloat16);
}
FA_DEVICE void cp_async_16(void* smem, const void* gmem, bool fill) { emu::cp_async(smem, gmem, 16, fill); }
FA_DEVICE void cp_async_4(void* smem, const void* gmem, bool fill) { emu::cp_async(smem, gmem, 4, fill); }
FA_DEVICE void cp_async_commit() { emu::cp_async_commit(); }
template <int kPendingGroups>
FA_DEVICE void cp_async_wait() { emu::cp_async_wait(kPendingGroups); }
FA_DEVICE bool warp_any(bool predicate) { return emu::vote_any(predicate); }
FA_DEVICE float shfl_xor(float value, int lane_mask) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits = emu::shfl_xor(bits, lane_mask);
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}
template <typename T>
FA_DEVICE T load_global(const T* address) {
  emu::check_global_read(address, sizeof(T));
  return *address;
}
template <typename T>
FA_DEVICE void store_global(T* address, T value) {
  emu::check_global_write(address, sizeof(T), false);
  *address = value;
}
FA_DEVICE void atomic_add_global(float* address, float value) {
  emu::check_global_write(address, sizeof(float), true);
  *address += value;
}
FA_DEVICE void atomic_add_global_pair(float* address, float first, float second) {
  emu::check_global_write(address, 2 * sizeof(float), true);
  address[0] += first;
  address[1] += second;
}
FA_DEVICE void atomic_add_global_quad(float* address, const float4& values) {
  emu::check_global_write(address, 4 * sizeof(float), true);  // refuses an address not 16-byte aligned
  address[0] += values.x;
  address[1] += values.y;
  address[2] += values.z;
  address[3] += values.w;
}
template <typename T>
FA_DEVICE T load_shared(const T* address) {
  emu::note_shared_read(address, sizeof(T));
  return *address;
}
template <typename T>
FA_DEVICE void store_shared(T* address, T value) {
  emu::note_shared_write(address, sizeof(T));
  *address = value;
}

template <typename... KernelArgs, typename... Args>
LaunchStatus launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                           cudaStream_t, Args... args) {
  return emu::launch(grid, block, smem_bytes, [&] { kernel(args...); });
}

#else  // real device

FA_DEVICE char* dynamic_shared_memory() {
  extern __shared__ __align__(16) char fast_attn_dynamic_smem[];
  return fast_attn_dynamic_smem;
}

FA_DEVICE void block_sync() { __syncthreads(); }

FA_DEVICE uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the addresses of the 8 rows of
// matrix i, register i receives (row lane / 4, columns 2 (lane % 4) + {0, 1}).
// The "memory" clobber keeps the compiler from moving the shared-memory read
// across barriers and cp.async waits.
FA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address))
               : "memory");
}

// As ldmatrix_x4, but register i receives (rows 2 (lane % 4) + {0, 1}, column lane / 4).
FA_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address))
               : "memory");
}

// d (16x8 fp32) += a (16x16, row) * b (16x8, col).
template <typename Element>
FA_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
FA_DEVICE void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
FA_DEVICE void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared, bypassing L1; zero-filled (nothing read) when !fill.
FA_DEVICE void cp_async_16(void* smem, const void* gmem, bool fill) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(fill ? 16 : 0)
               : "memory");
}

// 4 bytes global -> shared; zero-filled when !fill.
FA_DEVICE void cp_async_4(void* smem, const void* gmem, bool fill) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(fill ? 4 : 0)
               : "memory");
}

FA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most kPendingGroups of this thread's committed groups are in flight.
template <int kPendingGroups>
FA_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPendingGroups) : "memory");
}

FA_DEVICE float shfl_xor(float value, int lane_mask) { return __shfl_xor_sync(0xffffffffu, value, lane_mask); }
// Whether the predicate holds in some lane of the (whole, converged) warp.
FA_DEVICE bool warp_any(bool predicate) { return __any_sync(0xffffffffu, predicate) != 0; }

template <typename T>
FA_DEVICE T load_global(const T* address) {
  return *address;
}
template <typename T>
FA_DEVICE void store_global(T* address, T value) {
  *address = value;
}
FA_DEVICE void atomic_add_global(float* address, float value) { atomicAdd(address, value); }
// address[0] += first, address[1] += second (address 8-byte aligned): one red.global.add.v2.f32
// on sm_90 (REDG.E.ADD.F32x2), two scalar ones before it.
FA_DEVICE void atomic_add_global_pair(float* address, float first, float second) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(address), "f"(first), "f"(second) : "memory");
#else
  atomicAdd(address, first);
  atomicAdd(address + 1, second);
#endif
}
// address[0..3] += values (address 16-byte aligned): one red.global.add.v4.f32 on sm_90
// (REDG.E.ADD.F32x4; like the v2 form, it flushes denormals to zero), four scalar ones before it.
FA_DEVICE void atomic_add_global_quad(float* address, const float4& values) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(address), "f"(values.x), "f"(values.y),
               "f"(values.z), "f"(values.w)
               : "memory");
#else
  atomicAdd(address, values.x);
  atomicAdd(address + 1, values.y);
  atomicAdd(address + 2, values.z);
  atomicAdd(address + 3, values.w);
#endif
}
template <typename T>
FA_DEVICE T load_shared(const T* address) {
  return *address;
}
template <typename T>
FA_DEVICE void store_shared(T* address, T value) {
  *address = value;
}

inline LaunchStatus launch_status_of(cudaError_t error) {
  return error == cudaSuccess ? launch_ok() : LaunchStatus{false, cudaGetErrorString(error)};
}

// Launches kernel<<<grid, block, smem_bytes, stream>>>(args...), opting in to
// more than 48 KiB of dynamic shared memory where needed.
template <typename... KernelArgs, typename... Args>
LaunchStatus launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                           cudaStream_t stream, Args... args) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (error != cudaSuccess) {
      cudaGetLastError();  // clear it: the kernel was not launched
      return {false,
              "the device cannot give the kernel its shared memory (up to 160 KiB per CTA: the tiles are sized "
              "for A100 / H100 class GPUs, not for sm_86 / sm_89)"};
    }
  }
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
  return launch_status_of(cudaGetLastError());
}

#endif  // FAST_ATTN_CUDA_EMULATION

}  // namespace fast_attn::cuda
