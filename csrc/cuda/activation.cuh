// The activation formulas of fmoe.h in f32 on the device, for every kernel that applies one: the
// fused FC1 epilogues of grouped_mm_sm90.cu and grouped_mm_small.cu, and the activation op
// (activation.cu).
//
// NaN is kept the way the host's comparisons keep it (fminf / fmaxf would replace a NaN by the
// bound). The logistic function goes through the SFU (sigmoid_sfu), tanh through CUDA's tanhf, and
// nvcc may fuse a multiply-add, so a result near a bf16 rounding boundary can differ from the
// host's (csrc/host/activation.cpp, libm expf and an IEEE division) by one bf16 ulp: tests
// compare with a tolerance.
#pragma once

#include "fmoe.h"

namespace fmoe::cuda {

// 1 / (1 + e^-x) from the SFU's exp2 and reciprocal (__expf: ex2.approx of x log2(e);
// __fdividef: rcp.approx), within ~4e-6 relative of the exact value for |x| <= 20 (the f32 product
// x log2(e) carries most of it): three orders under a bf16 half ulp (2^-9). expf and an IEEE
// division took about 25 instructions per output, a third of the MXFP8 prefill FC1 epilogue's
// (bench/NOTES.md v21). Where the true value is below 2^-126 (x < -87.3) this gives 0.
__device__ __forceinline__ float sigmoid_sfu(float x) {
  return __fdividef(1.0f, 1.0f + __expf(-x));
}

// act(g, u) for `activation` (fmoe_activation); u (the up value) is ignored by the non-gated
// squared_relu. With a constant `activation` the switch folds away.
__device__ __forceinline__ float activation_value(int activation, float g, float u, float alpha,
                                                  float limit) {
  switch (activation) {
    case FMOE_ACT_SQUARED_RELU: {
      const float r = g < 0.0f ? 0.0f : g;
      return r * r;
    }
    case FMOE_ACT_SILU:
      return g * sigmoid_sfu(g) * u;
    case FMOE_ACT_GELU:
      return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u;
    default: {  // FMOE_ACT_SWIGLU_OAI
      const float gc = g > limit ? limit : g;
      const float uc = u > limit ? limit : (u < -limit ? -limit : u);
      return (uc + 1.0f) * gc * sigmoid_sfu(alpha * gc);
    }
  }
}

template <int kActivation>
__device__ __forceinline__ float activation_value(float g, float u, float alpha, float limit) {
  static_assert(kActivation == FMOE_ACT_SQUARED_RELU || kActivation == FMOE_ACT_SILU ||
                    kActivation == FMOE_ACT_GELU || kActivation == FMOE_ACT_SWIGLU_OAI,
                "unknown fmoe_activation");
  return activation_value(kActivation, g, u, alpha, limit);
}

}  // namespace fmoe::cuda
