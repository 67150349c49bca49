// Bulk tensor copies (TMA): global -> shared tiles described by a CUtensorMap.
// PTX ISA: "Data Movement and Conversion Instructions: cp.async.bulk.tensor" (tile mode,
// .mbarrier::complete_tx::bytes completion, .multicast::cluster) and "prefetch.tensormap".
//
// The map is a __grid_constant__ kernel parameter; its generic address is what the instruction
// takes. Out-of-bounds box elements are written as zeros and still count toward the barrier's
// transaction bytes, so a stage always expects the full box size.
#pragma once

#include <cstdint>

#include "cuda/ptx/cp_async.cuh"  // smem_addr

namespace fmoe::ptx {

__device__ __forceinline__ void tma_prefetch_map(const void* tensor_map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tensor_map))
               : "memory");
}

// Loads the box at coordinates (c0 = innermost, c1) into `smem_dst` (aligned to the swizzle
// span: 1024 bytes for 128-byte swizzle) and signals `bar` with its byte count.
__device__ __forceinline__ void tma_load_2d(void* smem_dst, const void* tensor_map, uint64_t* bar,
                                            int32_t c0, int32_t c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}

// tma_load_2d into the same shared-memory offset of every CTA in `ctas` (a bit per cluster rank),
// signalling the barrier at `bar`'s offset in each.
__device__ __forceinline__ void tma_load_2d_multicast(void* smem_dst, const void* tensor_map,
                                                      uint64_t* bar, int32_t c0, int32_t c1,
                                                      uint16_t ctas) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1),
      "h"(ctas)
      : "memory");
}

}  // namespace fmoe::ptx
