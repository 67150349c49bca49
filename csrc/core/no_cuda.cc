// Host-only build: the CUDA factory and queries report that CUDA is not compiled in.
#include "core/backend.h"

namespace fmoe {

Status make_cuda_backend(int64_t, std::unique_ptr<Backend>*) {
  return set_error(FMOE_ERR_UNSUPPORTED,
                   "fmoe_context_create: this library was built without CUDA (host only)");
}

int64_t cuda_device_count() { return 0; }

const char* cuda_build_info() { return ""; }

}  // namespace fmoe
