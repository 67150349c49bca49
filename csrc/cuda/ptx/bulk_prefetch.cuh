// Bulk prefetch of global memory into L2 (sm_90): the copy engine fetches a contiguous range
// with no destination and no completion to wait for, a pure hint.
// PTX ISA: "Data Movement and Conversion Instructions: cp.async.bulk.prefetch".
#pragma once

#include <cstdint>

namespace fmoe::ptx {

// `gmem` 16-byte aligned, `bytes` a non-zero multiple of 16, the whole range inside one
// allocation.
__device__ __forceinline__ void bulk_prefetch_l2(const void* gmem, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(gmem), "r"(bytes)
               : "memory");
}

}  // namespace fmoe::ptx
