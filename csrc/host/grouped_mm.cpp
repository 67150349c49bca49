// grouped_mm: for each group g and each non-skipped row r in [offsets[g], offsets[g+1]):
//   c[r, n] = bf16( sum_k a[r, k] * b[g, n, k] + bias[g, n] )      (f32 accumulation)
// for bf16 operands and for MXFP8 ones (dequantized exactly to f32 first: e4m3 * 2^s).
//
// Per group, the group's A rows are widened to f32 once; the columns n are cut into blocks that
// the pool shares out, and each block widens its rows of b[g] once and runs a 4-row x 2-column
// register-blocked kernel over k. Both operands are k-contiguous, so the inner loop is a plain
// stream of 4-wide vector multiply-adds (GCC vector extensions: SSE on baseline x86-64, NEON on
// arm64), without relying on -ffast-math to reassociate the sum.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/numerics.h"
#include "host/host_backend.h"

namespace fmoe::host {
namespace {

typedef float v4f __attribute__((vector_size(16)));

constexpr int64_t kRowTile = 4;
constexpr int64_t kColTile = 2;
constexpr int64_t kColBlock = 16;  // columns of b widened together (16 * k floats)

inline v4f load4(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(v4f v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// out[i][j] = dot(a[i], b[j]) over kp floats (kp a multiple of 4; the padding lanes are zero).
inline void dot_4x2(const float* const a[kRowTile], const float* const b[kColTile], int64_t kp,
                    float out[kRowTile][kColTile]) {
  v4f c00 = {0, 0, 0, 0}, c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
      c31 = c00;
  for (int64_t k = 0; k < kp; k += 4) {
    const v4f y0 = load4(b[0] + k), y1 = load4(b[1] + k);
    v4f x = load4(a[0] + k);
    c00 += x * y0;
    c01 += x * y1;
    x = load4(a[1] + k);
    c10 += x * y0;
    c11 += x * y1;
    x = load4(a[2] + k);
    c20 += x * y0;
    c21 += x * y1;
    x = load4(a[3] + k);
    c30 += x * y0;
    c31 += x * y1;
  }
  out[0][0] = hsum(c00), out[0][1] = hsum(c01);
  out[1][0] = hsum(c10), out[1][1] = hsum(c11);
  out[2][0] = hsum(c20), out[2][1] = hsum(c21);
  out[3][0] = hsum(c30), out[3][1] = hsum(c31);
}

// Widens row `r` of a [*, k] operand (bf16, or e4m3 with its e8m0 scales) into `dst` (kp floats,
// zero-padded past k).
inline void widen_row(const void* src, const uint8_t* scale, bool mx, int64_t r, int64_t k,
                      int64_t kp, float* dst) {
  if (mx) {
    const uint8_t* d = static_cast<const uint8_t*>(src) + r * k;
    const uint8_t* s = scale + r * (k / kMxBlock);
    for (int64_t i = 0; i < k; ++i) dst[i] = mx_dequantize(d[i], s[i / kMxBlock]);
  } else {
    const uint16_t* d = static_cast<const uint16_t*>(src) + r * k;
    for (int64_t i = 0; i < k; ++i) dst[i] = bf16_to_f32(d[i]);
  }
  for (int64_t i = k; i < kp; ++i) dst[i] = 0.0f;
}

}  // namespace

Status grouped_mm(ThreadPool& pool, const fmoe_grouped_mm_args& a, bool mx) {
  const int64_t K = a.k, N = a.n, rows = a.rows;
  const int64_t kp = (K + 3) / 4 * 4;
  auto* c = static_cast<uint16_t*>(a.c);
  std::vector<int64_t> row_ids;
  std::vector<float> a_f32;

  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t lo = a.group_offsets[g], hi = a.group_offsets[g + 1];
    if (lo < 0 || hi < lo || hi > rows) continue;  // a bad offset skips its group, never faults
    row_ids.clear();
    for (int64_t r = lo; r < hi; ++r)
      if (a.row_map == nullptr || a.row_map[r] >= 0) row_ids.push_back(r);
    const int64_t M = int64_t(row_ids.size());
    if (M == 0) continue;

    a_f32.resize(size_t(M * kp));
    pool.parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        widen_row(a.a, a.a_scale, mx, row_ids[m], K, kp, a_f32.data() + m * kp);
    });

    const void* b_group = mx ? static_cast<const void*>(static_cast<const uint8_t*>(a.b) + g * N * K)
                             : static_cast<const void*>(static_cast<const uint16_t*>(a.b) + g * N * K);
    const uint8_t* b_scale_group = mx ? a.b_scale + g * N * (K / kMxBlock) : nullptr;
    const float* bias = a.bias != nullptr ? a.bias + g * N : nullptr;
    const int64_t col_blocks = (N + kColBlock - 1) / kColBlock;

    pool.run(col_blocks, [&](int64_t blk) {
      const int64_t n0 = blk * kColBlock, n1 = std::min(N, n0 + kColBlock);
      std::vector<float> b_f32(size_t((n1 - n0) * kp));
      for (int64_t n = n0; n < n1; ++n)
        widen_row(b_group, b_scale_group, mx, n, K, kp, b_f32.data() + (n - n0) * kp);
      float acc[kRowTile][kColTile];
      for (int64_t m = 0; m < M; m += kRowTile) {
        const float* ap[kRowTile];
        for (int64_t i = 0; i < kRowTile; ++i)  // a short last tile repeats its last row
          ap[i] = a_f32.data() + std::min(m + i, M - 1) * kp;
        for (int64_t n = n0; n < n1; n += kColTile) {
          const float* bp[kColTile];
          for (int64_t j = 0; j < kColTile; ++j)
            bp[j] = b_f32.data() + (std::min(n + j, n1 - 1) - n0) * kp;
          dot_4x2(ap, bp, kp, acc);
          for (int64_t i = 0; i < kRowTile && m + i < M; ++i) {
            uint16_t* crow = c + row_ids[m + i] * N;
            for (int64_t j = 0; j < kColTile && n + j < n1; ++j) {
              const float v = bias != nullptr ? acc[i][j] + bias[n + j] : acc[i][j];
              crow[n + j] = f32_to_bf16(v);
            }
          }
        }
      }
    });
  }
  return FMOE_OK;
}

}  // namespace fmoe::host
