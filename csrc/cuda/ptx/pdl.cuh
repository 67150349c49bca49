// Programmatic dependent launch (PDL, sm_90): a kernel launched with the attribute
// cudaLaunchAttributeProgrammaticStreamSerialization may start while the kernel before it in the
// stream is still running, so its launch latency and its prologue (barrier init, tensor-map
// prefetch, shared-memory carve-up) overlap the previous kernel's tail.
// PTX ISA: "Parallel Synchronization and Communication Instructions: griddepcontrol"
// (griddepcontrol.wait, griddepcontrol.launch_dependents).
//
// The contract every kernel launched with launch_pdl keeps:
//  - grid_dependency_wait() runs before the first read of memory an earlier kernel writes AND
//    before the first write of memory an earlier kernel reads. It returns once the prerequisite
//    grid has completed and its memory operations are visible; on a kernel launched without the
//    attribute it returns at once.
//  - It runs in every CTA, with no early exit before it: the prerequisite grid's completion is
//    then implied by this grid's completion, so the ordering chains through a sequence of PDL
//    kernels (a kernel two launches later that reads this one's predecessor's output is safe).
//  - launch_dependents() only lets the next kernel be scheduled earlier (its CTAs then wait in
//    their own grid_dependency_wait); it never makes this kernel's writes visible early. The
//    first call in a CTA counts, later ones do nothing.
// A kernel without the wait must never be launched with the attribute. Graph capture records
// the programmatic edge, so the same launches are correct under capture and called directly.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace fmoe::ptx {

__device__ __forceinline__ void grid_dependency_wait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

__device__ __forceinline__ void launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

}  // namespace fmoe::ptx

namespace fmoe::cuda {

inline cudaLaunchAttribute pdl_attribute() {
  cudaLaunchAttribute a = {};
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
  return a;
}

// `kernel<<<grid, block, smem, stream>>>(args...)` with the PDL attribute; the kernel must call
// ptx::grid_dependency_wait() as described above. Returns the launch's error.
template <class... Params, class... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                       cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1] = {pdl_attribute()};
  cudaLaunchConfig_t lc = {};
  lc.gridDim = grid;
  lc.blockDim = block;
  lc.dynamicSmemBytes = smem;
  lc.stream = stream;
  lc.attrs = attr;
  lc.numAttrs = 1;
  return cudaLaunchKernelEx(&lc, kernel, std::forward<Args>(args)...);
}

}  // namespace fmoe::cuda
