// The CUDA backend: one object per context, bound to one device. Each op's launcher is a method
// defined in that op's .cu file (permute.cu, activation.cu, quantize.cu, grouped_mm_bf16.cu,
// grouped_mm_mxfp8.cu, unpermute.cu, route.cu); backend.cu holds the context, memory, stream, graph and
// event methods.
//
// Every method starts with activate() (cudaSetDevice): contexts of different devices may be used
// from one thread, and one context from several threads (the core serialises calls per context).
#pragma once

#include <cuda_runtime.h>

#include <set>
#include <string>

#include "core/backend.h"
#include "cuda/cuda_check.h"

namespace fmoe {
struct MoeCall;  // core/moe_call.h
namespace cuda {
struct ActEpilogue;  // cuda/grouped_mm_sm90.h

// The CUDA objects behind the core's opaque BackendStream / BackendGraph / BackendEvent
// pointers. They are distinct types (and the handles are converted with reinterpret_cast)
// because the host backend, linked into the same library, defines its own objects: one
// definition of fmoe::BackendStream per program would otherwise be two.
struct Stream {
  cudaStream_t stream;
};
struct Graph {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
};
struct Event {
  cudaEvent_t event;
};

// How the MXFP8 quantize kernel is launched against the kernel ahead on the stream (quantize.cu):
// plainly; as a programmatic dependent whose input that kernel does not write (the decode layer's
// input, quantized beside the routing kernel); or as one that waits for it before reading.
enum QuantizeOverlap { kNoOverlap = 0, kBesideInput = 1, kAfterPrevious = 2 };

// Called once per context by make_cuda_backend (device already current): raises the dynamic
// shared-memory limit of the kernels that need more than 48 KiB. Done here, not at launch,
// because a launch may be inside a stream capture.
Status permute_prepare_device(int max_smem_optin);
Status grouped_mm_bf16_prepare_device();
Status grouped_mm_mxfp8_prepare_device();

}  // namespace cuda

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, cudaStream_t default_stream, const cudaDeviceProp& props,
              int max_smem_optin);
  ~CudaBackend() override;

  fmoe_backend kind() const override { return FMOE_BACKEND_CUDA; }
  Status device_name(std::string* out) override;
  Status device_props(fmoe_device_props* out) override;
  Status synchronize() override;

  Status alloc(size_t bytes, void** out) override;
  Status free(void* ptr) override;
  Status memcpy(void* dst, const void* src, size_t bytes, fmoe_memcpy_kind kind,
                BackendStream* stream) override;
  Status memset(void* ptr, int value, size_t bytes, BackendStream* stream) override;

  Status stream_create(BackendStream** out) override;
  Status stream_destroy(BackendStream* stream) override;
  Status stream_synchronize(BackendStream* stream) override;

  Status capture_begin(BackendStream* stream) override;
  Status capture_end(BackendStream* stream, BackendGraph** out) override;
  Status graph_launch(BackendGraph* graph, BackendStream* stream) override;
  Status graph_destroy(BackendGraph* graph) override;
  bool is_capturing(BackendStream* stream) override;

  Status event_create(BackendEvent** out) override;
  Status event_destroy(BackendEvent* event) override;
  Status event_record(BackendEvent* event, BackendStream* stream) override;
  Status event_elapsed_ms(BackendEvent* start, BackendEvent* end, double* out_ms) override;
  Status event_query(BackendEvent* event, bool* out_complete) override;

  // Ops: each defined in its own .cu file.
  Status permute(BackendStream* s, const fmoe_permute_args& a) override;
  Status activation_quant(BackendStream* s, const fmoe_activation_args& a) override;
  Status quantize_mxfp8(BackendStream* s, const uint16_t* in, int64_t rows, int64_t cols,
                        uint8_t* data, uint8_t* scale) override;
  // quantize_mxfp8, optionally launched as a programmatic dependent of the kernel ahead
  // (cuda::QuantizeOverlap).
  Status quantize_mxfp8_launch(BackendStream* s, const uint16_t* in, int64_t rows, int64_t cols,
                               uint8_t* data, uint8_t* scale, cuda::QuantizeOverlap overlap);
  Status dequantize_mxfp8(BackendStream* s, const uint8_t* data, const uint8_t* scale,
                          int64_t rows, int64_t cols, float* out) override;
  // The MXFP8 round trip of bf16 [rows, cols] (cols % 64 == 0, 16-byte aligned rows) in the k
  // order of grouped_mm_sm90_mx_regs (mx_block.cuh); out may be in.
  Status mx_round_trip_k_order(BackendStream* s, const uint16_t* in, int64_t rows, int64_t cols,
                               uint16_t* out);
  Status swizzle_scales(BackendStream* s, const uint8_t* in, int64_t batch, int64_t rows,
                        int64_t scale_cols, bool to_swizzled, uint8_t* out) override;
  Status grouped_mm_bf16(BackendStream* s, const fmoe_grouped_mm_args& a) override;
  Status grouped_mm_mxfp8(BackendStream* s, const fmoe_grouped_mm_args& a) override;
  Status unpermute(BackendStream* s, const fmoe_unpermute_args& a) override;
  Status route(BackendStream* s, const fmoe_route_args& a) override;
  // permute; with mx_round_trip (a.permuted set, a.permuted_q not, hidden_size % 64 == 0) the
  // bf16 copy then holds what mx_round_trip_k_order would make of it.
  Status permute_launch(BackendStream* s, const fmoe_permute_args& a, bool mx_round_trip);
  // unpermute, optionally launched as a programmatic dependent of the kernel ahead (decode).
  Status unpermute_launch(BackendStream* s, const fmoe_unpermute_args& a, bool overlap_previous);
  // grouped_mm_bf16 (the Hopper kernel where it applies, else the mma.sync one); tile_counter, when
  // set, is handed to the Hopper kernel for dynamic tiles (grouped_mm_sm90.h: one int32, zero when
  // the launch starts, no other launch using it meanwhile) and unused by the mma.sync kernel.
  Status grouped_mm_bf16_launch(BackendStream* s, const fmoe_grouped_mm_args& a,
                                int32_t* tile_counter);
  Status expand_group_ids(BackendStream* s, const int32_t* tokens_per_expert,
                          int64_t num_local_experts, int64_t local_expert_start, int64_t rows,
                          int32_t* routing_rows) override;
  // The layer with FC1 and the activation fused (fused_moe.cu); the default composition where
  // the fused kernel does not apply.
  Status fused_moe(BackendStream* s, const PlanShape& shape, const fmoe_moe_args& a,
                   int32_t* invalid_count) override;

 private:
  // The decode path of fused_moe (fused_moe.cu): sets *handled when it ran the layer; leaves it
  // false, having enqueued nothing, when the call is not a decode call or its shapes do not fit.
  Status fused_moe_decode(BackendStream* s, const PlanShape& shape, const fmoe_moe_args& a,
                          int32_t* invalid_count, bool* handled);
  // The MXFP8 prefill path with the weights dequantized in registers (fused_moe.cu), under the
  // same contract: *handled false and nothing enqueued when its shapes do not fit.
  Status fused_moe_mx_regs(BackendStream* s, const MoeCall& call, int64_t rows,
                           const fmoe_grouped_mm_args& fc1, const cuda::ActEpilogue& act,
                           int32_t* invalid_count, bool* handled);
  Status activate() {
    FMOE_CHECK_CUDA(cudaSetDevice(device_));
    return FMOE_OK;
  }
  // nullptr = the context's default stream (a real non-blocking stream, never the legacy NULL
  // stream: capture needs a real stream and the legacy one would serialise with everything).
  cudaStream_t stream_of(BackendStream* s) const {
    return s ? reinterpret_cast<cuda::Stream*>(s)->stream : default_stream_;
  }

  int device_;
  cudaStream_t default_stream_;
  cudaDeviceProp props_;
  int max_smem_optin_;
  // Streams created on this context, so that synchronize() waits for all of them without
  // cudaDeviceSynchronize (which would also wait for other contexts' work on the device).
  std::set<cuda::Stream*> streams_;
};

}  // namespace fmoe
