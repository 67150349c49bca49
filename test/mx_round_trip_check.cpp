// numerics.h's mx_round_trip_fast against the scalar composition mx_round_trip_exact, for every
// scale byte that takes the fast form and every finite bf16 value that a block of that scale can
// hold (e8m0_scale_for_amax(|x|) <= scale byte). Compiled and run by test/numerics.test.ts.
// Prints the number of pairs compared and of mismatches; exit code 1 on any mismatch.
#include <cstdint>
#include <cstdio>

#include "core/numerics.h"

int main() {
  using namespace fmoe;
  long long compared = 0, mismatches = 0, fast_scales = 0;
  for (int sb = 0; sb < 255; ++sb) {
    if (!mx_round_trip_fast_ok(uint8_t(sb))) continue;
    ++fast_scales;
    for (uint32_t x = 0; x < 0x10000u; ++x) {
      const uint16_t mag = uint16_t(x & 0x7FFFu);
      if (mag >= 0x7F80u) continue;  // Inf / NaN: their blocks carry the NaN scale
      if (e8m0_scale_for_amax(bf16_to_f32(mag)) > sb) continue;  // |x| too large for this scale
      const uint16_t fast = mx_round_trip_fast(uint16_t(x), uint8_t(sb));
      const uint16_t exact = mx_round_trip_exact(uint16_t(x), uint8_t(sb));
      ++compared;
      if (fast != exact && ++mismatches <= 10)
        std::printf("mismatch: scale byte %d, x 0x%04x: fast 0x%04x, exact 0x%04x\n", sb, x, fast, exact);
    }
  }
  std::printf("scales %lld, pairs compared %lld, mismatches %lld\n", fast_scales, compared, mismatches);
  return mismatches == 0 ? 0 : 1;
}
