// unpermute: out[t, :] = bf16( sum_{k = 0..topk-1} probs[t,k] * input[inverse_map[t,k], :] ),
// the f32 sum taken in slot order, skipping slots whose row is not in [0, rows).
//
// One block per token (grid-stride), each thread owning 8 columns (16-byte loads) or one column
// when H % 8 != 0 or a pointer is unaligned. The adds and multiplies are explicitly rounded
// (__fmul_rn / __fadd_rn) so that nvcc cannot fuse them into FMAs: the sum is then the same
// sequence of f32 operations as the host's loop, bit for bit.
#include <algorithm>

#include "cuda/backend.h"
#include "cuda/configs.h"
#include "cuda/mx_block.cuh"

namespace fmoe {
namespace cuda {
namespace {

struct UnpermuteParams {
  const uint16_t* input;  // [rows, H]
  const int32_t* inverse_map;
  const float* probs;     // or null (weight 1)
  uint16_t* output;       // [T, H]
  int64_t rows, tokens, H, topk;
};

// kWidth columns per thread step: 8 (16-byte vectors) or 1.
template <int kWidth>
__global__ void unpermute_kernel(UnpermuteParams p) {
  const int64_t units = p.H / kWidth;
  for (int64_t t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    const int32_t* inv = p.inverse_map + t * p.topk;
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      float acc[kWidth];
#pragma unroll
      for (int i = 0; i < kWidth; ++i) acc[i] = 0.0f;
      for (int64_t k = 0; k < p.topk; ++k) {
        const int32_t r = inv[k];
        if (r < 0 || r >= p.rows) continue;  // not local, or a corrupt entry: treated as -1
        const float w = p.probs ? p.probs[t * p.topk + k] : 1.0f;
        const uint16_t* src = p.input + int64_t(r) * p.H + u * kWidth;
        uint16_t x[kWidth];
        if constexpr (kWidth == 8) {
          unpack8(*reinterpret_cast<const uint4*>(src), x);
        } else {
          x[0] = src[0];
        }
#pragma unroll
        for (int i = 0; i < kWidth; ++i)
          acc[i] = __fadd_rn(acc[i], __fmul_rn(w, bf16_to_f32(x[i])));
      }
      uint16_t y[kWidth];
#pragma unroll
      for (int i = 0; i < kWidth; ++i) y[i] = f32_to_bf16(acc[i]);
      uint16_t* dst = p.output + t * p.H + u * kWidth;
      if constexpr (kWidth == 8) {
        *reinterpret_cast<uint4*>(dst) = pack8(y);
      } else {
        dst[0] = y[0];
      }
    }
  }
}

}  // namespace
}  // namespace cuda

using namespace cuda;

Status CudaBackend::unpermute(BackendStream* s, const fmoe_unpermute_args& a) {
  FMOE_TRY(activate());
  if (a.num_tokens == 0) return FMOE_OK;
  UnpermuteParams p;
  p.input = static_cast<const uint16_t*>(a.input);
  p.inverse_map = a.inverse_map;
  p.probs = a.probs;
  p.output = static_cast<uint16_t*>(a.output);
  p.rows = a.rows;
  p.tokens = a.num_tokens;
  p.H = a.hidden_size;
  p.topk = a.topk;
  const unsigned grid = unsigned(std::min<int64_t>(a.num_tokens, kMaxGridBlocks));
  if (a.hidden_size % 8 == 0 && aligned_to(p.input, 16) && aligned_to(p.output, 16)) {
    unpermute_kernel<8><<<grid, row_threads(a.hidden_size / 8), 0, stream_of(s)>>>(p);
  } else {
    unpermute_kernel<1><<<grid, row_threads(a.hidden_size), 0, stream_of(s)>>>(p);
  }
  FMOE_CHECK_LAUNCH("unpermute_kernel");
  return FMOE_OK;
}

}  // namespace fmoe
