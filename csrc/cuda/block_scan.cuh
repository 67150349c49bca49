// Block-wide sum and exclusive scan over one value per thread (blockDim.x a multiple of 32, at
// most 1024). Every thread of the block must call them; they contain __syncthreads.
#pragma once

#include <cstdint>

#include "cuda/mx_block.cuh"  // kFullWarp

namespace fmoe::cuda {

template <class T>
__device__ __forceinline__ T warp_inclusive_scan(T v) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    T u = __shfl_up_sync(kFullWarp, v, d);
    if (lane >= d) v += u;
  }
  return v;
}

// Returns the sum of `v` over threads before this one; *total gets the block's sum.
template <class T>
__device__ T block_exclusive_scan(T v, T* total) {
  __shared__ T warp_sums[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  T incl = warp_inclusive_scan(v);
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? warp_sums[lane] : T(0);
    w = warp_inclusive_scan(w);
    warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  T before = (warp == 0 ? T(0) : warp_sums[warp - 1]) + incl - v;
  *total = warp_sums[31];
  __syncthreads();  // warp_sums is reused by the next call
  return before;
}

template <class T>
__device__ T block_sum(T v) {
  T total;
  block_exclusive_scan(v, &total);
  return total;
}

}  // namespace fmoe::cuda
