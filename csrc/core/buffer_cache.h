// Buffers the caller freed, kept for the next fmoe_alloc of the same size class, so that neither
// call waits for the device. cudaFree synchronizes the whole device (and cudaMalloc may): a caller
// that allocates per call, such as a layer's output on every forward, would pay that on every call
// and lose the overlap of its host code with the device's work.
//
// A freed buffer may still be read or written by work queued before the free, on any stream. It
// is handed out again only once a fence recorded at the free (an event on every stream) has
// passed, which a query tells without waiting. Model weights are not cached: a block above
// kMaxBlockBytes is allocated to its exact size and freed at once.
#pragma once

#include <cstddef>
#include <deque>
#include <vector>

#include "core/backend.h"
#include "core/status.h"

namespace fmoe {

class BufferCache {
 public:
  static constexpr size_t kMaxBlockBytes = size_t(256) << 20;
  static constexpr size_t kMaxBlocks = 1024;

  // The capacity allocated for a request of `bytes`: rounded up to a quarter of the power of two
  // at or below it (at most 25% more, and few enough classes that a repeated size finds its
  // block), at least 512; `bytes` itself above kMaxBlockBytes.
  static size_t size_class(size_t bytes);

  // Holds at most `max_cached_bytes` (the oldest blocks are freed first beyond it).
  BufferCache(Backend* backend, size_t max_cached_bytes)
      : backend_(backend), max_cached_bytes_(max_cached_bytes) {}

  // A cached block of exactly `capacity` bytes whose fence has passed, or nullptr.
  void* take(size_t capacity);

  // Caches `ptr`, allocated with `capacity` bytes, behind a fence on `streams` (nullptr is the
  // default stream); frees it at once when it is not to be cached or the fence cannot be recorded.
  Status give(void* ptr, size_t capacity, const std::vector<BackendStream*>& streams);

  // Frees every cached block and destroys the cache's events (at context destruction, or to make
  // room when an allocation runs out of memory).
  Status release_all();

  size_t cached_bytes() const { return cached_bytes_; }

 private:
  struct Block {
    void* ptr;
    size_t capacity;
    std::vector<BackendEvent*> fence;
  };

  bool passed(const Block& b);
  void recycle(Block& b);
  // The backend's free waits for the work that may still use the block, so the oldest block can
  // go whether its fence has passed or not.
  Status evict_oldest();

  Backend* backend_;
  size_t max_cached_bytes_;
  std::deque<Block> blocks_;  // oldest first
  std::vector<BackendEvent*> spare_events_;
  size_t cached_bytes_ = 0;
};

}  // namespace fmoe
