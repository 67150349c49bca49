// unpermute: out[t] = bf16(sum over slots k in order of probs[t,k] * input[inverse_map[t,k]]),
// summed in f32; tokens without a local slot get zeros.
#include <vector>

#include "core/numerics.h"
#include "host/host_backend.h"

namespace fmoe::host {

Status unpermute(ThreadPool& pool, const fmoe_unpermute_args& a) {
  const int64_t H = a.hidden_size, K = a.topk, rows = a.rows;
  const auto* in = static_cast<const uint16_t*>(a.input);
  auto* out = static_cast<uint16_t*>(a.output);
  pool.parallel_for(0, a.num_tokens, 8, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(static_cast<size_t>(H));
    for (int64_t t = lo; t < hi; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = a.inverse_map[t * K + k];
        if (r < 0 || r >= rows) continue;  // not local, or a corrupt entry: never read
        const float p = a.probs != nullptr ? a.probs[t * K + k] : 1.0f;
        const uint16_t* src = in + r * H;
        for (int64_t h = 0; h < H; ++h) {
          const float term = p * bf16_to_f32(src[h]);
          acc[h] += term;
        }
      }
      for (int64_t h = 0; h < H; ++h) out[t * H + h] = f32_to_bf16(acc[h]);
    }
  });
  return FMOE_OK;
}

}  // namespace fmoe::host
