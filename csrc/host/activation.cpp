// activation_quant: out[r, j] = act(in[r, :]) in f32, rounded once to bf16; the fused MXFP8
// output is exactly the quantization of those bf16 values. Rows with row_map == -1 or at or
// beyond *n_used are skipped (neither read nor written).
#include <algorithm>
#include <vector>

#include "core/activation_math.h"
#include "core/numerics.h"
#include "host/host_backend.h"

namespace fmoe::host {

Status activation_quant(ThreadPool& pool, const fmoe_activation_args& a) {
  const int64_t I = a.ffn;
  const bool gated = a.activation != FMOE_ACT_SQUARED_RELU;
  const bool interleaved = gated && a.layout == FMOE_LAYOUT_INTERLEAVED;
  const int64_t n1 = gated ? 2 * I : I;
  const float alpha = float(a.alpha), limit = float(a.limit);
  const auto* in = static_cast<const uint16_t*>(a.input);
  auto* out = static_cast<uint16_t*>(a.output);
  // n_used is read once: rows at or beyond it may hold stale data from a longer batch.
  const int64_t end = a.n_used != nullptr ? std::clamp<int64_t>(*a.n_used, 0, a.rows) : a.rows;
  const int64_t blocks = I / kMxBlock;

  pool.parallel_for(0, end, 16, [&](int64_t lo, int64_t hi) {
    std::vector<uint16_t> row(static_cast<size_t>(I));
    for (int64_t r = lo; r < hi; ++r) {
      if (a.row_map != nullptr && a.row_map[r] < 0) continue;
      const uint16_t* x = in + r * n1;
      for (int64_t j = 0; j < I; ++j) {
        float g, u = 0.0f;
        if (!gated) {
          g = bf16_to_f32(x[j]);
        } else if (interleaved) {
          g = bf16_to_f32(x[2 * j]);
          u = bf16_to_f32(x[2 * j + 1]);
        } else {
          g = bf16_to_f32(x[j]);
          u = bf16_to_f32(x[I + j]);
        }
        row[j] = f32_to_bf16(activation_value(a.activation, g, u, alpha, limit));
      }
      if (out != nullptr) std::copy(row.begin(), row.end(), out + r * I);
      if (a.output_q != nullptr) {
        mx_quantize_row(row.data(), I, a.output_q + r * I, a.output_scale + r * blocks);
      }
    }
  });
  return FMOE_OK;
}

}  // namespace fmoe::host
