// Standalone correctness check and benchmark of the decode grouped GEMM
// (csrc/cuda/grouped_mm_small.cu): BF16 and MXFP8, gather, bias, row_map, fused activations.
//
// Build and run (H100 / H200, from the repository root):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -Icsrc/include -Icsrc bench/dev/grouped_mm_small_check.cu csrc/cuda/grouped_mm_small.cu \
//     csrc/cuda/tensor_map.cu -o /tmp/gmm_small_check && /tmp/gmm_small_check
// (no -lcuda: the tensor map encoder is fetched through the runtime, as in the library.)
//
// Every case: random inputs from a hash RNG on the device (MXFP8: bf16 values times a random
// power of two per 32-block, quantized on the device with numerics.h's mx_quantize_block), c
// poisoned with 0xFFFF (a bf16 NaN), the kernel run once per forced split count, and a naive
// reference kernel (one thread per (row, weight row), f32 accumulation of the exactly dequantized
// operands) gives h = acc + bias; the host then forms the expected output: bf16(h), or
// bf16(act(bf16(h))) with the formulas of csrc/host/activation.cpp. Checks:
//  - every cell that must be written: |got - ref| <= 1.5e-2 * (|ref| + 0.1). Sound because both
//    sides sum the same products in f32 (order differs: ~1e-6 relative), the bf16 roundings agree
//    but at near-ties (one ulp, 2^-8 relative, at most ~2^-7 after an activation), while an
//    indexing, swizzle, scale or pipeline bug gives O(|ref|) errors (h is O(1) by construction).
//  - every cell that must not be written (skipped groups, row_map -1, gather index -1, rows past
//    the groups, columns in [out_cols, ldc)) still holds 0xFFFF.
// Then times the decode shapes of bench/cases.json at T = 1 (one row in each of topk groups):
// median of 20 single launches (events around each) and the mean of 20 back-to-back launches,
// rotating over 8 disjoint expert sets of a weight buffer of 8 * topk experts, so that L2 (50 MB)
// does not serve the weights. Prints GB/s of weight bytes (+ scales) read.
// Arguments: none (correctness, then timing), "correct" (correctness only), "waves [mxfp8|bf16]
// [case]" (the sweep of waves_main, optionally one format and one case). Exit code: 0 = all
// passed, 1 = a mismatch, 2 = a CUDA error, 3 = a kernel that never finished.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "core/numerics.h"
#include "cuda/grouped_mm_small.h"
#include "check_common.cuh"
#include "core/activation_math.h"

namespace {

using fmoe::cuda::SmallMmArgs;
using fmoe::cuda::SmallMmConfig;

// ---- device helpers ---------------------------------------------------------------------------
// bf16 values uniform in [-scale, scale); with `block_pow2`, each 32-block of a row is also
// multiplied by 2^e, e in [-3, 3], so MXFP8 scales differ from block to block.
__global__ void fill_bf16(uint16_t* p, int64_t count, uint32_t seed, float scale,
                          bool block_pow2) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v = uniform_pm1(i, seed) * scale;
    if (block_pow2) v = ldexpf(v, int(hash32(uint32_t(i / 32) * 2654435761u + seed) % 7) - 3);
    p[i] = fmoe::f32_to_bf16(v);
  }
}

// MXFP8 of a bf16 [rows, cols] matrix: one thread per 32-block (numerics.h, bit for bit).
__global__ void quantize_blocks(const uint16_t* in, int64_t blocks, uint8_t* q, uint8_t* sc) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks;
       b += int64_t(gridDim.x) * blockDim.x)
    sc[b] = fmoe::mx_quantize_block(in + b * 32, q + b * 32);
}

// Rewrites the e8m0 scales of an operand [rows, ks] to span the whole code range, 0x00 (2^-127,
// an f32 subnormal) and 0xFF (NaN) included, while every product scale stays near 2^-19, that of
// the quantized operands (h stays finite and O(1)): block kb has a base B (0 when kb % 8 == 0,
// 235 when kb % 8 == 1, else pseudo-random in [0, 235]); a token's scale is B + d, a weight
// row's 235 - B + d, d in {-1, 0, 1}, clamped to [0, 254]. NaN: weight row j at block j % ks
// when j % 37 == 5, token row r at block 1 when r % 5 == 3.
__global__ void spread_scales(uint8_t* sc, int64_t rows, int64_t ks, bool weights, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * ks;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / ks, kb = i % ks;
    const int base =
        kb % 8 == 0 ? 0 : kb % 8 == 1 ? 235 : int(hash32(uint32_t(kb) * 77u + 5u) % 236u);
    const int d = int(hash32(uint32_t(i) * 2654435761u + seed) % 3u) - 1;
    const int v = (weights ? 235 - base : base) + d;
    const bool nan = weights ? (r % 37 == 5 && kb == r % ks) : (r % 5 == 3 && kb == 1 % ks);
    sc[i] = nan ? 0xFF : uint8_t(v < 0 ? 0 : (v > 254 ? 254 : v));
  }
}

// h[r, j] = sum_k A(src(r), k) * B(g, j, k) + bias[g, j] for rows with row_group[r] = g >= 0
// (row_src[r] = the source row of a). A and B are bf16, or e4m3 + e8m0 dequantized exactly.
// h_abs[r, j] = sum_k |A(src(r), k) * B(g, j, k)|: what an accumulation error is relative to.
__global__ void reference_gemm(const void* a, const uint8_t* a_scale, const void* b,
                               const uint8_t* b_scale, const float* bias, const int* row_group,
                               const int* row_src, float* h, float* h_abs, int rows, int n, int k,
                               bool fp8) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int r = blockIdx.y;
  if (r >= rows || j >= n) return;
  const int g = row_group[r];
  if (g < 0) return;
  const int64_t ar = row_src[r], br = int64_t(g) * n + j;
  float acc = 0.f, acc_abs = 0.f;
  if (!fp8) {
    const uint16_t* x = static_cast<const uint16_t*>(a) + ar * k;
    const uint16_t* w = static_cast<const uint16_t*>(b) + br * k;
    for (int i = 0; i < k; ++i) {
      const float xv = fmoe::bf16_to_f32(x[i]), wv = fmoe::bf16_to_f32(w[i]);
      acc = fmaf(xv, wv, acc);
      acc_abs += std::fabs(xv * wv);
    }
  } else {
    const uint8_t* x = static_cast<const uint8_t*>(a) + ar * k;
    const uint8_t* w = static_cast<const uint8_t*>(b) + br * k;
    const uint8_t* xs = a_scale + ar * (k / 32);
    const uint8_t* ws = b_scale + br * (k / 32);
    for (int i = 0; i < k; ++i) {
      const float xv = fmoe::mx_dequantize(x[i], xs[i / 32]);
      const float wv = fmoe::mx_dequantize(w[i], ws[i / 32]);
      acc = fmaf(xv, wv, acc);
      acc_abs += std::fabs(xv * wv);
    }
  }
  if (bias) acc += bias[br];
  h[int64_t(r) * n + j] = acc;
  h_abs[int64_t(r) * n + j] = acc_abs;
}

float rb(float x) { return fmoe::bf16_to_f32(fmoe::f32_to_bf16(x)); }

// ---- a test problem ---------------------------------------------------------------------------
struct Problem {
  std::string name;
  int64_t rows = 0, n = 0, k = 0, groups = 0, max_rows = 32;
  std::vector<int32_t> offsets;
  std::vector<int32_t> row_map;    // empty = none
  std::vector<int32_t> row_index;  // empty = no gather
  int64_t a_rows = 0;              // rows of a when gathering
  bool bias = false, fp8 = false;
  int act = -1, layout = FMOE_LAYOUT_HALVES;
  int64_t ldc_extra = 0;
  bool spread_scales = false;     // MXFP8: scales over e8m0's whole range (spread_scales)
  int token_tile = 0;             // 0 = the config's choice
  std::vector<int> splits = {0};  // 0 = the config's choice
};

int64_t out_cols(const Problem& p) { return p.act >= FMOE_ACT_SILU ? p.n / 2 : p.n; }

// Which group each row belongs to (or -1 when not written), and its source row of a.
void row_plan(const Problem& p, std::vector<int>* rg, std::vector<int>* src, bool* overlap) {
  rg->assign(size_t(p.rows), -1);
  src->assign(size_t(p.rows), 0);
  *overlap = false;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int lo = p.offsets[g], hi = p.offsets[g + 1];
    if (!(lo >= 0 && lo <= hi && hi <= p.rows)) continue;
    for (int r = lo; r < hi; ++r) {
      if ((*rg)[r] != -1) *overlap = true;
      (*rg)[r] = int(g);
    }
  }
  const int64_t a_rows = p.row_index.empty() ? p.rows : p.a_rows;
  for (int64_t r = 0; r < p.rows; ++r) {
    int s = p.row_index.empty() ? int(r) : p.row_index[r];
    if (s < 0 || s >= a_rows) (*rg)[r] = -1, s = 0;
    (*src)[r] = s;
    if (!p.row_map.empty() && p.row_map[r] == -1) (*rg)[r] = -1;
  }
}

struct Dev {
  void *a = nullptr, *b = nullptr, *c = nullptr;
  uint8_t *a_scale = nullptr, *b_scale = nullptr;
  float *bias = nullptr, *h = nullptr;
  int32_t *offsets = nullptr, *row_map = nullptr, *row_index = nullptr, *row_group = nullptr,
          *row_src = nullptr;
  SmallMmArgs args;
};

template <class T>
T* upload_vec(const std::vector<T>& v) {
  if (v.empty()) return nullptr;
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, v.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// Random operand [rows, k]: bf16 in `*data`, or e4m3 + e8m0 (quantized from bf16).
void make_operand(int64_t rows, int64_t k, bool fp8, uint32_t seed, float scale, void** data,
                  uint8_t** sc) {
  const int64_t elems = std::max<int64_t>(1, rows * k);
  uint16_t* tmp = nullptr;
  CHECK_CUDA(cudaMalloc(&tmp, elems * 2));
  fill_bf16<<<2048, 256>>>(tmp, rows * k, seed, scale, fp8);
  CHECK_CUDA(cudaGetLastError());
  if (!fp8) {
    *data = tmp;
    *sc = nullptr;
    return;
  }
  CHECK_CUDA(cudaMalloc(data, elems));
  CHECK_CUDA(cudaMalloc(sc, std::max<int64_t>(1, rows * k / 32)));
  quantize_blocks<<<2048, 256>>>(tmp, rows * k / 32, static_cast<uint8_t*>(*data), *sc);
  CHECK_CUDA(cudaGetLastError());
  sync_or_die(0, "quantize");
  CHECK_CUDA(cudaFree(tmp));
}

Dev upload(const Problem& p, const std::vector<int>& rg, const std::vector<int>& src,
           uint32_t seed) {
  Dev d;
  const int64_t a_rows = p.row_index.empty() ? p.rows : p.a_rows;
  // b scaled by 1/sqrt(k): h is O(1) whatever k is, so one tolerance fits every case.
  make_operand(a_rows, p.k, p.fp8, seed * 7 + 1, 1.0f, &d.a, &d.a_scale);
  make_operand(p.groups * p.n, p.k, p.fp8, seed * 7 + 2, 1.7f / std::sqrt(float(p.k)), &d.b,
               &d.b_scale);
  if (p.fp8 && p.spread_scales) {
    spread_scales<<<256, 256>>>(d.a_scale, a_rows, p.k / 32, false, seed * 7 + 4);
    spread_scales<<<256, 256>>>(d.b_scale, p.groups * p.n, p.k / 32, true, seed * 7 + 5);
    CHECK_CUDA(cudaGetLastError());
  }
  const int64_t ldc = out_cols(p) + p.ldc_extra;
  CHECK_CUDA(cudaMalloc(&d.c, std::max<int64_t>(1, p.rows * ldc) * 2));
  if (p.bias) {
    CHECK_CUDA(cudaMalloc(&d.bias, p.groups * p.n * 4));
    fill_f32<<<256, 256>>>(d.bias, p.groups * p.n, seed * 7 + 3, 0.5f);
    CHECK_CUDA(cudaGetLastError());
  }
  d.offsets = upload_vec(p.offsets);
  d.row_map = upload_vec(p.row_map);
  d.row_index = upload_vec(p.row_index);
  if (p.rows > 0) {
    d.row_group = upload_vec(rg);
    d.row_src = upload_vec(src);
    CHECK_CUDA(cudaMalloc(&d.h, 2 * p.rows * p.n * 4));  // h, then h_abs
    dim3 grid(unsigned((p.n + 127) / 128), unsigned(p.rows));
    reference_gemm<<<grid, 128>>>(d.a, d.a_scale, d.b, d.b_scale, d.bias, d.row_group, d.row_src,
                                  d.h, d.h + p.rows * p.n, int(p.rows), int(p.n), int(p.k), p.fp8);
    CHECK_CUDA(cudaGetLastError());
  }
  SmallMmArgs& a = d.args;
  a.a = d.a;
  a.a_scale = d.a_scale;
  a.a_row_index = d.row_index;
  a.a_rows = a_rows;
  a.b = d.b;
  a.b_scale = d.b_scale;
  a.bias = d.bias;
  a.c = d.c;
  a.ldc = ldc;
  a.group_offsets = d.offsets;
  a.row_map = d.row_map;
  a.rows = p.rows;
  a.n = p.n;
  a.k = p.k;
  a.groups = p.groups;
  a.max_rows_per_group = p.max_rows;
  a.format = p.fp8 ? FMOE_WEIGHTS_MXFP8 : FMOE_WEIGHTS_BF16;
  a.epilogue.activation = p.act;
  a.epilogue.layout = p.layout;
  sync_or_die(0, "inputs + reference", 600.0);
  return d;
}

void release(Dev& d) {
  for (void* ptr : {d.a, d.b, d.c, static_cast<void*>(d.a_scale), static_cast<void*>(d.b_scale),
                    static_cast<void*>(d.bias), static_cast<void*>(d.h),
                    static_cast<void*>(d.offsets), static_cast<void*>(d.row_map),
                    static_cast<void*>(d.row_index), static_cast<void*>(d.row_group),
                    static_cast<void*>(d.row_src)})
    cudaFree(ptr);
  d = Dev{};
}

// Compares c with the reference; prints diagnostics; returns true when all is right.
bool compare(const Problem& p, const std::vector<int>& rg, const Dev& d, const std::string& label) {
  const int64_t oc = out_cols(p), ldc = oc + p.ldc_extra;
  const int64_t cells = p.rows * ldc;
  std::vector<uint16_t> got(size_t(std::max<int64_t>(cells, 1)));
  std::vector<float> h(size_t(std::max<int64_t>(2 * p.rows * p.n, 1)));
  if (cells > 0) CHECK_CUDA(cudaMemcpy(got.data(), d.c, cells * 2, cudaMemcpyDeviceToHost));
  if (p.rows > 0)
    CHECK_CUDA(cudaMemcpy(h.data(), d.h, 2 * p.rows * p.n * 4, cudaMemcpyDeviceToHost));
  const float* h_abs = h.data() + p.rows * p.n;
  // Hopper's fp8 tensor cores add the products of one k32 step with a narrower accumulator than
  // f32 (about 14 bits kept; why the kernel promotes every 32): h may differ from this reference
  // by up to ~2^-14 of the sum of |products|, which matters where the sum cancels (h near 0
  // while its terms are not) and where block scales differ widely (spread scales). Allowed: 2^-12.
  auto acc_slack = [&](int64_t i) { return p.fp8 ? std::ldexp(double(h_abs[i]), -12) : 0.0; };
  const bool gated = p.act >= FMOE_ACT_SILU;
  const int64_t I = p.n / 2;
  const float alpha = float(FMOE_SWIGLU_OAI_DEFAULT_ALPHA), limit = float(FMOE_SWIGLU_OAI_DEFAULT_LIMIT);
  int64_t checked = 0, untouched = 0, bad = 0, clobbered = 0, exact = 0;
  double max_ratio = 0;
  int printed = 0, printed_clob = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t c = 0; c < ldc; ++c) {
      const uint16_t bits = got[r * ldc + c];
      if (rg[r] < 0 || c >= oc) {
        ++untouched;
        if (bits != 0xFFFF && printed_clob++ < 5)
          std::printf("    WRITTEN but must not be: row %lld col %lld = 0x%04x (%s)\n",
                      (long long)r, (long long)c, bits,
                      c >= oc ? "ldc padding column" : "skipped row");
        if (bits != 0xFFFF) ++clobbered;
        continue;
      }
      ++checked;
      const float* hr = h.data() + r * p.n;
      float ref;
      if (p.act < 0) ref = rb(hr[c]);
      else if (!gated) ref = rb(fmoe::activation_value(p.act, rb(hr[c]), 0.f, alpha, limit));
      else {
        const int64_t wg = p.layout == FMOE_LAYOUT_HALVES ? c : 2 * c;
        const int64_t wu = p.layout == FMOE_LAYOUT_HALVES ? I + c : 2 * c + 1;
        ref = rb(fmoe::activation_value(p.act, rb(hr[wg]), rb(hr[wu]), alpha, limit));
      }
      const float gv = fmoe::bf16_to_f32(bits);
      double err = std::fabs(double(gv) - double(ref));
      if (p.act >= 0 && err > 0) {
        // The kernel and this reference sum h in different orders, so the bf16 rounding of h
        // before the activation may land one ulp apart, and the activation can amplify that
        // (steep silu/gelu, cancellation near 0): measure the distance to the activation of
        // the activation over the box of inputs from the bf16 below to the bf16 above, each
        // first widened by the accumulation slack (MXFP8), instead of to the one rounding this
        // reference chose.
        auto nb = [&](int64_t i, int d) {
          const float x = float(double(hr[i]) + d * acc_slack(r * p.n + i));
          return fmoe::bf16_to_f32(uint16_t(fmoe::f32_to_bf16(x) + d));
        };
        const int64_t wg = !gated ? c : p.layout == FMOE_LAYOUT_HALVES ? c : 2 * c;
        const int64_t wu = !gated ? c : p.layout == FMOE_LAYOUT_HALVES ? I + c : 2 * c + 1;
        double lo = ref, hi = ref;  // the activation over that box of inputs (it is continuous)
        for (int dg = -1; dg <= 1; ++dg)
          for (int du = -1; du <= 1; ++du) {
            const float alt = gated ? rb(fmoe::activation_value(p.act, nb(wg, dg), nb(wu, du), alpha, limit))
                                    : rb(fmoe::activation_value(p.act, nb(wg, dg), 0.f, alpha, limit));
            lo = std::min(lo, double(alt));
            hi = std::max(hi, double(alt));
          }
        err = gv < lo ? lo - gv : gv > hi ? gv - hi : 0.0;
      }
      const double tol = 1.5e-2 * (std::fabs(double(ref)) + 0.1) +
                         (p.act < 0 ? acc_slack(r * p.n + c) : p.fp8 ? 5e-3 : 0.0);
      if (gv == ref || (std::isnan(gv) && std::isnan(ref))) {
        ++exact;
        continue;
      }
      if (!(err <= tol)) {
        ++bad;
        if (printed++ < 8) {
          const int g = rg[r];
          std::printf("    MISMATCH row %lld (group %d, row %lld of it) col %lld (tile %lld, col "
                      "%lld in tile): got %.6g (0x%04x) ref %.6g (sum of |products| %.3g)\n",
                      (long long)r, g, (long long)(r - p.offsets[g]), (long long)c,
                      (long long)(c / (gated ? 32 : 64)), (long long)(c % (gated ? 32 : 64)), gv,
                      bits, ref, h_abs[r * p.n + c]);
          if (printed == 1 && !std::isnan(gv) && p.act < 0) {
            int found = 0;  // a permutation (fragment, swizzle, gather) shows up as a shifted match
            for (int64_t rr = 0; rr < p.rows && found < 3; ++rr)
              for (int64_t cc = std::max<int64_t>(0, c - 128); cc < std::min(oc, c + 128) && found < 3; ++cc)
                if (rg[rr] >= 0 && !(rr == r && cc == c) &&
                    std::fabs(rb(h[rr * p.n + cc]) - gv) <= 1e-3 * (std::fabs(gv) + 1e-2)) {
                  std::printf("      got value matches ref at row %lld col %lld (drow %+lld, dcol "
                              "%+lld)\n", (long long)rr, (long long)cc, (long long)(rr - r),
                              (long long)(cc - c));
                  ++found;
                }
            if (!found) std::printf("      got value matches no nearby ref\n");
          }
        }
      } else {
        max_ratio = std::max(max_ratio, err / tol);
      }
    }
  }
  const bool ok = bad == 0 && clobbered == 0;
  std::printf("  %s %-58s checked %lld (exact %.1f%%), untouched %lld, max err/tol %.3g",
              ok ? "PASS" : "FAIL", label.c_str(), (long long)checked,
              checked ? 100.0 * double(exact) / double(checked) : 100.0, (long long)untouched,
              max_ratio);
  if (!ok) std::printf(", %lld mismatches, %lld clobbered", (long long)bad, (long long)clobbered);
  std::printf("\n");
  std::fflush(stdout);
  return ok;
}

std::string cfg_str(const SmallMmConfig& c) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "[tile %d, splits %d, grid %d, %d CTA/SM, %d KB]", c.token_tile,
                c.splits, c.grid, c.ctas_per_sm, c.smem_bytes / 1024);
  return buf;
}

bool run_case(const Problem& p, int num_sms, uint32_t seed) {
  std::vector<int> rg, src;
  bool overlap = false;
  row_plan(p, &rg, &src, &overlap);
  if (overlap) {
    std::printf("  test bug: %s has overlapping groups\n", p.name.c_str());
    return false;
  }
  Dev d = upload(p, rg, src, seed);
  if (!fmoe::cuda::grouped_mm_small_supported(d.args)) {
    std::printf("  FAIL %s: grouped_mm_small_supported() = false\n", p.name.c_str());
    release(d);
    return false;
  }
  bool ok = true;
  for (int s : p.splits) {
    SmallMmConfig cfg = fmoe::cuda::grouped_mm_small_config(d.args, num_sms);
    if (s > 0) {
      cfg.splits = s;
      cfg.grid = 0;
    }
    if (p.token_tile > 0) {
      cfg.token_tile = p.token_tile;
      cfg.grid = 0;
    }
    const int64_t ldc = out_cols(p) + p.ldc_extra;
    CHECK_CUDA(cudaMemset(d.c, 0xFF, std::max<int64_t>(1, p.rows * ldc) * 2));
    cudaError_t e = fmoe::cuda::grouped_mm_small_with(d.args, cfg, num_sms, 0);
    if (e != cudaSuccess) {
      std::printf("  FAIL %s splits %d: launch returned %s\n", p.name.c_str(), cfg.splits,
                  cudaGetErrorString(e));
      ok = false;
      continue;
    }
    sync_or_die(0, (p.name + " kernel").c_str());
    ok = compare(p, rg, d, p.name + " " + cfg_str(cfg)) && ok;
  }
  release(d);
  return ok;
}

std::vector<int32_t> offsets_from_sizes(const std::vector<int>& sizes) {
  std::vector<int32_t> off(sizes.size() + 1, 0);
  for (size_t i = 0; i < sizes.size(); ++i) off[i + 1] = off[i] + sizes[i];
  return off;
}

Problem make(const std::string& name, const std::vector<int>& sizes, int64_t extra_rows,
             int64_t n, int64_t k, bool bias, bool fp8) {
  Problem p;
  p.name = name + (fp8 ? " mxfp8" : " bf16");
  p.groups = int64_t(sizes.size());
  p.offsets = offsets_from_sizes(sizes);
  p.rows = p.offsets.back() + extra_rows;
  p.n = n;
  p.k = k;
  p.bias = bias;
  p.fp8 = fp8;
  p.max_rows = std::max(1, std::min(32, *std::max_element(sizes.begin(), sizes.end())));
  return p;
}

// ---- timing on the decode shapes --------------------------------------------------------------
struct Shape {
  const char* name;
  int64_t n, k, topk;
  int act;  // fc1's epilogue (-1 for fc2)
};

// A timed problem over several routings (group sizes per routing): made and checked on the
// first, each routing's offsets uploaded for the timed launches to rotate over.
struct RotatedProblem {
  Problem p;
  std::vector<int> rg, src;
  Dev d;
  std::vector<int32_t*> dev_sets;
};
// max_rows > 0 replaces the bound make() derives from the first routing.
RotatedProblem upload_rotated(const std::string& name, const std::vector<std::vector<int>>& routings,
                              int64_t n, int64_t k, bool fp8, int act, int max_rows,
                              uint32_t seed) {
  RotatedProblem r;
  r.p = make(name, routings[0], 0, n, k, false, fp8);
  r.p.act = act;
  if (max_rows > 0) r.p.max_rows = max_rows;
  bool overlap;
  row_plan(r.p, &r.rg, &r.src, &overlap);
  r.d = upload(r.p, r.rg, r.src, seed);
  for (const std::vector<int>& sizes : routings)
    r.dev_sets.push_back(upload_vec(offsets_from_sizes(sizes)));
  return r;
}
void release(RotatedProblem& r) {
  for (auto* ptr : r.dev_sets) cudaFree(ptr);
  release(r.d);
}

// Median and fastest time of single launches of `cfg`, each on the next routing of `sets`, after
// 8 untimed ones.
LaunchTimes time_config(SmallMmArgs args, const SmallMmConfig& cfg,
                        const std::vector<int32_t*>& sets, int launches, int num_sms) {
  size_t next = 0;
  return time_launches("timing", 8, launches, [&] {
    args.group_offsets = sets[next++ % sets.size()];
    CHECK_CUDA(fmoe::cuda::grouped_mm_small_with(args, cfg, num_sms, 0));
  });
}

bool bench(const Shape& s, bool fp8, int num_sms) {
  // Weight buffer of kSets * topk experts; launch i uses experts {i % kSets + kSets j}: disjoint
  // sets, kSets - 1 of them (>= 7 x 12 MB even for qwen3 fc2 mxfp8, beyond the 50 MB L2) read
  // between two uses of one set.
  constexpr int kSets = 8;
  const int64_t groups = kSets * s.topk;
  std::vector<std::vector<int>> routings(kSets, std::vector<int>(size_t(groups), 0));
  for (int v = 0; v < kSets; ++v)
    for (int64_t j = 0; j < s.topk; ++j) routings[size_t(v)][size_t(v + kSets * j)] = 1;
  RotatedProblem rp = upload_rotated(s.name, routings, s.n, s.k, fp8, s.act, 0, 99);
  const Problem& p = rp.p;
  Dev& d = rp.d;
  const std::vector<int32_t*>& dev_sets = rp.dev_sets;
  if (!fmoe::cuda::grouped_mm_small_supported(d.args)) {
    std::printf("  FAIL %s: not supported\n", p.name.c_str());
    return false;
  }
  const SmallMmConfig cfg = fmoe::cuda::grouped_mm_small_config(d.args, num_sms);
  CHECK_CUDA(cudaMemset(d.c, 0xFF, p.rows * out_cols(p) * 2));
  CHECK_CUDA(fmoe::cuda::grouped_mm_small(d.args, num_sms, 0));
  sync_or_die(0, (p.name + " kernel").c_str());
  bool ok = compare(p, rp.rg, d, p.name + " " + cfg_str(cfg));

  const double bytes =
      double(s.topk) * double(s.n) * double(s.k) * (fp8 ? 1.0 + 1.0 / 32.0 : 2.0);
  SmallMmArgs args = d.args;
  const LaunchTimes times = time_config(args, cfg, dev_sets, 20, num_sms);
  const double med_us = times.median_ms * 1e3, min_us = times.min_ms * 1e3;
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  CHECK_CUDA(cudaEventRecord(e0));
  for (int i = 0; i < 20; ++i) {
    args.group_offsets = dev_sets[i % kSets];
    CHECK_CUDA(fmoe::cuda::grouped_mm_small(args, num_sms, 0));
  }
  CHECK_CUDA(cudaEventRecord(e1));
  sync_or_die(0, "timing");
  float total = 0;
  CHECK_CUDA(cudaEventElapsedTime(&total, e0, e1));
  const double mean_us = total * 1e3 / 20;
  std::printf("  TIME %-34s %7.1f MB: median %7.1f us (min %6.1f) %6.0f GB/s | back-to-back "
              "%7.1f us %6.0f GB/s | floor@2.95TB/s %6.1f us\n",
              p.name.c_str(), bytes / 1e6, med_us, min_us, bytes / (med_us * 1e3),
              mean_us, bytes / (mean_us * 1e3), bytes / 2.95e6);
  std::fflush(stdout);
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  release(rp);
  return ok;
}

// ---- "waves": time against the number of used groups, per split (bench/NOTES.md v18) ---------
// The decode layer at T = 8 uses ~52 of qwen3's 128 experts: 1248 FC1 items over 528 MXFP8 CTA
// slots (2.36 per slot). This sweep times the kernel while the used groups (so the items) cross a
// multiple of the slots, with the host's config and each split-K factor forced, and mixtral's
// FC1 and FC2 at T = 1 (two experts) with each split, persistent and one CTA per item.
void waves_case(const char* name, int64_t groups, int64_t n, int64_t k, int act, int64_t rows,
                const std::vector<int>& used_list, bool fp8, int num_sms, bool mixtral_grid) {
  constexpr int kSets = 8;
  for (int used : used_list) {
    // kSets routings of `rows` rows over `used` distinct groups (1 row each, the rest spread).
    std::vector<std::vector<int>> routings(kSets);
    for (int v = 0; v < kSets; ++v) {
      std::vector<int>& sizes = routings[size_t(v)];
      sizes.assign(size_t(groups), 0);
      std::vector<int> order(static_cast<size_t>(groups));
      for (int64_t g = 0; g < groups; ++g) order[size_t(g)] = int(g);
      uint32_t st = 12345u + 977u * uint32_t(v) + uint32_t(used);
      for (int64_t g = groups - 1; g > 0; --g) {  // Fisher-Yates on a small LCG
        st = st * 1664525u + 1013904223u;
        std::swap(order[size_t(g)], order[size_t((st >> 8) % uint32_t(g + 1))]);
      }
      for (int i = 0; i < used; ++i) sizes[size_t(order[size_t(i)])] = 1;
      for (int64_t r = used; r < rows; ++r) sizes[size_t(order[size_t(r % used)])] += 1;
    }
    // Rows per group bounded by the host's bound at T = 8, not by the largest group here.
    RotatedProblem rp = upload_rotated(name, routings, n, k, fp8, act, 8, 7);
    const Problem& p = rp.p;
    Dev& d = rp.d;
    const SmallMmConfig base = fmoe::cuda::grouped_mm_small_config(d.args, num_sms);
    std::vector<SmallMmConfig> cfgs{base};
    const int64_t tiles = act >= FMOE_ACT_SILU ? (n / 2 + 31) / 32 : (n + 63) / 64;
    const int64_t items = int64_t(used) * tiles;
    const int resident = base.ctas_per_sm * num_sms;
    for (int s : {1, 2, 4}) {
      if (s == base.splits && !mixtral_grid) continue;
      SmallMmConfig c = base;
      c.splits = s;
      c.grid = int(std::min<int64_t>(items, resident / s) * s);  // persistent
      cfgs.push_back(c);
      if (mixtral_grid) {
        c.grid = int(items * s);  // one CTA per item
        cfgs.push_back(c);
      }
    }
    for (const SmallMmConfig& cfg : cfgs) {
      SmallMmArgs args = d.args;
      CHECK_CUDA(cudaMemset(d.c, 0xFF, p.rows * out_cols(p) * 2));
      CHECK_CUDA(fmoe::cuda::grouped_mm_small_with(args, cfg, num_sms, 0));
      sync_or_die(0, "waves kernel");
      const bool ok = compare(p, rp.rg, d, p.name + " " + cfg_str(cfg));
      if (!ok) {
        release(rp);
        return;
      }
      const double us = time_config(args, cfg, rp.dev_sets, 30, num_sms).median_ms * 1e3;
      const double bytes = double(used) * double(n) * double(k) * (fp8 ? 1.0 + 1.0 / 32.0 : 2.0);
      const int slots = std::min<int>(cfg.grid, resident) / cfg.splits;
      std::printf("  WAVES %-11s %-5s used %3d items %5lld splits %d grid %4d slots %4d waves "
                  "%5.2f: %7.1f us %6.0f GB/s\n",
                  name, fp8 ? "mxfp8" : "bf16", used, (long long)items, cfg.splits, cfg.grid,
                  slots, double(items) / slots, us, bytes / (us * 1e3));
      std::fflush(stdout);
    }
    release(rp);
  }
}

// dtype: "mxfp8", "bf16" or "" (both); only: a case name, or "" (all).
int waves_main(int num_sms, const std::string& dtype, const std::string& only) {
  for (bool fp8 : {true, false}) {
    if (!dtype.empty() && dtype != (fp8 ? "mxfp8" : "bf16")) continue;
    auto run = [&](const char* name, int64_t groups, int64_t n, int64_t k, int act, int64_t rows,
                   const std::vector<int>& used, bool mixtral_grid) {
      if (only.empty() || only == name)
        waves_case(name, groups, n, k, act, rows, used, fp8, num_sms, mixtral_grid);
    };
    run("qwen3-fc1", 128, 1536, 2048, FMOE_ACT_SILU, 64, {40, 44, 45, 48, 52, 56, 60, 64}, false);
    run("qwen3-fc2", 128, 2048, 768, -1, 64, {33, 34, 40, 48, 52, 56, 64}, false);
    run("nemo-fc1", 128, 1856, 2688, FMOE_ACT_SQUARED_RELU, 48, {36, 37, 42, 48}, false);
    run("mixtral-fc2", 8, 4096, 14336, -1, 2, {2}, true);
    run("mixtral-fc1", 8, 28672, 4096, FMOE_ACT_SILU, 2, {2}, true);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CHECK_CUDA(cudaSetDevice(0));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const int num_sms = prop.multiProcessorCount;
  std::printf("device %s, sm_%d%d, %d SMs, L2 %d MB\n", prop.name, prop.major, prop.minor,
              num_sms, prop.l2CacheSize >> 20);
  if (prop.major != 9) {
    std::printf("needs a Hopper GPU (sm_90)\n");
    return 2;
  }
  if (argc > 1 && std::string(argv[1]) == "waves")
    return waves_main(num_sms, argc > 2 ? argv[2] : "", argc > 3 ? argv[3] : "");
  std::vector<Problem> cases;
  for (bool fp8 : {false, true}) {
    {
      Problem p = make("sizes 0/1/5/16/32 n256 k512 bias", {0, 1, 5, 16, 32, 0, 3}, 4, 256, 512,
                       true, fp8);
      p.splits = {1, 2, 4};
      cases.push_back(p);
    }
    {
      // Groups larger than the host bound (tile 8): several units per group.
      Problem p = make("bound 8 < sizes 20/9/32 n128 k256", {20, 0, 9, 32}, 0, 128, 256, false, fp8);
      p.max_rows = 8;
      p.splits = {1, 2};
      cases.push_back(p);
    }
    {
      // 128 groups, 6 used, gather from 7 tokens (index -1 and out of range skip a row),
      // row_map -1 rows, bias; n1536 k2048 = qwen3 fc1.
      std::vector<int> sizes(128, 0);
      sizes[3] = 2; sizes[17] = 1; sizes[64] = 4; sizes[65] = 1; sizes[100] = 3; sizes[127] = 2;
      Problem p = make("128 groups 6 used, gather, row_map n1536 k2048", sizes, 3, 1536, 2048,
                       true, fp8);
      p.a_rows = 7;
      p.row_index.resize(size_t(p.rows));
      for (int64_t r = 0; r < p.rows; ++r) p.row_index[r] = int32_t((r * 5 + 1) % 7);
      p.row_index[4] = -1;
      p.row_index[7] = 9;  // >= a_rows: skipped
      p.row_map.assign(size_t(p.rows), 0);
      p.row_map[2] = -1;
      p.row_map[9] = -1;
      p.splits = {0, 1, 2};
      cases.push_back(p);
    }
    {
      std::vector<int> sizes(256, 0);
      for (int j = 0; j < 8; ++j) sizes[size_t(j * 31 + 5)] = 1;
      Problem p = make("256 groups 8 x 1 row n512 k7168", sizes, 0, 512, 7168, false, fp8);
      p.splits = {0, 4};
      cases.push_back(p);
    }
    {
      // Bad offsets skip their groups; ldc wider than n; n % 64 != 0; k tail (fp8: k/32 = 90).
      Problem p;
      p.name = std::string("bad offsets, ldc+24, n200, k2880") + (fp8 ? " mxfp8" : " bf16");
      p.offsets = {0, 3, 40, 5, 9, -2, 12, 12, 20, 18, 30};  // valid: 0, 3, 6 (empty), 7
      p.groups = 10;
      p.rows = 26;
      p.n = 200;
      p.k = 2880;
      p.bias = true;
      p.fp8 = fp8;
      p.max_rows = 8;
      p.ldc_extra = 24;
      p.splits = {1, 2};
      cases.push_back(p);
    }
    if (fp8) {
      // e8m0's special codes (2^-127, NaN) and extreme scales, with and without an activation,
      // token tiles 8 and 16, a k tail (k / 32 = 131: a last stage of 3 blocks).
      for (int act : {-1, int(FMOE_ACT_SILU)}) {
        Problem p = make(act < 0 ? "spread scales n192 k4192" : "spread scales silu n192 k4192",
                         {3, 0, 12, 1, 7}, 2, 192, 4192, true, fp8);
        p.act = act;
        p.spread_scales = true;
        p.splits = {1, 2};
        p.token_tile = 16;
        cases.push_back(p);
        p.name += " tile 8";
        p.token_tile = 8;
        cases.push_back(p);
      }
    }
    // Every activation x layout, with bias, a k tail (k1000 bf16 / k1056 mxfp8) and gather.
    const int acts[4] = {FMOE_ACT_SQUARED_RELU, FMOE_ACT_SILU, FMOE_ACT_GELU, FMOE_ACT_SWIGLU_OAI};
    const char* act_names[4] = {"squared_relu", "silu", "gelu", "swiglu_oai"};
    for (int ai = 0; ai < 4; ++ai)
      for (int layout : {FMOE_LAYOUT_HALVES, FMOE_LAYOUT_INTERLEAVED}) {
        if (acts[ai] == FMOE_ACT_SQUARED_RELU && layout == FMOE_LAYOUT_INTERLEAVED) continue;
        Problem p = make(std::string("act ") + act_names[ai] +
                             (layout == FMOE_LAYOUT_HALVES ? " halves" : " interleaved") +
                             " n400 gather",
                         {1, 0, 6, 13}, 2, 400, fp8 ? 1056 : 1000, true, fp8);
        p.act = acts[ai];
        p.layout = layout;
        p.a_rows = 5;
        p.row_index.resize(size_t(p.rows));
        for (int64_t r = 0; r < p.rows; ++r) p.row_index[r] = int32_t(r % 5);
        p.splits = {1, 2};
        cases.push_back(p);
      }
  }

  bool all_ok = true;
  std::printf("correctness (|got - ref| <= 1.5e-2 * (|ref| + 0.1); unwritten cells keep 0xFFFF):\n");
  uint32_t seed = 1;
  for (const Problem& p : cases) all_ok = run_case(p, num_sms, seed++) && all_ok;

  if (argc > 1 && std::string(argv[1]) == "correct") {  // correctness only, no timing
    std::printf("%s\n", all_ok ? "ALL PASSED" : "FAILURES (see above)");
    return all_ok ? 0 : 1;
  }
  std::printf("decode timing, T = 1 (also verified):\n");
  const Shape shapes[] = {
      {"qwen3 fc1 n1536 k2048 x8 silu", 1536, 2048, 8, FMOE_ACT_SILU},
      {"qwen3 fc2 n2048 k768 x8", 2048, 768, 8, -1},
      {"nemotron fc1 n1856 k2688 x6 sqrelu", 1856, 2688, 6, FMOE_ACT_SQUARED_RELU},
      {"nemotron fc2 n2688 k1856 x6", 2688, 1856, 6, -1},
      {"gpt-oss fc1 n5760 k2880 x4 silu", 5760, 2880, 4, FMOE_ACT_SILU},
      {"gpt-oss fc2 n2880 k2880 x4", 2880, 2880, 4, -1},
      {"mixtral fc1 n28672 k4096 x2 silu", 28672, 4096, 2, FMOE_ACT_SILU},
      {"mixtral fc2 n4096 k14336 x2", 4096, 14336, 2, -1},
      {"deepseek fc1 n4096 k7168 x8 silu", 4096, 7168, 8, FMOE_ACT_SILU},
      {"deepseek fc2 n7168 k2048 x8", 7168, 2048, 8, -1},
  };
  for (bool fp8 : {false, true})
    for (const Shape& s : shapes) all_ok = bench(s, fp8, num_sms) && all_ok;

  std::printf("%s\n", all_ok ? "ALL PASSED" : "FAILURES (see above)");
  return all_ok ? 0 : 1;
}
