// Standalone correctness check and benchmark of the Hopper grouped GEMM with the activation fused
// into its epilogue (grouped_mm_sm90_bf16_act, csrc/cuda/grouped_mm_sm90.cu): FC1 of the fused
// layer, writing act(h) [rows, I] instead of h [rows, N1].
//
// Build and run (H100 / H200, from the repository root):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -Icsrc/include -Icsrc bench/dev/grouped_mm_sm90_act_check.cu csrc/cuda/grouped_mm_sm90.cu \
//     csrc/cuda/tensor_map.cu csrc/core/status.cpp -o /tmp/gmm_act_check && /tmp/gmm_act_check
// (status.cpp: the library's activation op, compiled into this file for the unfused timing,
// reports errors through it.)
//
// Every case: random bf16 a [rows, k], b [groups, N1, k] (scaled so that h ~ 2 in magnitude:
// the activations' curved parts and swiglu_oai's clamps are exercised), optional f32 bias; a
// naive reference kernel computes h = a @ b^T + bias in f32 for the rows that must be written.
// Then, for each activation and layout, both tile widths (BN = 128, 256) and both schedules
// (static tiles, dynamic tiles from a zeroed counter), the output [rows, I] (plus a slack tail)
// is poisoned with 0xFFFF, the fused kernel runs, and on the host:
//  - expected[r, j] = bf16(act(f32(bf16(h_gate)), f32(bf16(h_up)))) with the host backend's
//    formulas (csrc/host/activation.cpp), for every row that must be written;
//    |got - expected| <= 1e-2 * (|expected| + 1) everywhere (an indexing, pairing or masking bug
//    gives O(|expected|) errors), and at least 99% of the elements bit-exact (the kernel's f32
//    sum order differs from the reference's, which flips a bf16 rounding of h now and then, and
//    expf / tanhf differ from the host's by an ulp; a kernel that skipped the bf16 rounding of h
//    would match only ~half of the elements exactly);
//  - every element of rows that must not be written (skipped groups, row_map -1, rows past the
//    last group) and the slack tail still hold the poison.
// The plain kernel (h written) is checked on the same problems too: the two share the mainloop
// and the store path.
// Then times, on MoE prefill shapes, the fused kernel (static and dynamic tiles) against the
// unfused pair (plain kernel + the library's activation kernel, csrc/cuda/activation.cu,
// compiled in below).
// Exit code: 0 = all passed, 1 = a mismatch, 2 = a CUDA error, 3 = a kernel that never finished.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "core/numerics.h"
#include "cuda/grouped_mm_sm90.h"
// The library's activation op, for the unfused baseline of the timing: its kernel and ActParams
// live in an anonymous namespace, reachable from this translation unit only by including it.
#include "cuda/activation.cu"
#include "bf16_reference.cuh"
#include "check_common.cuh"
#include "core/activation_math.h"

namespace {

using fmoe::cuda::ActEpilogue;

constexpr float kAlpha = 1.702f;
// Smaller than gpt-oss's 7 so that with |h| ~ 2..8 a few percent of the values are clamped.
constexpr float kLimit = 4.0f;
constexpr int64_t kSlack = 4096;  // poisoned elements after the output: catches overruns

// ---- host reference of the activation: the formulas every backend shares, at this check's
// swiglu_oai parameters -------------------------------------------------------------------------
float host_act(int activation, float g, float u) {
  return fmoe::activation_value(activation, g, u, kAlpha, kLimit);
}

const char* act_name(int activation) {
  switch (activation) {
    case FMOE_ACT_SQUARED_RELU: return "squared_relu";
    case FMOE_ACT_SILU: return "silu";
    case FMOE_ACT_GELU: return "gelu";
    default: return "swiglu_oai";
  }
}

// ---- a test problem ---------------------------------------------------------------------------
struct Problem {
  std::string name;
  int64_t rows = 0, ffn = 0, k = 0, groups = 0;
  bool gated = true;  // N1 = 2 I (silu, gelu, swiglu_oai) or I (squared_relu)
  std::vector<int32_t> offsets;  // [groups + 1], possibly "bad"
  bool bias = false;
  std::vector<int32_t> row_map;  // empty = none
  int64_t n1() const { return gated ? 2 * ffn : ffn; }
};

// Group g is computed iff 0 <= off[g] <= off[g+1] <= rows; a row is written iff it lies in a
// computed group and its row_map entry (if any) is not negative.
std::vector<int> row_groups(const Problem& p) {
  std::vector<int> rg(size_t(p.rows), -1);
  for (int64_t g = 0; g < p.groups; ++g) {
    int lo = p.offsets[g], hi = p.offsets[g + 1];
    if (!(lo >= 0 && lo <= hi && hi <= p.rows)) continue;
    for (int r = lo; r < hi; ++r) rg[r] = int(g);
  }
  if (!p.row_map.empty())
    for (int64_t r = 0; r < p.rows; ++r)
      if (p.row_map[r] < 0) rg[r] = -1;
  return rg;
}

struct DeviceProblem {
  void *a = nullptr, *b = nullptr, *h = nullptr, *out = nullptr;
  float *bias = nullptr, *ref = nullptr;
  int32_t *offsets = nullptr, *row_map = nullptr, *row_group = nullptr;
  fmoe_grouped_mm_args args{};  // c = out (the fused kernel); the plain kernel gets c = h
  std::vector<float> ref_host;  // [rows, N1] (rows that must be written only)
};

DeviceProblem upload(const Problem& p, const std::vector<int>& rg, uint32_t seed) {
  DeviceProblem d;
  const int64_t n1 = p.n1();
  const int64_t b_elems = p.groups * n1 * p.k;
  CHECK_CUDA(cudaMalloc(&d.a, std::max<int64_t>(1, p.rows * p.k) * 2));
  CHECK_CUDA(cudaMalloc(&d.b, b_elems * 2));
  CHECK_CUDA(cudaMalloc(&d.h, (std::max<int64_t>(1, p.rows * n1) + kSlack) * 2));
  CHECK_CUDA(cudaMalloc(&d.out, (p.rows * p.ffn + kSlack) * 2));
  fill_bf16<<<1024, 256>>>(static_cast<__nv_bfloat16*>(d.a), p.rows * p.k, seed * 3 + 1, 1.0f);
  // a ~ U(-1, 1), b ~ U(-s, s): var(h) = k s^2 / 9, so s = 6 / sqrt(k) gives h a deviation of 2.
  fill_bf16<<<1024, 256>>>(static_cast<__nv_bfloat16*>(d.b), b_elems, seed * 3 + 2,
                           6.0f / std::sqrt(float(p.k)));
  CHECK_CUDA(cudaGetLastError());
  if (p.bias) {
    CHECK_CUDA(cudaMalloc(&d.bias, p.groups * n1 * 4));
    fill_f32<<<256, 256>>>(d.bias, p.groups * n1, seed * 3 + 3, 1.0f);
    CHECK_CUDA(cudaGetLastError());
  }
  CHECK_CUDA(cudaMalloc(&d.offsets, (p.groups + 1) * 4));
  CHECK_CUDA(cudaMemcpy(d.offsets, p.offsets.data(), (p.groups + 1) * 4, cudaMemcpyHostToDevice));
  if (!p.row_map.empty()) {
    CHECK_CUDA(cudaMalloc(&d.row_map, p.rows * 4));
    CHECK_CUDA(cudaMemcpy(d.row_map, p.row_map.data(), p.rows * 4, cudaMemcpyHostToDevice));
  }
  d.ref_host.assign(size_t(p.rows * n1), 0.f);
  if (p.rows > 0) {
    CHECK_CUDA(cudaMalloc(&d.row_group, p.rows * 4));
    CHECK_CUDA(cudaMemcpy(d.row_group, rg.data(), p.rows * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMalloc(&d.ref, p.rows * n1 * 4));
    CHECK_CUDA(cudaMemset(d.ref, 0, p.rows * n1 * 4));
    dim3 block(32, 8), grid(unsigned((n1 + 31) / 32), unsigned((p.rows + 7) / 8));
    reference_gemm<<<grid, block>>>(static_cast<const __nv_bfloat16*>(d.a),
                                    static_cast<const __nv_bfloat16*>(d.b), d.bias, d.row_group,
                                    d.ref, int(p.rows), int(n1), int(p.k));
    CHECK_CUDA(cudaGetLastError());
    sync_or_die(0, "input fill + reference kernel", 600.0);
    CHECK_CUDA(cudaMemcpy(d.ref_host.data(), d.ref, p.rows * n1 * 4, cudaMemcpyDeviceToHost));
  }
  d.args.size = sizeof(fmoe_grouped_mm_args);
  d.args.a = d.a;
  d.args.b = d.b;
  d.args.bias = d.bias;
  d.args.c = d.out;
  d.args.group_offsets = d.offsets;
  d.args.row_map = d.row_map;
  d.args.rows = p.rows;
  d.args.n = n1;
  d.args.k = p.k;
  d.args.groups = p.groups;
  sync_or_die(0, "upload");
  return d;
}

void release(DeviceProblem& d) {
  cudaFree(d.a);
  cudaFree(d.b);
  cudaFree(d.h);
  cudaFree(d.out);
  cudaFree(d.bias);
  cudaFree(d.ref);
  cudaFree(d.offsets);
  cudaFree(d.row_map);
  cudaFree(d.row_group);
  d = DeviceProblem{};
}

// Host: the output the op-by-op pipeline defines for row r (bf16 bits), from the f32 reference h.
void expected_row(const Problem& p, const DeviceProblem& d, const ActEpilogue& act, int64_t r,
                  uint16_t* out) {
  const int64_t n1 = p.n1(), I = p.ffn;
  const float* h = d.ref_host.data() + r * n1;
  auto hb = [&](int64_t c) { return fmoe::bf16_to_f32(fmoe::f32_to_bf16(h[c])); };
  for (int64_t j = 0; j < I; ++j) {
    float g, u = 0.f;
    if (!p.gated) {
      g = hb(j);
    } else if (act.layout == FMOE_LAYOUT_INTERLEAVED) {
      g = hb(2 * j);
      u = hb(2 * j + 1);
    } else {
      g = hb(j);
      u = hb(I + j);
    }
    out[j] = fmoe::f32_to_bf16(host_act(act.activation, g, u));
  }
}

// The kernel and the reference sum h in different orders, so h's bf16 rounding before the
// activation can land one ulp apart, which a steep activation or a large partner (u in g*u)
// amplifies past the output tolerance: the distance from `got` to the activation of the
// neighbouring bf16 inputs (each of gate and up moved by -1, 0, +1 ulp).
double neighbour_error(const Problem& p, const DeviceProblem& d, const ActEpilogue& act,
                       int64_t r, int64_t j, float got) {
  const int64_t n1 = p.n1(), I = p.ffn;
  const float* h = d.ref_host.data() + r * n1;
  auto nb = [&](int64_t c, int step) {
    return fmoe::bf16_to_f32(uint16_t(fmoe::f32_to_bf16(h[c]) + step));
  };
  const bool inter = act.layout == FMOE_LAYOUT_INTERLEAVED;
  const int64_t cg = !p.gated ? j : inter ? 2 * j : j;
  const int64_t cu = inter ? 2 * j + 1 : I + j;
  double best = INFINITY;
  for (int sg = -1; sg <= 1; ++sg)
    for (int su = -1; su <= 1; ++su) {
      const float want = fmoe::bf16_to_f32(fmoe::f32_to_bf16(
          host_act(act.activation, nb(cg, sg), p.gated ? nb(cu, su) : 0.f)));
      best = std::min(best, std::fabs(double(got) - double(want)));
    }
  return best;
}

// Compares the fused output (out, [rows, I] + slack) with the expected values.
bool compare_act(const Problem& p, const std::vector<int>& rg, const DeviceProblem& d,
                 const ActEpilogue& act, int block_n, bool picked, bool dynamic) {
  const int64_t I = p.ffn;
  std::vector<uint16_t> got(size_t(p.rows * I + kSlack));
  CHECK_CUDA(cudaMemcpy(got.data(), d.out, got.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<uint16_t> want(static_cast<size_t>(I));
  int64_t checked = 0, exact = 0, untouched = 0, mismatches = 0, clobbered = 0;
  double max_ratio = 0;
  int printed = 0, printed_clobber = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    const uint16_t* row = got.data() + r * I;
    if (rg[r] < 0) {
      for (int64_t j = 0; j < I; ++j) {
        ++untouched;
        if (row[j] != 0xFFFF) {
          ++clobbered;
          if (printed_clobber++ < 5)
            std::printf("    WRITTEN but must not be: row %lld col %lld holds 0x%04x\n",
                        (long long)r, (long long)j, row[j]);
        }
      }
      continue;
    }
    expected_row(p, d, act, r, want.data());
    for (int64_t j = 0; j < I; ++j) {
      ++checked;
      const float gv = fmoe::bf16_to_f32(row[j]), wv = fmoe::bf16_to_f32(want[j]);
      if (row[j] == want[j]) {
        ++exact;
        continue;
      }
      double err = std::fabs(double(gv) - double(wv));
      const double tol = 1e-2 * (std::fabs(double(wv)) + 1.0);
      if (err > tol) err = neighbour_error(p, d, act, r, j, gv);
      if (!std::isnan(err)) max_ratio = std::max(max_ratio, err / tol);
      if (!(err <= tol)) {
        ++mismatches;
        if (printed++ < 8)
          std::printf("    MISMATCH row %lld (group %d) col %lld (tile col %lld): got %.6g "
                      "(0x%04x) want %.6g (0x%04x)\n",
                      (long long)r, rg[r], (long long)j,
                      (long long)(j % ((block_n == fmoe::cuda::kSm90PingPong ? 128 : block_n) / (p.gated ? 2 : 1))), gv, row[j], wv,
                      want[j]);
      }
    }
  }
  for (int64_t i = 0; i < kSlack; ++i)
    if (got[size_t(p.rows * I + i)] != 0xFFFF) {
      ++clobbered;
      if (printed_clobber++ < 5)
        std::printf("    WRITTEN past the output: element %lld of the slack\n", (long long)i);
    }
  const double exact_frac = checked ? double(exact) / double(checked) : 1.0;
  const bool ok = mismatches == 0 && clobbered == 0 && exact_frac >= 0.99;
  char label[160];
  std::snprintf(label, sizeof label, "%s %s%s%s", act_name(act.activation),
                !p.gated ? "" : (act.layout == FMOE_LAYOUT_INTERLEAVED ? "interleaved" : "halves"),
                picked ? " (picked)" : "", dynamic ? " dynamic" : "");
  std::printf("  %s %-44s %-28s BN=%d: checked %lld, bit-exact %.4f%%, max err/tol %.3g, "
              "untouched %lld",
              ok ? "PASS" : "FAIL", p.name.c_str(), label, block_n, (long long)checked,
              100.0 * exact_frac, max_ratio, (long long)untouched);
  if (!ok)
    std::printf(", %lld mismatches, %lld clobbered", (long long)mismatches, (long long)clobbered);
  std::printf("\n");
  std::fflush(stdout);
  return ok;
}

// The plain kernel on the same problem: c = h [rows, N1], against the f32 reference.
bool check_plain(const Problem& p, const std::vector<int>& rg, DeviceProblem& d, int num_sms) {
  const int64_t n1 = p.n1();
  fmoe_grouped_mm_args args = d.args;
  args.c = d.h;
  bool ok = true;
  for (int bn : {128, 256, fmoe::cuda::kSm90PingPong}) {
    CHECK_CUDA(cudaMemset(d.h, 0xFF, (std::max<int64_t>(1, p.rows * n1) + kSlack) * 2));
    cudaError_t e = fmoe::cuda::grouped_mm_sm90_bf16_block_n(args, num_sms, bn, 0);
    if (e != cudaSuccess) {
      std::printf("  FAIL %s plain BN=%d: launch returned %s\n", p.name.c_str(), bn,
                  cudaGetErrorString(e));
      ok = false;
      continue;
    }
    sync_or_die(0, (p.name + " plain kernel").c_str());
    std::vector<uint16_t> got(size_t(p.rows * n1 + kSlack));
    CHECK_CUDA(cudaMemcpy(got.data(), d.h, got.size() * 2, cudaMemcpyDeviceToHost));
    int64_t bad = 0, clobbered = 0;
    double max_ratio = 0;
    for (int64_t r = 0; r < p.rows; ++r)
      for (int64_t c = 0; c < n1; ++c) {
        const uint16_t bits = got[size_t(r * n1 + c)];
        if (rg[r] < 0) {
          clobbered += bits != 0xFFFF;
          continue;
        }
        const double rv = d.ref_host[size_t(r * n1 + c)];
        const double err = std::fabs(double(fmoe::bf16_to_f32(bits)) - rv);
        const double tol = 1e-2 * (std::fabs(rv) + 1.0);
        if (!(err <= tol)) ++bad;
        else max_ratio = std::max(max_ratio, err / tol);
      }
    for (int64_t i = 0; i < kSlack; ++i) clobbered += got[size_t(p.rows * n1 + i)] != 0xFFFF;
    const bool this_ok = bad == 0 && clobbered == 0;
    std::printf("  %s %-44s %-28s BN=%d: max err/tol %.3g%s\n", this_ok ? "PASS" : "FAIL",
                p.name.c_str(), "plain GEMM (h)", bn, max_ratio,
                this_ok ? "" : (" -- " + std::to_string(bad) + " mismatches, " +
                                std::to_string(clobbered) + " clobbered")
                                   .c_str());
    ok = ok && this_ok;
  }
  return ok;
}

// The dynamic scheduler's counter (grouped_mm_sm90.h), zeroed before each launch that takes it.
int32_t* g_tile_counter = nullptr;
int32_t* zeroed_counter() {
  CHECK_CUDA(cudaMemsetAsync(g_tile_counter, 0, sizeof(int32_t), 0));
  return g_tile_counter;
}

std::vector<ActEpilogue> activations_for(const Problem& p) {
  std::vector<ActEpilogue> v;
  if (!p.gated) {
    v.push_back(ActEpilogue{FMOE_ACT_SQUARED_RELU, FMOE_LAYOUT_HALVES, kAlpha, kLimit});
    return v;
  }
  for (int a : {FMOE_ACT_SILU, FMOE_ACT_GELU, FMOE_ACT_SWIGLU_OAI})
    for (int l : {FMOE_LAYOUT_HALVES, FMOE_LAYOUT_INTERLEAVED})
      v.push_back(ActEpilogue{a, l, kAlpha, kLimit});
  return v;
}

bool run_case(const Problem& p, int num_sms, uint32_t seed) {
  const std::vector<int> rg = row_groups(p);
  DeviceProblem d = upload(p, rg, seed);
  bool ok = true;
  for (const ActEpilogue& act : activations_for(p)) {
    if (!fmoe::cuda::grouped_mm_sm90_act_supported(d.args, act)) {
      std::printf("  FAIL %s %s: grouped_mm_sm90_act_supported() = false\n", p.name.c_str(),
                  act_name(act.activation));
      ok = false;
      continue;
    }
    const int picked = fmoe::cuda::grouped_mm_sm90_pick_block_n(d.args, num_sms);
    for (int bn : {128, 256, fmoe::cuda::kSm90PingPong})
      for (bool dynamic : {false, true}) {
        CHECK_CUDA(cudaMemset(d.out, 0xFF, (p.rows * p.ffn + kSlack) * 2));
        cudaError_t e = fmoe::cuda::grouped_mm_sm90_bf16_act_block_n(
            d.args, act, num_sms, bn, 0, dynamic ? zeroed_counter() : nullptr);
        if (e != cudaSuccess) {
          std::printf("  FAIL %s %s BN=%d: launch returned %s\n", p.name.c_str(),
                      act_name(act.activation), bn, cudaGetErrorString(e));
          ok = false;
          continue;
        }
        sync_or_die(0, (p.name + " fused kernel").c_str());
        ok = compare_act(p, rg, d, act, bn, bn == picked, dynamic) && ok;
      }
  }
  ok = check_plain(p, rg, d, num_sms) && ok;
  release(d);
  return ok;
}

std::vector<int32_t> offsets_from_sizes(const std::vector<int>& sizes) {
  std::vector<int32_t> off(sizes.size() + 1);
  off[0] = 0;
  for (size_t i = 0; i < sizes.size(); ++i) off[i + 1] = off[i] + sizes[i];
  return off;
}

Problem make(const std::string& name, const std::vector<int>& sizes, int64_t extra_rows,
             int64_t ffn, bool gated, int64_t k, bool bias) {
  Problem p;
  p.name = name;
  p.groups = int64_t(sizes.size());
  p.offsets = offsets_from_sizes(sizes);
  p.rows = p.offsets.back() + extra_rows;
  p.ffn = ffn;
  p.gated = gated;
  p.k = k;
  p.bias = bias;
  return p;
}

// Padding rows as permute makes them (the last rows of each group), plus some real rows skipped.
void add_row_map(Problem& p) {
  p.row_map.assign(size_t(p.rows), 0);
  for (int64_t r = 0; r < p.rows; ++r) p.row_map[r] = int32_t(r * 7 % 1000);
  for (int64_t g = 0; g < p.groups; ++g)
    for (int r = std::max(p.offsets[g], p.offsets[g + 1] - 13); r < p.offsets[g + 1]; ++r)
      p.row_map[r] = -1;
  for (int64_t r = 0; r < p.rows; r += 17) p.row_map[r] = -1;
}

// ---- timing -----------------------------------------------------------------------------------
float median_ms(const std::string& what, int iters, const std::function<void()>& launch) {
  return time_launches(what.c_str(), 3, iters, launch).median_ms;
}

// The library's activation pass, launched as CudaBackend::activation_quant launches it.
void launch_activation_op(const DeviceProblem& d, const Problem& p, const ActEpilogue& act) {
  fmoe::cuda::ActParams ap;
  ap.in = static_cast<const uint16_t*>(d.h);
  ap.out = static_cast<uint16_t*>(d.out);
  ap.out_q = nullptr;
  ap.out_scale = nullptr;
  ap.row_map = d.row_map;
  ap.n_used = d.offsets + p.groups;
  ap.rows = p.rows;
  ap.ffn = p.ffn;
  ap.activation = act.activation;
  ap.layout = act.layout;
  ap.alpha = act.alpha;
  ap.limit = act.limit;
  const unsigned grid = unsigned(std::min<int64_t>(p.rows, fmoe::cuda::kMaxGridBlocks));
  fmoe::cuda::activation_kernel<<<grid, fmoe::cuda::row_threads(p.ffn)>>>(ap);
  CHECK_CUDA(cudaGetLastError());
}

bool bench(const std::string& name, int64_t groups, int64_t rows_per_group, int64_t ffn,
           int64_t k, const ActEpilogue& act, int num_sms) {
  const bool gated = act.activation != FMOE_ACT_SQUARED_RELU;
  Problem p = make(name, std::vector<int>(size_t(groups), int(rows_per_group)), 0, ffn, gated, k,
                   false);
  // As in the layer: a row_map (permutation_map) with every row real.
  p.row_map.assign(size_t(p.rows), 0);
  for (int64_t r = 0; r < p.rows; ++r) p.row_map[r] = int32_t(r % 100000);
  const std::vector<int> rg = row_groups(p);
  DeviceProblem d = upload(p, rg, 7);
  const int64_t n1 = p.n1();
  const double flops = 2.0 * double(p.rows) * double(n1) * double(k);
  const int picked = fmoe::cuda::grouped_mm_sm90_pick_block_n(d.args, num_sms);
  bool ok = true;
  char label[200];
  for (int bn : {128, 256, fmoe::cuda::kSm90PingPong}) {
    CHECK_CUDA(cudaMemset(d.out, 0xFF, (p.rows * p.ffn + kSlack) * 2));
    CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_bf16_act_block_n(d.args, act, num_sms, bn, 0));
    sync_or_die(0, (name + " fused kernel").c_str());
    ok = compare_act(p, rg, d, act, bn, bn == picked, false) && ok;
    const float fused = median_ms(name + " fused", 20, [&] {
      CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_bf16_act_block_n(d.args, act, num_sms, bn, 0));
    });
    std::snprintf(label, sizeof label, "%s fused FC1+%s", name.c_str(), act_name(act.activation));
    std::printf("  TIME %-58s BN=%d%s: median %.3f ms, %.1f TFLOP/s\n", label, bn,
                bn == picked ? " (picked)" : "", fused, flops / (fused * 1e-3) / 1e12);
  }
  // Unfused: the plain kernel (picked width) writes h, the activation op reads it.
  fmoe_grouped_mm_args plain = d.args;
  plain.c = d.h;
  const float gemm = median_ms(name + " plain", 20, [&] {
    CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_bf16_block_n(plain, num_sms, picked, 0));
  });
  const float act_ms = median_ms(name + " activation op", 20, [&] { launch_activation_op(d, p, act); });
  const float both = median_ms(name + " plain + activation op", 20, [&] {
    CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_bf16_block_n(plain, num_sms, picked, 0));
    launch_activation_op(d, p, act);
  });
  const float fused = median_ms(name + " fused (picked)", 20, [&] {
    CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_bf16_act(d.args, act, num_sms, 0));
  });
  // The same with dynamic tiles, the counter's memset included (as in the layer).
  const float fused_dynamic = median_ms(name + " fused (picked, dynamic)", 20, [&] {
    CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_bf16_act(d.args, act, num_sms, 0, zeroed_counter()));
  });
  std::snprintf(label, sizeof label, "%s fused FC1+%s", name.c_str(), act_name(act.activation));
  std::printf("  TIME %-58s BN=%d (picked): static %.3f ms, %.1f TFLOP/s; dynamic %.3f ms, "
              "%.1f TFLOP/s\n",
              label, picked, fused, flops / (fused * 1e-3) / 1e12, fused_dynamic,
              flops / (fused_dynamic * 1e-3) / 1e12);
  std::printf("  TIME %-58s BN=%d: GEMM %.3f ms (%.1f TFLOP/s) + activation op %.3f ms = %.3f "
              "ms back to back\n",
              (name + " unfused").c_str(), picked, gemm, flops / (gemm * 1e-3) / 1e12, act_ms,
              both);
  std::printf("  SPEEDUP %s: fused %.3f ms vs unfused %.3f ms: %.3f ms saved (x%.2f)\n",
              name.c_str(), fused, both, both - fused, both / fused);
  std::fflush(stdout);
  release(d);
  return ok;
}

}  // namespace

int main() {
  int dev = 0;
  CHECK_CUDA(cudaSetDevice(dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  const int num_sms = prop.multiProcessorCount;
  CHECK_CUDA(cudaMalloc(&g_tile_counter, sizeof(int32_t)));
  std::printf("device %s, sm_%d%d, %d SMs, %zu KB smem/block opt-in\n", prop.name, prop.major,
              prop.minor, num_sms, prop.sharedMemPerBlockOptin / 1024);
  if (prop.major != 9) {
    std::printf("needs a Hopper GPU (sm_90)\n");
    return 2;
  }

  std::vector<Problem> cases;
  {
    Problem p = make("I768 gated k2048 groups 0/1/127/129 bias row_map",
                     {0, 1, 127, 129, 300, 0, 64, 5, 128}, 37, 768, true, 2048, true);
    add_row_map(p);
    cases.push_back(p);
  }
  cases.push_back(make("I2880 gated (I % 128 != 0) k2880 bias", {130, 1, 0, 257, 127}, 11, 2880,
                       true, 2880, true));
  cases.push_back(make("I2048 gated k1024", {512, 129, 127, 0, 1}, 0, 2048, true, 1024, false));
  {
    Problem p = make("I1856 squared_relu k2688 bias row_map", {200, 0, 129, 1, 127}, 21, 1856,
                     false, 2688, true);
    add_row_map(p);
    cases.push_back(p);
  }
  cases.push_back(make("I768 squared_relu k2048", {300, 1, 0, 129}, 5, 768, false, 2048, false));
  cases.push_back(make("I72 gated (I < BN/2) k200 (partial k) bias", {70, 130, 1}, 3, 72, true,
                       200, true));
  cases.push_back(make("I72 squared_relu k200 bias", {70, 130, 1}, 3, 72, false, 200, true));
  {
    // Bad offsets: out of range and decreasing groups are skipped, their rows stay poisoned.
    Problem p;
    p.name = "bad offsets I768 gated k1024 bias";
    p.offsets = {0, 256, 5000, 600, 800, -3, 1000, 1000, 1100, 1050, 5000, 1150, 1290};
    p.groups = int64_t(p.offsets.size()) - 1;
    p.rows = 1300;
    p.ffn = 768;
    p.gated = true;
    p.k = 1024;
    p.bias = true;
    cases.push_back(p);
  }
  cases.push_back(make("all groups empty I768 gated", {0, 0, 0}, 256, 768, true, 512, false));

  bool all_ok = true;
  std::printf("correctness (|got - want| <= 1e-2 (|want| + 1), >= 99%% bit-exact; rows not "
              "written and the slack keep 0xFFFF):\n");
  uint32_t seed = 1;
  for (const Problem& p : cases) all_ok = run_case(p, num_sms, seed++) && all_ok;

  std::printf("timing (median of 20 after 3 warm-up launches; results verified too):\n");
  const ActEpilogue silu{FMOE_ACT_SILU, FMOE_LAYOUT_HALVES, kAlpha, kLimit};
  const ActEpilogue sqrelu{FMOE_ACT_SQUARED_RELU, FMOE_LAYOUT_HALVES, kAlpha, kLimit};
  const ActEpilogue oai{FMOE_ACT_SWIGLU_OAI, FMOE_LAYOUT_INTERLEAVED, kAlpha, kLimit};
  all_ok = bench("qwen3 T8192: 128 x 512 rows, n1 1536 k2048", 128, 512, 768, 2048, silu,
                 num_sms) && all_ok;
  all_ok = bench("nemotron T8192: 128 x 384 rows, n1 1856 k2688", 128, 384, 1856, 2688, sqrelu,
                 num_sms) && all_ok;
  all_ok = bench("gpt-oss T8192: 128 x 256 rows, n1 5760 k2880", 128, 256, 2880, 2880, silu,
                 num_sms) && all_ok;
  all_ok = bench("gpt-oss T8192 interleaved: 128 x 256 rows, n1 5760 k2880", 128, 256, 2880,
                 2880, oai, num_sms) && all_ok;

  std::printf("%s\n", all_ok ? "ALL PASSED" : "FAILURES (see above)");
  return all_ok ? 0 : 1;
}
