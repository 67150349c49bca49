// The activation formulas of fmoe.h in f32 on the device, in the host backend's order of
// operations (csrc/host/activation.cpp), for every kernel that applies one: the fused FC1
// epilogue of grouped_mm_sm90.cu (and the activation op, activation.cu, whose activate() spells
// out the same expressions).
//
// NaN is kept the way the host's comparisons keep it (fminf / fmaxf would replace a NaN by the
// bound). CUDA's expf / tanhf agree with the host's libm to an ulp or two and nvcc may fuse a
// multiply-add, so a result on a bf16 rounding boundary can differ from the host's by one bf16
// ulp: tests compare with a tolerance.
#pragma once

#include "fmoe.h"

namespace fmoe::cuda {

// act(g, u): u (the up value) is ignored by the non-gated squared_relu.
template <int kActivation>
__device__ __forceinline__ float activation_value(float g, float u, float alpha, float limit) {
  if constexpr (kActivation == FMOE_ACT_SQUARED_RELU) {
    const float r = g < 0.0f ? 0.0f : g;
    return r * r;
  } else if constexpr (kActivation == FMOE_ACT_SILU) {
    return g / (1.0f + expf(-g)) * u;
  } else if constexpr (kActivation == FMOE_ACT_GELU) {
    return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u;
  } else {
    static_assert(kActivation == FMOE_ACT_SWIGLU_OAI, "unknown fmoe_activation");
    const float gc = g > limit ? limit : g;
    const float uc = u > limit ? limit : (u < -limit ? -limit : u);
    return (uc + 1.0f) * gc * (1.0f / (1.0f + expf(-(alpha * gc))));
  }
}

}  // namespace fmoe::cuda
