// The host (CPU) backend: the reference semantics of every op, and the fallback where no GPU is
// present. Memory is host memory; streams are synchronous; graph capture records closures.
//
// The handle types are the host's own (HostStream, ...) and cross the Backend interface as
// reinterpret_cast'ed BackendStream* etc.: defining fmoe::BackendStream here would give the
// library two definitions of one class once the CUDA backend defines its own.
#pragma once

#include <chrono>
#include <functional>
#include <vector>

#include "core/backend.h"
#include "host/thread_pool.h"

namespace fmoe::host {

using Work = std::function<Status()>;

struct HostStream {
  bool capturing = false;
  std::vector<Work> recorded;
};

struct HostGraph {
  std::vector<Work> ops;
};

struct HostEvent {
  bool recorded = false;
  std::chrono::steady_clock::time_point at;
};

// The ops, run immediately (each in its own file).
Status permute(ThreadPool& pool, const fmoe_permute_args& a);
Status activation_quant(ThreadPool& pool, const fmoe_activation_args& a);
Status quantize_mxfp8(ThreadPool& pool, const uint16_t* in, int64_t rows, int64_t cols,
                      uint8_t* data, uint8_t* scale);
Status dequantize_mxfp8(ThreadPool& pool, const uint8_t* data, const uint8_t* scale,
                        int64_t rows, int64_t cols, float* out);
Status swizzle_scales(const uint8_t* in, int64_t batch, int64_t rows, int64_t scale_cols,
                      bool to_swizzled, uint8_t* out);
Status grouped_mm(ThreadPool& pool, const fmoe_grouped_mm_args& a, bool mxfp8);
Status unpermute(ThreadPool& pool, const fmoe_unpermute_args& a);
Status expand_group_ids(const int32_t* tokens_per_expert, int64_t num_local_experts,
                        int64_t local_expert_start, int64_t rows, int32_t* routing_rows);

}  // namespace fmoe::host
