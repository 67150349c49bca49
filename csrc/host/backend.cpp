// HostBackend: memory, streams that run their work on threads of their own, recorded graphs,
// clock events, and the dispatch of each op either to its stream or into the capturing stream's
// recording.
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <string>

#include "host/host_backend.h"

namespace fmoe {
namespace host {
namespace {

constexpr size_t kAlign = 256;

HostStream* as_host(BackendStream* s) { return reinterpret_cast<HostStream*>(s); }
BackendStream* as_backend(HostStream* s) { return reinterpret_cast<BackendStream*>(s); }
HostGraph* as_host(BackendGraph* g) { return reinterpret_cast<HostGraph*>(g); }
// An event handle owns one reference to its HostEvent and each queued record another: an event
// destroyed while records are still queued (as CUDA allows) lives until they have run.
using HostEventRef = std::shared_ptr<HostEvent>;
HostEventRef& as_host(BackendEvent* e) { return *reinterpret_cast<HostEventRef*>(e); }

class HostBackend final : public Backend {
 public:
  HostBackend() : pool_(default_host_threads()) {}

  fmoe_backend kind() const override { return FMOE_BACKEND_HOST; }

  Status device_name(std::string* out) override {
    const int n = pool_.threads();
    *out = "host (" + std::to_string(n) + (n == 1 ? " thread)" : " threads)");
    return FMOE_OK;
  }

  Status device_props(fmoe_device_props* out) override {
    out->backend = FMOE_BACKEND_HOST;
    out->device = -1;
    out->compute_capability = 0;
    out->multiprocessors = pool_.threads();
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    out->global_memory_bytes = pages > 0 && page > 0 ? int64_t(pages) * page : 0;
    out->l2_cache_bytes = 0;
    out->shared_memory_per_block_bytes = 0;
    return FMOE_OK;
  }

  ~HostBackend() override {
    // The core destroys its streams first; any left are joined here, while the pool they use is
    // still alive (the default stream's thread is joined by its own destructor, before the pool's).
    for (HostStream* s : streams_) delete s;
  }

  Status synchronize() override {
    Status first = default_stream_.synchronize();
    for (HostStream* s : streams_) {
      Status st = s->synchronize();
      if (first == FMOE_OK) first = st;
    }
    return first;
  }

  Status alloc(size_t bytes, void** out) override {
    // At least one aligned block, so a zero-byte buffer still has a unique address.
    size_t rounded = bytes == 0 ? kAlign : (bytes + kAlign - 1) / kAlign * kAlign;
    if (rounded < bytes)
      return set_error(FMOE_ERR_OUT_OF_MEMORY, "fmoe_alloc: %zu bytes is too large", bytes);
    void* p = std::aligned_alloc(kAlign, rounded);
    if (p == nullptr)
      return set_error(FMOE_ERR_OUT_OF_MEMORY, "fmoe_alloc: cannot allocate %zu bytes of host "
                       "memory", bytes);
    *out = p;
    return FMOE_OK;
  }

  Status free(void* ptr) override {
    // As cudaFree: the work queued on any stream may still use the buffer.
    Status st = synchronize();
    std::free(ptr);
    return st;
  }

  Status memcpy(void* dst, const void* src, size_t bytes, fmoe_memcpy_kind kind,
                BackendStream* s) override {
    HostStream* hs = stream(s);
    if (kind == FMOE_MEMCPY_DEVICE_TO_HOST) {
      // The caller reads `dst` on return: the stream's work before the copy comes first.
      FMOE_TRY(hs->synchronize());
      std::memmove(dst, src, bytes);
      return FMOE_OK;
    }
    if (kind == FMOE_MEMCPY_HOST_TO_DEVICE) {
      if (!hs->capturing && hs->idle()) {
        std::memmove(dst, src, bytes);  // nothing queued to order it after
        return FMOE_OK;
      }
      // The caller may reuse `src` on return: the copy runs in order, from a copy of its own.
      auto staged = std::make_shared<std::vector<uint8_t>>(static_cast<const uint8_t*>(src),
                                                           static_cast<const uint8_t*>(src) + bytes);
      return submit(s, [dst, staged]() -> Status {
        std::memmove(dst, staged->data(), staged->size());
        return FMOE_OK;
      });
    }
    return submit(s, [dst, src, bytes]() -> Status {
      std::memmove(dst, src, bytes);
      return FMOE_OK;
    });
  }

  Status memset(void* ptr, int value, size_t bytes, BackendStream* s) override {
    return submit(s, [ptr, value, bytes]() -> Status {
      std::memset(ptr, value, bytes);
      return FMOE_OK;
    });
  }

  Status stream_create(BackendStream** out) override {
    auto* s = new HostStream;
    streams_.insert(s);
    *out = as_backend(s);
    return FMOE_OK;
  }
  Status stream_destroy(BackendStream* s) override {
    HostStream* hs = as_host(s);
    Status st = hs->synchronize();
    streams_.erase(hs);
    delete hs;
    return st;
  }
  Status stream_synchronize(BackendStream* s) override { return stream(s)->synchronize(); }

  Status capture_begin(BackendStream* s) override {
    HostStream* hs = stream(s);
    if (hs->capturing)
      return set_error(FMOE_ERR_INVALID_STATE,
                       "fmoe_graph_capture_begin: the stream is already capturing");
    hs->capturing = true;
    hs->recorded.clear();
    return FMOE_OK;
  }

  Status capture_end(BackendStream* s, BackendGraph** out) override {
    HostStream* hs = stream(s);
    if (!hs->capturing)
      return set_error(FMOE_ERR_INVALID_STATE, "fmoe_graph_capture_end: the stream is not "
                       "capturing");
    auto* g = new HostGraph;
    g->ops = std::move(hs->recorded);
    hs->recorded.clear();
    hs->capturing = false;
    *out = reinterpret_cast<BackendGraph*>(g);
    return FMOE_OK;
  }

  Status graph_launch(BackendGraph* graph, BackendStream* s) override {
    HostGraph* g = as_host(graph);
    HostStream* hs = stream(s);
    if (hs->capturing) {  // a graph launched into a capture becomes part of it
      hs->recorded.insert(hs->recorded.end(), g->ops.begin(), g->ops.end());
      return FMOE_OK;
    }
    // The graph may be destroyed before its ops run: the closure holds copies of them.
    hs->enqueue([ops = g->ops]() -> Status {
      for (const Work& w : ops) FMOE_TRY(w());
      return FMOE_OK;
    });
    return FMOE_OK;
  }

  Status graph_destroy(BackendGraph* graph) override {
    delete as_host(graph);
    return FMOE_OK;
  }

  bool is_capturing(BackendStream* s) override { return stream(s)->capturing; }

  Status event_create(BackendEvent** out) override {
    *out = reinterpret_cast<BackendEvent*>(new HostEventRef(std::make_shared<HostEvent>()));
    return FMOE_OK;
  }
  Status event_destroy(BackendEvent* e) override {
    delete &as_host(e);
    return FMOE_OK;
  }
  Status event_record(BackendEvent* e, BackendStream* s) override {
    HostEventRef he = as_host(e);
    uint64_t number = 0;  // a record inside a capture completes nothing when replayed
    if (!stream(s)->capturing) {
      he->recorded = true;
      number = ++he->records;
    }
    // The raise releases what the stream's work wrote before it to whoever sees it complete.
    return submit(s, [he, number]() -> Status {
      he->at_ns.store(std::chrono::steady_clock::now().time_since_epoch().count(),
                      std::memory_order_relaxed);
      uint64_t seen = he->reached.load(std::memory_order_relaxed);
      while (seen < number &&
             !he->reached.compare_exchange_weak(seen, number, std::memory_order_release)) {
      }
      return FMOE_OK;
    });
  }
  Status event_elapsed_ms(BackendEvent* start, BackendEvent* end, double* out_ms) override {
    HostEvent *a = as_host(start).get(), *b = as_host(end).get();
    if (!a->recorded || !b->recorded)
      return set_error(FMOE_ERR_INVALID_STATE,
                       "fmoe_event_elapsed_ms: %s has not been recorded",
                       !a->recorded ? "start" : "end");
    FMOE_TRY(synchronize());
    using Ticks = std::chrono::steady_clock::duration;
    const Ticks elapsed = Ticks(b->at_ns.load()) - Ticks(a->at_ns.load());
    *out_ms = std::chrono::duration<double, std::milli>(elapsed).count();
    return FMOE_OK;
  }
  Status event_query(BackendEvent* e, bool* out_complete) override {
    *out_complete = as_host(e)->complete();
    return FMOE_OK;
  }

  // Ops: the arguments are copied into the closure, so a recording outlives the caller's struct.
  Status permute(BackendStream* s, const fmoe_permute_args& a) override {
    return submit(s, [this, a]() { return host::permute(pool_, a); });
  }
  Status activation_quant(BackendStream* s, const fmoe_activation_args& a) override {
    return submit(s, [this, a]() { return host::activation_quant(pool_, a); });
  }
  Status quantize_mxfp8(BackendStream* s, const uint16_t* in, int64_t rows, int64_t cols,
                        uint8_t* data, uint8_t* scale) override {
    return submit(s, [=]() { return host::quantize_mxfp8(pool_, in, rows, cols, data, scale); });
  }
  Status dequantize_mxfp8(BackendStream* s, const uint8_t* data, const uint8_t* scale,
                          int64_t rows, int64_t cols, float* out) override {
    return submit(s,
                  [=]() { return host::dequantize_mxfp8(pool_, data, scale, rows, cols, out); });
  }
  Status swizzle_scales(BackendStream* s, const uint8_t* in, int64_t batch, int64_t rows,
                        int64_t scale_cols, bool to_swizzled, uint8_t* out) override {
    return submit(s, [=]() {
      return host::swizzle_scales(in, batch, rows, scale_cols, to_swizzled, out);
    });
  }
  Status grouped_mm_bf16(BackendStream* s, const fmoe_grouped_mm_args& a) override {
    return submit(s, [this, a]() { return host::grouped_mm(pool_, a, false); });
  }
  Status grouped_mm_mxfp8(BackendStream* s, const fmoe_grouped_mm_args& a) override {
    return submit(s, [this, a]() { return host::grouped_mm(pool_, a, true); });
  }
  Status unpermute(BackendStream* s, const fmoe_unpermute_args& a) override {
    return submit(s, [this, a]() { return host::unpermute(pool_, a); });
  }
  Status route(BackendStream* s, const fmoe_route_args& a) override {
    return submit(s, [this, a]() { return host::route(pool_, a); });
  }
  Status expand_group_ids(BackendStream* s, const int32_t* tokens_per_expert,
                          int64_t num_local_experts, int64_t local_expert_start, int64_t rows,
                          int32_t* routing_rows) override {
    return submit(s, [=]() {
      return host::expand_group_ids(tokens_per_expert, num_local_experts, local_expert_start,
                                    rows, routing_rows);
    });
  }

 private:
  HostStream* stream(BackendStream* s) { return s == nullptr ? &default_stream_ : as_host(s); }

  // Queues `work` on its stream, or appends it to the recording of a capturing stream.
  Status submit(BackendStream* s, Work work) {
    HostStream* hs = stream(s);
    if (hs->capturing)
      hs->recorded.push_back(std::move(work));
    else
      hs->enqueue(std::move(work));
    return FMOE_OK;
  }

  // Declared before the streams: their threads use it until they are joined.
  ThreadPool pool_;
  std::set<HostStream*> streams_;  // created ones; the default stream is not among them
  HostStream default_stream_;
};

}  // namespace
}  // namespace host

Status make_host_backend(std::unique_ptr<Backend>* out) {
  *out = std::make_unique<host::HostBackend>();
  return FMOE_OK;
}

}  // namespace fmoe
