// The interface every backend implements. The ABI entry points (csrc/core/api.cpp) validate
// arguments once, for all backends, and then call these methods with arguments known to be
// consistent: required pointers non-null, sizes in range, buffers that lie in a tracked allocation
// large enough. A backend only computes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "fmoe.h"
#include "core/status.h"

namespace fmoe {

// Opaque to the core: each backend defines its own.
struct BackendStream;
struct BackendGraph;
struct BackendEvent;

// Static shape of one fused MoE layer after validation.
struct PlanShape {
  fmoe_plan_desc desc;
  int64_t n1;        // FC1 outputs: ffn or 2*ffn
  int64_t max_rows;  // fmoe_max_rows(max_tokens, topk, E_local, alignment)
};

constexpr int kTileCounters = 4;

// Where each intermediate of fused_moe lives inside the workspace. Computed by the core from the
// plan alone (see plan_workspace_layout), identical for every backend.
struct WorkspaceLayout {
  size_t expert_offsets;   // i32 [E_local + 1]
  size_t permutation_map;  // i32 [max_rows]
  size_t inverse_map;      // i32 [max_rows] (T*topk entries used; skip-permute: T)
  size_t routing_rows;     // i32 [max_rows]: skip-permute mode's synthetic routing map
  size_t permuted;         // bf16 [max_rows, H] (bf16), or e4m3 [max_rows, H] (mxfp8);
                           // reused for the FC2 output bf16 [max_rows, H]
  size_t permuted_scale;   // e8m0 [max_rows, H/32] (mxfp8 only)
  size_t fc1_out;          // bf16 [max_rows, N1]
  size_t act_out;          // bf16 [max_rows, I], or e4m3 [max_rows, I] (mxfp8)
  size_t act_scale;        // e8m0 [max_rows, I/32] (mxfp8 only)
  size_t tile_counters;    // i32 [kTileCounters]: a backend's GEMM schedulers (zeroed per call)
  size_t total_bytes;
};
WorkspaceLayout plan_workspace_layout(const PlanShape& shape);

class Backend {
 public:
  virtual ~Backend() = default;

  virtual fmoe_backend kind() const = 0;
  virtual Status device_name(std::string* out) = 0;
  virtual Status device_props(fmoe_device_props* out) = 0;  // size already checked
  virtual Status synchronize() = 0;                          // all streams

  virtual Status alloc(size_t bytes, void** out) = 0;  // bytes may be 0
  virtual Status free(void* ptr) = 0;
  // stream == nullptr: the default stream.
  virtual Status memcpy(void* dst, const void* src, size_t bytes, fmoe_memcpy_kind kind,
                        BackendStream* stream) = 0;
  virtual Status memset(void* ptr, int value, size_t bytes, BackendStream* stream) = 0;

  virtual Status stream_create(BackendStream** out) = 0;
  virtual Status stream_destroy(BackendStream* stream) = 0;
  virtual Status stream_synchronize(BackendStream* stream) = 0;

  virtual Status capture_begin(BackendStream* stream) = 0;
  virtual Status capture_end(BackendStream* stream, BackendGraph** out) = 0;
  virtual Status graph_launch(BackendGraph* graph, BackendStream* stream) = 0;
  virtual Status graph_destroy(BackendGraph* graph) = 0;
  // True while `stream` (nullptr = default) is capturing; memcpy to/from the host is refused then.
  virtual bool is_capturing(BackendStream* stream) = 0;

  // Events (timing, waiting). Defaults report FMOE_ERR_UNSUPPORTED.
  virtual Status event_create(BackendEvent** out);
  virtual Status event_destroy(BackendEvent* event);
  virtual Status event_record(BackendEvent* event, BackendStream* stream);
  virtual Status event_elapsed_ms(BackendEvent* start, BackendEvent* end, double* out_ms);
  virtual Status event_query(BackendEvent* event, bool* out_complete);

  // Ops. Arguments are validated (see api.cpp); semantics are those of fmoe.h.
  virtual Status permute(BackendStream* s, const fmoe_permute_args& a) = 0;
  virtual Status activation_quant(BackendStream* s, const fmoe_activation_args& a) = 0;
  virtual Status quantize_mxfp8(BackendStream* s, const uint16_t* in, int64_t rows, int64_t cols,
                                uint8_t* data, uint8_t* scale) = 0;
  virtual Status dequantize_mxfp8(BackendStream* s, const uint8_t* data, const uint8_t* scale,
                                  int64_t rows, int64_t cols, float* out) = 0;
  // to_swizzled: linear -> swizzled when true, swizzled -> linear when false.
  virtual Status swizzle_scales(BackendStream* s, const uint8_t* in, int64_t batch, int64_t rows,
                                int64_t scale_cols, bool to_swizzled, uint8_t* out) = 0;
  virtual Status grouped_mm_bf16(BackendStream* s, const fmoe_grouped_mm_args& a) = 0;
  virtual Status grouped_mm_mxfp8(BackendStream* s, const fmoe_grouped_mm_args& a) = 0;
  virtual Status unpermute(BackendStream* s, const fmoe_unpermute_args& a) = 0;
  virtual Status route(BackendStream* s, const fmoe_route_args& a) = 0;
  // Skip-permute helper: routing_rows[r] = local_expert_start + e for the rows of group e (groups
  // taken in order with tokens_per_expert[e] rows each), -1 for rows beyond their sum.
  virtual Status expand_group_ids(BackendStream* s, const int32_t* tokens_per_expert,
                                  int64_t num_local_experts, int64_t local_expert_start,
                                  int64_t rows, int32_t* routing_rows) = 0;

  // The whole layer. The default composes the ops above through the workspace layout
  // (core/fused_moe.cpp); a backend may override it with fused kernels of its own.
  virtual Status fused_moe(BackendStream* s, const PlanShape& shape, const fmoe_moe_args& a,
                           int32_t* invalid_count);
};

// Factories. make_cuda_backend returns FMOE_ERR_UNSUPPORTED in a host-only build.
Status make_host_backend(std::unique_ptr<Backend>* out);
Status make_cuda_backend(int64_t device, std::unique_ptr<Backend>* out);
int64_t cuda_device_count();  // 0 without CUDA
const char* cuda_build_info(); // "" without CUDA, else e.g. "cuda 13.0 sm_90a"

}  // namespace fmoe
