// The constants of the vector exp of the CPU kernels (VecAvx512::exp,
// VecAvx2::exp), one definition for every instruction set.
//
// e^x within ~1.2 ulp: x is clamped to [kMinInput, kMaxInput] (so -inf -> 0 and
// +inf -> inf without NaN), x = n ln2 + r with n = round(x log2(e)) and ln2 split
// in a high and a low part (exact n ln2 subtraction), e^r by a degree-6
// polynomial whose coefficients were fitted for minimal relative error on
// |r| <= ln2/2 (3e-9), then scaled by 2^n.
#pragma once

namespace fast_attn::cpu {
namespace {

struct ExpPolynomial {
  static constexpr float kMaxInput = 88.8f;
  static constexpr float kMinInput = -104.0f;
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2High = 0.693145751953125f;
  static constexpr float kLn2Low = 1.428606765330187e-06f;
  // Horner order: p = c[0]; p = p r + c[i] for i = 1..6.
  static constexpr float kCoefficients[7] = {1.381461325e-03f, 8.368709981e-03f, 4.166838737e-02f,
                                             1.666652069e-01f, 4.999999345e-01f, 1.0f,
                                             1.0f};
};

}  // namespace
}  // namespace fast_attn::cpu
