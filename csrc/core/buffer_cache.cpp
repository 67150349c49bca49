// BufferCache: the fmoe_free / fmoe_alloc cache of buffers (see buffer_cache.h).
#include "core/buffer_cache.h"

namespace fmoe {

size_t BufferCache::size_class(size_t bytes) {
  constexpr size_t kMin = 512;
  if (bytes <= kMin) return kMin;
  if (bytes > kMaxBlockBytes) return bytes;
  size_t power = kMin;
  while (power * 2 <= bytes) power *= 2;
  const size_t step = power / 4;
  return (bytes + step - 1) / step * step;
}

bool BufferCache::passed(const Block& b) {
  for (BackendEvent* e : b.fence) {
    bool complete = false;
    if (backend_->event_query(e, &complete) != FMOE_OK || !complete) {
      clear_error();  // a failed query means "not known to have passed", not a failed call
      return false;
    }
  }
  return true;
}

void BufferCache::recycle(Block& b) {
  spare_events_.insert(spare_events_.end(), b.fence.begin(), b.fence.end());
  b.fence.clear();
}

void* BufferCache::take(size_t capacity) {
  for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
    if (it->capacity != capacity || !passed(*it)) continue;
    void* p = it->ptr;
    recycle(*it);
    cached_bytes_ -= it->capacity;
    blocks_.erase(it);
    return p;
  }
  return nullptr;
}

Status BufferCache::give(void* ptr, size_t capacity, const std::vector<BackendStream*>& streams) {
  if (capacity > kMaxBlockBytes || capacity > max_cached_bytes_) return backend_->free(ptr);
  Block b{ptr, capacity, {}};
  for (BackendStream* s : streams) {
    BackendEvent* e = nullptr;
    if (!spare_events_.empty()) {
      e = spare_events_.back();
      spare_events_.pop_back();
    } else if (backend_->event_create(&e) != FMOE_OK) {
      e = nullptr;
    }
    if (e == nullptr || backend_->event_record(e, s) != FMOE_OK) {
      if (e != nullptr) spare_events_.push_back(e);
      recycle(b);
      clear_error();
      return backend_->free(ptr);  // no fence: the backend's free waits instead
    }
    b.fence.push_back(e);
  }
  blocks_.push_back(std::move(b));
  cached_bytes_ += capacity;
  while (cached_bytes_ > max_cached_bytes_ || blocks_.size() > kMaxBlocks) FMOE_TRY(evict_oldest());
  return FMOE_OK;
}

Status BufferCache::evict_oldest() {
  Block& b = blocks_.front();
  Status st = backend_->free(b.ptr);
  recycle(b);
  cached_bytes_ -= b.capacity;
  blocks_.pop_front();
  return st;
}

Status BufferCache::release_all() {
  Status first = FMOE_OK;
  while (!blocks_.empty()) {
    Status st = evict_oldest();
    if (first == FMOE_OK) first = st;
  }
  for (BackendEvent* e : spare_events_) {
    Status st = backend_->event_destroy(e);
    if (first == FMOE_OK) first = st;
  }
  spare_events_.clear();
  return first;
}

}  // namespace fmoe
