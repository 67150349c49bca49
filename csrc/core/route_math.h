// fmoe_route on one token (fmoe.h, "Op: route"), in the order of operations every backend
// follows. Header-only and FMOE_HD: the host backend runs route_token per token on its threads;
// the CUDA warp kernel (cuda/route.cu) shares out its loops over a warp but calls the pieces
// (route_before, route_choice, route_group_value, route_score), and its comparison kernel runs
// route_token per thread. Scores are recomputed where they are compared, so no array of
// num_experts values is kept per token (a device thread would hold it in local memory).
#pragma once

#include <cmath>
#include <cstdint>

#include "core/numerics.h"  // FMOE_HD
#include "fmoe.h"

namespace fmoe {

constexpr int64_t kRouteMaxTopk = 32;
constexpr int64_t kRouteMaxGroups = 64;

struct RouteToken {
  const float* logits;  // the token's num_experts logits
  const float* bias;    // selection_bias or null
  int64_t num_experts, topk, num_groups, topk_groups;
  bool softmax, renormalize;
  float scale;
  float max, sum;  // softmax: the logits' max and the sum of exp(logit - max)
};

// Whether choice a (expert i) ranks before choice b (expert j): larger first, a NaN after every
// number, equal choices by lower id.
FMOE_HD bool route_before(float a, int64_t i, float b, int64_t j) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a != b) return a > b;
  return i < j;
}

FMOE_HD float route_score(const RouteToken& r, int64_t e) {
  const float l = r.logits[e];
  return r.softmax ? expf(l - r.max) / r.sum : 1.0f / (1.0f + expf(-l));
}

FMOE_HD float route_choice(const RouteToken& r, int64_t e) {
  if (r.softmax && r.bias == nullptr && r.num_groups == 1) return r.logits[e];
  return route_score(r, e) + (r.bias != nullptr ? r.bias[e] : 0.0f);
}

// Group g's value: the sum of its two largest choices (its one choice for a group of one).
FMOE_HD float route_group_value(const RouteToken& r, int64_t g) {
  const int64_t size = r.num_experts / r.num_groups;
  float first = 0.0f, second = 0.0f;
  int64_t first_id = -1, second_id = -1;
  for (int64_t e = g * size; e < (g + 1) * size; ++e) {
    const float c = route_choice(r, e);
    if (first_id < 0 || route_before(c, e, first, first_id)) {
      second = first, second_id = first_id;
      first = c, first_id = e;
    } else if (second_id < 0 || route_before(c, e, second, second_id)) {
      second = c, second_id = e;
    }
  }
  return second_id < 0 ? first : first + second;
}

// The token's topk experts (global ids) and weights.
FMOE_HD void route_token(RouteToken r, int32_t* ids, float* weights) {
  const int64_t E = r.num_experts;
  if (r.softmax) {
    float m = r.logits[0];
    for (int64_t e = 1; e < E; ++e) m = r.logits[e] > m ? r.logits[e] : m;
    float s = 0.0f;
    for (int64_t e = 0; e < E; ++e) s += expf(r.logits[e] - m);
    r.max = m;
    r.sum = s;
  }
  // Groups: each one's value, then the topk_groups best (a bit each in `chosen`).
  uint64_t chosen = ~uint64_t(0);
  if (r.num_groups > 1) {
    float value[kRouteMaxGroups];
    for (int64_t g = 0; g < r.num_groups; ++g) value[g] = route_group_value(r, g);
    chosen = 0;
    for (int64_t pick = 0; pick < r.topk_groups; ++pick) {
      int64_t best = -1;
      for (int64_t g = 0; g < r.num_groups; ++g)
        if (!((chosen >> g) & 1) && (best < 0 || route_before(value[g], g, value[best], best))) best = g;
      chosen |= uint64_t(1) << best;
    }
  }
  // Experts, best first: each pick is the best of those ranking after the previous pick.
  const int64_t size = E / r.num_groups;
  float prev = 0.0f;
  int64_t prev_id = -1;
  for (int64_t k = 0; k < r.topk; ++k) {
    float best = 0.0f;
    int64_t best_id = -1;
    for (int64_t e = 0; e < E; ++e) {
      if (!((chosen >> (e / size)) & 1)) continue;
      const float c = route_choice(r, e);
      if (prev_id >= 0 && !route_before(prev, prev_id, c, e)) continue;
      if (best_id < 0 || route_before(c, e, best, best_id)) best = c, best_id = e;
    }
    ids[k] = int32_t(best_id);
    prev = best, prev_id = best_id;
  }
  float total = 0.0f;
  for (int64_t k = 0; k < r.topk; ++k) {
    weights[k] = route_score(r, ids[k]);
    total += weights[k];
  }
  for (int64_t k = 0; k < r.topk; ++k) {
    const float w = r.renormalize && total > 0.0f ? weights[k] / total : weights[k];
    weights[k] = w * r.scale;
  }
}

// The per-token view of the op's arguments (max and sum are filled by route_token).
FMOE_HD RouteToken route_token_args(const fmoe_route_args& a, int64_t t) {
  RouteToken r;
  r.logits = a.logits + t * a.num_experts;
  r.bias = a.selection_bias;
  r.num_experts = a.num_experts;
  r.topk = a.topk;
  r.num_groups = a.num_groups;
  r.topk_groups = a.topk_groups;
  r.softmax = a.scoring == FMOE_ROUTE_SOFTMAX;
  r.renormalize = a.renormalize != 0;
  r.scale = float(a.scale);
  r.max = 0.0f;
  r.sum = 1.0f;
  return r;
}

}  // namespace fmoe
