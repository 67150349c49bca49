// Argument checks shared by every ABI entry point (see Check in core/context.h).
#include <cinttypes>
#include <cstdarg>
#include <cstdio>

#include "core/context.h"

namespace fmoe {

bool checked_product(std::initializer_list<int64_t> factors, int64_t* out) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (f < 0 || __builtin_mul_overflow(p, f, &p)) return false;
  }
  *out = p;
  return true;
}

bool compute_max_rows(int64_t tokens, int64_t topk, int64_t local_experts, int64_t alignment,
                      int64_t* out) {
  int64_t slots, pad, sum;
  if (!checked_product({tokens, topk}, &slots)) return false;
  if (!checked_product({local_experts, alignment - 1}, &pad)) return false;
  if (__builtin_add_overflow(slots, pad, &sum)) return false;
  if (__builtin_add_overflow(sum, alignment - 1, &sum)) return false;
  *out = sum / alignment * alignment;
  return true;
}

Check& Check::that(bool cond, const char* fmt, ...) {
  if (!ok() || cond) return *this;
  char buf[768];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  status_ = set_error(FMOE_ERR_INVALID_ARGUMENT, "%s: %s", fn_, buf);
  return *this;
}

Check& Check::not_null(const void* p, const char* name) {
  return that(p != nullptr, "%s is NULL", name);
}

Check& Check::struct_size(uint64_t got, size_t want, const char* struct_name) {
  // Exact match: a caller built against another revision of a struct is refused rather than
  // half-read (the ABI grows by appending fields and bumping FMOE_ABI_VERSION).
  return that(got == want, "%s.size is %" PRIu64 ", expected %zu (sizeof)", struct_name, got,
              want);
}

Check& Check::at_least(int64_t v, int64_t lo, const char* name) {
  return that(v >= lo, "%s (%" PRId64 ") must be >= %" PRId64, name, v, lo);
}

Check& Check::in_range(int64_t v, int64_t lo, int64_t hi, const char* name) {
  return that(v >= lo && v <= hi, "%s (%" PRId64 ") must be in [%" PRId64 ", %" PRId64 "]", name,
              v, lo, hi);
}

Check& Check::multiple_of_32(int64_t v, const char* name, const char* why) {
  return that(v % 32 == 0, "%s (%" PRId64 ") must be a multiple of 32%s", name, v, why);
}

Check& Check::buffer(const void* p, const char* name, std::initializer_list<int64_t> dims,
                     int64_t elem_bytes) {
  if (!ok() || p == nullptr) return *this;
  int64_t elems = 0, bytes = 0;
  bool fits = checked_product(dims, &elems) && checked_product({elems, elem_bytes}, &bytes);
  that(fits, "%s: its size in bytes overflows int64", name);
  if (!ok()) return *this;
  return buffer_bytes(p, name, bytes);
}

Check& Check::buffer_bytes(const void* p, const char* name, int64_t bytes) {
  if (!ok() || p == nullptr || ctx_ == nullptr) return *this;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  auto it = ctx_->allocations.upper_bound(addr);
  if (it == ctx_->allocations.begin()) return *this;
  --it;
  const uintptr_t base = it->first;
  const int64_t size = it->second.bytes;
  // A zero-byte allocation still owns its (unique) base address.
  const uint64_t span = size > 0 ? uint64_t(size) : 1;
  if (addr - base >= span) return *this;  // caller-owned memory
  const int64_t holds = size - int64_t(addr - base);
  return that(bytes <= holds, "%s needs %" PRId64 " bytes but its buffer holds %" PRId64, name,
              bytes, holds);
}

Check& Check::stream(void* handle, BackendStream** out) {
  if (!ok()) return *this;
  if (handle == nullptr) {
    *out = nullptr;
    return *this;
  }
  auto* s = static_cast<fmoe_stream_s*>(handle);
  that(ctx_->streams.count(s) != 0, "stream %p is not a live stream of this context", handle);
  if (ok()) *out = s->impl;
  return *this;
}

Check& Check::event(fmoe_event_s* e, const char* name) {
  if (!ok() || e == nullptr) return *this;
  return that(ctx_->events.count(e) != 0, "%s %p is not a live event of this context", name,
              static_cast<void*>(e));
}

}  // namespace fmoe
