// MXFP8 quantization, dequantization and the 128x4 swizzled scale layout (fmoe.h), built on the
// scalar rules of core/numerics.h that the CUDA backend shares, in branch-free forms of them that
// vectorize (equal bit for bit), in the widest vectors the CPU has.
#include <cstring>

#include "core/numerics.h"
#include "host/host_backend.h"

namespace fmoe::host {
namespace {

// numerics.h's f32_to_e4m3 without branches (selects as masks: a conditional stops GCC's
// vectorizer), so that a block's 32 conversions vectorize; equal for every finite f32, checked
// over all of them. The quantum is 2^(max(e, -6) - 3) for |y| in [2^e, 2^(e+1)) (e4m3's 3
// fraction bits, its subnormals below 2^-6); adding 2^23 quanta and taking them away rounds |y|
// to a multiple of it, ties to even. The rounded value's bits give the code, as a normal
// (exponent + 7, top 3 fraction bits) or a subnormal (value * 2^9); from 464 on, the largest
// finite code.
__attribute__((always_inline)) inline uint8_t e4m3_round(float y) {
  const uint32_t u = f32_bits(y);
  const uint32_t a = u & 0x7FFFFFFFu;
  const int32_t e = int32_t(a >> 23) - 127;
  const int32_t e_min6 = e + ((-6 - e) & -int32_t(e < -6));  // max(e, -6)
  const float quanta = f32_from_bits(uint32_t(e_min6 - 3 + 23 + 127) << 23);
  const float r = (f32_from_bits(a) + quanta) - quanta;
  const uint32_t rb = f32_bits(r);
  const uint32_t is_normal = 0u - uint32_t(rb >= 0x3C800000u);  // 2^-6, e4m3's smallest normal
  const uint32_t saturate = 0u - uint32_t(a >= 0x43E80000u);    // 464: rounds past 448
  const uint32_t normal = (((rb >> 23) - 120u) << 3) | ((rb >> 20) & 7u);
  // Converted only below 2^-6 (0 in its place otherwise): the int conversion stays in range.
  const uint32_t subnormal = uint32_t(int32_t(f32_from_bits(rb & ~is_normal) * 512.0f));
  const uint32_t code = (normal & is_normal) | (subnormal & ~is_normal);
  return uint8_t(((u >> 24) & 0x80u) | (kE4m3MaxFinite & saturate) | (code & ~saturate));
}

// mx_quantize_block over a row: the block's largest magnitude as bf16 bits (finite values order as
// their bits; Inf and NaN, from 0x7F80 on, make a NaN block), its scale, then each element divided
// by the scale as mx_divide_by_scale does (two exact multiplies) and rounded.
__attribute__((always_inline)) inline void quantize_row(const uint16_t* __restrict in, int64_t cols,
                                                        uint8_t* __restrict data,
                                                        uint8_t* __restrict scale) {
  for (int64_t b = 0; b < cols; b += kMxBlock) {
    const uint16_t* x = in + b;
    uint8_t* q = data + b;
    uint32_t amax = 0;
    for (int i = 0; i < kMxBlock; ++i) {
      const uint32_t m = x[i] & 0x7FFFu;
      amax = m > amax ? m : amax;
    }
    if (amax >= 0x7F80u) {
      std::memset(q, kE4m3Nan, kMxBlock);
      scale[b / kMxBlock] = kE8m0Nan;
      continue;
    }
    const uint8_t sb = e8m0_scale_for_amax(bf16_to_f32(uint16_t(amax)));
    scale[b / kMxBlock] = sb;
    const int s = int(sb) - 127, s1 = s / 2, s2 = s - s1;
    const float m1 = f32_from_bits(uint32_t(127 - s1) << 23);
    const float m2 = f32_from_bits(uint32_t(127 - s2) << 23);
    for (int i = 0; i < kMxBlock; ++i) q[i] = e4m3_round((bf16_to_f32(x[i]) * m1) * m2);
  }
}

// numerics.h's mx_dequantize over n values (a multiple of 32) and their n / 32 scales, e4m3
// value times 2^s in one f32 product, without branches or a table so that it vectorizes: an
// e4m3 byte's magnitude bits shifted left by 20 are the f32 bits of value * 2^-120 (exponent
// bias 7 against 127; e4m3 subnormals land on f32 subnormals, zero on zero), one exact multiply
// by 2^120 gives the value, and magnitude 0x7F is NaN.
__attribute__((always_inline)) inline void dequantize_row(const uint8_t* __restrict src,
                                                          const uint8_t* scale, int64_t n,
                                                          float* __restrict dst) {
  for (int64_t b = 0; b < n; b += kMxBlock) {
    const float s = e8m0_to_f32(scale[b / kMxBlock]);
    for (int i = 0; i < kMxBlock; ++i) {
      const uint32_t u = src[b + i], mag = u & 0x7Fu;
      const uint32_t v = f32_bits(f32_from_bits(((u & 0x80u) << 24) | (mag << 20)) * 0x1p120f);
      const uint32_t nan = 0u - uint32_t(mag == 0x7Fu);  // all ones where NaN
      dst[b + i] = f32_from_bits((v & ~nan) | (0x7FC00000u & nan)) * s;
    }
  }
}

// One out-of-line instantiation of each per instruction set (grouped_mm.cpp does the same).
__attribute__((noinline)) void quantize_row_sse(const uint16_t* in, int64_t cols, uint8_t* data,
                                                uint8_t* scale) {
  quantize_row(in, cols, data, scale);
}
__attribute__((noinline)) void dequantize_row_sse(const uint8_t* src, const uint8_t* scale,
                                                  int64_t n, float* dst) {
  dequantize_row(src, scale, n, dst);
}
#if defined(__x86_64__)
__attribute__((target("avx2"))) void quantize_row_avx2(const uint16_t* in, int64_t cols,
                                                       uint8_t* data, uint8_t* scale) {
  quantize_row(in, cols, data, scale);
}
__attribute__((target("avx2"))) void dequantize_row_avx2(const uint8_t* src, const uint8_t* scale,
                                                         int64_t n, float* dst) {
  dequantize_row(src, scale, n, dst);
}
__attribute__((target("avx512f"))) void quantize_row_avx512(const uint16_t* in, int64_t cols,
                                                            uint8_t* data, uint8_t* scale) {
  quantize_row(in, cols, data, scale);
}
__attribute__((target("avx512f"))) void dequantize_row_avx512(const uint8_t* src,
                                                              const uint8_t* scale, int64_t n,
                                                              float* dst) {
  dequantize_row(src, scale, n, dst);
}
#endif

}  // namespace

void mx_quantize_row(const uint16_t* in, int64_t cols, uint8_t* data, uint8_t* scale) {
#if defined(__x86_64__)
  const int width = host_vector_floats();
  if (width == 16) return quantize_row_avx512(in, cols, data, scale);
  if (width == 8) return quantize_row_avx2(in, cols, data, scale);
#endif
  quantize_row_sse(in, cols, data, scale);
}

void mx_dequantize_row(const uint8_t* data, const uint8_t* scale, int64_t n, float* out) {
#if defined(__x86_64__)
  const int width = host_vector_floats();
  if (width == 16) return dequantize_row_avx512(data, scale, n, out);
  if (width == 8) return dequantize_row_avx2(data, scale, n, out);
#endif
  dequantize_row_sse(data, scale, n, out);
}

Status quantize_mxfp8(ThreadPool& pool, const uint16_t* in, int64_t rows, int64_t cols,
                      uint8_t* data, uint8_t* scale) {
  const int64_t blocks = cols / kMxBlock;
  pool.parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      mx_quantize_row(in + r * cols, cols, data + r * cols, scale + r * blocks);
  });
  return FMOE_OK;
}

Status dequantize_mxfp8(ThreadPool& pool, const uint8_t* data, const uint8_t* scale,
                        int64_t rows, int64_t cols, float* out) {
  const int64_t blocks = cols / kMxBlock;
  pool.parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      mx_dequantize_row(data + r * cols, scale + r * blocks, cols, out + r * cols);
  });
  return FMOE_OK;
}

Status swizzle_scales(const uint8_t* in, int64_t batch, int64_t rows, int64_t scale_cols,
                      bool to_swizzled, uint8_t* out) {
  if (rows == 0 || scale_cols == 0) return FMOE_OK;  // empty matrices, however many (no loop)
  const int64_t padded_rows = (rows + 127) / 128 * 128;
  const int64_t padded_cols = (scale_cols + 3) / 4 * 4;
  const int64_t swizzled_bytes = padded_rows * padded_cols;  // one matrix
  const int64_t linear_bytes = rows * scale_cols;
  for (int64_t b = 0; b < batch; ++b) {
    if (to_swizzled) {
      const uint8_t* src = in + b * linear_bytes;
      uint8_t* dst = out + b * swizzled_bytes;
      std::memset(dst, 0, size_t(swizzled_bytes));  // padding bytes are 0
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < scale_cols; ++c)
          dst[swizzled_scale_offset(r, c, padded_cols)] = src[r * scale_cols + c];
    } else {
      const uint8_t* src = in + b * swizzled_bytes;
      uint8_t* dst = out + b * linear_bytes;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < scale_cols; ++c)
          dst[r * scale_cols + c] = src[swizzled_scale_offset(r, c, padded_cols)];
    }
  }
  return FMOE_OK;
}

}  // namespace fmoe::host
