// The objects behind the ABI's opaque handles, and the argument checks every entry point shares.
// Only the core (csrc/core) sees these; backends see validated arguments and their own handles.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <set>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "core/backend.h"
#include "core/buffer_cache.h"
#include "core/status.h"
#include "fmoe.h"

struct fmoe_stream_s {
  fmoe::BackendStream* impl;
};
struct fmoe_graph_s {
  fmoe::BackendGraph* impl;
};
struct fmoe_event_s {
  fmoe::BackendEvent* impl;
  // Its last record was inside a capture: CUDA refuses to query or time such an event until a
  // record outside a capture, and the core refuses it alike on every backend.
  bool recorded_in_capture = false;
};

struct fmoe_plan_s {
  fmoe_context_s* ctx;
  fmoe::PlanShape shape;
  int64_t workspace_bytes;
  // The i32 invalid-id counter, allocated through the backend. It is deliberately NOT entered in
  // the context's allocation table: fmoe_context_live_allocations counts what the caller
  // allocated with fmoe_alloc, so a leak check stays at zero while plans are alive.
  int32_t* invalid_counter;
};

struct fmoe_context_s {
  std::unique_ptr<fmoe::Backend> backend;
  // Held for the whole of every ABI call on this context: the tables below and the backend are
  // used by one thread at a time.
  std::mutex mu;
  struct Allocation {
    int64_t bytes;    // requested: what ops may touch
    size_t capacity;  // allocated (BufferCache::size_class of bytes)
  };
  std::map<uintptr_t, Allocation> allocations;  // by base address
  int64_t live_bytes = 0;
  // Buffers freed by fmoe_free, for fmoe_alloc to reuse without waiting for the device.
  std::unique_ptr<fmoe::BufferCache> buffer_cache;
  std::set<fmoe_stream_s*> streams;
  std::set<fmoe_graph_s*> graphs;
  std::set<fmoe_event_s*> events;
  std::set<fmoe_plan_s*> plans;
  // The thread that began each capture still open, by stream (nullptr: the default stream). CUDA
  // captures in thread-local mode: until the capture ends, that thread may not allocate or wait
  // for the device, while other threads may allocate. The core refuses those calls on that thread
  // alike on every backend, so code that runs on the host backend runs on CUDA.
  std::map<fmoe_stream_s*, std::thread::id> capture_threads;
  // Buffers fmoe_free took while a stream captured (no free may run then, from any thread): the
  // first memory call after the last capture ends hands them to the cache.
  std::vector<std::pair<void*, size_t>> frees_after_capture;
};

namespace fmoe {

// Runs `body` (returning a Status) as the body of ABI function `fn`: clears the thread's message,
// turns every C++ exception into a status (nothing unwinds across the C ABI), and clears the
// message again when the call succeeds.
template <class F>
int abi_call(const char* fn, F&& body) {
  clear_error();
  Status s;
  try {
    s = body();
  } catch (const std::bad_alloc&) {
    return set_error(FMOE_ERR_OUT_OF_MEMORY, "%s: out of host memory", fn);
  } catch (const std::exception& e) {
    return set_error(FMOE_ERR_INTERNAL, "%s: internal error: %s", fn, e.what());
  } catch (...) {
    return set_error(FMOE_ERR_INTERNAL, "%s: internal error: unknown exception", fn);
  }
  if (s == FMOE_OK) clear_error();
  return s;
}

// Product of non-negative factors; false when it does not fit in int64.
bool checked_product(std::initializer_list<int64_t> factors, int64_t* out);

// round_up(T*topk + E_local*(alignment-1), alignment), overflow-checked (arguments already in
// range). false on overflow.
bool compute_max_rows(int64_t tokens, int64_t topk, int64_t local_experts, int64_t alignment,
                      int64_t* out);

// Chained argument checks of one ABI call. Each check does nothing once one has failed, so a
// function lists its checks in order and returns status() once; the first failure's message
// (prefixed with the function name) is the one reported. Messages:
//   "<fn>: <name> is NULL"
//   "<fn>: <name> (<v>) must be >= <lo>"
//   "<fn>: <name> (<v>) must be a multiple of 32"
//   "<fn>: <struct>.size is <got>, expected <want> (sizeof)"
//   "<fn>: <name> needs <n> bytes but its buffer holds <m>"
class Check {
 public:
  Check(fmoe_context_s* ctx, const char* fn) : ctx_(ctx), fn_(fn) {}

  Status status() const { return status_; }
  bool ok() const { return status_ == FMOE_OK; }
  const char* fn() const { return fn_; }

  // Free-form condition: `fmt` is the message after "<fn>: ".
  Check& that(bool cond, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
  Check& not_null(const void* p, const char* name);
  Check& struct_size(uint64_t got, size_t want, const char* struct_name);
  Check& at_least(int64_t v, int64_t lo, const char* name);
  Check& in_range(int64_t v, int64_t lo, int64_t hi, const char* name);  // lo <= v <= hi
  Check& multiple_of_32(int64_t v, const char* name, const char* why);
  // The bytes an op touches from `p` (the product of `dims` times `elem_bytes`) must fit in the
  // live allocation of this context that holds `p`, if any. NULL and pointers outside every
  // allocation (caller-owned memory) pass.
  Check& buffer(const void* p, const char* name, std::initializer_list<int64_t> dims,
                int64_t elem_bytes);
  Check& buffer_bytes(const void* p, const char* name, int64_t bytes);
  // Resolves a stream handle of this context (NULL = default stream).
  Check& stream(void* handle, BackendStream** out);
  // A non-NULL event must be a live event of this context ("<name> %p is not a live event ...");
  // NULL is left to not_null.
  Check& event(fmoe_event_s* e, const char* name);

 private:
  fmoe_context_s* ctx_;
  const char* fn_;
  Status status_ = FMOE_OK;
};

// Validates a plan handle against the registry of live plans (plans are used without their
// context by some entry points).
bool plan_is_live(fmoe_plan_s* plan);
void plan_registry_remove(fmoe_plan_s* plan);

// Frees the plan's device state (the context's lock is held by the caller), without waiting:
// see release_buffer.
Status plan_release(fmoe_context_s* ctx, fmoe_plan_s* plan);

// Releases a buffer of `capacity` bytes that work queued before now may still use, without
// waiting for the device: to the cache, behind a fence on every stream; while a stream of the
// context captures (when neither that fence nor a free may run), held until the captures end.
// The context's lock is held by the caller.
Status release_buffer(fmoe_context_s* ctx, void* ptr, size_t capacity);

// FMOE_ERR_INVALID_STATE when the calling thread has a capture open on `ctx` (capture_threads):
// "<fn>: this thread is capturing a graph on <stream>; <why>". FMOE_OK otherwise. The context's
// lock is held by the caller.
Status refuse_on_capturing_thread(fmoe_context_s* ctx, const char* fn, const char* why);

}  // namespace fmoe
