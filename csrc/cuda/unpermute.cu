// unpermute: out[t, :] = bf16( sum_{k = 0..topk-1} probs[t,k] * input[inverse_map[t,k], :] ),
// the f32 sum taken in slot order, skipping slots whose row is not in [0, rows).
//
// A block owns (token, piece of blockDim.x units) pairs, grid-stride; a thread owns 8 columns
// (16-byte loads) or one column when H % 8 != 0 or a pointer is unaligned. The slots are taken
// kSlotBatch at a time: their inverse_map entries and probs are loaded first, then all their rows,
// then summed in slot order, so a decode token waits for two memory round trips per batch rather
// than two per slot (topk = 8 one after another cost ~6 us at T = 1). Small T spreads a row's
// columns over several blocks (narrow blocks) so that the few rows are read by many SMs at once.
// The adds and multiplies are explicitly rounded (__fmul_rn / __fadd_rn) so that nvcc cannot fuse
// them into FMAs: the sum is then the same sequence of f32 operations as the host's loop, bit for
// bit.
#include <algorithm>
#include <type_traits>

#include "cuda/backend.h"
#include "cuda/configs.h"
#include "cuda/mx_block.cuh"
#include "cuda/ptx/griddep.cuh"

namespace fmoe {
namespace cuda {
namespace {

constexpr int kSlotBatch = 8;

struct UnpermuteParams {
  const uint16_t* input;  // [rows, H]
  const int32_t* inverse_map;
  const float* probs;     // or null (weight 1)
  uint16_t* output;       // [T, H]
  int64_t rows, tokens, H, topk;
  int64_t pieces;         // column pieces per token: ceil(units / blockDim.x)
};

// kWidth columns per thread step: 8 (16-byte vectors) or 1. Launch bounds of four 256-thread
// blocks per SM (64 registers; ptxas spills 28 bytes): at prefill sizes the kernel is bound by the
// row loads it keeps in flight. With the 127 registers it took unbounded, two blocks fit: the op
// ran at ~2.5 TB/s, now ~3.5 (H200, 8192 tokens of qwen3 and deepseek-v3: 26-28% less time;
// three blocks, 80 registers, measured between; bench/NOTES.md v11).
template <int kWidth>
__global__ void __launch_bounds__(kRowThreadsMax, 4) unpermute_kernel(UnpermuteParams p) {
  // Launched as a programmatic dependent of the decode FC2 (fused_moe.cu), it starts under FC2's
  // tail; every read of the input follows the wait (a no-op for a plain launch).
  ptx::griddep_wait();
  const int64_t units = p.H / kWidth;
  for (int64_t b = blockIdx.x; b < p.tokens * p.pieces; b += gridDim.x) {
    const int64_t t = b / p.pieces;
    const int64_t u = (b - t * p.pieces) * blockDim.x + threadIdx.x;
    if (u >= units) continue;
    const int32_t* inv = p.inverse_map + t * p.topk;
    float acc[kWidth];
#pragma unroll
    for (int i = 0; i < kWidth; ++i) acc[i] = 0.0f;
    for (int64_t k0 = 0; k0 < p.topk; k0 += kSlotBatch) {
      int32_t row[kSlotBatch];
      float w[kSlotBatch];
#pragma unroll
      for (int j = 0; j < kSlotBatch; ++j) {
        const int64_t k = k0 + j;
        const int32_t r = k < p.topk ? inv[k] : -1;
        // Not local, or a corrupt entry: treated as -1.
        row[j] = (r >= 0 && r < p.rows) ? r : -1;
        w[j] = (row[j] >= 0 && p.probs) ? p.probs[t * p.topk + k] : 1.0f;
      }
      // The batch's row pieces stay packed until they are summed: a uint4 is 4 registers, its
      // 8 unpacked halves 8 (the register budget above).
      using Piece = std::conditional_t<kWidth == 8, uint4, uint16_t>;
      Piece x[kSlotBatch];
#pragma unroll
      for (int j = 0; j < kSlotBatch; ++j) {
        if (row[j] < 0) continue;
        x[j] = *reinterpret_cast<const Piece*>(p.input + int64_t(row[j]) * p.H + u * kWidth);
      }
#pragma unroll
      for (int j = 0; j < kSlotBatch; ++j) {
        if (row[j] < 0) continue;
        uint16_t v[kWidth];
        if constexpr (kWidth == 8) unpack8(x[j], v);
        else v[0] = x[j];
#pragma unroll
        for (int i = 0; i < kWidth; ++i)
          acc[i] = __fadd_rn(acc[i], __fmul_rn(w[j], bf16_to_f32(v[i])));
      }
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

// Threads per block for `units` per token: a row's units in one block while there are tokens
// enough to fill the SMs, else narrower blocks (down to one warp) so that more SMs share the rows.
int unpermute_threads(int64_t units, int64_t tokens, int num_sms) {
  int threads = row_threads(units);
  while (threads > 32 && tokens * ((units + threads - 1) / threads) < 2 * int64_t(num_sms))
    threads = std::max(32, threads / 2 / 32 * 32);
  return threads;
}

}  // namespace
}  // namespace cuda

using namespace cuda;

Status CudaBackend::unpermute(BackendStream* s, const fmoe_unpermute_args& a) {
  return unpermute_launch(s, a, /*overlap_previous=*/false);
}

Status CudaBackend::unpermute_launch(BackendStream* s, const fmoe_unpermute_args& a,
                                     bool overlap_previous) {
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
  const bool vec = a.hidden_size % 8 == 0 && aligned_to(p.input, 16) && aligned_to(p.output, 16);
  const int64_t units = vec ? a.hidden_size / 8 : a.hidden_size;
  const int threads = unpermute_threads(units, a.num_tokens, props_.multiProcessorCount);
  p.pieces = (units + threads - 1) / threads;
  cudaLaunchConfig_t lc = {};
  lc.gridDim = dim3(unsigned(std::min<int64_t>(a.num_tokens * p.pieces, kMaxGridBlocks)));
  lc.blockDim = dim3(unsigned(threads));
  lc.stream = stream_of(s);
  cudaLaunchAttribute attr;
  set_programmatic_launch(&lc, &attr, overlap_previous);
  FMOE_CHECK_CUDA(vec ? cudaLaunchKernelEx(&lc, unpermute_kernel<8>, p)
                      : cudaLaunchKernelEx(&lc, unpermute_kernel<1>, p));
  FMOE_CHECK_LAUNCH("unpermute_kernel");
  return FMOE_OK;
}

}  // namespace fmoe
