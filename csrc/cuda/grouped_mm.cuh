// The grouped GEMM shared by the bf16 and MXFP8 ops: tile scheduling over device-side group
// offsets, the shared-memory pipeline, the tensor-core inner loop and the epilogue. The two ops
// differ only in their operand loader (how a k-slice of A and B reaches shared memory as bf16),
// a template parameter of the kernel.
//
//   c[r, n] = sum_k a[r, k] * b[g, n, k] + bias[g, n]   for r in [offsets[g], offsets[g+1])
//
// Scheduling. Groups are sized on the device, so the grid is an upper bound: with M tiles that
// never straddle a group, sum_g ceil(rows_g / BM) <= ceil(rows / BM) + groups. Block (mt, nt)
// finds the group holding the mt-th M tile by a warp scan over the offsets (groups are few) and
// exits at once when mt is past the real work: empty groups and unused capacity cost one scan.
// A group whose offsets are not 0 <= start <= end <= rows is skipped, so bad offsets never fault.
// (With such offsets the groups may overlap and their tiles exceed the bound; those past it are
// not computed. Valid offsets never do.)
//
// Pipeline. A kStages-deep ring of bf16 k-slices in shared memory. A loader has two phases:
// fetch(kt) starts the global reads of slice kt (cp.async straight into shared memory, or loads
// into registers) and store(kt) finishes it (nothing for cp.async; dequantize and write to shared
// memory for register loaders). Slice kt + kStages - 1 is fetched before the MMAs of slice kt
// and stored after them, so its global latency overlaps the math either way.
//
// Shared-memory layout of a slice: [rows][32] bf16 for A then for B, k contiguous, 64 bytes per
// row in four 16-byte chunks; chunk c of row r sits at chunk c ^ ((r >> 1) & 3), which makes the
// 8 rows of every ldmatrix phase hit 8 distinct 16-byte bank groups (conflict-free) and keeps
// each 16-byte cp.async / st.shared whole.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>

#include "core/numerics.h"
#include "cuda/block_scan.cuh"
#include "cuda/cuda_check.h"
#include "cuda/ptx/cp_async.cuh"
#include "cuda/ptx/mma.cuh"

namespace fmoe::cuda {

struct GroupedMmParams {
  const void* a;           // [rows, k] bf16 or e4m3
  const uint8_t* a_scale;  // MXFP8: [rows, k/32]
  const void* b;           // [groups, n, k] bf16 or e4m3
  const uint8_t* b_scale;  // MXFP8: [groups, n, k/32]
  const float* bias;       // [groups, n] or null
  uint16_t* c;             // [rows, n] bf16
  const int32_t* offsets;  // [groups + 1]
  const int32_t* row_map;  // [rows] or null: rows with a negative entry (-1) are not stored
  int64_t n, k;
  int rows, groups;
  int m_tiles;    // upper bound of M tiles over all groups (grid = m_tiles * n_tiles)
  bool c_pairs;   // c 4-byte aligned and n even: two columns per 32-bit store
};

// Rows [row0, row_end) of group `group`: one M tile.
struct GroupTile {
  int group, row0, row_end;
};

// Byte offset of 16-byte chunk `chunk` (0..3) of row `row` inside a [rows][32] bf16 tile.
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// Finds the mt-th M tile in group order; false (for the whole block) when there is none.
template <int BM>
__device__ bool find_group_tile(const GroupedMmParams& p, int mt, GroupTile* out) {
  __shared__ int s_tile[3];
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    if (lane == 0) s_tile[0] = -1;
    __syncwarp();
    int before = 0;  // M tiles of the groups already scanned
    for (int g0 = 0; g0 < p.groups; g0 += 32) {
      const int g = g0 + lane;
      int start = 0, end = 0, tiles = 0;
      if (g < p.groups) {
        start = p.offsets[g];
        end = p.offsets[g + 1];
        if (start >= 0 && start <= end && end <= p.rows) tiles = (end - start + BM - 1) / BM;
      }
      const int incl = warp_inclusive_scan(tiles);
      const int first = before + incl - tiles;
      const bool mine = mt >= first && mt < before + incl;  // at most one lane
      if (mine) {
        s_tile[0] = g;
        s_tile[1] = start + (mt - first) * BM;
        s_tile[2] = end;
      }
      if (__ballot_sync(kFullWarp, mine)) break;
      before += __shfl_sync(kFullWarp, incl, 31);
    }
  }
  __syncthreads();
  out->group = s_tile[0];
  out->row0 = s_tile[1];
  out->row_end = min(s_tile[2], s_tile[1] + BM);
  return out->group >= 0;
}

// One warp's MMAs over one k-slice held in shared memory.
template <class Cfg>
__device__ __forceinline__ void warp_mma_slice(const uint8_t* a_tile, const uint8_t* b_tile,
                                               float (&acc)[Cfg::kFragsM][Cfg::kFragsN][4]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / Cfg::kWarpsN, wn = warp % Cfg::kWarpsN;
#pragma unroll
  for (int ks = 0; ks < Cfg::kBlockK / 16; ++ks) {
    uint32_t af[Cfg::kFragsM][4];
    uint32_t bf[Cfg::kFragsN][2];
#pragma unroll
    for (int mi = 0; mi < Cfg::kFragsM; ++mi) {
      // Matrices: rows 0-7 / 8-15 (lane / 8 % 2) x k 0-7 / 8-15 (lane / 16) -> a[0..3].
      const int row = wm * Cfg::kWarpTileM + mi * 16 + lane % 16;
      ptx::ldmatrix_x4(af[mi], a_tile + tile_offset(row, ks * 2 + lane / 16));
    }
#pragma unroll
    for (int nj = 0; nj < Cfg::kFragsN / 2; ++nj) {
      // Matrices: (n 0-7, k lo), (n 0-7, k hi), (n 8-15, k lo), (n 8-15, k hi).
      const int row = wn * Cfg::kWarpTileN + nj * 16 + (lane / 16) * 8 + lane % 8;
      uint32_t r[4];
      ptx::ldmatrix_x4(r, b_tile + tile_offset(row, ks * 2 + (lane / 8) % 2));
      bf[2 * nj][0] = r[0];
      bf[2 * nj][1] = r[1];
      bf[2 * nj + 1][0] = r[2];
      bf[2 * nj + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < Cfg::kFragsM; ++mi)
#pragma unroll
      for (int ni = 0; ni < Cfg::kFragsN; ++ni)
        ptx::mma_bf16_16816(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
  }
}

// Loader concept (see the top of this file):
//   Loader(const GroupedMmParams&, const GroupTile&, int64_t n0, uint8_t* smem)  (all threads)
//   void fetch(int kt);  void store(int kt);
template <class Cfg, class Loader>
__global__ void __launch_bounds__(Cfg::kThreads)
    grouped_mm_kernel(const __grid_constant__ GroupedMmParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int mt = int(blockIdx.x % unsigned(p.m_tiles));
  const int nt = int(blockIdx.x / unsigned(p.m_tiles));
  GroupTile tile;
  if (!find_group_tile<Cfg::kBlockM>(p, mt, &tile)) return;  // block-uniform
  const int64_t n0 = int64_t(nt) * Cfg::kBlockN;

  Loader loader(p, tile, n0, smem);
  const int k_tiles = int((p.k + Cfg::kBlockK - 1) / Cfg::kBlockK);
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < k_tiles) {
      loader.fetch(s);
      loader.store(s);
    }
    ptx::cp_async_commit();  // empty groups keep the wait count uniform
  }

  float acc[Cfg::kFragsM][Cfg::kFragsN][4];
#pragma unroll
  for (int mi = 0; mi < Cfg::kFragsM; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::kFragsN; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;

  for (int kt = 0; kt < k_tiles; ++kt) {
    // Slice kt's cp.async group is complete; the barrier publishes it (and every register
    // loader's stores) and guarantees that nobody still reads the stage refilled below, which
    // was last used by slice kt - 1.
    ptx::cp_async_wait<Cfg::kStages - 2>();
    __syncthreads();
    const int next = kt + Cfg::kStages - 1;
    if (next < k_tiles) loader.fetch(next);
    ptx::cp_async_commit();
    const uint8_t* stage = smem + (kt % Cfg::kStages) * Cfg::kStageBytes;
    warp_mma_slice<Cfg>(stage, stage + Cfg::kBlockM * Cfg::kBlockK * 2, acc);
    if (next < k_tiles) loader.store(next);
  }

  // Epilogue: + bias in f32, one rounding to bf16, straight from the accumulator fragments.
  // Rows past the group's end and rows whose row_map is negative (-1) are not stored.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / Cfg::kWarpsN, wn = warp % Cfg::kWarpsN;
  const float* bias = p.bias ? p.bias + int64_t(tile.group) * p.n : nullptr;
#pragma unroll
  for (int mi = 0; mi < Cfg::kFragsM; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = tile.row0 + wm * Cfg::kWarpTileM + mi * 16 + half * 8 + lane / 4;
      if (row >= tile.row_end) continue;
      if (p.row_map && p.row_map[row] < 0) continue;
      uint16_t* crow = p.c + int64_t(row) * p.n;
#pragma unroll
      for (int ni = 0; ni < Cfg::kFragsN; ++ni) {
        const int64_t col = n0 + wn * Cfg::kWarpTileN + ni * 8 + (lane % 4) * 2;
        float v0 = acc[mi][ni][half * 2], v1 = acc[mi][ni][half * 2 + 1];
        if (col + 1 < p.n) {
          if (bias) {
            v0 += bias[col];
            v1 += bias[col + 1];
          }
          const uint16_t h0 = f32_to_bf16(v0), h1 = f32_to_bf16(v1);
          if (p.c_pairs) {
            *reinterpret_cast<uint32_t*>(crow + col) = uint32_t(h0) | (uint32_t(h1) << 16);
          } else {
            crow[col] = h0;
            crow[col + 1] = h1;
          }
        } else if (col < p.n) {
          if (bias) v0 += bias[col];
          crow[col] = f32_to_bf16(v0);
        }
      }
    }
  }
}

// Grid of the upper-bound schedule; false when it does not fit a launch.
template <class Cfg>
bool grouped_mm_grid(GroupedMmParams* p, unsigned* grid) {
  const int64_t m_tiles = (int64_t(p->rows) + Cfg::kBlockM - 1) / Cfg::kBlockM + p->groups;
  const int64_t n_tiles = (p->n + Cfg::kBlockN - 1) / Cfg::kBlockN;
  if (m_tiles * n_tiles > INT_MAX) return false;
  p->m_tiles = int(m_tiles);
  *grid = unsigned(m_tiles * n_tiles);
  return true;
}

// Checks the sizes the kernel keeps in 32-bit registers, fills the grid fields and launches.
template <class Cfg, class Loader>
Status launch_grouped_mm(const char* fn, GroupedMmParams p, int64_t rows, int64_t groups,
                         cudaStream_t stream) {
  if (rows > INT_MAX || groups > INT_MAX - 1 || p.k > int64_t(INT_MAX) - Cfg::kBlockK)
    return set_error(FMOE_ERR_UNSUPPORTED, "%s: rows, groups or k exceed the CUDA kernel's "
                     "32-bit tile indices", fn);
  p.rows = int(rows);
  p.groups = int(groups);
  p.c_pairs = p.n % 2 == 0 && (reinterpret_cast<uintptr_t>(p.c) & 3) == 0;
  unsigned grid = 0;
  if (!grouped_mm_grid<Cfg>(&p, &grid))
    return set_error(FMOE_ERR_UNSUPPORTED, "%s: %lld rows x %lld columns need more tiles than "
                     "one launch holds", fn, (long long)rows, (long long)p.n);
  grouped_mm_kernel<Cfg, Loader><<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  FMOE_CHECK_LAUNCH("grouped_mm_kernel");
  return FMOE_OK;
}

template <class Cfg, class Loader>
Status grouped_mm_prepare() {
  FMOE_CHECK_CUDA(cudaFuncSetAttribute(grouped_mm_kernel<Cfg, Loader>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Cfg::kSmemBytes));
  return FMOE_OK;
}

}  // namespace fmoe::cuda
