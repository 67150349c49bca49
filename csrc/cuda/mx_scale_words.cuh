// Copying a k-block's MXFP8 scale bytes of one row into shared memory, for kernels that stage 128
// bytes of k per stage: 128 e4m3 = 4 scale blocks, i.e. scale bytes [row * ks + kb * 4, +4) of a
// row-major [rows, ks] scale array (ks = k / 32). Those 4 bytes are 4-byte aligned only when
// ks % 4 == 0, and cp.async copies aligned words, so a row's bytes arrive as the two aligned
// words that cover them, plus the skew of the first byte inside them. Used by the decode GEMM
// (grouped_mm_small.cu) and the fp8-wgmma prefill GEMM (grouped_mm_sm90.cu); the pair form below
// serves the register-dequantizing prefill GEMM (grouped_mm_sm90.cu); the cursor form, the
// decode GEMM's copies with the row's address work done once per item. Last, the decode GEMM's
// branch-free conversion of four scale bytes to f32, and two scales' product from their exponent
// fields.
#pragma once

#include <climits>
#include <cstdint>

#include "cuda/ptx/cp_async_mbarrier.cuh"
#include "cuda/ptx/prmt.cuh"

namespace fmoe::cuda {

// Byte offset, inside the 8 bytes of a row's two scale words, of the stage's first scale: the
// words start at the aligned-down address and the buffers are 4-byte aligned.
__device__ __forceinline__ int scale_skew(int64_t row, int ks) { return int((row * ks) & 3); }

// The bytes of a 4-byte scale word that lie inside the array, given the array's bytes `left` from
// the word's start (none when left <= 0).
template <class T>
__device__ __forceinline__ uint32_t scale_word_bytes(T left) {
  return left <= 0 ? 0u : (left >= 4 ? 4u : uint32_t(left));
}

// Copies the aligned 4-byte scale word at byte offset `at` of `base` into *dst with cp.async;
// bytes past `end_bytes` (all of them when at >= end_bytes) read as zero.
__device__ __forceinline__ void copy_scale_word(uint32_t* dst, const uint8_t* base, int64_t at,
                                                int64_t end_bytes) {
  const uint32_t bytes = scale_word_bytes(end_bytes - at);
  ptx::cp_async_4_partial(dst, bytes ? base + at : base, bytes);
}

// Issues word `half` (0 or 1) of the two 4-byte copies covering scale bytes
// [row * ks + kb * 4, +4) into dst[half]; rows < 0 and bytes past `end_bytes` read as zero.
__device__ __forceinline__ void copy_scale_words(uint32_t* dst, const uint8_t* base, int64_t row,
                                                 int ks, int kb, int64_t end_bytes, int half) {
  const int64_t at =
      row >= 0 ? ((row * ks + int64_t(kb) * 4) & ~int64_t(3)) + 4 * half : end_bytes;
  copy_scale_word(dst + half, base, at, end_bytes);
}

// copy_scale_words with the row's part hoisted out of a loop over k-blocks: the aligned word
// `half` of k-block kb sits 4 kb bytes past that of k-block 0, so a cursor keeps the word's
// address at kb = 0 and the bytes of the array from there (saturated at INT_MAX; 0 for rows < 0).
struct ScaleWordCursor {
  const uint8_t* src;
  int left;
};

__device__ __forceinline__ ScaleWordCursor scale_word_cursor(const uint8_t* base, int64_t row,
                                                             int ks, int64_t end_bytes, int half) {
  const int64_t at = row >= 0 ? ((row * ks) & ~int64_t(3)) + 4 * half : end_bytes;
  const int64_t left = end_bytes - at;
  return {left > 0 ? base + at : base, int(left > 0 ? (left < INT_MAX ? left : INT_MAX) : 0)};
}

// The copy copy_scale_words(dst, ..., kb, ..., half) issues, from the cursor of its row and half.
__device__ __forceinline__ void copy_scale_word_at(uint32_t* dst, ScaleWordCursor c, int kb) {
  const uint32_t bytes = scale_word_bytes(c.left - 4 * kb);
  ptx::cp_async_4_partial(dst, bytes ? c.src + 4 * kb : c.src, bytes);
}

// Kernels that stage 64 bytes of k per stage need the 2 scale bytes [row * ks + kb * 2, +2) of a
// row (ks even): one aligned word always holds them, at byte (row * ks + kb * 2) % 4. Copies that
// word into *dst; rows < 0 and bytes past `end_bytes` read as zero.
__device__ __forceinline__ void copy_scale_pair_word(uint32_t* dst, const uint8_t* base,
                                                     int64_t row, int ks, int kb,
                                                     int64_t end_bytes) {
  copy_scale_word(dst, base, row >= 0 ? (row * ks + int64_t(kb) * 2) & ~int64_t(3) : end_bytes,
                  end_bytes);
}

// Scale byte j (0..3) of a row's stage from its two words and skew.
__device__ __forceinline__ uint8_t scale_byte(const uint32_t (&w)[2], int skew, int j) {
  const uint64_t both = uint64_t(w[0]) | (uint64_t(w[1]) << 32);
  return uint8_t(both >> (8 * (skew + j)));
}

// ---- Four scale bytes of a word to f32, branch-free ------------------------------------------
// e8m0_to_f32 (core/numerics.h) per byte costs two compares and two selects for its special
// bytes (0x00: 2^-127, an f32 subnormal; 0xFF: NaN). Here the special bytes of a word are found
// once (4 instructions), and each byte then takes 3: its f32 bits are the byte at bits 23-30 and
// the special flag at bit 22 (0x00400000 = 2^-127; 0x7FC00000 = NaN; the flag of any other byte
// is 0, and byte << 23 is 2^(byte - 127) exactly).

// Bit 7 of byte j set iff byte j of w is 0x00 or 0xFF (all its bits equal). No carry crosses a
// byte: each byte of `differ` is at most 0x7F, so adding 0x7F stays below 0x100.
__device__ __forceinline__ uint32_t e8m0x4_special(uint32_t w) {
  const uint32_t differ = (w ^ (w >> 1)) & 0x7F7F7F7Fu;  // bit i: byte bits i and i + 1 differ
  return ~(differ + 0x7F7F7F7Fu) & 0x80808080u;
}

// 2^(byte j of w - 127) as e8m0_to_f32 gives it; `special` = e8m0x4_special(w).
template <int J>
__device__ __forceinline__ float e8m0x4_to_f32(uint32_t w, uint32_t special) {
  static_assert(J >= 0 && J < 4, "a word holds 4 scale bytes");
  // Byte 3 of the permute: byte J of w; byte 2: byte J of special (0x80 or 0).
  constexpr uint32_t kSelector = 0x0000u | (uint32_t(4 + J) << 8) | (uint32_t(J) << 12);
  const uint32_t v = ptx::prmt<kSelector>(w, special);
  return __uint_as_float((v >> 1) & 0x7FC00000u);
}

// ---- Two scales' product from exponent fields --------------------------------------------------
// An e8m0 byte a in [1, 254] is the f32 2^(a - 127), whose exponent field (bits 23-30) is a.
// So the f32 product of two scales a and b has the field a + b - 127, while that is in [1, 254]
// (a normal f32) or 255 (infinity, as the multiplication overflows); bytes in [64, 191] keep it
// there (a + b - 127 in [1, 255]). Then the product's bits are field(a) + field(b) -
// kE8m0BiasField, modulo 2^32: integer adds in place of two decodes and a multiplication.

// Byte J of w at bits 23-30, the rest zero.
template <int J>
__device__ __forceinline__ uint32_t e8m0_exponent_field(uint32_t w) {
  static_assert(J >= 0 && J < 4, "a word holds 4 scale bytes");
  constexpr int kLeft = 23 - 8 * J;  // 23, 15, 7, -1
  return (kLeft >= 0 ? w << (kLeft & 31) : w >> 1) & 0x7F800000u;
}

constexpr uint32_t kE8m0BiasField = 127u << 23;

// Bit 7 of byte j (the other bits are not meaningful) set iff byte j of w is in [64, 191]: its
// bits 7 and 6 differ. AND the words' results, then mask with 0x80808080.
__device__ __forceinline__ uint32_t e8m0x4_in_product_range(uint32_t w) { return w ^ (w << 1); }

}  // namespace fmoe::cuda
