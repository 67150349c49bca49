// Warp-level tensor-core primitives (sm_80+; on sm_90 they run on the same tensor cores as
// wgmma, at a lower issue rate).
// PTX ISA: "Warp Level Matrix Multiply-Accumulate Instructions: mma" (shape m16n8k16, .bf16,
// f32 accumulators), "ldmatrix" and "stmatrix".
#pragma once

#include <cstdint>

#include "cuda/ptx/cp_async.cuh"  // smem_addr

namespace fmoe::ptx {

// Loads four 8x8 b16 matrices from shared memory. Lane l supplies the address of row (l % 8) of
// matrix (l / 8); every row is 16 contiguous bytes. Register i of lane l receives elements
// (l / 4, 2*(l % 4)) and (l / 4, 2*(l % 4) + 1) of matrix i: exactly the mma fragment order.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// Stores four 8x8 b16 matrices to shared memory, transposed. Lane l holds in r[i] elements
// (l / 4, 2*(l % 4)) and (l / 4, 2*(l % 4) + 1) of matrix i (the mma accumulator fragment order,
// packed to b16 pairs) and supplies the address of row (l % 8) of matrix (l / 8) of the result:
// row j of the stored matrix i is column j of the held one, 16 contiguous bytes.
__device__ __forceinline__ void stmatrix_x4_trans(void* smem_row, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   smem_addr(smem_row)),
               "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
}

// d += a * b for a 16x16 (row-major) bf16 A fragment, a 16x8 (column-major, i.e. k contiguous
// per n) bf16 B fragment and a 16x8 f32 accumulator.
// Fragments (g = lane / 4, t = lane % 4): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..],
// a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]; b[0] = B[2t..2t+1][g], b[1] = B[2t+8..][g];
// d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1].
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace fmoe::ptx
