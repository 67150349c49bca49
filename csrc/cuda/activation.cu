// activation_quant: out[r, j] = act(in[r, :]) for the rows that are not skipped, in f32, rounded
// once to bf16; optionally also (or only) the MXFP8 copy of those bf16 values.
//
// One block per row (grid-stride over rows), one output column per thread step. A warp covers 32
// consecutive columns, which is exactly one MXFP8 block when I % 32 == 0 (required with output_q),
// so the block's amax is a warp reduction.
#include <algorithm>

#include "cuda/activation.cuh"
#include "cuda/backend.h"
#include "cuda/configs.h"
#include "cuda/mx_block.cuh"

namespace fmoe {
namespace cuda {
namespace {

struct ActParams {
  const uint16_t* in;  // [rows, N1]
  uint16_t* out;       // [rows, I] or null
  uint8_t* out_q;      // [rows, I] or null
  uint8_t* out_scale;  // [rows, I/32]
  const int32_t* row_map;
  const int32_t* n_used;
  int64_t rows, ffn;
  int activation, layout;
  float alpha, limit;
};

// act of column j of an FC1 output row (activation.cuh's formulas).
__device__ __forceinline__ float activate(const ActParams& p, const uint16_t* row, int64_t j) {
  if (p.activation == FMOE_ACT_SQUARED_RELU)
    return activation_value(p.activation, bf16_to_f32(row[j]), 0.0f, p.alpha, p.limit);
  const bool halves = p.layout == FMOE_LAYOUT_HALVES;
  const float g = bf16_to_f32(halves ? row[j] : row[2 * j]);
  const float u = bf16_to_f32(halves ? row[p.ffn + j] : row[2 * j + 1]);
  return activation_value(p.activation, g, u, p.alpha, p.limit);
}

__global__ void activation_kernel(ActParams p) {
  // Rows >= *n_used may hold stale data from a longer batch: never read them.
  const int64_t limit_rows = p.n_used ? std::min<int64_t>(p.rows, max(*p.n_used, 0)) : p.rows;
  const int64_t I = p.ffn;
  const int64_t n1 = p.activation == FMOE_ACT_SQUARED_RELU ? I : 2 * I;
  for (int64_t r = blockIdx.x; r < limit_rows; r += gridDim.x) {
    if (p.row_map && p.row_map[r] < 0) continue;  // padding row (block-uniform)
    const uint16_t* row = p.in + r * n1;
    for (int64_t j0 = 0; j0 < I; j0 += blockDim.x) {
      const int64_t j = j0 + threadIdx.x;
      const bool active = j < I;
      uint16_t y[1] = {0};
      if (active) {
        y[0] = f32_to_bf16(activate(p, row, j));
        if (p.out) p.out[r * I + j] = y[0];
      }
      if (p.out_q) {
        // Whole warps only: j0 and blockDim.x are multiples of 32 and so is I.
        uint8_t q[1];
        const uint8_t sc = mx_quantize_lanes<1>(y, q);
        if (active) {
          p.out_q[r * I + j] = q[0];
          if (j % 32 == 0) p.out_scale[r * (I / 32) + j / 32] = sc;
        }
      }
    }
  }
}

}  // namespace
}  // namespace cuda

using namespace cuda;

Status CudaBackend::activation_quant(BackendStream* s, const fmoe_activation_args& a) {
  FMOE_TRY(activate());
  if (a.rows == 0) return FMOE_OK;
  ActParams p;
  p.in = static_cast<const uint16_t*>(a.input);
  p.out = static_cast<uint16_t*>(a.output);
  p.out_q = a.output_q;
  p.out_scale = a.output_scale;
  p.row_map = a.row_map;
  p.n_used = a.n_used;
  p.rows = a.rows;
  p.ffn = a.ffn;
  p.activation = int(a.activation);
  p.layout = int(a.layout);
  p.alpha = float(a.alpha);
  p.limit = float(a.limit);
  const unsigned grid = unsigned(std::min<int64_t>(a.rows, kMaxGridBlocks));
  activation_kernel<<<grid, row_threads(a.ffn), 0, stream_of(s)>>>(p);
  FMOE_CHECK_LAUNCH("activation_kernel");
  return FMOE_OK;
}

}  // namespace fmoe
