// 16-bit floating-point storage types of the CPU kernels and their scalar
// conversions to and from float. Plain C++ (no ATen, no intrinsics): the
// kernels are compiled once per instruction set (kernels_*.cpp) and must not
// share inline code with ATen's headers.
//
// Everything here has internal linkage (anonymous namespace), so each
// instruction-set translation unit gets its own copy compiled for its target.
#pragma once

#include <cstdint>
#include <cstring>

namespace fast_attn::cpu {
namespace {

// Raw storage of a bfloat16 / float16 element: the kernels only load, convert
// and store these; all arithmetic happens in float.
struct BFloat16Bits {
  uint16_t bits;
};
struct Float16Bits {
  uint16_t bits;
};

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t bits_from_float(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float to_float(float value) { return value; }
inline double to_float(double value) { return value; }

inline float to_float(BFloat16Bits value) { return float_from_bits(static_cast<uint32_t>(value.bits) << 16); }

inline float to_float(Float16Bits value) {
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000u) << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1fu;
  const uint32_t mantissa = value.bits & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in float.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) {
    return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  }
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest even, NaN stays NaN (quieted).
inline BFloat16Bits bfloat16_from_float(float value) {
  const uint32_t bits = bits_from_float(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return {static_cast<uint16_t>((bits >> 16) | 0x40u)};
  }
  const uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  return {static_cast<uint16_t>(rounded >> 16)};
}

// Round to nearest even, overflow to inf, subnormals rounded correctly.
inline Float16Bits float16_from_float(float value) {
  uint32_t bits = bits_from_float(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  bits &= 0x7fffffffu;
  if (bits >= 0x7f800000u) {  // inf or NaN
    return {static_cast<uint16_t>(sign | (bits > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  }
  if (bits >= 0x477ff000u) {  // rounds to a magnitude >= 65520: inf
    return {static_cast<uint16_t>(sign | 0x7c00u)};
  }
  if (bits < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5 puts round(|x| * 2^24)
    // (rounded to nearest even by the float adder) in the low mantissa bits.
    const float shifted = float_from_bits(bits) + 0.5f;
    return {static_cast<uint16_t>(sign | (bits_from_float(shifted) - 0x3f000000u))};
  }
  const uint32_t mantissa_odd = (bits >> 13) & 1u;
  bits += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissa_odd;
  return {static_cast<uint16_t>(sign | (bits >> 13))};
}

inline void store_scalar(float* dst, float value) { *dst = value; }
inline void store_scalar(double* dst, double value) { *dst = value; }
inline void store_scalar(BFloat16Bits* dst, float value) { *dst = bfloat16_from_float(value); }
inline void store_scalar(Float16Bits* dst, float value) { *dst = float16_from_float(value); }

}  // namespace
}  // namespace fast_attn::cpu
