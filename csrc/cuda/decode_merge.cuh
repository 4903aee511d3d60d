// The lse rule that merges partial softmax results, for 8 columns of a row: the decode kernel
// merges its thread groups' results with it (decode_kernel.cuh), the combine kernel the splits'
// (decode_combine.cu). Part p adds weight w_p (exp of its max or lse less the largest of all
// parts), its softmax sum l_p (1 for a normalized part) and its 8 columns o_p:
//   out = sum_p w_p o_p / sum_p w_p l_p,
// and 0 when no part has weight (a row without visible keys).
#pragma once

#include "device_runtime.cuh"

namespace fast_attn::cuda {

struct SoftmaxMerge {
  float sum = 0.0f;   // sum_p w_p l_p
  float out[8] = {};  // sum_p w_p o_p, then out / sum after normalize()

  // o_p as two float4: columns 0..3 and 4..7.
  FA_DEVICE void add(float weight, float part_sum, const float4& lo, const float4& hi) {
    const float columns[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    sum += weight * part_sum;
    FA_UNROLL
    for (int i = 0; i < 8; ++i) {
      out[i] += weight * columns[i];
    }
  }

  FA_DEVICE void normalize() {
    const float scale = sum == 0.0f ? 0.0f : 1.0f / sum;
    FA_UNROLL
    for (int i = 0; i < 8; ++i) {
      out[i] *= scale;
    }
  }

  // out as 8 float32 columns (16-byte aligned) or as 8 elements of a 16-bit type.
  FA_DEVICE void store(float* columns) const {
    store_global(reinterpret_cast<float4*>(columns), make_float4(out[0], out[1], out[2], out[3]));
    store_global(reinterpret_cast<float4*>(columns + 4), make_float4(out[4], out[5], out[6], out[7]));
  }
  template <typename Element>
  FA_DEVICE void store(Element* columns) const {
    store_global(reinterpret_cast<uint4*>(columns), pack8<Element>(out));
  }
};

}  // namespace fast_attn::cuda
