// Programmatic dependent launch: a kernel launched with the programmatic stream serialization
// attribute may start before the kernel ahead of it on the stream has finished.
// PTX ISA: "Parallel Synchronization and Communication Instructions: griddepcontrol".
//
// launch_dependents: this CTA no longer holds back the next kernel's launch (the next kernel
// starts once every CTA has said so or exited). wait: blocks until every prerequisite grid has
// completed and its memory is visible. Both are no-ops in a kernel launched without the
// attribute, so a kernel can carry them whatever its launcher decides.
#pragma once

namespace fmoe::ptx {

__device__ __forceinline__ void griddep_launch_dependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

__device__ __forceinline__ void griddep_wait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

}  // namespace fmoe::ptx
