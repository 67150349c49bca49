// The bf16 operands and the naive f32 reference GEMM shared by the Hopper GEMM checks
// (grouped_mm_sm90_check.cu, grouped_mm_sm90_act_check.cu).
#pragma once

#include <cuda_bf16.h>

#include "check_common.cuh"

__global__ void fill_bf16(__nv_bfloat16* p, int64_t count, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16_rn(uniform_pm1(i, seed) * scale);
}

// ref[r, c] = sum_k a[r,k] * b[g,c,k] + bias[g,c] for rows with row_group[r] = g >= 0. One thread
// per output element; k % 8 == 0, so 16-byte loads (8 bf16) along k.
__global__ void reference_gemm(const __nv_bfloat16* a, const __nv_bfloat16* b, const float* bias,
                               const int* row_group, float* ref, int rows, int n, int k) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = blockIdx.y * blockDim.y + threadIdx.y;
  if (row >= rows || col >= n) return;
  const int g = row_group[row];
  if (g < 0) return;
  const uint4* ar = reinterpret_cast<const uint4*>(a + int64_t(row) * k);
  const uint4* br = reinterpret_cast<const uint4*>(b + (int64_t(g) * n + col) * k);
  float acc = 0.f;
  for (int i = 0; i < k / 8; ++i) {
    uint4 va = ar[i], vb = br[i];
    const __nv_bfloat16* ea = reinterpret_cast<const __nv_bfloat16*>(&va);
    const __nv_bfloat16* eb = reinterpret_cast<const __nv_bfloat16*>(&vb);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc = fmaf(__bfloat162float(ea[j]), __bfloat162float(eb[j]), acc);
  }
  if (bias) acc += bias[int64_t(g) * n + col];
  ref[int64_t(row) * n + col] = acc;
}
