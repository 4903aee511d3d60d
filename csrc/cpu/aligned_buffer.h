// Per-worker scratch memory of the CPU kernels: one 64-byte aligned block,
// carved into the tiles a task needs. Allocated once per worker, not per task.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace fast_attn::cpu {
namespace {

class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t bytes) {
    const size_t rounded = (bytes + 63) / 64 * 64;
    data_ = static_cast<unsigned char*>(std::aligned_alloc(64, rounded == 0 ? 64 : rounded));
    if (data_ == nullptr) throw std::bad_alloc();
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(data_); }

  unsigned char* data() { return data_; }

 private:
  unsigned char* data_;
};

// Hands out consecutive 64-byte aligned arrays from a buffer; with a null base
// it only counts their bytes (CarvedScratch's first pass), so layout and size
// cannot drift.
class ScratchCarver {
 public:
  explicit ScratchCarver(unsigned char* base) : base_(base) {}

  template <class T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(base_) + offset_);
    offset_ += (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
    return p;
  }

  size_t bytes() const { return offset_; }

 private:
  unsigned char* base_;
  size_t offset_ = 0;
};

// The scratch of one kernel object: carve(ScratchCarver&) takes its arrays, once
// with a null base to size the buffer and once for real.
class CarvedScratch {
 public:
  template <class Carve>
  explicit CarvedScratch(const Carve& carve) : buffer_(bytes_taken(carve)) {
    ScratchCarver carver(buffer_.data());
    carve(carver);
  }

 private:
  template <class Carve>
  static size_t bytes_taken(const Carve& carve) {
    ScratchCarver sizing(nullptr);
    carve(sizing);
    return sizing.bytes();
  }

  AlignedBuffer buffer_;
};

}  // namespace
}  // namespace fast_attn::cpu
