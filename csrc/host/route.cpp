// route: each token's topk experts and weights from its router logits (core/route_math.h, the
// code the CUDA kernel runs too), tokens shared out over the pool.
#include "core/route_math.h"
#include "host/host_backend.h"

namespace fmoe::host {

Status route(ThreadPool& pool, const fmoe_route_args& a) {
  pool.parallel_for(0, a.num_tokens, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      route_token(route_token_args(a, t), a.routing_map + t * a.topk, a.probs + t * a.topk);
  });
  return FMOE_OK;
}

}  // namespace fmoe::host
