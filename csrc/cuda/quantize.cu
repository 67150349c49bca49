// MXFP8 quantization, dequantization and the 128x4 swizzled scale layout. Every element goes
// through core/numerics.h, so the bytes equal the host backend's.
//
// All kernels are grid-stride loops over 64-bit indices with a capped grid: a full DeepSeek-V3
// fc1 ([256, 4096, 7168], 7.5e9 elements) is one call.
#include <algorithm>

#include "cuda/backend.h"
#include "cuda/configs.h"
#include "cuda/mx_block.cuh"
#include "cuda/ptx/griddep.cuh"

namespace fmoe {
namespace cuda {
namespace {

// Each thread step quantizes 8 consecutive elements; 4 consecutive lanes hold one 32-element
// block (cols % 32 == 0, so blocks never straddle rows and the scale of element i is i / 32).
// The loop steps a whole warp at a time so that the 4-lane reductions always have every lane.
// Launch overlap (QuantizeOverlap, backend.h). kBesideInput: the input does not come from
// the kernel ahead, the next kernel may launch at once (it waits for this one before reading what
// it writes), and a CTA waits for the kernel ahead before it exits, so that this one completes
// after it. kAfterPrevious: the input comes from the kernel ahead, waited for before any read; the
// launch only saves its latency under that kernel's tail. With kAfterPrevious and kNoOverlap the
// next kernel launches as this one's CTAs exit: measured on an H100 (bench/NOTES.md v22), FC2
// launched at the start of the activation's quantization ran the decode layer 1-3% slower.
template <bool kVec>
__global__ void quantize_kernel(const uint16_t* in, int64_t groups8, uint8_t* data,
                                uint8_t* scale, QuantizeOverlap overlap) {
  if (overlap == kAfterPrevious) ptx::griddep_wait();
  if (overlap == kBesideInput) ptx::griddep_launch_dependents();
  const int lane = threadIdx.x % 32;
  const int64_t warp0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) - lane;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = warp0; base < groups8; base += stride) {
    const int64_t g = base + lane;
    const bool active = g < groups8;  // groups8 % 4 == 0: whole blocks are active or not
    uint16_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (active) {
      if constexpr (kVec) {
        unpack8(*reinterpret_cast<const uint4*>(in + g * 8), v);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = in[g * 8 + i];
      }
    }
    uint8_t q[8];
    const uint8_t sc = mx_quantize_lanes<8>(v, q);
    if (active) {
      if constexpr (kVec) {
        *reinterpret_cast<uint2*>(data + g * 8) = pack8_bytes(q);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) data[g * 8 + i] = q[i];
      }
      if (g % 4 == 0) scale[g / 4] = sc;
    }
  }
  if (overlap == kBesideInput) ptx::griddep_wait();
}

// The MXFP8 round trip of every 32-block of [rows, cols] (cols % 64 == 0), written in the k order
// of the register-dequantizing GEMM (mx_block.cuh): out[r, 64b + l] = the round trip of
// in[r, 64b + mx_regs_k_source(l)]. A lane holds 8 consecutive elements, 8 lanes one 64-block
// (mx_round_trip_k_order_lanes). In place is allowed: a warp reads its 256 elements before it
// writes them. The fused layer folds this into its permute copy; this pass is its fallback.
constexpr int kRoundTripWarps = kElementwiseThreads / 32;
__global__ void __launch_bounds__(kElementwiseThreads)
    mx_round_trip_k_order_kernel(const uint16_t* in, int64_t groups8, uint16_t* out) {
  __shared__ uint16_t buf[kRoundTripWarps][256];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t warp0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) - lane;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = warp0; base < groups8; base += stride) {
    const int64_t g = base + lane;
    const bool active = g < groups8;  // groups8 % 8 == 0: whole 64-blocks are active or not
    const uint4 v = active ? *reinterpret_cast<const uint4*>(in + g * 8) : make_uint4(0, 0, 0, 0);
    const uint4 o = mx_round_trip_k_order_lanes(v, buf[warp], lane);
    if (active) *reinterpret_cast<uint4*>(out + g * 8) = o;
  }
}

// value = e4m3 * 2^s in f32: exact for every pair of bytes (the product has at most 4
// significant bits and its exponent stays >= -136 > -149), so it equals the host's bit for bit;
// a NaN scale or element gives NaN, and 448 * 2^127 overflows to Inf on both backends.
__global__ void dequantize_kernel(const uint8_t* data, const uint8_t* scale, int64_t n,
                                  float* out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = mx_dequantize(data[i], scale[i / kMxBlock]);
}

// Linear -> swizzled: walks the swizzled bytes in order (coalesced writes, padding included) and
// gathers each from the linear layout, 0 for padding.
__global__ void swizzle_kernel(const uint8_t* linear, int64_t batch, int64_t rows, int64_t cols,
                               int64_t padded_cols, int64_t bytes_per_matrix, uint8_t* out) {
  const int64_t total = batch * bytes_per_matrix;
  const int64_t tiles_per_row = padded_cols / 4;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < total; o += stride) {
    const int64_t b = o / bytes_per_matrix, within = o % bytes_per_matrix;
    const int64_t tile = within / 512, q = within % 512;
    // Inverse of swizzled_scale_offset: q = (r % 32) * 16 + ((r % 128) / 32) * 4 + c % 4.
    const int64_t r = (tile / tiles_per_row) * 128 + ((q % 16) / 4) * 32 + q / 16;
    const int64_t c = (tile % tiles_per_row) * 4 + q % 4;
    out[o] = (r < rows && c < cols) ? linear[(b * rows + r) * cols + c] : uint8_t(0);
  }
}

// Swizzled -> linear: walks the linear bytes in order and gathers each from the swizzled layout.
__global__ void unswizzle_kernel(const uint8_t* swizzled, int64_t batch, int64_t rows,
                                 int64_t cols, int64_t padded_cols, int64_t bytes_per_matrix,
                                 uint8_t* out) {
  const int64_t total = batch * rows * cols;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t b = i / (rows * cols), rc = i % (rows * cols);
    const int64_t r = rc / cols, c = rc % cols;
    out[i] = swizzled[b * bytes_per_matrix + swizzled_scale_offset(r, c, padded_cols)];
  }
}

}  // namespace
}  // namespace cuda

using namespace cuda;

Status CudaBackend::quantize_mxfp8(BackendStream* s, const uint16_t* in, int64_t rows,
                                   int64_t cols, uint8_t* data, uint8_t* scale) {
  return quantize_mxfp8_launch(s, in, rows, cols, data, scale, kNoOverlap);
}

Status CudaBackend::quantize_mxfp8_launch(BackendStream* s, const uint16_t* in, int64_t rows,
                                          int64_t cols, uint8_t* data, uint8_t* scale,
                                          QuantizeOverlap overlap) {
  FMOE_TRY(activate());
  const int64_t groups8 = rows * cols / 8;
  if (groups8 == 0) return FMOE_OK;
  cudaLaunchConfig_t lc = {};
  lc.gridDim = dim3(grid_blocks(groups8, kElementwiseThreads));
  lc.blockDim = dim3(kElementwiseThreads);
  lc.stream = stream_of(s);
  cudaLaunchAttribute attr;
  set_programmatic_launch(&lc, &attr, overlap != kNoOverlap);
  const bool vec = aligned_to(in, 16) && aligned_to(data, 8);
  FMOE_CHECK_CUDA(vec ? cudaLaunchKernelEx(&lc, quantize_kernel<true>, in, groups8, data, scale,
                                           overlap)
                      : cudaLaunchKernelEx(&lc, quantize_kernel<false>, in, groups8, data, scale,
                                           overlap));
  FMOE_CHECK_LAUNCH("quantize_kernel");
  return FMOE_OK;
}

Status CudaBackend::mx_round_trip_k_order(BackendStream* s, const uint16_t* in, int64_t rows,
                                          int64_t cols, uint16_t* out) {
  FMOE_TRY(activate());
  const int64_t groups8 = rows * cols / 8;
  if (groups8 == 0) return FMOE_OK;
  mx_round_trip_k_order_kernel<<<grid_blocks(groups8, kElementwiseThreads), kElementwiseThreads, 0,
                                 stream_of(s)>>>(in, groups8, out);
  FMOE_CHECK_LAUNCH("mx_round_trip_k_order_kernel");
  return FMOE_OK;
}

Status CudaBackend::dequantize_mxfp8(BackendStream* s, const uint8_t* data, const uint8_t* scale,
                                     int64_t rows, int64_t cols, float* out) {
  FMOE_TRY(activate());
  const int64_t n = rows * cols;
  if (n == 0) return FMOE_OK;
  dequantize_kernel<<<grid_blocks(n, kElementwiseThreads), kElementwiseThreads, 0,
                      stream_of(s)>>>(data, scale, n, out);
  FMOE_CHECK_LAUNCH("dequantize_kernel");
  return FMOE_OK;
}

Status CudaBackend::swizzle_scales(BackendStream* s, const uint8_t* in, int64_t batch,
                                   int64_t rows, int64_t scale_cols, bool to_swizzled,
                                   uint8_t* out) {
  FMOE_TRY(activate());
  const int64_t padded_rows = (rows + 127) / 128 * 128;
  const int64_t padded_cols = (scale_cols + 3) / 4 * 4;
  const int64_t per_matrix = padded_rows * padded_cols;
  const int64_t work = to_swizzled ? batch * per_matrix : batch * rows * scale_cols;
  if (work == 0) return FMOE_OK;
  const unsigned grid = grid_blocks(work, kElementwiseThreads);
  if (to_swizzled) {
    swizzle_kernel<<<grid, kElementwiseThreads, 0, stream_of(s)>>>(in, batch, rows, scale_cols,
                                                                   padded_cols, per_matrix, out);
    FMOE_CHECK_LAUNCH("swizzle_kernel");
  } else {
    unswizzle_kernel<<<grid, kElementwiseThreads, 0, stream_of(s)>>>(
        in, batch, rows, scale_cols, padded_cols, per_matrix, out);
    FMOE_CHECK_LAUNCH("unswizzle_kernel");
  }
  return FMOE_OK;
}

}  // namespace fmoe
