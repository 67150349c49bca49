// Programmatic dependent launch: a kernel launched with the programmatic stream serialization
// attribute may start before the kernel ahead of it on the stream has finished.
// PTX ISA: "Parallel Synchronization and Communication Instructions: griddepcontrol".
//
// launch_dependents: this CTA no longer holds back the next kernel's launch (the next kernel
// starts once every CTA has said so or exited). wait: blocks until every prerequisite grid has
// completed and its memory is visible. Both are no-ops in a kernel launched without the
// attribute, so a kernel can carry them whatever its launcher decides.
#pragma once

#include <cuda_runtime.h>

namespace fmoe::ptx {

__device__ __forceinline__ void griddep_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

__device__ __forceinline__ void griddep_wait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

}  // namespace fmoe::ptx

namespace fmoe::cuda {

// The host side: sets on `lc` the attribute that launches its kernel as a programmatic dependent
// of the kernel ahead on the stream, when `overlap_previous` (else no attribute). `attr` backs
// lc.attrs and must live until the launch.
inline void set_programmatic_launch(cudaLaunchConfig_t* lc, cudaLaunchAttribute* attr,
                                    bool overlap_previous) {
  attr->id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr->val.programmaticStreamSerializationAllowed = 1;
  lc->attrs = overlap_previous ? attr : nullptr;
  lc->numAttrs = overlap_previous ? 1 : 0;
}

}  // namespace fmoe::cuda
