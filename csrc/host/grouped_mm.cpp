// grouped_mm: for each group g and each non-skipped row r in [offsets[g], offsets[g+1]):
//   c[r, n] = bf16( sum_k a[r, k] * b[g, n, k] + bias[g, n] )      (f32 accumulation)
// for bf16 operands and for MXFP8 ones (dequantized exactly to f32 first: e4m3 * 2^s).
//
// Per group, the group's A rows are widened to f32 once; the columns n are cut into blocks that
// the pool shares out, and each block runs register-blocked tiles (up to 4 rows by 2-8 columns)
// over k. Both operands are k-contiguous, so the inner loop is a plain stream of 4-wide vector
// multiply-adds (GCC vector extensions: SSE on baseline x86-64, NEON on arm64), without relying on
// -ffast-math to reassociate the sum. For a few rows per group (decode), bf16 rows of b are widened
// in registers as they are read (one unpack): b's bytes are then read once, where a widened f32
// copy would write and read twice as many again. Groups of more rows, and MXFP8 (a decode per
// byte), widen the block's rows of b once.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/numerics.h"
#include "host/host_backend.h"

namespace fmoe::host {
namespace {

typedef float v4f __attribute__((vector_size(16)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint64_t v2u64 __attribute__((vector_size(16)));

constexpr int64_t kRowTile = 4;
constexpr int64_t kColBlock = 16;  // columns a task computes (rows of b widened together)
constexpr int64_t kWidenRows = 8;  // groups of more rows widen b once per block

inline v4f load4(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Four bf16 values widened to f32 (exact: the bf16 bits are the f32's upper half). Interleaving
// them above zeros (little-endian lanes) is one unpack instruction; a convert-then-shift is six on
// SSE2.
inline v4f load4_bf16(const uint16_t* p) {
  uint64_t bits;
  std::memcpy(&bits, p, sizeof bits);
  const v2u64 q = {bits, 0};
  const v8u16 zero = {};
  // Vector casts reinterpret the bits (GCC vector extensions).
  return (v4f)__builtin_shufflevector(zero, (v8u16)q, 0, 8, 1, 9, 2, 10, 3, 11);
}

inline float hsum(v4f v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// Rows of b: widened f32 rows (kp floats, zero-padded), or bf16 rows of k values read in place.
struct F32Rows {
  const float* const* row;
  v4f load(int j, int64_t k) const { return load4(row[j] + k); }
};
struct Bf16Rows {
  const uint16_t* const* row;
  v4f load(int j, int64_t k) const { return load4_bf16(row[j] + k); }
};

// out[i][j] = dot(a[i], b[j]) for an R x C tile: `b` loads its values 4 at a time below
// k4 = floor(k/4)*4, and `tail` holds the rest of each b row zero-padded to 4 (k - k4 values); a's
// rows are zero-padded to a multiple of 4. Each lane accumulates its k in order, whatever the tile,
// so a row's result does not depend on the rows it shares a tile with. R x C independent sums hide
// the add's latency: a tile of one row takes 8 columns, not 2.
template <int R, int C, class B>
inline void dot_tile(const float* const* a, const B& b, int64_t k4, const v4f* tail, float* out) {
  v4f c[R][C] = {};
  auto step = [&](const v4f (&y)[C], int64_t k) {
    for (int i = 0; i < R; ++i) {
      const v4f x = load4(a[i] + k);
      for (int j = 0; j < C; ++j) c[i][j] += x * y[j];
    }
  };
  for (int64_t k = 0; k < k4; k += 4) {
    v4f y[C];
    for (int j = 0; j < C; ++j) y[j] = b.load(j, k);
    step(y, k);
  }
  if (tail != nullptr) {
    v4f y[C];
    for (int j = 0; j < C; ++j) y[j] = tail[j];
    step(y, k4);
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) out[i * C + j] = hsum(c[i][j]);
}

// The tile shape for R (1..4) rows of a: R x C, C = 8 / R rounded down to a power of two.
template <int R>
constexpr int kTileCols = R == 1 ? 8 : R == 2 ? 4 : 2;

// A task's share of one group: the columns [n0, n1) of b against the group's rows of a.
struct Block {
  const float* a_f32;      // the group's rows of a, widened (kp floats each)
  int64_t kp, k4, k, n;    // padded k, k rounded down to 4, k, columns of c
  int64_t n0, n1;
  const float* b_f32;      // the block's rows of b widened (kp floats each), or null
  const uint16_t* b_bf16;  // bf16: the group's b [n, k]
  const v4f* tails;        // bf16 with k % 4 != 0: each block column's last values, else null
  const float* bias;       // the group's bias, or null
  const int64_t* row_ids;  // c's row of each row of a
  uint16_t* c;
};

// One tile of R rows of a (from row m) against every column pair, quad or octet of the block.
template <int R>
void block_tiles(const Block& bk, int64_t m) {
  constexpr int C = kTileCols<R>;
  const float* ap[R];
  for (int i = 0; i < R; ++i) ap[i] = bk.a_f32 + (m + i) * bk.kp;
  for (int64_t n = bk.n0; n < bk.n1; n += C) {
    int64_t cols[C];  // a short last group repeats the block's last column
    for (int j = 0; j < C; ++j) cols[j] = std::min<int64_t>(n + j, bk.n1 - 1);
    float acc[R * C];
    if (bk.b_f32 != nullptr) {
      const float* rows[C];
      for (int j = 0; j < C; ++j) rows[j] = bk.b_f32 + (cols[j] - bk.n0) * bk.kp;
      dot_tile<R, C>(ap, F32Rows{rows}, bk.k4, nullptr, acc);
    } else {
      const uint16_t* rows[C];
      v4f tail[C];
      for (int j = 0; j < C; ++j) {
        rows[j] = bk.b_bf16 + cols[j] * bk.k;
        if (bk.tails != nullptr) tail[j] = bk.tails[cols[j] - bk.n0];
      }
      dot_tile<R, C>(ap, Bf16Rows{rows}, bk.k4, bk.tails != nullptr ? tail : nullptr, acc);
    }
    for (int i = 0; i < R; ++i) {
      uint16_t* crow = bk.c + bk.row_ids[m + i] * bk.n;
      for (int j = 0; j < C && n + j < bk.n1; ++j) {
        const float v = bk.bias != nullptr ? acc[i * C + j] + bk.bias[n + j] : acc[i * C + j];
        crow[n + j] = f32_to_bf16(v);
      }
    }
  }
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

    // Widening b's rows once per block pays where many row tiles reuse them; for a few rows
    // (decode), bf16 rows are widened in registers as they are read instead.
    const bool widen_b = mx || M > kWidenRows;
    pool.run(col_blocks, [&](int64_t blk) {
      const int64_t n0 = blk * kColBlock, n1 = std::min(N, n0 + kColBlock);
      // The block's rows of b widened to f32 (kp floats each, zero-padded).
      std::vector<float> b_f32;
      if (widen_b) {
        b_f32.resize(size_t((n1 - n0) * kp));
        for (int64_t n = n0; n < n1; ++n)
          widen_row(b_group, b_scale_group, mx, n, K, kp, b_f32.data() + (n - n0) * kp);
      }
      const auto* b_bf16 = static_cast<const uint16_t*>(b_group);
      const int64_t k4 = widen_b ? kp : K / 4 * 4;
      // bf16 rows whose k is not a multiple of 4: each column's last values, zero-padded.
      const bool has_tail = !widen_b && k4 < K;
      v4f tails[kColBlock];
      for (int64_t n = n0; has_tail && n < n1; ++n) {
        uint16_t last[4] = {0, 0, 0, 0};
        std::memcpy(last, b_bf16 + n * K + k4, size_t(K - k4) * sizeof(uint16_t));
        tails[n - n0] = load4_bf16(last);
      }
      const Block blk_args{a_f32.data(), kp, k4, K, N, n0, n1, widen_b ? b_f32.data() : nullptr, b_bf16,
                           has_tail ? tails : nullptr, bias, row_ids.data(), c};
      for (int64_t m = 0; m < M; m += kRowTile) {
        switch (std::min(kRowTile, M - m)) {
          case 1: block_tiles<1>(blk_args, m); break;
          case 2: block_tiles<2>(blk_args, m); break;
          case 3: block_tiles<3>(blk_args, m); break;
          default: block_tiles<4>(blk_args, m); break;
        }
      }
    });
  }
  return FMOE_OK;
}

}  // namespace fmoe::host
