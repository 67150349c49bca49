// Thread block clusters of two CTAs that share operand tiles: the CTA's rank, the other CTA's
// shared memory, barrier arrivals on it, and the cluster-wide barrier.
// PTX ISA: "Special registers: %cluster_ctarank", "Data Movement: mapa", "mbarrier.arrive"
// (.shared::cluster), "mbarrier.try_wait" (.acquire.cluster) and "barrier.cluster".
#pragma once

#include <cstdint>

#include "cuda/ptx/cp_async.cuh"  // smem_addr

namespace fmoe::ptx {

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}

// The shared::cluster address of `p` (this CTA's shared memory) in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t cluster_peer_addr(const void* p, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(smem_addr(p)), "r"(rank));
  return out;
}

// One arrival on a barrier of another CTA of the cluster (an address from cluster_peer_addr).
// kClusterScope orders this thread's earlier memory operations for the whole cluster; without it
// only for its own CTA, which is enough where the arrival only vouches that this CTA has
// finished reading its own shared memory.
template <bool kClusterScope>
__device__ __forceinline__ void mbar_arrive_peer(uint32_t bar) {
  if constexpr (kClusterScope)
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(bar)
                 : "memory");
  else
    asm volatile("mbarrier.arrive.release.cta.shared::cluster.b64 _, [%0];\n" ::"r"(bar)
                 : "memory");
}

// mbar_wait that acquires what the other CTA released before its arrival (cluster scope).
__device__ __forceinline__ void mbar_wait_cluster(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void st_shared_peer_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared::cluster.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

// Every thread of the cluster arrives and waits (threads need not be converged).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

}  // namespace fmoe::ptx
