// route: each token's topk experts and weights from its router logits (fmoe.h, "Op: route").
//
// A warp per token: lane l looks at experts l, l + 32, ...; each pick is a warp-wide best under
// route_before (core/route_math.h: larger choice first, NaN last, lower id on ties), so a token
// costs topk passes over the lane's num_experts / 32 choices (held in registers up to 256
// experts) and five shuffles, where one thread walking all experts topk times took tens of
// microseconds. Group values (top-2 sums) are taken by one lane per group, in the host's order.
// Sums the host takes in order (the softmax's, the weights') are taken in the same order through
// shuffles, so the arithmetic is the host's but for the device's exp (within 2 ulp): two choices
// within an ulp may be ordered differently, and softmax without a bias or groups chooses by the
// logits, exactly as the host does.
// FMOE_ROUTE_KERNEL=thread runs route_token (the host's code) one thread per token instead, for
// comparisons.
#include <cstdlib>
#include <cstring>

#include "core/route_math.h"
#include "cuda/backend.h"

namespace fmoe {
namespace cuda {
namespace {

constexpr int kRouteThreads = 128;
constexpr int kRouteWarps = kRouteThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Experts per lane whose choices the warp kernel keeps in registers (up to 256 experts); more
// are reloaded on each of the topk passes.
constexpr int kCachedChoices = 8;

__global__ void __launch_bounds__(kRouteThreads) route_thread_kernel(fmoe_route_args a) {
  const int64_t t = int64_t(blockIdx.x) * kRouteThreads + threadIdx.x;
  if (t >= a.num_tokens) return;
  route_token(route_token_args(a, t), a.routing_map + t * a.topk, a.probs + t * a.topk);
}

// The warp's best (choice, id) under route_before; id -1 (nothing) loses to everything. Every
// lane ends with the same pair: the order is total.
__device__ __forceinline__ void warp_best(float& c, int64_t& id) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float oc = __shfl_xor_sync(kFullMask, c, offset);
    const int64_t oid = __shfl_xor_sync(kFullMask, id, offset);
    if (oid >= 0 && (id < 0 || route_before(oc, oid, c, id))) c = oc, id = oid;
  }
}

// sum over lanes [0, n) of v, added in lane order (the host's sequential order).
__device__ __forceinline__ float ordered_sum(float v, int n, float start) {
  float s = start;
  for (int j = 0; j < n; ++j) s += __shfl_sync(kFullMask, v, j);
  return s;
}

__global__ void __launch_bounds__(kRouteThreads) route_warp_kernel(fmoe_route_args a) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kRouteWarps + threadIdx.x / 32;
  if (t >= a.num_tokens) return;  // the whole warp: t is the warp's
  RouteToken r = route_token_args(a, t);
  const int64_t E = r.num_experts;
  if (r.softmax) {
    // The host's max: logits[0] if it is NaN, else the largest of the numbers.
    float m = -INFINITY;
    for (int64_t e = lane; e < E; e += 32) m = r.logits[e] > m ? r.logits[e] : m;
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float o = __shfl_xor_sync(kFullMask, m, offset);
      m = o > m ? o : m;
    }
    if (r.logits[0] != r.logits[0]) m = r.logits[0];
    float s = 0.0f;
    for (int64_t e0 = 0; e0 < E; e0 += 32) {
      const int64_t e = e0 + lane;
      const float v = e < E ? expf(r.logits[e] - m) : 0.0f;
      s = ordered_sum(v, int(E - e0 < 32 ? E - e0 : 32), s);
    }
    r.max = m;
    r.sum = s;
  }
  // Groups: lane g (and g + 32) takes group g's value as the host does; then topk_groups picks.
  uint64_t chosen = ~uint64_t(0);
  if (r.num_groups > 1) {
    float value[2];
    for (int h = 0; h < 2; ++h) {
      const int64_t g = lane + 32 * h;
      value[h] = g < r.num_groups ? route_group_value(r, g) : 0.0f;
    }
    chosen = 0;
    for (int64_t pick = 0; pick < r.topk_groups; ++pick) {
      float best = 0.0f;
      int64_t best_id = -1;
      for (int h = 0; h < 2; ++h) {
        const int64_t g = lane + 32 * h;
        if (g < r.num_groups && !((chosen >> g) & 1) && (best_id < 0 || route_before(value[h], g, best, best_id)))
          best = value[h], best_id = g;
      }
      warp_best(best, best_id);
      chosen |= uint64_t(1) << best_id;
    }
  }
  // Experts, best first; lane k keeps slot k's id.
  const int64_t size = E / r.num_groups;
  int64_t mine = -1;
  if (E <= 32 * kCachedChoices) {
    // The lane's choices are computed once and kept in registers; a pick clears its bit.
    float choice[kCachedChoices];
    uint32_t open = 0;  // bit j: expert lane + 32 j is still a candidate
#pragma unroll
    for (int j = 0; j < kCachedChoices; ++j) {
      const int64_t e = lane + 32 * j;
      const bool ok = e < E && ((chosen >> (e / size)) & 1);
      choice[j] = ok ? route_choice(r, e) : 0.0f;
      open |= uint32_t(ok) << j;
    }
    for (int64_t k = 0; k < r.topk; ++k) {
      float best = 0.0f;
      int64_t best_id = -1;
#pragma unroll
      for (int j = 0; j < kCachedChoices; ++j) {
        const int64_t e = lane + 32 * j;
        if (((open >> j) & 1) && (best_id < 0 || route_before(choice[j], e, best, best_id)))
          best = choice[j], best_id = e;
      }
      warp_best(best, best_id);  // topk <= the eligible experts: best_id >= 0
      if ((best_id & 31) == lane) open &= ~(1u << (best_id >> 5));
      if (lane == k) mine = best_id;
    }
  } else {
    // More experts than registers: each pass reloads them and takes the best after the last pick.
    float prev = 0.0f;
    int64_t prev_id = -1;
    for (int64_t k = 0; k < r.topk; ++k) {
      float best = 0.0f;
      int64_t best_id = -1;
      for (int64_t e = lane; e < E; e += 32) {
        if (!((chosen >> (e / size)) & 1)) continue;
        const float c = route_choice(r, e);
        if (prev_id >= 0 && !route_before(prev, prev_id, c, e)) continue;
        if (best_id < 0 || route_before(c, e, best, best_id)) best = c, best_id = e;
      }
      warp_best(best, best_id);
      if (lane == k) mine = best_id;
      prev = best, prev_id = best_id;
    }
  }
  const int k = int(r.topk);
  const float w = lane < k ? route_score(r, mine) : 0.0f;
  const float total = ordered_sum(w, k, 0.0f);
  if (lane < k) {
    a.routing_map[t * k + lane] = int32_t(mine);
    a.probs[t * k + lane] = (r.renormalize && total > 0.0f ? w / total : w) * r.scale;
  }
}

bool route_by_thread() {
  static const bool by_thread = [] {
    const char* v = std::getenv("FMOE_ROUTE_KERNEL");
    return v != nullptr && std::strcmp(v, "thread") == 0;
  }();
  return by_thread;
}

}  // namespace
}  // namespace cuda

using namespace cuda;

Status CudaBackend::route(BackendStream* s, const fmoe_route_args& a) {
  FMOE_TRY(activate());
  if (a.num_tokens == 0) return FMOE_OK;
  if (route_by_thread()) {
    const int64_t blocks = (a.num_tokens + kRouteThreads - 1) / kRouteThreads;
    route_thread_kernel<<<unsigned(blocks), kRouteThreads, 0, stream_of(s)>>>(a);
    FMOE_CHECK_LAUNCH("route_thread_kernel");
    return FMOE_OK;
  }
  const int64_t blocks = (a.num_tokens + kRouteWarps - 1) / kRouteWarps;
  route_warp_kernel<<<unsigned(blocks), kRouteThreads, 0, stream_of(s)>>>(a);
  FMOE_CHECK_LAUNCH("route_warp_kernel");
  return FMOE_OK;
}

}  // namespace fmoe
