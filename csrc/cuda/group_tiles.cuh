// The per-CTA table of a grouped GEMM's work, read from the device-side group offsets (graph
// capture: no host sync). Shared by the Hopper prefill GEMM (grouped_mm_sm90.cu) and the decode
// GEMM (grouped_mm_small.cu), which cut groups into tiles of different heights.
#pragma once

#include <cstdint>

#include "cuda/block_scan.cuh"

namespace fmoe::cuda {

// Every thread of the block calls this (it has a __syncthreads at the end). For group g:
// s_start[g], s_end[g] = its rows, and s_prefix[g] = the tiles of `tile_rows` rows owned by the
// groups before it (s_prefix[groups] = all tiles). A group is kept iff 0 <= off[g] <= off[g+1]
// <= rows; any other gets no tiles (fmoe.h: a bad offset skips its group, never faults). The
// scan runs in warp 0, each lane over a contiguous run of groups.
__device__ __forceinline__ void build_group_tiles(const int32_t* offsets, int groups, int rows,
                                                  int tile_rows, int* s_start, int* s_end,
                                                  int* s_prefix) {
  const int tid = threadIdx.x;
  for (int g = tid; g < groups; g += blockDim.x) {
    const int lo = offsets[g], hi = offsets[g + 1];
    const bool ok = lo >= 0 && lo <= hi && hi <= rows;
    s_start[g] = ok ? lo : 0;
    s_end[g] = ok ? hi : 0;
    s_prefix[g + 1] = ok ? (hi - lo + tile_rows - 1) / tile_rows : 0;
  }
  __syncthreads();
  if (tid < 32) {
    const int chunk = (groups + 31) / 32;
    const int lo = min(groups, tid * chunk), hi = min(groups, lo + chunk);
    int sum = 0;
    for (int i = lo; i < hi; ++i) sum += s_prefix[i + 1];
    int run = warp_inclusive_scan(sum) - sum;
    for (int i = lo; i < hi; ++i) {
      run += s_prefix[i + 1];
      s_prefix[i + 1] = run;
    }
    if (tid == 0) s_prefix[0] = 0;
  }
  __syncthreads();
}

}  // namespace fmoe::cuda
