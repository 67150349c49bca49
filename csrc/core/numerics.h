// Scalar number formats shared bit for bit by the host and CUDA backends: bf16 rounding, the
// MXFP8 scale rule and e4m3 rounding (documented in fmoe.h, "Precision"). Header-only so that
// both compilers build the same code; nothing here depends on the rounding mode.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FMOE_HD __host__ __device__ __forceinline__
#else
#define FMOE_HD inline
#endif

namespace fmoe {

constexpr int kMxBlock = 32;          // elements per e8m0 scale
constexpr uint8_t kE8m0Nan = 0xFF;
constexpr uint8_t kE4m3Nan = 0x7F;
constexpr uint8_t kE4m3MaxFinite = 0x7E;  // 448

FMOE_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FMOE_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

FMOE_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
FMOE_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x0040u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// e8m0 scale exponent s (biased byte = s + 127) of a block whose largest magnitude is `amax`
// (finite, >= 0): the smallest s with amax / 2^s <= 448, clamped to [-127, 127]. amax == 0 -> 0.
FMOE_HD uint8_t e8m0_scale_for_amax(float amax) {
  uint32_t u = f32_bits(amax) & 0x7FFFFFFFu;
  if (u == 0) return 127;
  int e = int(u >> 23);
  uint32_t mant = u & 0x7FFFFFu;
  int exp2;  // floor(log2(amax))
  uint32_t m; // 23-bit fraction of the normalised significand
  if (e == 0) {  // f32 subnormal: normalise
    int shift = 0;
    while ((mant & 0x800000u) == 0) { mant <<= 1; ++shift; }
    exp2 = -126 - shift;
    m = mant & 0x7FFFFFu;
  } else {
    exp2 = e - 127;
    m = mant;
  }
  // 448 = 1.75 * 2^8: amax <= 1.75 * 2^(8+s)  <=>  s >= exp2 - 8 (significand <= 1.75) else exp2 - 7
  int s = (m <= 0x600000u) ? exp2 - 8 : exp2 - 7;
  if (s < -127) s = -127;
  if (s > 127) s = 127;
  return uint8_t(s + 127);
}

FMOE_HD float e8m0_to_f32(uint8_t b) {
  // Selects, not branches (kernels decode scales in their inner loops); 2^-127 is an f32
  // subnormal.
  const uint32_t bits = b == kE8m0Nan ? 0x7FC00000u : (b == 0 ? 0x00400000u : uint32_t(b) << 23);
  return f32_from_bits(bits);
}

// |x| (already divided by the scale) to e4m3, round to nearest even, saturating at 448.
// x must be finite.
FMOE_HD uint8_t f32_to_e4m3(float x) {
  uint32_t u = f32_bits(x);
  uint8_t sign = uint8_t((u >> 24) & 0x80u);
  u &= 0x7FFFFFFFu;
  // Values >= 464 (448 + half an ulp of 32 at that binade) round past 448: saturate.
  if (u >= 0x43E80000u) return uint8_t(sign | kE4m3MaxFinite);
  int e = int(u >> 23) - 127;  // floor(log2|x|) for normal f32; f32 subnormals are far below e4m3
  if (e < -6) {
    // e4m3 subnormal range: code = round(|x| * 2^9), 0..8 (8 is the smallest normal, 0x08).
    // |x| < 2^-6 so |x| * 2^9 < 8: do the rounding on the integer significand.
    if (e < -11) return sign;  // below half of 2^-9 (and f32 subnormals): rounds to zero
    uint32_t sig = (u & 0x7FFFFFu) | 0x800000u;  // |x| = sig * 2^(e - 23)
    int shift = 23 - (e + 9);                    // |x| * 2^9 = sig >> shift (fraction below)
    uint32_t q = sig >> shift;
    uint32_t rem = sig & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return uint8_t(sign | q);
  }
  // Normal: keep 3 fraction bits, round the other 20 to nearest even; a carry bumps the exponent,
  // which the encoding handles by itself.
  uint32_t sig = u & 0x7FFFFFu;
  uint32_t q = (uint32_t(e + 7) << 3) | (sig >> 20);
  uint32_t rem = sig & 0xFFFFFu;
  if (rem > 0x80000u || (rem == 0x80000u && (q & 1u))) ++q;
  if (q > kE4m3MaxFinite) q = kE4m3MaxFinite;
  return uint8_t(sign | q);
}

FMOE_HD float e4m3_to_f32(uint8_t b) {
  uint32_t sign = uint32_t(b & 0x80u) << 24;
  uint32_t mag = b & 0x7Fu;
  if (mag == 0x7Fu) return f32_from_bits(0x7FC00000u);
  uint32_t e = mag >> 3, m = mag & 7u;
  if (e == 0) {  // subnormal: m * 2^-9
    float v = float(m) * (1.0f / 512.0f);
    return f32_from_bits(f32_bits(v) | sign);
  }
  return f32_from_bits(sign | ((e - 7 + 127) << 23) | (m << 20));
}

// Dequantized MXFP8 element: e4m3 * 2^s as one f32 product (a NaN scale or element gives NaN).
FMOE_HD float mx_dequantize(uint8_t value, uint8_t scale_byte) {
  return e4m3_to_f32(value) * e8m0_to_f32(scale_byte);
}

// x * 2^-(scale_byte - 127) exactly (no rounding: a power-of-two scale of a bf16 value whose
// result stays in the f32 normal range, or underflows far below e4m3's smallest subnormal).
FMOE_HD float mx_divide_by_scale(float x, uint8_t scale_byte) {
  int s = int(scale_byte) - 127;
  // Two steps keep every factor a normal f32 power of two.
  int s1 = s / 2, s2 = s - s1;
  return (x * f32_from_bits(uint32_t(127 - s1) << 23)) * f32_from_bits(uint32_t(127 - s2) << 23);
}

// MXFP8 quantization and round trip of one element without the scalar functions' branches and
// int-to-float conversions, for the CUDA kernels' inner loops. For a finite bf16 x of a block
// whose scale byte sb satisfies mx_fast_scale_ok (then |x| <= 448 * 2^s, as e8m0_scale_for_amax
// guarantees for every element of the block, so nothing saturates), with s = sb - 127:
// - e4m3 normals (|x| >= 2^(s-6)) keep 4 significant bits: x's bf16 bits rounded to 3 fraction
//   bits, to nearest even, a carry moving into the exponent as in f32_to_e4m3; the code is those
//   bits with the exponent rebased from bf16's to e4m3's under the scale;
// - e4m3 subnormals are the multiples of 2^(s-9): adding 1.5 * 2^(s+14) in f32 rounds |x| to one
//   (the sum's ulp), to nearest even; the sum's low bits are the code (0..8, 8 the smallest
//   normal) and subtracting the addend back is exact;
// - the sign goes back on afterwards, so values that round to zero keep it, as in f32_to_e4m3.
// The scale range keeps 2^(s-6) a bf16 normal, the subnormal steps far above f32's subnormals
// (no flush-to-zero can differ) and 1.5 * 2^(s+15) below f32's largest power of two.
// test/numerics.test.ts checks both against the scalar functions for every bf16 value and scale.
constexpr uint8_t kMxFastMinScale = 17;   // s >= -110
constexpr uint8_t kMxFastMaxScale = 239;  // s <= 112
FMOE_HD bool mx_fast_scale_ok(uint8_t scale_byte) {
  return scale_byte >= kMxFastMinScale && scale_byte <= kMxFastMaxScale;
}

struct MxFastParts {
  uint32_t sign, mag;  // bf16 sign bit and magnitude bits of x
  uint32_t rounded;    // e4m3 normal range: |x| rounded to 4 significant bits, bf16 bits
  uint32_t sum_bits;   // subnormal range: f32 bits of |x| + step
  uint32_t step_bits;  // f32 bits of step = 1.5 * 2^(s+14)
  bool normal;         // |x| >= 2^(s-6)
};
FMOE_HD MxFastParts mx_fast_parts(uint16_t x, uint8_t scale_byte) {
  MxFastParts p;
  p.sign = x & 0x8000u;
  p.mag = x & 0x7FFFu;
  p.rounded = (p.mag + 7u + ((p.mag >> 4) & 1u)) & 0xFFF0u;
  p.step_bits = ((uint32_t(scale_byte) + 14u) << 23) | 0x400000u;
  p.sum_bits = f32_bits(bf16_to_f32(uint16_t(p.mag)) + f32_from_bits(p.step_bits));
  p.normal = p.mag >= (uint32_t(scale_byte) - 6u) << 7;  // bf16 bits of 2^(s-6)
  return p;
}

// = mx_quantize_exact(x, sb) where mx_fast_scale_ok(sb).
FMOE_HD uint8_t mx_quantize_fast(uint16_t x, uint8_t scale_byte) {
  const MxFastParts p = mx_fast_parts(x, scale_byte);
  const uint32_t code =
      p.normal ? (p.rounded >> 4) - ((uint32_t(scale_byte) - 7u) << 3) : p.sum_bits - p.step_bits;
  return uint8_t((p.sign >> 8) | code);
}

// = mx_round_trip_exact(x, sb) where mx_fast_scale_ok(sb).
FMOE_HD uint16_t mx_round_trip_fast(uint16_t x, uint8_t scale_byte) {
  const MxFastParts p = mx_fast_parts(x, scale_byte);
  const float sub = f32_from_bits(p.sum_bits) - f32_from_bits(p.step_bits);
  return uint16_t(p.sign | (p.normal ? p.rounded : f32_bits(sub) >> 16));
}

// The e4m3 code of x in a block of scale byte sb through the scalar functions, for any scale
// byte (NaN scale: the NaN code).
FMOE_HD uint8_t mx_quantize_exact(uint16_t x, uint8_t scale_byte) {
  return scale_byte == kE8m0Nan ? kE4m3Nan
                                : f32_to_e4m3(mx_divide_by_scale(bf16_to_f32(x), scale_byte));
}

// The round trip dequant(quant(x)) as bf16 bits through the scalar functions, for any scale byte
// (NaN scale: NaN).
FMOE_HD uint16_t mx_round_trip_exact(uint16_t x, uint8_t scale_byte) {
  return f32_to_bf16(mx_dequantize(mx_quantize_exact(x, scale_byte), scale_byte));
}

// Quantizes one block of 32 bf16 values: writes 32 e4m3 bytes and returns the scale byte.
FMOE_HD uint8_t mx_quantize_block(const uint16_t* in, uint8_t* out) {
  float amax = 0.0f;
  bool bad = false;
  for (int i = 0; i < kMxBlock; ++i) {
    uint32_t mag = uint32_t(in[i] & 0x7FFFu);
    if (mag >= 0x7F80u) bad = true;  // inf or NaN
    float a = bf16_to_f32(uint16_t(mag));
    amax = a > amax ? a : amax;
  }
  const uint8_t scale = bad ? kE8m0Nan : e8m0_scale_for_amax(amax);
  for (int i = 0; i < kMxBlock; ++i) out[i] = mx_quantize_exact(in[i], scale);
  return scale;
}

// Byte offset of scale (r, c) inside the 128x4-tiled (swizzled) layout of one [rows, cols] matrix
// whose column count is padded to `padded_cols` (a multiple of 4).
FMOE_HD int64_t swizzled_scale_offset(int64_t r, int64_t c, int64_t padded_cols) {
  int64_t tile = (r / 128) * (padded_cols / 4) + c / 4;
  int64_t rr = r % 128;
  return tile * 512 + (rr % 32) * 16 + (rr / 32) * 4 + (c % 4);
}

}  // namespace fmoe
