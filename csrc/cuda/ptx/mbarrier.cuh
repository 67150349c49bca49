// mbarrier: the shared-memory barriers that pair the copy engine with the tensor cores.
// PTX ISA: "Parallel Synchronization and Communication Instructions: mbarrier" (mbarrier.init,
// mbarrier.arrive, mbarrier.arrive.expect_tx, mbarrier.try_wait.parity) and "membar/fence"
// (fence.mbarrier_init).
//
// A barrier counts arrivals and, for the bulk copy engine, transaction bytes; a phase completes
// when both reach zero, then the barrier re-arms for the next phase. Waiters name the phase they
// wait for by its parity, so a ring of stages tracks one bit per pass around the ring.
#pragma once

#include <cstdint>

#include "cuda/ptx/cp_async.cuh"  // smem_addr

namespace fmoe::ptx {

// Steps a position around a ring of kStages stages: the next stage, and the parity a waiter names
// flipped each time the ring wraps.
template <int kStages>
__device__ __forceinline__ void next_stage(int& stage, uint32_t& phase) {
  if (++stage == kStages) {
    stage = 0;
    phase ^= 1;
  }
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals)
               : "memory");
}

// Makes initialised barriers visible to the async proxy (the copy engine completes on them).
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// One arrival plus `bytes` expected from bulk copies that complete_tx on this barrier.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Waits until the phase of parity `parity` has completed. On a freshly initialised barrier the
// phase of parity 1 (the one "before" phase 0) counts as complete, so a producer that waits with
// parity (pass ^ 1) passes its first trip around the ring without waiting.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

}  // namespace fmoe::ptx
