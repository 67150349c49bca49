// numerics.h's branch-free MXFP8 forms against the scalar functions they stand for, for every
// scale byte that takes them and every finite bf16 value that a block of that scale can hold
// (e8m0_scale_for_amax(|x|) <= scale byte): mx_quantize_fast against mx_quantize_exact,
// mx_round_trip_fast against mx_round_trip_exact. Compiled and run by test/numerics.test.ts.
// Prints the counts; exit code 1 on any mismatch.
#include <cstdint>
#include <cstdio>

#include "core/numerics.h"

int main() {
  using namespace fmoe;
  long long scales = 0, compared = 0, quantize_mismatches = 0, round_trip_mismatches = 0;
  for (int sb = 0; sb < 255; ++sb) {
    if (!mx_fast_scale_ok(uint8_t(sb))) continue;
    ++scales;
    for (uint32_t x = 0; x < 0x10000u; ++x) {
      const uint16_t mag = uint16_t(x & 0x7FFFu);
      if (mag >= 0x7F80u) continue;  // Inf / NaN: their blocks carry the NaN scale
      if (e8m0_scale_for_amax(bf16_to_f32(mag)) > sb) continue;  // |x| too large for this scale
      ++compared;
      const uint8_t q = mx_quantize_fast(uint16_t(x), uint8_t(sb));
      const uint8_t q_ref = mx_quantize_exact(uint16_t(x), uint8_t(sb));
      if (q != q_ref && ++quantize_mismatches <= 10)
        std::printf("quantize mismatch: scale byte %d, x 0x%04x: fast 0x%02x, scalar 0x%02x\n", sb, x, q,
                    q_ref);
      const uint16_t r = mx_round_trip_fast(uint16_t(x), uint8_t(sb));
      const uint16_t r_ref = mx_round_trip_exact(uint16_t(x), uint8_t(sb));
      if (r != r_ref && ++round_trip_mismatches <= 10)
        std::printf("round trip mismatch: scale byte %d, x 0x%04x: fast 0x%04x, scalar 0x%04x\n", sb, x,
                    r, r_ref);
    }
  }
  std::printf("scales %lld, values compared %lld, quantize mismatches %lld, round trip mismatches %lld\n",
              scales, compared, quantize_mismatches, round_trip_mismatches);
  return quantize_mismatches == 0 && round_trip_mismatches == 0 ? 0 : 1;
}
