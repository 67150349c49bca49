// Errors are values on the CUDA side too: a failing runtime call becomes FMOE_ERR_CUDA plus a
// thread-local message naming the call, the runtime's reason and where it happened, and the
// enclosing function returns that status. Nothing aborts.
#pragma once

#include <cuda_runtime.h>

#include "core/status.h"

namespace fmoe {

inline Status cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  // Clears the runtime's per-thread last error so that the next launch check does not report
  // this failure a second time. (A sticky error, e.g. a kernel fault, stays: the context is
  // unusable then and every later call says so.)
  (void)cudaGetLastError();
  Status code = err == cudaErrorMemoryAllocation ? FMOE_ERR_OUT_OF_MEMORY : FMOE_ERR_CUDA;
  return set_error(code, "%s failed: %s (%s:%d)", what, cudaGetErrorString(err), file, line);
}

}  // namespace fmoe

#define FMOE_CHECK_CUDA(call)                                                          \
  do {                                                                                 \
    cudaError_t fmoe_cuda_err_ = (call);                                               \
    if (fmoe_cuda_err_ != cudaSuccess)                                                 \
      return ::fmoe::cuda_error(fmoe_cuda_err_, #call, __FILE__, __LINE__);            \
  } while (0)

// After every <<<...>>>: a launch reports its configuration errors (too much shared memory, a
// grid dimension out of range) only through cudaGetLastError.
#define FMOE_CHECK_LAUNCH(kernel_name)                                                 \
  do {                                                                                 \
    cudaError_t fmoe_cuda_err_ = cudaGetLastError();                                   \
    if (fmoe_cuda_err_ != cudaSuccess)                                                 \
      return ::fmoe::cuda_error(fmoe_cuda_err_, "launch of " kernel_name, __FILE__, __LINE__); \
  } while (0)
