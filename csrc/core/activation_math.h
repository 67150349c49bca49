// The activation formulas of fmoe.h on one (gate, up) pair in f32, in the order of operations
// every backend follows. Header-only and FMOE_HD so that one definition can serve host and
// device code; the host backend and the kernel checks of bench/dev use it.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/numerics.h"  // FMOE_HD
#include "fmoe.h"

namespace fmoe {

// act(g, u) for `activation` (fmoe_activation); squared_relu ignores u. swiglu_oai's clamps are
// spelled out with comparisons (as std::min / std::clamp behave) so that a NaN input compares
// false and passes through, the same on every backend.
FMOE_HD float activation_value(int64_t activation, float g, float u, float alpha, float limit) {
  switch (activation) {
    case FMOE_ACT_SQUARED_RELU: {
      const float r = g < 0.0f ? 0.0f : g;  // std::max(g, 0.0f): a NaN g stays NaN
      return r * r;
    }
    case FMOE_ACT_SILU:
      return g / (1.0f + expf(-g)) * u;
    case FMOE_ACT_GELU:
      return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * u;
    default: {  // FMOE_ACT_SWIGLU_OAI
      const float gc = g > limit ? limit : g;
      const float uc = u > limit ? limit : (u < -limit ? -limit : u);
      return (uc + 1.0f) * gc * (1.0f / (1.0f + expf(-(alpha * gc))));
    }
  }
}

}  // namespace fmoe
