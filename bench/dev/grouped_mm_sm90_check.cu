// Standalone correctness check and benchmark of the Hopper grouped GEMM (csrc/cuda/grouped_mm_sm90.cu).
//
// Build and run (H100 / H200, from the repository root):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc \
//     bench/dev/grouped_mm_sm90_check.cu csrc/cuda/grouped_mm_sm90.cu csrc/cuda/tensor_map.cu \
//     -o /tmp/gmm_check && /tmp/gmm_check
// (no -lcuda: the tensor map encoder is fetched through the runtime, as in the library.)
//
// Every case: random bf16 inputs from a hash RNG on the device, c poisoned with 0xFFFF (a bf16
// NaN), the sm90 kernel and a naive reference kernel (one thread per output element, f32
// accumulation in k order) run, then on the host:
//  - every element that must be written matches: |got - ref| <= 1e-2 * (|ref| + 1). Why this is
//    sound: both sides sum the same bf16 products in f32 (only the order differs: relative error
//    ~k * 2^-24 of sum|a*b|, < 1e-4 here), then the kernel rounds once to bf16 (half an ulp, at
//    most 2^-9 |ref|); 1e-2 |ref| is > 2 bf16 ulps, while any indexing, swizzle or pipeline bug
//    gives O(|ref|) errors. The + 1e-2 absolute part covers refs that cancel to near zero.
//  - every element that must not be written (rows of skipped groups, padding rows with
//    row_map = -1, rows >= offsets[groups]) still holds the poison 0xFFFF.
// Each case runs each kernel: BN=128 and BN=256 (cooperative tiles), BN=1 (kSm90PingPong).
// Then times the kernel on MoE prefill shapes (median of 20 after warm-up) and prints TFLOP/s.
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
#include <string>
#include <vector>

#include "core/numerics.h"
#include "cuda/grouped_mm_sm90.h"
#include "bf16_reference.cuh"
#include "check_common.cuh"

namespace {

// ---- device helpers ---------------------------------------------------------------------------
void launch_fill_bf16(void* p, int64_t count, uint32_t seed, float scale) {
  fill_bf16<<<1024, 256>>>(static_cast<__nv_bfloat16*>(p), count, seed, scale);
  CHECK_CUDA(cudaGetLastError());
}

// ---- a test problem ---------------------------------------------------------------------------
struct Problem {
  std::string name;
  int64_t rows = 0, n = 0, k = 0, groups = 0;
  std::vector<int32_t> offsets;  // [groups + 1], possibly "bad"
  bool bias = false;
  std::vector<int32_t> row_map;  // empty = none
};

// The spec of which rows are written and by which group: group g is computed iff
// 0 <= off[g] <= off[g+1] <= rows; a row is written iff it lies in a computed group and its
// row_map entry (if any) is not -1. Overlapping computed groups (possible only with decreasing
// offsets) make the result ambiguous, so the cases avoid them (checked here).
std::vector<int> row_groups(const Problem& p, bool* overlap) {
  std::vector<int> rg(size_t(p.rows), -1);
  *overlap = false;
  for (int64_t g = 0; g < p.groups; ++g) {
    int lo = p.offsets[g], hi = p.offsets[g + 1];
    if (!(lo >= 0 && lo <= hi && hi <= p.rows)) continue;
    for (int r = lo; r < hi; ++r) {
      if (rg[r] != -1) *overlap = true;
      rg[r] = int(g);
    }
  }
  if (!p.row_map.empty())
    for (int64_t r = 0; r < p.rows; ++r)
      if (p.row_map[r] == -1) rg[r] = -1;
  return rg;
}

struct DeviceProblem {
  void *a = nullptr, *b = nullptr, *c = nullptr;
  float *bias = nullptr, *ref = nullptr;
  int32_t *offsets = nullptr, *row_map = nullptr, *row_group = nullptr;
  fmoe_grouped_mm_args args{};
};

DeviceProblem upload(const Problem& p, const std::vector<int>& rg, uint32_t seed, bool with_ref) {
  DeviceProblem d;
  const int64_t a_elems = std::max<int64_t>(1, p.rows * p.k);
  const int64_t b_elems = p.groups * p.n * p.k;
  CHECK_CUDA(cudaMalloc(&d.a, a_elems * 2));
  CHECK_CUDA(cudaMalloc(&d.b, b_elems * 2));
  CHECK_CUDA(cudaMalloc(&d.c, std::max<int64_t>(1, p.rows * p.n) * 2));
  // Inputs in [-1, 1): products stay O(1) and sums O(sqrt(k)), far from bf16 limits.
  launch_fill_bf16(d.a, p.rows * p.k, seed * 3 + 1, 1.0f);
  launch_fill_bf16(d.b, b_elems, seed * 3 + 2, 1.0f);
  if (p.bias) {
    CHECK_CUDA(cudaMalloc(&d.bias, p.groups * p.n * 4));
    fill_f32<<<256, 256>>>(d.bias, p.groups * p.n, seed * 3 + 3, 4.0f);
    CHECK_CUDA(cudaGetLastError());
  }
  CHECK_CUDA(cudaMalloc(&d.offsets, (p.groups + 1) * 4));
  CHECK_CUDA(cudaMemcpy(d.offsets, p.offsets.data(), (p.groups + 1) * 4, cudaMemcpyHostToDevice));
  if (!p.row_map.empty()) {
    CHECK_CUDA(cudaMalloc(&d.row_map, p.rows * 4));
    CHECK_CUDA(cudaMemcpy(d.row_map, p.row_map.data(), p.rows * 4, cudaMemcpyHostToDevice));
  }
  if (with_ref && p.rows > 0) {
    CHECK_CUDA(cudaMalloc(&d.row_group, p.rows * 4));
    CHECK_CUDA(cudaMemcpy(d.row_group, rg.data(), p.rows * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMalloc(&d.ref, p.rows * p.n * 4));
    dim3 block(32, 8), grid(unsigned((p.n + 31) / 32), unsigned((p.rows + 7) / 8));
    reference_gemm<<<grid, block>>>(static_cast<const __nv_bfloat16*>(d.a),
                                    static_cast<const __nv_bfloat16*>(d.b), d.bias, d.row_group,
                                    d.ref, int(p.rows), int(p.n), int(p.k));
    CHECK_CUDA(cudaGetLastError());
  }
  d.args.size = sizeof(fmoe_grouped_mm_args);
  d.args.a = d.a;
  d.args.b = d.b;
  d.args.bias = d.bias;
  d.args.c = d.c;
  d.args.group_offsets = d.offsets;
  d.args.row_map = d.row_map;
  d.args.rows = p.rows;
  d.args.n = p.n;
  d.args.k = p.k;
  d.args.groups = p.groups;
  sync_or_die(0, "input fill + reference kernel", 600.0);
  return d;
}

void release(DeviceProblem& d) {
  cudaFree(d.a);
  cudaFree(d.b);
  cudaFree(d.c);
  cudaFree(d.bias);
  cudaFree(d.ref);
  cudaFree(d.offsets);
  cudaFree(d.row_map);
  cudaFree(d.row_group);
  d = DeviceProblem{};
}

// Compares c with the reference; prints diagnostics; returns true when all is right.
bool compare(const Problem& p, const std::vector<int>& rg, const DeviceProblem& d,
             const char* label, int block_n) {
  const int64_t elems = p.rows * p.n;
  std::vector<uint16_t> got(size_t(std::max<int64_t>(elems, 1)));
  std::vector<float> ref(size_t(std::max<int64_t>(elems, 1)), 0.f);
  if (elems > 0) {
    CHECK_CUDA(cudaMemcpy(got.data(), d.c, elems * 2, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(ref.data(), d.ref, elems * 4, cudaMemcpyDeviceToHost));
  }
  std::vector<int> gstart(size_t(p.groups), 0);
  for (int64_t g = 0; g < p.groups; ++g) gstart[g] = p.offsets[g];
  std::vector<double> gmax(size_t(p.groups), 0.0);
  std::vector<int64_t> gbad(size_t(p.groups), 0);
  int64_t checked = 0, untouched = 0, mismatches = 0, clobbered = 0;
  double max_err = 0, max_ratio = 0;
  int printed = 0, printed_clobber = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int g = rg[r];
    for (int64_t c = 0; c < p.n; ++c) {
      const uint16_t bits = got[r * p.n + c];
      if (g < 0) {
        ++untouched;
        if (bits != 0xFFFF) {
          ++clobbered;
          if (printed_clobber++ < 5)
            std::printf("    WRITTEN but must not be: row %lld col %lld holds 0x%04x (%g)\n",
                        (long long)r, (long long)c, bits, fmoe::bf16_to_f32(bits));
        }
        continue;
      }
      ++checked;
      const float gv = fmoe::bf16_to_f32(bits);
      const float rv = ref[r * p.n + c];
      const double err = std::fabs(double(gv) - double(rv));
      const double tol = 1e-2 * (std::fabs(double(rv)) + 1.0);
      const bool bad = !(err <= tol);  // NaN -> bad
      if (!std::isnan(err)) {
        max_err = std::max(max_err, err);
        max_ratio = std::max(max_ratio, err / tol);
        gmax[g] = std::max(gmax[g], err);
      } else {
        gmax[g] = INFINITY;
      }
      if (bad) {
        ++mismatches;
        ++gbad[g];
        if (printed++ < 8) {
          const int64_t in_group = r - gstart[g];
          std::printf("    MISMATCH row %lld col %lld (group %d, row %lld of the group, tile row "
                      "%lld, tile col %lld): got %.6g (0x%04x) ref %.6g\n",
                      (long long)r, (long long)c, g, (long long)in_group,
                      (long long)(in_group % 128), (long long)(c % (block_n == fmoe::cuda::kSm90PingPong ? 128 : block_n)), gv, bits, rv);
          if (printed == 1 && !std::isnan(gv)) {
            // Where does the wrong value belong? Helps tell a fragment / swizzle permutation
            // from garbage.
            int found = 0;
            for (int64_t rr = std::max<int64_t>(0, r - 64);
                 rr < std::min<int64_t>(p.rows, r + 64) && found < 3; ++rr)
              for (int64_t cc = std::max<int64_t>(0, c - 64);
                   cc < std::min<int64_t>(p.n, c + 64) && found < 3; ++cc) {
                if (rg[rr] < 0) continue;
                const float v = ref[rr * p.n + cc];
                if (std::fabs(v - gv) <= 2e-3 * (std::fabs(v) + 1e-3) && !(rr == r && cc == c)) {
                  std::printf("      got value matches ref at row %lld col %lld (drow %+lld, "
                              "dcol %+lld)\n",
                              (long long)rr, (long long)cc, (long long)(rr - r),
                              (long long)(cc - c));
                  ++found;
                }
              }
            if (!found) std::printf("      got value matches no ref within +-64 rows/cols\n");
          }
        }
      }
    }
  }
  const bool ok = mismatches == 0 && clobbered == 0;
  std::printf("  %s %-44s BN=%d: checked %lld, untouched %lld, max|err| %.3g, max err/tol %.3g",
              ok ? "PASS" : "FAIL", label, block_n, (long long)checked, (long long)untouched,
              max_err, max_ratio);
  if (!ok)
    std::printf(", %lld mismatches, %lld clobbered", (long long)mismatches, (long long)clobbered);
  std::printf("\n");
  if (!ok) {
    int shown = 0;
    for (int64_t g = 0; g < p.groups && shown < 32; ++g) {
      if (gbad[g] == 0 && p.groups > 16) continue;
      std::printf("    group %3lld rows [%d, %d): max|err| %.3g, %lld bad\n", (long long)g,
                  p.offsets[g], p.offsets[g + 1], gmax[g], (long long)gbad[g]);
      ++shown;
    }
  }
  std::fflush(stdout);
  return ok;
}

bool run_case(const Problem& p, int num_sms, uint32_t seed) {
  bool overlap = false;
  const std::vector<int> rg = row_groups(p, &overlap);
  if (overlap) {
    std::printf("  test bug: case %s has overlapping valid groups\n", p.name.c_str());
    return false;
  }
  DeviceProblem d = upload(p, rg, seed, true);
  bool ok = true;
  if (!fmoe::cuda::grouped_mm_sm90_supported(d.args)) {
    std::printf("  FAIL %s: grouped_mm_sm90_supported() = false\n", p.name.c_str());
    release(d);
    return false;
  }
  const int picked = fmoe::cuda::grouped_mm_sm90_pick_block_n(d.args, num_sms);
  for (int bn : {128, 256, fmoe::cuda::kSm90PingPong}) {
    const int64_t c_bytes = std::max<int64_t>(1, p.rows * p.n) * 2;
    CHECK_CUDA(cudaMemset(d.c, 0xFF, c_bytes));  // poison: every bf16 = 0xFFFF (NaN)
    cudaError_t e = fmoe::cuda::grouped_mm_sm90_bf16_block_n(d.args, num_sms, bn, 0);
    if (e != cudaSuccess) {
      std::printf("  FAIL %s BN=%d: launch returned %s\n", p.name.c_str(), bn,
                  cudaGetErrorString(e));
      ok = false;
      continue;
    }
    sync_or_die(0, (p.name + " sm90 kernel").c_str());
    std::string label = p.name + (bn == picked ? " (picked)" : "");
    ok = compare(p, rg, d, label.c_str(), bn) && ok;
  }
  release(d);
  return ok;
}

std::vector<int32_t> offsets_from_sizes(const std::vector<int>& sizes, int start = 0) {
  std::vector<int32_t> off(sizes.size() + 1);
  off[0] = start;
  for (size_t i = 0; i < sizes.size(); ++i) off[i + 1] = off[i] + sizes[i];
  return off;
}

Problem make(const std::string& name, const std::vector<int>& sizes, int64_t extra_rows,
             int64_t n, int64_t k, bool bias) {
  Problem p;
  p.name = name;
  p.groups = int64_t(sizes.size());
  p.offsets = offsets_from_sizes(sizes);
  p.rows = p.offsets.back() + extra_rows;
  p.n = n;
  p.k = k;
  p.bias = bias;
  return p;
}

// ---- timing -----------------------------------------------------------------------------------
bool bench(const std::string& name, int64_t groups, int64_t rows_per_group, int64_t n, int64_t k,
           int num_sms) {
  Problem p = make(name, std::vector<int>(size_t(groups), int(rows_per_group)), 0, n, k, false);
  bool overlap = false;
  const std::vector<int> rg = row_groups(p, &overlap);
  DeviceProblem d = upload(p, rg, 7, true);
  const double flops = 2.0 * double(p.rows) * double(n) * double(k);
  const int picked = fmoe::cuda::grouped_mm_sm90_pick_block_n(d.args, num_sms);
  bool ok = true;
  for (int bn : {128, 256, fmoe::cuda::kSm90PingPong}) {
    CHECK_CUDA(cudaMemset(d.c, 0xFF, p.rows * p.n * 2));
    CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_bf16_block_n(d.args, num_sms, bn, 0));
    sync_or_die(0, (name + " sm90 kernel").c_str());
    ok = compare(p, rg, d, (name + (bn == picked ? " (picked)" : "")).c_str(), bn) && ok;
    const LaunchTimes t = time_launches((name + " timing").c_str(), 3, 20, [&] {
      CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_bf16_block_n(d.args, num_sms, bn, 0));
    });
    const float med = t.median_ms;
    std::printf("  TIME %-40s BN=%d%s: median %.3f ms (min %.3f), %.1f TFLOP/s\n", name.c_str(),
                bn, bn == picked ? " (picked)" : "", med, t.min_ms, flops / (med * 1e-3) / 1e12);
    std::fflush(stdout);
  }
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
  std::printf("device %s, sm_%d%d, %d SMs, %zu KB smem/block opt-in\n", prop.name, prop.major,
              prop.minor, num_sms, prop.sharedMemPerBlockOptin / 1024);
  if (prop.major != 9) {
    std::printf("needs a Hopper GPU (sm_90)\n");
    return 2;
  }

  std::vector<Problem> cases;
  cases.push_back(make("uniform 8x512 n2048 k2048 bias", std::vector<int>(8, 512), 0, 2048,
                       2048, true));
  cases.push_back(make("ragged 0/1/127/129 unaligned n3072 k2880",
                       {0, 1, 127, 129, 300, 0, 64, 1000, 5, 128, 256, 77}, 37, 3072, 2880,
                       false));
  cases.push_back(make("group > 8192 rows n2048 k2048 bias", {9000, 700, 1}, 0, 2048, 2048,
                       true));
  cases.push_back(make("n5760 k7168 bias", {300, 517}, 11, 5760, 7168, true));
  cases.push_back(make("k200 n264 (partial k and n tiles) bias", {130, 0, 70}, 3, 264, 200,
                       true));
  cases.push_back(make("n8 k64 (one narrow column block)", {5, 300}, 0, 8, 64, false));
  {
    // Padded groups as permute makes them: the last rows of each group are padding (-1), and a
    // few real rows are skipped too; rows past the last group are never written.
    Problem p = make("row_map -1 rows n1536 k2048 bias", {200, 333, 0, 150}, 40, 1536, 2048,
                     true);
    p.row_map.assign(size_t(p.rows), 0);
    for (int64_t r = 0; r < p.rows; ++r) p.row_map[r] = int32_t(r * 7 % 1000);
    for (int64_t g = 0; g < p.groups; ++g)
      for (int r = std::max(p.offsets[g], p.offsets[g + 1] - 13); r < p.offsets[g + 1]; ++r)
        p.row_map[r] = -1;
    for (int64_t r = 0; r < p.rows; r += 17) p.row_map[r] = -1;
    cases.push_back(p);
  }
  {
    std::vector<int> sizes(128);
    uint32_t s = 12345;
    for (int g = 0; g < 128; ++g) {
      s = s * 1664525u + 1013904223u;
      const uint32_t v = s >> 8;
      sizes[g] = (v % 7 == 0) ? 0 : int(v % 300);  // some empty, most < 300
    }
    sizes[5] = 1;
    sizes[9] = 127;
    sizes[10] = 129;
    sizes[11] = 128;
    cases.push_back(make("128 random groups n1536 k2048 bias", sizes, 5, 1536, 2048, true));
  }
  {
    // Bad offsets: out of range (> rows, < 0) and decreasing. Computed groups: 0 [0,256),
    // 3 [600,800), 6 (empty), 7 [1000,1100), 11 [1150,1290); everything else stays poisoned.
    Problem p;
    p.name = "bad offsets (skipped groups) n2048 k1024";
    p.offsets = {0, 256, 5000, 600, 800, -3, 1000, 1000, 1100, 1050, 5000, 1150, 1290};
    p.groups = int64_t(p.offsets.size()) - 1;
    p.rows = 1300;
    p.n = 2048;
    p.k = 1024;
    p.bias = true;
    cases.push_back(p);
  }
  {
    Problem p = make("all groups empty", {0, 0, 0, 0}, 256, 512, 512, false);
    cases.push_back(p);
  }

  bool all_ok = true;
  std::printf("correctness (tolerance |got - ref| <= 1e-2 * (|ref| + 1); untouched rows must "
              "keep 0xFFFF):\n");
  uint32_t seed = 1;
  for (const Problem& p : cases) all_ok = run_case(p, num_sms, seed++) && all_ok;

  std::printf("timing (median of 20 after 3 warm-up launches; results verified too):\n");
  all_ok = bench("qwen3 fc1: 128 x 512 rows, n1536 k2048", 128, 512, 1536, 2048, num_sms) && all_ok;
  all_ok = bench("qwen3 fc2: 128 x 512 rows, n2048 k768", 128, 512, 2048, 768, num_sms) && all_ok;
  all_ok = bench("dense: 16384 x 4096 x 7168, 1 group", 1, 16384, 4096, 7168, num_sms) && all_ok;

  std::printf("%s\n", all_ok ? "ALL PASSED" : "FAILURES (see above)");
  return all_ok ? 0 : 1;
}
