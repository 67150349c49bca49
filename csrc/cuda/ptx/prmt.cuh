// Byte permute with the sign-replicating selectors. PTX ISA: "Integer Arithmetic Instructions:
// prmt" (default mode): each selector nibble picks one of the 8 bytes of {b, a} with its 3 low
// bits, and its high bit replicates that byte's sign bit over the result byte. CUDA's
// __byte_perm masks the high bits away (it compiles its selector & 0x7777), so the replicating
// form needs the instruction itself.
#pragma once

#include <cstdint>

namespace fmoe::ptx {

template <uint32_t kSelector>
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "n"(kSelector));
  return r;
}

}  // namespace fmoe::ptx
