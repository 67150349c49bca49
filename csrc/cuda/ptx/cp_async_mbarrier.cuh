// cp.async completing on an mbarrier, and the small (4-byte) cp.async form: for stages that mix
// copy-engine tiles (TMA) with per-thread gathers into one shared-memory ring.
// PTX ISA: "Data Movement and Conversion Instructions: cp.async" (cp-size 4, src-size) and
// "cp.async.mbarrier.arrive".
#pragma once

#include <cstdint>

#include "cuda/ptx/cp_async.cuh"  // smem_addr

namespace fmoe::ptx {

// Copies the first `src_bytes` (0..4) bytes of the 4-byte word at `gmem_src` (4-byte aligned) and
// zero-fills the rest of the destination word: a word that straddles the end of a buffer reads
// only its bytes inside. .ca: the 4-byte form has no .cg variant.
__device__ __forceinline__ void cp_async_4_partial(void* smem_dst, const void* gmem_src,
                                                   uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

// Arrives on `bar` once every cp.async this thread issued before has landed. .noinc: the arrival
// is one of the barrier's expected arrivals (counted in its init count), not an extra one.
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar))
               : "memory");
}

}  // namespace fmoe::ptx
