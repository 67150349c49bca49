// The C ABI (include/fmoe.h): contexts, memory, streams, graphs, events and the single ops.
// Every entry point validates its arguments here, once for all backends, before the backend is
// called; plans and the fused op live in plan.cpp and fused_moe.cpp.
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/context.h"
#include "core/route_math.h"

using namespace fmoe;

namespace {

// The context handle, checked before its mutex is taken.
#define FMOE_CHECK_CTX(fn)                                                                  \
  do {                                                                                      \
    if (ctx == nullptr) return set_error(FMOE_ERR_INVALID_ARGUMENT, fn ": ctx is NULL"); \
  } while (0)

}  // namespace

// ---------------------------------------------------------------------------------------------
// Library
// ---------------------------------------------------------------------------------------------

extern "C" FMOE_API int fmoe_abi_version(int64_t* out_version) {
  return abi_call("fmoe_abi_version", [&]() -> Status {
    FMOE_CHECK_ARG(out_version != nullptr, "fmoe_abi_version", "out_version is NULL");
    *out_version = FMOE_ABI_VERSION;
    return FMOE_OK;
  });
}

extern "C" FMOE_API const char* fmoe_build_info(void) {
  static const std::string info = [] {
    std::string s = "fused-moe 0.1.0 (abi " + std::to_string(FMOE_ABI_VERSION) + "): ";
    const char* cuda = cuda_build_info();
    if (cuda != nullptr && cuda[0] != '\0') {
      s += "host + ";
      s += cuda;
    } else {
      s += "host only (built without CUDA)";
    }
    return s;
  }();
  return info.c_str();
}

extern "C" FMOE_API int fmoe_cuda_device_count(int64_t* out_count) {
  return abi_call("fmoe_cuda_device_count", [&]() -> Status {
    FMOE_CHECK_ARG(out_count != nullptr, "fmoe_cuda_device_count", "out_count is NULL");
    *out_count = cuda_device_count();
    return FMOE_OK;
  });
}

// ---------------------------------------------------------------------------------------------
// Contexts
// ---------------------------------------------------------------------------------------------

extern "C" FMOE_API int fmoe_context_create(int64_t backend, int64_t device,
                                            fmoe_context_t* out_ctx) {
  return abi_call("fmoe_context_create", [&]() -> Status {
    Check c(nullptr, "fmoe_context_create");
    c.not_null(out_ctx, "out_ctx")
        .in_range(backend, FMOE_BACKEND_AUTO, FMOE_BACKEND_CUDA, "backend");
    FMOE_TRY(c.status());
    *out_ctx = nullptr;
    std::unique_ptr<Backend> impl;
    if (backend == FMOE_BACKEND_AUTO)
      backend = cuda_device_count() > 0 ? FMOE_BACKEND_CUDA : FMOE_BACKEND_HOST;
    // The ordinal matters to cuda only; host ignores it, whatever its value.
    if (backend == FMOE_BACKEND_CUDA) FMOE_TRY(c.at_least(device, 0, "device").status());
    if (backend == FMOE_BACKEND_CUDA)
      FMOE_TRY(make_cuda_backend(device, &impl));
    else
      FMOE_TRY(make_host_backend(&impl));
    fmoe_device_props props{};
    props.size = sizeof props;
    FMOE_TRY(impl->device_props(&props));
    // At most 2 GiB of freed buffers, and a sixteenth of the memory (of a small host's RAM);
    // FMOE_BUFFER_CACHE=0 frees every buffer at once (for comparisons).
    size_t cache_bytes =
        std::min(size_t(2) << 30, size_t(std::max<int64_t>(props.global_memory_bytes, 0)) / 16);
    const char* cache_env = std::getenv("FMOE_BUFFER_CACHE");
    if (cache_env != nullptr && std::strcmp(cache_env, "0") == 0) cache_bytes = 0;
    auto* ctx = new fmoe_context_s;
    ctx->buffer_cache = std::make_unique<BufferCache>(impl.get(), cache_bytes);
    ctx->backend = std::move(impl);
    *out_ctx = ctx;
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_context_destroy(fmoe_context_t ctx) {
  return abi_call("fmoe_context_destroy", [&]() -> Status {
    if (ctx == nullptr) return FMOE_OK;
    Status first = FMOE_OK;
    auto keep = [&](Status s) {
      if (first == FMOE_OK) first = s;
    };
    {
      std::lock_guard<std::mutex> lock(ctx->mu);
      Backend& b = *ctx->backend;
      keep(b.synchronize());
      // Everything still owned is released even when a step fails; the first failure is reported.
      for (fmoe_plan_s* p : ctx->plans) keep(plan_release(ctx, p));
      ctx->plans.clear();
      for (fmoe_graph_s* g : ctx->graphs) {
        keep(b.graph_destroy(g->impl));
        delete g;
      }
      ctx->graphs.clear();
      for (fmoe_event_s* e : ctx->events) {
        keep(b.event_destroy(e->impl));
        delete e;
      }
      ctx->events.clear();
      for (fmoe_stream_s* s : ctx->streams) {
        keep(b.stream_destroy(s->impl));
        delete s;
      }
      ctx->streams.clear();
      for (auto& kv : ctx->allocations) keep(b.free(reinterpret_cast<void*>(kv.first)));
      ctx->allocations.clear();
      for (const auto& freed : ctx->frees_after_capture) keep(b.free(freed.first));
      ctx->frees_after_capture.clear();
      keep(ctx->buffer_cache->release_all());
      ctx->buffer_cache.reset();
      ctx->backend.reset();
    }
    delete ctx;
    return first;
  });
}

extern "C" FMOE_API int fmoe_context_backend(fmoe_context_t ctx, int64_t* out_backend) {
  return abi_call("fmoe_context_backend", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_context_backend");
    FMOE_CHECK_ARG(out_backend != nullptr, "fmoe_context_backend", "out_backend is NULL");
    std::lock_guard<std::mutex> lock(ctx->mu);
    *out_backend = ctx->backend->kind();
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_context_device_name(fmoe_context_t ctx, char* out_name,
                                                 int64_t capacity) {
  return abi_call("fmoe_context_device_name", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_context_device_name");
    Check c(ctx, "fmoe_context_device_name");
    FMOE_TRY(c.not_null(out_name, "out_name").at_least(capacity, 1, "capacity").status());
    std::lock_guard<std::mutex> lock(ctx->mu);
    std::string name;
    FMOE_TRY(ctx->backend->device_name(&name));
    size_t n = std::min<size_t>(name.size(), size_t(capacity - 1));
    std::memcpy(out_name, name.data(), n);
    out_name[n] = '\0';
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_context_device_props(fmoe_context_t ctx,
                                                  fmoe_device_props* out_props) {
  return abi_call("fmoe_context_device_props", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_context_device_props");
    Check c(ctx, "fmoe_context_device_props");
    c.not_null(out_props, "out_props");
    if (c.ok()) c.struct_size(out_props->size, sizeof(fmoe_device_props), "fmoe_device_props");
    FMOE_TRY(c.status());
    std::lock_guard<std::mutex> lock(ctx->mu);
    fmoe_device_props props;
    std::memset(&props, 0, sizeof props);
    props.size = sizeof props;
    FMOE_TRY(ctx->backend->device_props(&props));
    props.size = sizeof props;
    *out_props = props;
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_context_live_allocations(fmoe_context_t ctx, int64_t* out_count,
                                                      int64_t* out_bytes) {
  return abi_call("fmoe_context_live_allocations", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_context_live_allocations");
    Check c(ctx, "fmoe_context_live_allocations");
    FMOE_TRY(c.not_null(out_count, "out_count").not_null(out_bytes, "out_bytes").status());
    std::lock_guard<std::mutex> lock(ctx->mu);
    *out_count = int64_t(ctx->allocations.size());
    *out_bytes = ctx->live_bytes;
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_context_synchronize(fmoe_context_t ctx) {
  return abi_call("fmoe_context_synchronize", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_context_synchronize");
    std::lock_guard<std::mutex> lock(ctx->mu);
    FMOE_TRY(refuse_on_capturing_thread(
        ctx, "fmoe_context_synchronize",
        "a wait for the device cannot be captured (end the capture first)"));
    // A capturing stream cannot be waited for, from any thread (CUDA would end that capture).
    if (!ctx->capture_threads.empty())
      return set_error(FMOE_ERR_INVALID_STATE,
                       "fmoe_context_synchronize: another thread is capturing a graph on stream "
                       "%p; wait for the streams it does not capture with fmoe_stream_synchronize",
                       static_cast<void*>(ctx->capture_threads.begin()->first));
    return ctx->backend->synchronize();
  });
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

Status fmoe::refuse_on_capturing_thread(fmoe_context_s* ctx, const char* fn, const char* why) {
  for (const auto& [stream, thread] : ctx->capture_threads) {
    if (thread != std::this_thread::get_id()) continue;
    if (stream == nullptr)
      return set_error(FMOE_ERR_INVALID_STATE,
                       "%s: this thread is capturing a graph on the default stream; %s", fn, why);
    return set_error(FMOE_ERR_INVALID_STATE,
                     "%s: this thread is capturing a graph on stream %p; %s", fn,
                     static_cast<void*>(stream), why);
  }
  return FMOE_OK;
}

namespace {
// capture_threads holds exactly the streams whose capture began and has not ended: no backend
// query per stream on every allocation and free.
bool any_stream_capturing(const fmoe_context_s* ctx) { return !ctx->capture_threads.empty(); }

std::vector<BackendStream*> all_streams(fmoe_context_s* ctx) {
  std::vector<BackendStream*> streams{nullptr};
  for (fmoe_stream_s* s : ctx->streams) streams.push_back(s->impl);
  return streams;
}

// Hands the buffers freed during captures to the cache, once no stream captures.
Status release_frees_after_capture(fmoe_context_s* ctx) {
  if (ctx->frees_after_capture.empty() || any_stream_capturing(ctx)) return FMOE_OK;
  const std::vector<BackendStream*> streams = all_streams(ctx);
  Status first = FMOE_OK;
  for (const auto& [ptr, capacity] : ctx->frees_after_capture) {
    Status st = ctx->buffer_cache->give(ptr, capacity, streams);
    if (first == FMOE_OK) first = st;
  }
  ctx->frees_after_capture.clear();
  return first;
}
}  // namespace

Status fmoe::release_buffer(fmoe_context_s* ctx, void* ptr, size_t capacity) {
  // While a stream captures, neither the cache's fence (an event recorded on every stream, the
  // capturing one too) nor the backend's free (cudaFree waits for the whole device) may run.
  if (any_stream_capturing(ctx)) {
    ctx->frees_after_capture.emplace_back(ptr, capacity);
    return FMOE_OK;
  }
  FMOE_TRY(release_frees_after_capture(ctx));
  return ctx->buffer_cache->give(ptr, capacity, all_streams(ctx));
}

extern "C" FMOE_API int fmoe_alloc(fmoe_context_t ctx, int64_t bytes, void** out_ptr) {
  return abi_call("fmoe_alloc", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_alloc");
    Check c(ctx, "fmoe_alloc");
    FMOE_TRY(c.not_null(out_ptr, "out_ptr").at_least(bytes, 0, "bytes").status());
    *out_ptr = nullptr;
    std::lock_guard<std::mutex> lock(ctx->mu);
    FMOE_TRY(refuse_on_capturing_thread(
        ctx, "fmoe_alloc",
        "memory cannot be allocated inside a capture (allocate before fmoe_graph_capture_begin)"));
    FMOE_TRY(release_frees_after_capture(ctx));
    const size_t capacity = BufferCache::size_class(size_t(bytes));
    const bool capturing = any_stream_capturing(ctx);
    void* p = capturing ? nullptr : ctx->buffer_cache->take(capacity);
    if (p == nullptr) {
      Status st = ctx->backend->alloc(capacity, &p);
      if (st == FMOE_ERR_OUT_OF_MEMORY && !capturing && ctx->buffer_cache->cached_bytes() > 0) {
        FMOE_TRY(ctx->buffer_cache->release_all());
        st = ctx->backend->alloc(capacity, &p);
      }
      FMOE_TRY(st);
    }
    ctx->allocations[reinterpret_cast<uintptr_t>(p)] = {bytes, capacity};
    ctx->live_bytes += bytes;
    *out_ptr = p;
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_free(fmoe_context_t ctx, void* ptr) {
  return abi_call("fmoe_free", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_free");
    if (ptr == nullptr) return FMOE_OK;
    std::lock_guard<std::mutex> lock(ctx->mu);
    auto it = ctx->allocations.find(reinterpret_cast<uintptr_t>(ptr));
    FMOE_CHECK_ARG(it != ctx->allocations.end(), "fmoe_free",
                   "ptr %p is not a live allocation of this context", ptr);
    const fmoe_context_s::Allocation a = it->second;
    ctx->live_bytes -= a.bytes;
    ctx->allocations.erase(it);
    return release_buffer(ctx, ptr, a.capacity);
  });
}

extern "C" FMOE_API int fmoe_memcpy(fmoe_context_t ctx, void* dst, const void* src,
                                    int64_t bytes, int64_t kind, void* stream) {
  return abi_call("fmoe_memcpy", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_memcpy");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_memcpy");
    BackendStream* s = nullptr;
    c.at_least(bytes, 0, "bytes")
        .in_range(kind, FMOE_MEMCPY_HOST_TO_DEVICE, FMOE_MEMCPY_DEVICE_TO_DEVICE, "kind")
        .stream(stream, &s);
    if (bytes > 0) c.not_null(dst, "dst").not_null(src, "src");
    c.buffer_bytes(dst, "dst", bytes).buffer_bytes(src, "src", bytes);
    FMOE_TRY(c.status());
    if (kind != FMOE_MEMCPY_DEVICE_TO_DEVICE && ctx->backend->is_capturing(s))
      return set_error(FMOE_ERR_INVALID_STATE,
                       "fmoe_memcpy: a %s copy cannot be captured (the stream is capturing)",
                       kind == FMOE_MEMCPY_HOST_TO_DEVICE ? "host-to-device" : "device-to-host");
    if (bytes == 0) return FMOE_OK;
    return ctx->backend->memcpy(dst, src, size_t(bytes), fmoe_memcpy_kind(kind), s);
  });
}

extern "C" FMOE_API int fmoe_memset(fmoe_context_t ctx, void* ptr, int64_t value, int64_t bytes,
                                    void* stream) {
  return abi_call("fmoe_memset", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_memset");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_memset");
    BackendStream* s = nullptr;
    c.in_range(value, 0, 255, "value").at_least(bytes, 0, "bytes").stream(stream, &s);
    if (bytes > 0) c.not_null(ptr, "ptr");
    FMOE_TRY(c.buffer_bytes(ptr, "ptr", bytes).status());
    if (bytes == 0) return FMOE_OK;
    return ctx->backend->memset(ptr, int(value), size_t(bytes), s);
  });
}

// ---------------------------------------------------------------------------------------------
// Streams. NULL handles name the default stream; destroying NULL is a no-op.
// ---------------------------------------------------------------------------------------------

extern "C" FMOE_API int fmoe_stream_create(fmoe_context_t ctx, fmoe_stream_t* out_stream) {
  return abi_call("fmoe_stream_create", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_stream_create");
    FMOE_CHECK_ARG(out_stream != nullptr, "fmoe_stream_create", "out_stream is NULL");
    *out_stream = nullptr;
    std::lock_guard<std::mutex> lock(ctx->mu);
    BackendStream* impl = nullptr;
    FMOE_TRY(ctx->backend->stream_create(&impl));
    auto* s = new fmoe_stream_s{impl};
    ctx->streams.insert(s);
    *out_stream = s;
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_stream_destroy(fmoe_context_t ctx, fmoe_stream_t stream) {
  return abi_call("fmoe_stream_destroy", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_stream_destroy");
    if (stream == nullptr) return FMOE_OK;
    std::lock_guard<std::mutex> lock(ctx->mu);
    FMOE_CHECK_ARG(ctx->streams.count(stream) != 0, "fmoe_stream_destroy",
                   "stream %p is not a live stream of this context", static_cast<void*>(stream));
    if (ctx->backend->is_capturing(stream->impl))
      return set_error(FMOE_ERR_INVALID_STATE,
                       "fmoe_stream_destroy: the stream is capturing (end the capture first)");
    Status st = ctx->backend->stream_destroy(stream->impl);
    ctx->streams.erase(stream);
    delete stream;
    return st;
  });
}

extern "C" FMOE_API int fmoe_stream_synchronize(fmoe_context_t ctx, fmoe_stream_t stream) {
  return abi_call("fmoe_stream_synchronize", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_stream_synchronize");
    std::lock_guard<std::mutex> lock(ctx->mu);
    BackendStream* s = nullptr;
    FMOE_TRY(Check(ctx, "fmoe_stream_synchronize").stream(stream, &s).status());
    if (ctx->backend->is_capturing(s))
      return set_error(FMOE_ERR_INVALID_STATE,
                       "fmoe_stream_synchronize: the stream is capturing: its work is recorded, "
                       "not run (end the capture first)");
    return ctx->backend->stream_synchronize(s);
  });
}

// ---------------------------------------------------------------------------------------------
// Graphs
// ---------------------------------------------------------------------------------------------

extern "C" FMOE_API int fmoe_graph_capture_begin(fmoe_context_t ctx, fmoe_stream_t stream) {
  return abi_call("fmoe_graph_capture_begin", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_graph_capture_begin");
    std::lock_guard<std::mutex> lock(ctx->mu);
    BackendStream* s = nullptr;
    FMOE_TRY(Check(ctx, "fmoe_graph_capture_begin").stream(stream, &s).status());
    if (ctx->backend->is_capturing(s))
      return set_error(FMOE_ERR_INVALID_STATE,
                       "fmoe_graph_capture_begin: the stream is already capturing");
    FMOE_TRY(ctx->backend->capture_begin(s));
    ctx->capture_threads[stream] = std::this_thread::get_id();
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_graph_capture_end(fmoe_context_t ctx, fmoe_stream_t stream,
                                               fmoe_graph_t* out_graph) {
  return abi_call("fmoe_graph_capture_end", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_graph_capture_end");
    FMOE_CHECK_ARG(out_graph != nullptr, "fmoe_graph_capture_end", "out_graph is NULL");
    *out_graph = nullptr;
    std::lock_guard<std::mutex> lock(ctx->mu);
    BackendStream* s = nullptr;
    FMOE_TRY(Check(ctx, "fmoe_graph_capture_end").stream(stream, &s).status());
    if (!ctx->backend->is_capturing(s))
      return set_error(FMOE_ERR_INVALID_STATE,
                       "fmoe_graph_capture_end: the stream is not capturing");
    const auto began = ctx->capture_threads.find(stream);
    if (began != ctx->capture_threads.end() && began->second != std::this_thread::get_id())
      return set_error(FMOE_ERR_INVALID_STATE,
                       "fmoe_graph_capture_end: another thread began this capture, and only it "
                       "may end it (as CUDA's thread-local capture requires)");
    BackendGraph* impl = nullptr;
    const Status ended = ctx->backend->capture_end(s, &impl);
    // A failed end still ends the capture (an invalidated one, say) unless the backend says not.
    if (!ctx->backend->is_capturing(s)) ctx->capture_threads.erase(stream);
    FMOE_TRY(ended);
    auto* g = new fmoe_graph_s{impl};
    ctx->graphs.insert(g);
    *out_graph = g;
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_graph_launch(fmoe_context_t ctx, fmoe_graph_t graph,
                                          fmoe_stream_t stream) {
  return abi_call("fmoe_graph_launch", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_graph_launch");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_graph_launch");
    BackendStream* s = nullptr;
    c.not_null(graph, "graph")
        .that(graph == nullptr || ctx->graphs.count(graph) != 0,
              "graph %p is not a live graph of this context", static_cast<void*>(graph))
        .stream(stream, &s);
    FMOE_TRY(c.status());
    return ctx->backend->graph_launch(graph->impl, s);
  });
}

extern "C" FMOE_API int fmoe_graph_destroy(fmoe_context_t ctx, fmoe_graph_t graph) {
  return abi_call("fmoe_graph_destroy", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_graph_destroy");
    if (graph == nullptr) return FMOE_OK;
    std::lock_guard<std::mutex> lock(ctx->mu);
    FMOE_CHECK_ARG(ctx->graphs.count(graph) != 0, "fmoe_graph_destroy",
                   "graph %p is not a live graph of this context", static_cast<void*>(graph));
    Status st = ctx->backend->graph_destroy(graph->impl);
    ctx->graphs.erase(graph);
    delete graph;
    return st;
  });
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

extern "C" FMOE_API int fmoe_event_create(fmoe_context_t ctx, fmoe_event_t* out_event) {
  return abi_call("fmoe_event_create", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_event_create");
    FMOE_CHECK_ARG(out_event != nullptr, "fmoe_event_create", "out_event is NULL");
    *out_event = nullptr;
    std::lock_guard<std::mutex> lock(ctx->mu);
    BackendEvent* impl = nullptr;
    FMOE_TRY(ctx->backend->event_create(&impl));
    auto* e = new fmoe_event_s{impl};
    ctx->events.insert(e);
    *out_event = e;
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_event_destroy(fmoe_context_t ctx, fmoe_event_t event) {
  return abi_call("fmoe_event_destroy", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_event_destroy");
    if (event == nullptr) return FMOE_OK;
    std::lock_guard<std::mutex> lock(ctx->mu);
    FMOE_TRY(Check(ctx, "fmoe_event_destroy").event(event, "event").status());
    Status st = ctx->backend->event_destroy(event->impl);
    ctx->events.erase(event);
    delete event;
    return st;
  });
}

namespace {
// An event whose last record was inside a capture marks a point of the graph, not of the device's
// work: nothing to query or time (fmoe_event_s::recorded_in_capture).
Status refuse_recorded_in_capture(const char* fn, const fmoe_event_s* e, const char* name) {
  if (!e->recorded_in_capture) return FMOE_OK;
  return set_error(FMOE_ERR_INVALID_STATE,
                   "%s: %s was last recorded inside a capture, which marks a point of the graph, "
                   "not of the device's work (record it outside a capture first)",
                   fn, name);
}
}  // namespace

extern "C" FMOE_API int fmoe_event_record(fmoe_context_t ctx, fmoe_event_t event,
                                          fmoe_stream_t stream) {
  return abi_call("fmoe_event_record", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_event_record");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_event_record");
    BackendStream* s = nullptr;
    c.not_null(event, "event").event(event, "event").stream(stream, &s);
    FMOE_TRY(c.status());
    FMOE_TRY(ctx->backend->event_record(event->impl, s));
    event->recorded_in_capture = ctx->backend->is_capturing(s);
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_event_elapsed_ms(fmoe_context_t ctx, fmoe_event_t start,
                                              fmoe_event_t end, double* out_ms) {
  return abi_call("fmoe_event_elapsed_ms", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_event_elapsed_ms");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_event_elapsed_ms");
    c.not_null(start, "start")
        .not_null(end, "end")
        .not_null(out_ms, "out_ms")
        .event(start, "start")
        .event(end, "end");
    FMOE_TRY(c.status());
    FMOE_TRY(refuse_recorded_in_capture("fmoe_event_elapsed_ms", start, "start"));
    FMOE_TRY(refuse_recorded_in_capture("fmoe_event_elapsed_ms", end, "end"));
    return ctx->backend->event_elapsed_ms(start->impl, end->impl, out_ms);
  });
}

extern "C" FMOE_API int fmoe_event_query(fmoe_context_t ctx, fmoe_event_t event,
                                         int64_t* out_complete) {
  return abi_call("fmoe_event_query", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_event_query");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_event_query");
    c.not_null(event, "event").not_null(out_complete, "out_complete").event(event, "event");
    FMOE_TRY(c.status());
    FMOE_TRY(refuse_recorded_in_capture("fmoe_event_query", event, "event"));
    bool complete = false;
    FMOE_TRY(ctx->backend->event_query(event->impl, &complete));
    *out_complete = complete ? 1 : 0;
    return FMOE_OK;
  });
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

namespace {

Status check_permute(Check& c, const fmoe_permute_args* args, int64_t* out_max_rows) {
  c.not_null(args, "args");
  if (!c.ok()) return c.status();
  c.struct_size(args->size, sizeof(fmoe_permute_args), "fmoe_permute_args");
  if (!c.ok()) return c.status();
  const fmoe_permute_args& a = *args;
  c.not_null(a.hidden, "hidden")
      .not_null(a.routing_map, "routing_map")
      .that(a.permuted != nullptr || a.permuted_q != nullptr,
            "permuted and permuted_q are both NULL (one is required)")
      .that(a.permuted_q == nullptr || a.permuted_scale != nullptr,
            "permuted_scale is NULL (required with permuted_q)")
      .not_null(a.expert_offsets, "expert_offsets")
      .not_null(a.permutation_map, "permutation_map")
      .not_null(a.inverse_map, "inverse_map")
      .at_least(a.num_tokens, 0, "num_tokens")
      .at_least(a.hidden_size, 1, "hidden_size")
      .at_least(a.num_experts, 1, "num_experts")
      .that(a.num_experts <= INT32_MAX, "num_experts (%" PRId64 ") exceeds 2^31-1",
            a.num_experts)
      .at_least(a.topk, 1, "topk")
      .that(a.topk <= a.num_experts, "topk (%" PRId64 ") exceeds num_experts (%" PRId64 ")",
            a.topk, a.num_experts)
      .at_least(a.num_local_experts, 1, "num_local_experts")
      .at_least(a.local_expert_start, 0, "local_expert_start")
      .that(__int128(a.local_expert_start) + a.num_local_experts <= a.num_experts,
            "local_expert_start (%" PRId64 ") + num_local_experts (%" PRId64
            ") exceeds num_experts (%" PRId64 ")",
            a.local_expert_start, a.num_local_experts, a.num_experts)
      .at_least(a.alignment, 1, "alignment");
  if (a.permuted_q != nullptr) c.multiple_of_32(a.hidden_size, "hidden_size", " (permuted_q is set)");
  if (!c.ok()) return c.status();
  int64_t max_rows = 0;
  bool fits = compute_max_rows(a.num_tokens, a.topk, a.num_local_experts, a.alignment, &max_rows);
  c.that(fits && max_rows <= INT32_MAX,
         "max_rows for num_tokens %" PRId64 ", topk %" PRId64 ", num_local_experts %" PRId64
         ", alignment %" PRId64 " exceeds 2^31-1",
         a.num_tokens, a.topk, a.num_local_experts, a.alignment);
  const int64_t T = a.num_tokens, H = a.hidden_size, K = a.topk;
  c.buffer(a.hidden, "hidden", {T, H}, 2)
      .buffer(a.routing_map, "routing_map", {T, K}, 4)
      .buffer(a.probs, "probs", {T, K}, 4)
      .buffer(a.permuted, "permuted", {max_rows, H}, 2)
      .buffer(a.permuted_q, "permuted_q", {max_rows, H}, 1)
      .buffer(a.permuted_scale, "permuted_scale", {max_rows, H / 32}, 1)
      .buffer(a.expert_offsets, "expert_offsets", {a.num_local_experts + 1}, 4)
      .buffer(a.permutation_map, "permutation_map", {max_rows}, 4)
      .buffer(a.inverse_map, "inverse_map", {T, K}, 4)
      .buffer(a.invalid_count, "invalid_count", {1}, 4);
  *out_max_rows = max_rows;
  return c.status();
}

Status check_activation(Check& c, const fmoe_activation_args* args) {
  c.not_null(args, "args");
  if (!c.ok()) return c.status();
  c.struct_size(args->size, sizeof(fmoe_activation_args), "fmoe_activation_args");
  if (!c.ok()) return c.status();
  const fmoe_activation_args& a = *args;
  c.not_null(a.input, "input")
      .that(a.output != nullptr || a.output_q != nullptr,
            "output and output_q are both NULL (one is required)")
      .that(a.output_q == nullptr || a.output_scale != nullptr,
            "output_scale is NULL (required with output_q)")
      .at_least(a.rows, 0, "rows")
      .at_least(a.ffn, 1, "ffn")
      .that(a.ffn <= INT64_MAX / 2, "ffn (%" PRId64 ") is too large (2 * ffn overflows int64)",
            a.ffn)
      .in_range(a.activation, FMOE_ACT_SQUARED_RELU, FMOE_ACT_SWIGLU_OAI, "activation")
      .in_range(a.layout, FMOE_LAYOUT_HALVES, FMOE_LAYOUT_INTERLEAVED, "layout");
  if (a.output_q != nullptr) c.multiple_of_32(a.ffn, "ffn", " (output_q is set)");
  if (a.activation == FMOE_ACT_SWIGLU_OAI) {
    c.that(a.limit > 0 && std::isfinite(a.limit), "limit (%g) must be finite and > 0", a.limit)
        .that(std::isfinite(a.alpha), "alpha (%g) must be finite", a.alpha);
  }
  if (!c.ok()) return c.status();
  const int64_t n1 = a.activation == FMOE_ACT_SQUARED_RELU ? a.ffn : 2 * a.ffn;
  c.buffer(a.input, "input", {a.rows, n1}, 2)
      .buffer(a.output, "output", {a.rows, a.ffn}, 2)
      .buffer(a.output_q, "output_q", {a.rows, a.ffn}, 1)
      .buffer(a.output_scale, "output_scale", {a.rows, a.ffn / 32}, 1)
      .buffer(a.row_map, "row_map", {a.rows}, 4)
      .buffer(a.n_used, "n_used", {1}, 4);
  return c.status();
}

Status check_grouped_mm(Check& c, const fmoe_grouped_mm_args* args, bool mxfp8) {
  c.not_null(args, "args");
  if (!c.ok()) return c.status();
  c.struct_size(args->size, sizeof(fmoe_grouped_mm_args), "fmoe_grouped_mm_args");
  if (!c.ok()) return c.status();
  const fmoe_grouped_mm_args& a = *args;
  c.not_null(a.a, "a");
  if (mxfp8) c.not_null(a.a_scale, "a_scale");
  c.not_null(a.b, "b");
  if (mxfp8) c.not_null(a.b_scale, "b_scale");
  c.not_null(a.c, "c")
      .not_null(a.group_offsets, "group_offsets")
      .at_least(a.rows, 0, "rows")
      .at_least(a.n, 1, "n")
      .at_least(a.k, 1, "k")
      .at_least(a.groups, 1, "groups");
  if (mxfp8) c.multiple_of_32(a.k, "k", "");
  if (!c.ok()) return c.status();
  const int64_t eb = mxfp8 ? 1 : 2;
  c.buffer(a.a, "a", {a.rows, a.k}, eb)
      .buffer(a.b, "b", {a.groups, a.n, a.k}, eb)
      .buffer(a.bias, "bias", {a.groups, a.n}, 4)
      .buffer(a.c, "c", {a.rows, a.n}, 2)
      .buffer(a.group_offsets, "group_offsets", {a.groups + 1}, 4)
      .buffer(a.row_map, "row_map", {a.rows}, 4);
  if (mxfp8) {
    c.buffer(a.a_scale, "a_scale", {a.rows, a.k / 32}, 1)
        .buffer(a.b_scale, "b_scale", {a.groups, a.n, a.k / 32}, 1);
  }
  return c.status();
}

Status check_unpermute(Check& c, const fmoe_unpermute_args* args) {
  c.not_null(args, "args");
  if (!c.ok()) return c.status();
  c.struct_size(args->size, sizeof(fmoe_unpermute_args), "fmoe_unpermute_args");
  if (!c.ok()) return c.status();
  const fmoe_unpermute_args& a = *args;
  c.not_null(a.input, "input")
      .not_null(a.inverse_map, "inverse_map")
      .not_null(a.output, "output")
      .at_least(a.rows, 0, "rows")
      .at_least(a.num_tokens, 0, "num_tokens")
      .at_least(a.hidden_size, 1, "hidden_size")
      .at_least(a.topk, 1, "topk")
      .buffer(a.input, "input", {a.rows, a.hidden_size}, 2)
      .buffer(a.inverse_map, "inverse_map", {a.num_tokens, a.topk}, 4)
      .buffer(a.probs, "probs", {a.num_tokens, a.topk}, 4)
      .buffer(a.output, "output", {a.num_tokens, a.hidden_size}, 2);
  return c.status();
}

Status check_route(Check& c, const fmoe_route_args* args) {
  c.not_null(args, "args");
  if (!c.ok()) return c.status();
  c.struct_size(args->size, sizeof(fmoe_route_args), "fmoe_route_args");
  if (!c.ok()) return c.status();
  const fmoe_route_args& a = *args;
  c.not_null(a.logits, "logits")
      .not_null(a.routing_map, "routing_map")
      .not_null(a.probs, "probs")
      .at_least(a.num_tokens, 0, "num_tokens")
      .at_least(a.num_experts, 1, "num_experts")
      .in_range(a.scoring, FMOE_ROUTE_SOFTMAX, FMOE_ROUTE_SIGMOID, "scoring")
      .in_range(a.num_groups, 1, kRouteMaxGroups, "num_groups")
      .in_range(a.renormalize, 0, 1, "renormalize")
      .that(std::isfinite(a.scale), "scale (%g) must be finite", a.scale);
  if (!c.ok()) return c.status();
  c.that(a.num_experts % a.num_groups == 0, "num_groups (%" PRId64 ") must divide num_experts (%" PRId64 ")",
         a.num_groups, a.num_experts)
      .in_range(a.topk_groups, 1, a.num_groups, "topk_groups");
  if (!c.ok()) return c.status();
  const int64_t eligible = a.topk_groups * (a.num_experts / a.num_groups);
  c.in_range(a.topk, 1, std::min(kRouteMaxTopk, eligible), "topk")
      .buffer(a.logits, "logits", {a.num_tokens, a.num_experts}, 4)
      .buffer(a.selection_bias, "selection_bias", {a.num_experts}, 4)
      .buffer(a.routing_map, "routing_map", {a.num_tokens, a.topk}, 4)
      .buffer(a.probs, "probs", {a.num_tokens, a.topk}, 4);
  return c.status();
}

// Batch-of-scales extent of the swizzled layout; false on overflow. One matrix must fit even
// when the batch is empty: the backends compute a matrix's extent before looping over the batch.
bool swizzled_bytes(int64_t batch, int64_t rows, int64_t scale_cols, int64_t* out) {
  if (rows > INT64_MAX - 127 || scale_cols > INT64_MAX - 3) return false;
  const int64_t pr = (rows + 127) / 128 * 128, pc = (scale_cols + 3) / 4 * 4;
  int64_t matrix = 0;
  return checked_product({pr, pc}, &matrix) && checked_product({batch, matrix}, out);
}

}  // namespace

extern "C" FMOE_API int fmoe_permute(fmoe_context_t ctx, void* stream,
                                     const fmoe_permute_args* args) {
  return abi_call("fmoe_permute", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_permute");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_permute");
    BackendStream* s = nullptr;
    int64_t max_rows = 0;
    FMOE_TRY(c.stream(stream, &s).status());
    FMOE_TRY(check_permute(c, args, &max_rows));
    return ctx->backend->permute(s, *args);
  });
}

extern "C" FMOE_API int fmoe_activation_quant(fmoe_context_t ctx, void* stream,
                                              const fmoe_activation_args* args) {
  return abi_call("fmoe_activation_quant", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_activation_quant");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_activation_quant");
    BackendStream* s = nullptr;
    FMOE_TRY(c.stream(stream, &s).status());
    FMOE_TRY(check_activation(c, args));
    return ctx->backend->activation_quant(s, *args);
  });
}

extern "C" FMOE_API int fmoe_quantize_mxfp8(fmoe_context_t ctx, void* stream, const void* input,
                                            int64_t rows, int64_t cols, uint8_t* out_data,
                                            uint8_t* out_scale) {
  return abi_call("fmoe_quantize_mxfp8", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_quantize_mxfp8");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_quantize_mxfp8");
    BackendStream* s = nullptr;
    c.stream(stream, &s)
        .not_null(input, "input")
        .not_null(out_data, "out_data")
        .not_null(out_scale, "out_scale")
        .at_least(rows, 0, "rows")
        .at_least(cols, 1, "cols")
        .multiple_of_32(cols, "cols", "")
        .buffer(input, "input", {rows, cols}, 2)
        .buffer(out_data, "out_data", {rows, cols}, 1)
        .buffer(out_scale, "out_scale", {rows, cols / 32}, 1);
    FMOE_TRY(c.status());
    return ctx->backend->quantize_mxfp8(s, static_cast<const uint16_t*>(input), rows, cols,
                                        out_data, out_scale);
  });
}

extern "C" FMOE_API int fmoe_dequantize_mxfp8(fmoe_context_t ctx, void* stream,
                                              const uint8_t* data, const uint8_t* scale,
                                              int64_t rows, int64_t cols, float* out) {
  return abi_call("fmoe_dequantize_mxfp8", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_dequantize_mxfp8");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_dequantize_mxfp8");
    BackendStream* s = nullptr;
    c.stream(stream, &s)
        .not_null(data, "data")
        .not_null(scale, "scale")
        .not_null(out, "out")
        .at_least(rows, 0, "rows")
        .at_least(cols, 1, "cols")
        .multiple_of_32(cols, "cols", "")
        .buffer(data, "data", {rows, cols}, 1)
        .buffer(scale, "scale", {rows, cols / 32}, 1)
        .buffer(out, "out", {rows, cols}, 4);
    FMOE_TRY(c.status());
    return ctx->backend->dequantize_mxfp8(s, data, scale, rows, cols, out);
  });
}

extern "C" FMOE_API int fmoe_swizzled_scale_bytes(int64_t batch, int64_t rows, int64_t scale_cols,
                                                  int64_t* out_bytes) {
  return abi_call("fmoe_swizzled_scale_bytes", [&]() -> Status {
    Check c(nullptr, "fmoe_swizzled_scale_bytes");
    c.not_null(out_bytes, "out_bytes")
        .at_least(batch, 0, "batch")
        .at_least(rows, 0, "rows")
        .at_least(scale_cols, 0, "scale_cols");
    FMOE_TRY(c.status());
    int64_t bytes = 0;
    FMOE_CHECK_ARG(swizzled_bytes(batch, rows, scale_cols, &bytes), "fmoe_swizzled_scale_bytes",
                   "batch * rows * scale_cols overflows int64");
    *out_bytes = bytes;
    return FMOE_OK;
  });
}

namespace {

int swizzle_entry(const char* fn, fmoe_context_t ctx, void* stream, const uint8_t* in,
                  int64_t batch, int64_t rows, int64_t scale_cols, bool to_swizzled,
                  uint8_t* out) {
  return abi_call(fn, [&]() -> Status {
    if (ctx == nullptr) return set_error(FMOE_ERR_INVALID_ARGUMENT, "%s: ctx is NULL", fn);
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, fn);
    BackendStream* s = nullptr;
    const char* in_name = to_swizzled ? "linear" : "swizzled";
    const char* out_name = to_swizzled ? "out_swizzled" : "out_linear";
    c.stream(stream, &s)
        .not_null(in, in_name)
        .not_null(out, out_name)
        .at_least(batch, 0, "batch")
        .at_least(rows, 0, "rows")
        .at_least(scale_cols, 0, "scale_cols");
    int64_t sw = 0;
    if (c.ok())
      c.that(swizzled_bytes(batch, rows, scale_cols, &sw),
             "batch * rows * scale_cols overflows int64");
    FMOE_TRY(c.status());
    if (to_swizzled)
      c.buffer(in, in_name, {batch, rows, scale_cols}, 1).buffer_bytes(out, out_name, sw);
    else
      c.buffer_bytes(in, in_name, sw).buffer(out, out_name, {batch, rows, scale_cols}, 1);
    FMOE_TRY(c.status());
    return ctx->backend->swizzle_scales(s, in, batch, rows, scale_cols, to_swizzled, out);
  });
}

}  // namespace

extern "C" FMOE_API int fmoe_swizzle_scales(fmoe_context_t ctx, void* stream,
                                            const uint8_t* linear, int64_t batch, int64_t rows,
                                            int64_t scale_cols, uint8_t* out_swizzled) {
  return swizzle_entry("fmoe_swizzle_scales", ctx, stream, linear, batch, rows, scale_cols, true,
                       out_swizzled);
}

extern "C" FMOE_API int fmoe_unswizzle_scales(fmoe_context_t ctx, void* stream,
                                              const uint8_t* swizzled, int64_t batch,
                                              int64_t rows, int64_t scale_cols,
                                              uint8_t* out_linear) {
  return swizzle_entry("fmoe_unswizzle_scales", ctx, stream, swizzled, batch, rows, scale_cols,
                       false, out_linear);
}

extern "C" FMOE_API int fmoe_grouped_mm_bf16(fmoe_context_t ctx, void* stream,
                                             const fmoe_grouped_mm_args* args) {
  return abi_call("fmoe_grouped_mm_bf16", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_grouped_mm_bf16");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_grouped_mm_bf16");
    BackendStream* s = nullptr;
    FMOE_TRY(c.stream(stream, &s).status());
    FMOE_TRY(check_grouped_mm(c, args, false));
    return ctx->backend->grouped_mm_bf16(s, *args);
  });
}

extern "C" FMOE_API int fmoe_grouped_mm_mxfp8(fmoe_context_t ctx, void* stream,
                                              const fmoe_grouped_mm_args* args) {
  return abi_call("fmoe_grouped_mm_mxfp8", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_grouped_mm_mxfp8");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_grouped_mm_mxfp8");
    BackendStream* s = nullptr;
    FMOE_TRY(c.stream(stream, &s).status());
    FMOE_TRY(check_grouped_mm(c, args, true));
    return ctx->backend->grouped_mm_mxfp8(s, *args);
  });
}

extern "C" FMOE_API int fmoe_route(fmoe_context_t ctx, void* stream, const fmoe_route_args* args) {
  return abi_call("fmoe_route", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_route");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_route");
    BackendStream* s = nullptr;
    FMOE_TRY(c.stream(stream, &s).status());
    FMOE_TRY(check_route(c, args));
    return ctx->backend->route(s, *args);
  });
}

extern "C" FMOE_API int fmoe_unpermute(fmoe_context_t ctx, void* stream,
                                       const fmoe_unpermute_args* args) {
  return abi_call("fmoe_unpermute", [&]() -> Status {
    FMOE_CHECK_CTX("fmoe_unpermute");
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_unpermute");
    BackendStream* s = nullptr;
    FMOE_TRY(c.stream(stream, &s).status());
    FMOE_TRY(check_unpermute(c, args));
    return ctx->backend->unpermute(s, *args);
  });
}
