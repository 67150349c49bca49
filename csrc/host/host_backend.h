// The host (CPU) backend: the reference semantics of every op, and the fallback where no GPU is
// present. Memory is host memory; each stream runs its work in order on a thread of its own;
// graph capture records closures.
//
// The handle types are the host's own (HostStream, ...) and cross the Backend interface as
// reinterpret_cast'ed BackendStream* etc.: defining fmoe::BackendStream here would give the
// library two definitions of one class once the CUDA backend defines its own.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/backend.h"
#include "host/thread_pool.h"

namespace fmoe::host {

using Work = std::function<Status()>;

// A stream: its work runs in order on a thread of its own, started with the first work, so an op
// returns at once and the caller's thread (a server's event loop) stays free, as with a CUDA
// stream. While the stream captures, work is recorded instead (by the backend, on the caller's
// thread: `capturing` and `recorded` are the caller's alone).
class HostStream {
 public:
  HostStream() = default;
  HostStream(const HostStream&) = delete;
  HostStream& operator=(const HostStream&) = delete;
  ~HostStream();  // runs what is queued, then joins the thread

  void enqueue(Work work);
  // True when nothing is queued or running.
  bool idle();
  // Waits until the stream is idle. Returns the first failure of the work run since the last
  // synchronize (its message as the caller's fmoe_last_error), and forgets it.
  Status synchronize();

  bool capturing = false;
  std::vector<Work> recorded;

 private:
  void run_queue();

  std::mutex mu_;
  std::condition_variable wake_, idle_;
  std::deque<Work> queue_;
  bool running_ = false;
  bool stop_ = false;
  std::thread thread_;
  Status error_ = FMOE_OK;
  std::string error_message_;
};

struct HostGraph {
  std::vector<Work> ops;
};

// An event's records are numbered (on the caller's thread); its streams' threads raise `reached`
// to the number of each record they pass, so the newest record decides completion, as on CUDA.
struct HostEvent {
  bool recorded = false;            // record() was called outside a capture
  uint64_t records = 0;             // records made outside a capture
  std::atomic<uint64_t> reached{0};
  std::atomic<int64_t> at_ns{0};    // steady_clock time of the last record reached
  bool complete() const { return reached.load(std::memory_order_acquire) >= records; }
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
Status route(ThreadPool& pool, const fmoe_route_args& a);
Status expand_group_ids(const int32_t* tokens_per_expert, int64_t num_local_experts,
                        int64_t local_expert_start, int64_t rows, int32_t* routing_rows);

// One row of `cols` bf16 values (a multiple of 32) quantized to MXFP8: the bytes and scales of
// core/numerics.h's mx_quantize_block, block after block; and n MXFP8 values (a multiple of 32)
// with their n / 32 scales dequantized as its mx_dequantize does (quantize.cpp).
void mx_quantize_row(const uint16_t* in, int64_t cols, uint8_t* data, uint8_t* scale);
void mx_dequantize_row(const uint8_t* data, const uint8_t* scale, int64_t n, float* out);

// The widest vectors of f32 this CPU runs (4, 8 or 16), capped by FMOE_HOST_SIMD=sse|avx2;
// probed once (grouped_mm.cpp).
int host_vector_floats();

}  // namespace fmoe::host
