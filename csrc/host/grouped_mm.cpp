// grouped_mm: for each group g and each non-skipped row r in [offsets[g], offsets[g+1]):
//   c[r, n] = bf16( sum_k a[r, k] * b[g, n, k] + bias[g, n] )      (f32 accumulation)
// for bf16 operands and for MXFP8 ones (dequantized exactly to f32 first: e4m3 * 2^s).
//
// Per group, the group's A rows are widened to f32 once; the columns n are cut into blocks that
// the pool shares out, and each block runs register-blocked tiles (up to 4 rows by 2-16 columns)
// over k. Every sum has one order, whatever the machine: lane j of an output's four accumulates
// a[k] * b[k] for k = j mod 4 in increasing k, then (l0 + l1) + (l2 + l3). So the inner loop is a
// stream of vector multiply-adds (GCC vector extensions) without -ffast-math reassociating it, and
// results are bit for bit the same on every path and instruction set (a NaN result is NaN, of
// either sign: which NaN an add keeps follows its operands' order, which the compiler chooses).
// - For a few rows per group (decode), b's bytes are read once: bf16 rows are widened in registers
//   as they are loaded (one unpack per four values), e4m3 rows kMxChunk values at a time into a
//   small buffer that stays in L1 (dot_tile_mx), where a widened f32 copy of the block would write
//   and read two (bf16) or four (e4m3) times as many bytes again.
// - Groups of more rows widen the block's rows of b once, laid out so that one vector load brings
//   the same four k of W/4 columns: 4-wide on baseline x86-64 and arm64, 8-wide with AVX2, 16-wide
//   with AVX-512 (chosen at run time; FMOE_HOST_SIMD=sse|avx2 caps it, for comparisons).
// - MXFP8 values are dequantized as numerics.h's mx_dequantize does, e4m3 value times 2^s in one
//   f32 product (mx_dequantize_row, quantize.cpp), so every path sees the same floats.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/numerics.h"
#include "host/host_backend.h"

namespace fmoe::host {
namespace {

typedef float v4f __attribute__((vector_size(16)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint64_t v2u64 __attribute__((vector_size(16)));

typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));

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

// Rows of b read in place: bf16, k values each.
struct Bf16Rows {
  const uint16_t* const* row;
  v4f load(int j, int64_t k) const { return load4_bf16(row[j] + k); }
};

// Rows of b as f32, each holding k values from k0 on (a chunk of MXFP8 rows dequantized).
struct F32Rows {
  const float* const* row;
  int64_t k0;
  v4f load(int j, int64_t k) const { return load4(row[j] + (k - k0)); }
};

// One k step of four: c[i][j] += a[i][k..k+3] * y[j], lane by lane.
template <int R, int C>
inline void dot_step(const float* const* a, const v4f (&y)[C], int64_t k, v4f (&c)[R][C]) {
  for (int i = 0; i < R; ++i) {
    const v4f x = load4(a[i] + k);
    for (int j = 0; j < C; ++j) c[i][j] += x * y[j];
  }
}

// c[i][j] += the products of k in [k0, k1) (multiples of 4), lane by lane.
template <int R, int C, class B>
inline void dot_accumulate(const float* const* a, const B& b, int64_t k0, int64_t k1,
                           v4f (&c)[R][C]) {
  for (int64_t k = k0; k < k1; k += 4) {
    v4f y[C];
    for (int j = 0; j < C; ++j) y[j] = b.load(j, k);
    dot_step<R, C>(a, y, k, c);
  }
}

template <int R, int C>
inline void dot_finish(const v4f (&c)[R][C], float* out) {
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) out[i * C + j] = hsum(c[i][j]);
}

// out[i][j] = dot(a[i], b[j]) for an R x C tile: `b` loads its values 4 at a time below
// k4 = floor(k/4)*4, and `tail` holds the rest of each b row zero-padded to 4 (k - k4 values); a's
// rows are zero-padded to a multiple of 4. Each lane accumulates its k in order, whatever the tile,
// so a row's result does not depend on the rows it shares a tile with. R x C independent sums hide
// the add's latency: a tile of one row takes 8 columns, not 2.
template <int R, int C, class B>
inline void dot_tile(const float* const* a, const B& b, int64_t k4, const v4f* tail, float* out) {
  v4f c[R][C] = {};
  dot_accumulate<R, C>(a, b, 0, k4, c);
  if (tail != nullptr) {
    v4f y[C];
    for (int j = 0; j < C; ++j) y[j] = tail[j];
    dot_step<R, C>(a, y, k4, c);
  }
  dot_finish<R, C>(c, out);
}

// k values of b an MXFP8 tile dequantizes at a time (C rows of them: at most 8 KB on the stack).
constexpr int64_t kMxChunk = 256;

// The MXFP8 tile: b's rows dequantized kMxChunk values at a time (mx_dequantize_row: the widest
// vectors the CPU has), each chunk then added as dot_tile adds (the same lanes, the same order).
template <int R, int C>
inline void dot_tile_mx(const float* const* a, const uint8_t* const* b, const uint8_t* const* scale,
                        int64_t k, float* out) {
  v4f c[R][C] = {};
  alignas(64) float chunk[C][kMxChunk];
  const float* rows[C];
  for (int j = 0; j < C; ++j) rows[j] = chunk[j];
  for (int64_t k0 = 0; k0 < k; k0 += kMxChunk) {
    const int64_t n = std::min(kMxChunk, k - k0);
    for (int j = 0; j < C; ++j) mx_dequantize_row(b[j] + k0, scale[j] + k0 / kMxBlock, n, chunk[j]);
    dot_accumulate<R, C>(a, F32Rows{rows, k0}, k0, k0 + n, c);
  }
  dot_finish<R, C>(c, out);
}

// The tile shape for R (1..4) rows of a: R x C, C = 8 / R rounded down to a power of two.
template <int R>
constexpr int kTileCols = R == 1 ? 8 : R == 2 ? 4 : 2;

// A task's share of one group: the columns [n0, n1) of b against the group's rows of a.
struct Block {
  const float* a_f32;      // the group's rows of a, widened (kp floats each)
  int64_t kp, k4, k, n;    // padded k, k rounded down to 4, k, columns of c
  int64_t n0, n1;
  const float* b_wide;     // the block's rows of b widened and interleaved (wide_b), or null
  const uint16_t* b_bf16;  // bf16: the group's b [n, k]
  const uint8_t* b_mx;     // MXFP8 read in place: the group's b [n, k] (e4m3) and its scales
  const uint8_t* b_mx_scale;  //   [n, k / 32]
  const v4f* tails;        // bf16 with k % 4 != 0: each block column's last values, else null
  const float* bias;       // the group's bias, or null
  const int64_t* row_ids;  // c's row of each row of a
  uint16_t* c;
};

// c[row_ids[m + i], n] = bf16(acc + bias[n]).
inline void store(const Block& bk, int64_t m, int i, int64_t n, float acc) {
  const float v = bk.bias != nullptr ? acc + bk.bias[n] : acc;
  bk.c[bk.row_ids[m + i] * bk.n + n] = f32_to_bf16(v);
}

// One tile of R rows of a (from row m) against every column pair, quad or octet of the block,
// rows of b (bf16, or e4m3 with scales: kMx) read in place.
template <int R, bool kMx>
void block_tiles(const Block& bk, int64_t m) {
  constexpr int C = kTileCols<R>;
  const float* ap[R];
  for (int i = 0; i < R; ++i) ap[i] = bk.a_f32 + (m + i) * bk.kp;
  for (int64_t n = bk.n0; n < bk.n1; n += C) {
    const uint16_t* rows[C];  // a short last group repeats the block's last column
    const uint8_t* mx_rows[C];
    const uint8_t* mx_scales[C];
    v4f tail[C];
    for (int j = 0; j < C; ++j) {
      const int64_t col = std::min<int64_t>(n + j, bk.n1 - 1);
      if constexpr (kMx) {
        mx_rows[j] = bk.b_mx + col * bk.k;
        mx_scales[j] = bk.b_mx_scale + col * (bk.k / kMxBlock);
      } else {
        rows[j] = bk.b_bf16 + col * bk.k;
      }
      if (bk.tails != nullptr) tail[j] = bk.tails[col - bk.n0];
    }
    float acc[R * C];
    const v4f* tails = bk.tails != nullptr ? tail : nullptr;
    if constexpr (kMx) dot_tile_mx<R, C>(ap, mx_rows, mx_scales, bk.k, acc);
    else dot_tile<R, C>(ap, Bf16Rows{rows}, bk.k4, tails, acc);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C && n + j < bk.n1; ++j) store(bk, m, i, n + j, acc[i * C + j]);
  }
}

// Widens row `r` of a [*, k] operand (bf16, or e4m3 with its e8m0 scales) into `dst` (kp floats,
// zero-padded past k).
inline void widen_row(const void* src, const uint8_t* scale, bool mx, int64_t r, int64_t k,
                      int64_t kp, float* dst) {
  if (mx) {  // k is a multiple of 32
    mx_dequantize_row(static_cast<const uint8_t*>(src) + r * k, scale + r * (k / kMxBlock), k, dst);
  } else {
    const uint16_t* d = static_cast<const uint16_t*>(src) + r * k;
    for (int64_t i = 0; i < k; ++i) dst[i] = bf16_to_f32(d[i]);
  }
  for (int64_t i = k; i < kp; ++i) dst[i] = 0.0f;
}

// The block against all M rows of a, kRowTile at a time, b read in place.
template <bool kMx>
void in_place_rows(const Block& bk, int64_t M) {
  for (int64_t m = 0; m < M; m += kRowTile) {
    switch (std::min(kRowTile, M - m)) {
      case 1: block_tiles<1, kMx>(bk, m); break;
      case 2: block_tiles<2, kMx>(bk, m); break;
      case 3: block_tiles<3, kMx>(bk, m); break;
      default: block_tiles<4, kMx>(bk, m); break;
    }
  }
}

// ---- The widened path, W floats per vector (4, 8 or 16) ----
//
// The block's columns are cut into sets of W/4; the widened b holds, per set and per four k
// (q = k/4), the set's columns' four values side by side: one load of W floats. a's four values
// at q are repeated W/4 times, so lane 4c + j of a product is column c's lane j: the same sums as
// four-wide code, each vector carrying W/4 columns.

template <int W> struct WideVec;
template <> struct WideVec<4> { typedef v4f type; };
template <> struct WideVec<8> { typedef v8f type; };
template <> struct WideVec<16> { typedef v16f type; };

// Floats of the widened block b: ceil(kColBlock / (W/4)) sets of kp/4 vectors.
template <int W>
constexpr int64_t wide_block_floats(int64_t kp) {
  return (kColBlock + W / 4 - 1) / (W / 4) * kp * (W / 4);
}

// The block's rows of b (bf16, or e4m3 with scales) widened into the interleaved layout; columns
// past the block's end are zeros.
template <int W>
void widen_block(const void* b, const uint8_t* scale, bool mx, int64_t n0, int64_t n1, int64_t k,
                 int64_t kp, float* row, float* out) {
  constexpr int cols = W / 4;
  const int64_t q_count = kp / 4;
  const int64_t full = (n1 - n0) / cols * q_count * W;  // floats of the sets filled whole
  std::memset(out + full, 0, size_t(wide_block_floats<W>(kp) - full) * sizeof(float));
  for (int64_t n = n0; n < n1; ++n) {
    if (cols == 1) {  // one column a set: the layout is its row
      widen_row(b, scale, mx, n, k, kp, out + (n - n0) * kp);
      continue;
    }
    widen_row(b, scale, mx, n, k, kp, row);
    const int64_t set = (n - n0) / cols, c = (n - n0) % cols;
    float* dst = out + set * q_count * W + c * 4;
    for (int64_t q = 0; q < q_count; ++q) std::memcpy(dst + q * W, row + q * 4, 4 * sizeof(float));
  }
}

// a's four values at k repeated across a vector of W (written through a reference: a vector
// returned by value from a function built without AVX would change the ABI; these are all
// inlined into a function built with the ISA their vectors need).
template <int W>
__attribute__((always_inline)) inline void repeat4(const float* p, typename WideVec<W>::type& out) {
  const v4f x = load4(p);
  if constexpr (W == 4) {
    out = x;
  } else {
    const v8f x8 = __builtin_shufflevector(x, x, 0, 1, 2, 3, 0, 1, 2, 3);
    if constexpr (W == 8) out = x8;
    else out = __builtin_shufflevector(x8, x8, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
  }
}

// R rows of a (from row m) against S sets (from set s0): R x S vector sums over k, then each
// column's four lanes summed and stored.
template <int W, int R, int S>
__attribute__((always_inline)) inline void wide_tile(const Block& bk, int64_t m, int64_t s0) {
  typedef typename WideVec<W>::type vf;
  constexpr int cols = W / 4;
  const int64_t q_count = bk.kp / 4;
  const float* ap[R];
  for (int i = 0; i < R; ++i) ap[i] = bk.a_f32 + (m + i) * bk.kp;
  const float* bp = bk.b_wide + s0 * q_count * W;
  vf acc[R][S] = {};
  for (int64_t q = 0; q < q_count; ++q) {
    vf y[S];
    for (int s = 0; s < S; ++s) std::memcpy(&y[s], bp + (s * q_count + q) * W, sizeof(vf));
    for (int i = 0; i < R; ++i) {
      vf x;
      repeat4<W>(ap[i] + 4 * q, x);
      for (int s = 0; s < S; ++s) acc[i][s] += x * y[s];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int s = 0; s < S; ++s)
      for (int c = 0; c < cols; ++c) {
        const int64_t n = bk.n0 + (s0 + s) * cols + c;
        if (n >= bk.n1) break;
        const vf& v = acc[i][s];
        store(bk, m, i, n, (v[4 * c] + v[4 * c + 1]) + (v[4 * c + 2] + v[4 * c + 3]));
      }
}

// R rows against the block's sets, S at a time (registers hold R x S accumulators).
template <int W, int R>
__attribute__((always_inline)) inline void wide_rows(const Block& bk, int64_t m) {
  constexpr int S = W == 16 ? 4 : 2;
  const int64_t sets = (bk.n1 - bk.n0 + W / 4 - 1) / (W / 4);
  int64_t s0 = 0;
  for (; s0 + S <= sets; s0 += S) wide_tile<W, R, S>(bk, m, s0);
  for (; s0 < sets; ++s0) wide_tile<W, R, 1>(bk, m, s0);
}

template <int W>
__attribute__((always_inline)) inline void wide_block(const Block& bk, int64_t M) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) wide_rows<W, 4>(bk, m);
  switch (M - m) {
    case 1: wide_rows<W, 1>(bk, m); break;
    case 2: wide_rows<W, 2>(bk, m); break;
    case 3: wide_rows<W, 3>(bk, m); break;
    default: break;
  }
}

// One out-of-line instantiation per instruction set: the vector code is compiled inside the
// function whose target allows it, and nothing built for AVX runs unless the CPU has it.
__attribute__((noinline)) void wide_block_sse(const Block& bk, int64_t M) { wide_block<4>(bk, M); }
#if defined(__x86_64__)
__attribute__((target("avx2"))) void wide_block_avx2(const Block& bk, int64_t M) {
  wide_block<8>(bk, M);
}
__attribute__((target("avx512f"))) void wide_block_avx512(const Block& bk, int64_t M) {
  wide_block<16>(bk, M);
}
#endif

// The widest vectors this CPU runs, capped by FMOE_HOST_SIMD (sse | avx2); host_vector_floats
// keeps the answer for the process.
int probe_wide_floats() {
  int w = 4;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) w = 16;
  else if (__builtin_cpu_supports("avx2")) w = 8;
#endif
  if (const char* cap = std::getenv("FMOE_HOST_SIMD")) {
    if (std::strcmp(cap, "sse") == 0) w = 4;
    else if (std::strcmp(cap, "avx2") == 0) w = std::min(w, 8);
  }
  return w;
}

}  // namespace

int host_vector_floats() {
  static const int width = probe_wide_floats();
  return width;
}

Status grouped_mm(ThreadPool& pool, const fmoe_grouped_mm_args& a, bool mx) {
  const int64_t K = a.k, N = a.n, rows = a.rows;
  const int64_t kp = (K + 3) / 4 * 4;
  auto* c = static_cast<uint16_t*>(a.c);
  std::vector<int64_t> row_ids;
  std::vector<float> a_f32;
  const int width = host_vector_floats();

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
    // (decode), they are widened in registers as they are read instead.
    const bool widen_b = M > kWidenRows;
    pool.run(col_blocks, [&](int64_t blk) {
      const int64_t n0 = blk * kColBlock, n1 = std::min(N, n0 + kColBlock);
      // The block's rows of b widened to f32 and interleaved for W-float vectors.
      std::vector<float> b_wide;
      if (widen_b) {
        std::vector<float> row(static_cast<size_t>(kp));
        b_wide.resize(size_t(wide_block_floats<16>(kp)));
        switch (width) {
          case 16: widen_block<16>(b_group, b_scale_group, mx, n0, n1, K, kp, row.data(), b_wide.data()); break;
          case 8: widen_block<8>(b_group, b_scale_group, mx, n0, n1, K, kp, row.data(), b_wide.data()); break;
          default: widen_block<4>(b_group, b_scale_group, mx, n0, n1, K, kp, row.data(), b_wide.data()); break;
        }
      }
      const auto* b_bf16 = static_cast<const uint16_t*>(b_group);
      const int64_t k4 = widen_b ? kp : K / 4 * 4;
      // bf16 rows whose k is not a multiple of 4: each column's last values, zero-padded (MXFP8's k
      // is a multiple of 32).
      const bool has_tail = !widen_b && k4 < K;
      v4f tails[kColBlock];
      for (int64_t n = n0; has_tail && n < n1; ++n) {
        uint16_t last[4] = {0, 0, 0, 0};
        std::memcpy(last, b_bf16 + n * K + k4, size_t(K - k4) * sizeof(uint16_t));
        tails[n - n0] = load4_bf16(last);
      }
      const Block blk_args{a_f32.data(), kp, k4, K, N, n0, n1, widen_b ? b_wide.data() : nullptr,
                           mx ? nullptr : b_bf16, mx ? static_cast<const uint8_t*>(b_group) : nullptr,
                           b_scale_group, has_tail ? tails : nullptr, bias, row_ids.data(), c};
      if (widen_b) {
        switch (width) {
#if defined(__x86_64__)
          case 16: wide_block_avx512(blk_args, M); break;
          case 8: wide_block_avx2(blk_args, M); break;
#endif
          default: wide_block_sse(blk_args, M); break;
        }
        return;
      }
      if (mx) in_place_rows<true>(blk_args, M);
      else in_place_rows<false>(blk_args, M);
    });
  }
  return FMOE_OK;
}

}  // namespace fmoe::host
