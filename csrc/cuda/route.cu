// route: each token's topk experts and weights from its router logits, one thread per token
// running core/route_math.h, the code the host backend runs. A token's work is a few passes over
// its num_experts logits (the scores are recomputed, not kept: no per-thread array in local
// memory), microseconds beside the layer it routes. The scores' exp is the device's (within 2 ulp
// of the host's), so a choice between two experts whose choices differ by an ulp may go the other
// way; softmax without a bias or groups chooses by the logits, exactly as the host does.
#include "core/route_math.h"
#include "cuda/backend.h"

namespace fmoe {
namespace cuda {
namespace {

constexpr int kRouteThreads = 128;

__global__ void __launch_bounds__(kRouteThreads) route_kernel(fmoe_route_args a) {
  const int64_t t = int64_t(blockIdx.x) * kRouteThreads + threadIdx.x;
  if (t >= a.num_tokens) return;
  route_token(route_token_args(a, t), a.routing_map + t * a.topk, a.probs + t * a.topk);
}

}  // namespace
}  // namespace cuda

using namespace cuda;

Status CudaBackend::route(BackendStream* s, const fmoe_route_args& a) {
  FMOE_TRY(activate());
  if (a.num_tokens == 0) return FMOE_OK;
  const int64_t blocks = (a.num_tokens + kRouteThreads - 1) / kRouteThreads;
  route_kernel<<<unsigned(blocks), kRouteThreads, 0, stream_of(s)>>>(a);
  FMOE_CHECK_LAUNCH("route_kernel");
  return FMOE_OK;
}

}  // namespace fmoe
