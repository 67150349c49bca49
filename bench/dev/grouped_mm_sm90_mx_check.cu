// Standalone correctness check and benchmark of the Hopper grouped GEMM with MXFP8 operands
// (grouped_mm_sm90_mxfp8 / grouped_mm_sm90_mxfp8_act, csrc/cuda/grouped_mm_sm90.cu).
//
// Build and run (H100 / H200, from the repository root):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \
//     -Icsrc/include -Icsrc bench/dev/grouped_mm_sm90_mx_check.cu csrc/cuda/grouped_mm_sm90.cu \
//     csrc/cuda/tensor_map.cu -o /tmp/gmm_mx_check && /tmp/gmm_mx_check
//
// Inputs: random e4m3 bytes (every finite code: 0x7F / 0xFF, the NaNs, are replaced) and random
// e8m0 scales in 120..134 (2^-7 .. 2^7), so every dequantized value is exact in bf16.
//  - Plain GEMM: a naive reference kernel dequantizes with numerics.h (mx_dequantize) and sums in
//    f32; the sm90 kernel's c (poisoned with 0xFFFF first) must satisfy
//    |got - ref| <= 1e-2 (|ref| + 1) on every written element (the products are exact, the sums
//    f32 in another order: near bit-exact), and rows that must not be written keep the poison.
//  - Fused activation: the bf16 sm90 act kernel (checked by grouped_mm_sm90_act_check.cu) on the
//    dequantized operands (exact in bf16) is the reference, same tolerance and poison rules.
// Then times the MXFP8 kernel against the bf16 kernel on the same shapes (median of 20).
// Exit code: 0 = all passed, 1 = a mismatch, 2 = a CUDA error.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/numerics.h"
#include "cuda/grouped_mm_sm90.h"
#include "check_common.cuh"

namespace {

using fmoe::cuda::ActEpilogue;

// Random finite e4m3 codes.
__global__ void fill_e4m3(uint8_t* p, int64_t count, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint8_t b = uint8_t(hash64(i, seed));
    if ((b & 0x7F) == 0x7F) b ^= 0x01;  // NaN -> +-448
    p[i] = b;
  }
}
// Random scale bytes in 120..134.
__global__ void fill_scale(uint8_t* p, int64_t count, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = uint8_t(120 + hash64(i, seed) % 15);
}
// bf16 [rows, k] = dequant(data, scale): exact for the scales used here.
__global__ void dequant_bf16(const uint8_t* d, const uint8_t* s, uint16_t* out, int64_t rows,
                             int64_t k) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * k;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = fmoe::f32_to_bf16(fmoe::mx_dequantize(d[i], s[(i / k) * (k / 32) + (i % k) / 32]));
}
// ref[r, c] = sum_k dequant(a) dequant(b[g]) + bias for rows with row_group[r] = g >= 0.
__global__ void reference_gemm(const uint8_t* a, const uint8_t* as, const uint8_t* b,
                               const uint8_t* bs, const float* bias, const int* row_group,
                               float* ref, int rows, int n, int k) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = blockIdx.y * blockDim.y + threadIdx.y;
  if (row >= rows || col >= n) return;
  const int g = row_group[row];
  if (g < 0) return;
  const int64_t br = int64_t(g) * n + col;
  float acc = 0.f;
  for (int i = 0; i < k; ++i)
    acc = fmaf(fmoe::mx_dequantize(a[int64_t(row) * k + i], as[int64_t(row) * (k / 32) + i / 32]),
               fmoe::mx_dequantize(b[br * k + i], bs[br * (k / 32) + i / 32]), acc);
  if (bias) acc += bias[br];
  ref[int64_t(row) * n + col] = acc;
}

struct Problem {
  std::string name;
  int64_t rows = 0, n = 0, k = 0, groups = 0;
  std::vector<int32_t> offsets;
  bool bias = false;
  std::vector<int32_t> row_map;
};

// Group of each row (-1: must not be written): computed groups are 0 <= off[g] <= off[g+1] <= rows.
std::vector<int> row_groups(const Problem& p) {
  std::vector<int> rg(size_t(p.rows), -1);
  for (int64_t g = 0; g < p.groups; ++g) {
    const int lo = p.offsets[g], hi = p.offsets[g + 1];
    if (lo >= 0 && lo <= hi && hi <= p.rows)
      for (int r = lo; r < hi; ++r) rg[r] = int(g);
  }
  if (!p.row_map.empty())
    for (int64_t r = 0; r < p.rows; ++r)
      if (p.row_map[r] < 0) rg[r] = -1;
  return rg;
}

struct Device {
  uint8_t *a = nullptr, *as = nullptr, *b = nullptr, *bs = nullptr;
  uint16_t *a16 = nullptr, *b16 = nullptr, *c = nullptr, *c_ref = nullptr;
  float *bias = nullptr, *ref = nullptr;
  int32_t *offsets = nullptr, *row_map = nullptr, *row_group = nullptr;
  fmoe_grouped_mm_args mx{}, bf{};
};

Device upload(const Problem& p, const std::vector<int>& rg, uint32_t seed, bool ref) {
  Device d;
  const int64_t ae = std::max<int64_t>(1, p.rows * p.k), be = p.groups * p.n * p.k;
  CHECK_CUDA(cudaMalloc(&d.a, ae));
  CHECK_CUDA(cudaMalloc(&d.as, ae / 32 + 1));
  CHECK_CUDA(cudaMalloc(&d.b, be));
  CHECK_CUDA(cudaMalloc(&d.bs, be / 32));
  CHECK_CUDA(cudaMalloc(&d.a16, ae * 2));
  CHECK_CUDA(cudaMalloc(&d.b16, be * 2));
  const int64_t ce = std::max<int64_t>(1, p.rows * p.n);
  CHECK_CUDA(cudaMalloc(&d.c, ce * 2));
  CHECK_CUDA(cudaMalloc(&d.c_ref, ce * 2));
  fill_e4m3<<<1024, 256>>>(d.a, p.rows * p.k, seed * 5 + 1);
  fill_scale<<<1024, 256>>>(d.as, p.rows * p.k / 32, seed * 5 + 2);
  fill_e4m3<<<1024, 256>>>(d.b, be, seed * 5 + 3);
  fill_scale<<<1024, 256>>>(d.bs, be / 32, seed * 5 + 4);
  dequant_bf16<<<1024, 256>>>(d.a, d.as, d.a16, p.rows, p.k);
  dequant_bf16<<<1024, 256>>>(d.b, d.bs, d.b16, p.groups * p.n, p.k);
  if (p.bias) {
    CHECK_CUDA(cudaMalloc(&d.bias, p.groups * p.n * 4));
    fill_f32<<<256, 256>>>(d.bias, p.groups * p.n, seed * 5 + 5, 64.0f);
  }
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaMalloc(&d.offsets, (p.groups + 1) * 4));
  CHECK_CUDA(cudaMemcpy(d.offsets, p.offsets.data(), (p.groups + 1) * 4, cudaMemcpyHostToDevice));
  if (!p.row_map.empty()) {
    CHECK_CUDA(cudaMalloc(&d.row_map, p.rows * 4));
    CHECK_CUDA(cudaMemcpy(d.row_map, p.row_map.data(), p.rows * 4, cudaMemcpyHostToDevice));
  }
  if (ref && p.rows > 0) {
    CHECK_CUDA(cudaMalloc(&d.row_group, p.rows * 4));
    CHECK_CUDA(cudaMemcpy(d.row_group, rg.data(), p.rows * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMalloc(&d.ref, p.rows * p.n * 4));
    dim3 block(32, 8), grid(unsigned((p.n + 31) / 32), unsigned((p.rows + 7) / 8));
    reference_gemm<<<grid, block>>>(d.a, d.as, d.b, d.bs, d.bias, d.row_group, d.ref,
                                    int(p.rows), int(p.n), int(p.k));
    CHECK_CUDA(cudaGetLastError());
  }
  fmoe_grouped_mm_args g{};
  g.size = sizeof g;
  g.bias = d.bias;
  g.c = d.c;
  g.group_offsets = d.offsets;
  g.row_map = d.row_map;
  g.rows = p.rows;
  g.n = p.n;
  g.k = p.k;
  g.groups = p.groups;
  d.mx = g;
  d.mx.a = d.a;
  d.mx.a_scale = d.as;
  d.mx.b = d.b;
  d.mx.b_scale = d.bs;
  d.bf = g;
  d.bf.a = d.a16;
  d.bf.b = d.b16;
  d.bf.c = d.c_ref;
  CHECK_CUDA(cudaDeviceSynchronize());
  return d;
}

void release(Device& d) {
  for (void* ptr : {(void*)d.a, (void*)d.as, (void*)d.b, (void*)d.bs, (void*)d.a16, (void*)d.b16,
                    (void*)d.c, (void*)d.c_ref, (void*)d.bias, (void*)d.ref, (void*)d.offsets,
                    (void*)d.row_map, (void*)d.row_group})
    cudaFree(ptr);
  d = Device{};
}

// got [rows, cols] bf16 vs want (f32 or bf16 values) on rows with rg >= 0; others keep 0xFFFF.
// tol_scale widens the tolerance; up to allowed_fraction of the elements may miss it.
bool compare(const std::string& label, const std::vector<int>& rg, int64_t rows, int64_t cols,
             const std::vector<uint16_t>& got, const std::vector<float>& want,
             double tol_scale = 1.0, double allowed_fraction = 0.0) {
  int64_t bad = 0, clobbered = 0, checked = 0, exact = 0;
  double max_ratio = 0;
  for (int64_t r = 0; r < rows; ++r) {
    // Random e4m3 bytes span 2^-9..448 with random signs: a dot product of k of them cancels
    // heavily, and two f32 summation orders then differ by ~2^-24 * sqrt(k) * the largest
    // product, far more than 1% of a small |want|. Measure errors against the row's RMS instead
    // of each element's own magnitude (1% of it still catches any wrong k-block or scale).
    double sq = 0;
    for (int64_t c = 0; c < cols; ++c) sq += double(want[r * cols + c]) * want[r * cols + c];
    const double row_rms = cols > 0 ? std::sqrt(sq / double(cols)) : 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      const uint16_t bits = got[r * cols + c];
      if (rg[r] < 0) {
        if (bits != 0xFFFF && clobbered++ < 5)
          std::printf("    WRITTEN but must not be: row %lld col %lld\n", (long long)r,
                      (long long)c);
        continue;
      }
      ++checked;
      const double g = fmoe::bf16_to_f32(bits), w = want[r * cols + c];
      const double tol = tol_scale * 1e-2 * (std::fabs(w) + row_rms + 1.0), err = std::fabs(g - w);
      if (fmoe::f32_to_bf16(float(w)) == bits) ++exact;
      if (!(err <= tol)) {
        if (bad++ < 8)
          std::printf("    MISMATCH row %lld col %lld (group %d): got %.6g want %.6g\n",
                      (long long)r, (long long)c, rg[r], g, w);
      } else {
        max_ratio = std::max(max_ratio, err / tol);
      }
    }
  }
  const bool ok = double(bad) <= allowed_fraction * double(checked) && clobbered == 0;
  std::printf("  %s %-60s checked %lld, %.2f%% bit-exact, max err/tol %.3g", ok ? "PASS" : "FAIL",
              label.c_str(), (long long)checked, checked ? 100.0 * exact / checked : 100.0,
              max_ratio);
  if (bad || clobbered)
    std::printf(", %lld mismatches, %lld clobbered", (long long)bad, (long long)clobbered);
  std::printf("\n");
  std::fflush(stdout);
  return ok;
}

std::vector<uint16_t> fetch16(const uint16_t* p, int64_t count) {
  std::vector<uint16_t> v(size_t(std::max<int64_t>(1, count)));
  if (count > 0) CHECK_CUDA(cudaMemcpy(v.data(), p, count * 2, cudaMemcpyDeviceToHost));
  return v;
}

// The MXFP8 kernel a block_n value of grouped_mm_sm90_mxfp8_block_n selects, for labels.
std::string design_name(int bn) {
  return bn == fmoe::cuda::kSm90MxFp8Wgmma ? "fp8-wgmma" : "dequant BN=" + std::to_string(bn);
}

bool run_case(const Problem& p, int num_sms, uint32_t seed, bool with_act) {
  const std::vector<int> rg = row_groups(p);
  Device d = upload(p, rg, seed, true);
  if (!fmoe::cuda::grouped_mm_sm90_mxfp8_supported(d.mx)) {
    std::printf("  FAIL %s: grouped_mm_sm90_mxfp8_supported() = false\n", p.name.c_str());
    release(d);
    return false;
  }
  bool ok = true;
  const int64_t ce = std::max<int64_t>(1, p.rows * p.n);
  std::vector<float> ref(size_t(ce), 0.f);
  if (p.rows > 0)
    CHECK_CUDA(cudaMemcpy(ref.data(), d.ref, p.rows * p.n * 4, cudaMemcpyDeviceToHost));
  for (int bn : {fmoe::cuda::kSm90MxFp8Wgmma, 128, 256}) {
    CHECK_CUDA(cudaMemset(d.c, 0xFF, ce * 2));
    CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_mxfp8_block_n(d.mx, num_sms, bn, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    ok = compare(p.name + " " + design_name(bn), rg, p.rows, p.n,
                 fetch16(d.c, p.rows * p.n), ref) && ok;
  }
  if (with_act) {
    const ActEpilogue acts[] = {{FMOE_ACT_SILU, FMOE_LAYOUT_HALVES, 1.702f, 7.0f},
                                {FMOE_ACT_SWIGLU_OAI, FMOE_LAYOUT_INTERLEAVED, 1.702f, 7.0f},
                                {FMOE_ACT_SQUARED_RELU, FMOE_LAYOUT_HALVES, 1.702f, 7.0f}};
    const char* names[] = {"silu halves", "swiglu_oai interleaved", "squared_relu"};
    for (int i = 0; i < 3; ++i) {
      const ActEpilogue& act = acts[i];
      if (!fmoe::cuda::grouped_mm_sm90_mxfp8_act_supported(d.mx, act)) {
        std::printf("  FAIL %s %s: act not supported\n", p.name.c_str(), names[i]);
        ok = false;
        continue;
      }
      const int64_t cols = act.activation == FMOE_ACT_SQUARED_RELU ? p.n : p.n / 2;
      for (int bn : {fmoe::cuda::kSm90MxFp8Wgmma, 128, 256}) {
        CHECK_CUDA(cudaMemset(d.c, 0xFF, ce * 2));
        CHECK_CUDA(cudaMemset(d.c_ref, 0xFF, ce * 2));
        CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_mxfp8_act_block_n(d.mx, act, num_sms, bn, 0));
        CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_bf16_act_block_n(d.bf, act, num_sms, bn ? bn : 128, 0));
        CHECK_CUDA(cudaDeviceSynchronize());
        const std::vector<uint16_t> want16 = fetch16(d.c_ref, p.rows * cols);
        std::vector<float> want(want16.size());
        for (size_t j = 0; j < want16.size(); ++j) want[j] = fmoe::bf16_to_f32(want16[j]);
        // The dequantizing kernels compute bit for bit the bf16 kernel's h. fp8 wgmma sums each
        // k32 block in the tensor core's own precision, so its bf16 h can sit one ulp off: an
        // activation output then moves by up to two ulps (squared_relu), or flips where the gate
        // cancels to about zero against the row (swiglu_oai's clamps turn that into 0 vs -42 on
        // these random e4m3 bytes, whose products span 2^-18..2^17). Allowed: 2x the tolerance,
        // and 1e-4 of the elements outside it.
        const bool fp8 = bn == fmoe::cuda::kSm90MxFp8Wgmma;
        ok = compare(p.name + " " + names[i] + " " + design_name(bn), rg, p.rows, cols,
                     fetch16(d.c, p.rows * cols), want, fp8 ? 2.0 : 1.0, fp8 ? 1e-4 : 0.0) && ok;
      }
    }
  }
  release(d);
  return ok;
}

std::vector<int32_t> offsets_from_sizes(const std::vector<int>& sizes) {
  std::vector<int32_t> off(sizes.size() + 1, 0);
  for (size_t i = 0; i < sizes.size(); ++i) off[i + 1] = off[i] + sizes[i];
  return off;
}

Problem make(const std::string& name, const std::vector<int>& sizes, int64_t extra, int64_t n,
             int64_t k, bool bias) {
  Problem p;
  p.name = name;
  p.groups = int64_t(sizes.size());
  p.offsets = offsets_from_sizes(sizes);
  p.rows = p.offsets.back() + extra;
  p.n = n;
  p.k = k;
  p.bias = bias;
  return p;
}

void bench(const std::string& name, int64_t groups, int64_t rows_per_group, int64_t n, int64_t k,
           int num_sms) {
  Problem p = make(name, std::vector<int>(size_t(groups), int(rows_per_group)), 0, n, k, false);
  const std::vector<int> rg = row_groups(p);
  Device d = upload(p, rg, 7, false);
  const double flops = 2.0 * double(p.rows) * double(n) * double(k);
  const int picked = fmoe::cuda::grouped_mm_sm90_pick_block_n(d.mx, num_sms);
  for (int bn : {fmoe::cuda::kSm90MxFp8Wgmma, 128, 256}) {
    const float mx = time_launches("mxfp8 timing", 3, 20, [&] {
      CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_mxfp8_block_n(d.mx, num_sms, bn, 0));
    }).median_ms;
    const float bf = time_launches("bf16 timing", 3, 20, [&] {
      CHECK_CUDA(fmoe::cuda::grouped_mm_sm90_bf16_block_n(d.bf, num_sms, bn ? bn : picked, 0));
    }).median_ms;
    std::printf("  TIME %-44s %s%s: mxfp8 %.3f ms %.1f TFLOP/s | bf16 %.3f ms %.1f TFLOP/s\n",
                name.c_str(), design_name(bn).c_str(), bn == picked ? " (picked)" : "", mx,
                flops / (mx * 1e-3) / 1e12, bf, flops / (bf * 1e-3) / 1e12);
    std::fflush(stdout);
  }
  release(d);
}

}  // namespace

int main() {
  CHECK_CUDA(cudaSetDevice(0));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const int num_sms = prop.multiProcessorCount;
  std::printf("device %s, sm_%d%d, %d SMs\n", prop.name, prop.major, prop.minor, num_sms);
  if (prop.major != 9) {
    std::printf("needs a Hopper GPU (sm_90)\n");
    return 2;
  }
  struct Case {
    Problem p;
    bool act;
  };
  std::vector<Case> cases;
  {
    Problem p = make("groups 0/1/127/129/9000 n1536 k2048 bias row_map",
                     {0, 1, 127, 129, 9000, 0, 64}, 37, 1536, 2048, true);
    p.row_map.assign(size_t(p.rows), 0);
    for (int64_t r = 0; r < p.rows; r += 13) p.row_map[r] = -1;
    cases.push_back({p, true});
  }
  cases.push_back({make("n5760 k2880 bias", {130, 1, 0, 257, 127}, 11, 5760, 2880, true), true});
  cases.push_back({make("n2048 k7168", {300, 517}, 5, 2048, 7168, false), false});
  {
    std::vector<int> sizes(128);
    uint32_t s = 12345;
    for (int g = 0; g < 128; ++g) {
      s = s * 1664525u + 1013904223u;
      sizes[g] = ((s >> 8) % 7 == 0) ? 0 : int((s >> 8) % 300);
    }
    sizes[5] = 1;
    sizes[9] = 127;
    sizes[10] = 129;
    cases.push_back({make("128 random groups n1536 k2048 bias", sizes, 5, 1536, 2048, true), true});
  }
  {
    Problem p;
    p.name = "bad offsets n2048 k2048 bias";
    p.offsets = {0, 256, 5000, 600, 800, -3, 1000, 1000, 1100, 1050, 5000, 1150, 1290};
    p.groups = int64_t(p.offsets.size()) - 1;
    p.rows = 1300;
    p.n = 2048;
    p.k = 2048;
    p.bias = true;
    cases.push_back({p, true});
  }
  cases.push_back({make("k96 (partial k-block) n1536", {70, 130}, 3, 1536, 96, true), false});

  bool ok = true;
  std::printf("correctness (|got - want| <= 1e-2 (|want| + 1); unwritten rows keep 0xFFFF):\n");
  uint32_t seed = 1;
  for (const Case& c : cases) ok = run_case(c.p, num_sms, seed++, c.act) && ok;

  std::printf("timing (median of 20 after 3 warm-up launches):\n");
  bench("qwen3 fc1: 128 x 512 rows, n1536 k2048", 128, 512, 1536, 2048, num_sms);
  bench("qwen3 fc2: 128 x 512 rows, n2048 k768", 128, 512, 2048, 768, num_sms);
  bench("dense: 16384 x 4096 x 7168, 1 group", 1, 16384, 4096, 7168, num_sms);
  std::printf("%s\n", ok ? "ALL PASSED" : "FAILURES (see above)");
  return ok ? 0 : 1;
}
