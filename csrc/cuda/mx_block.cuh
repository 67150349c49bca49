// The MXFP8 block rule of core/numerics.h, spread over the lanes of a warp that hold one
// 32-element block together. Only the reduction (amax) is distributed; every element goes through
// numerics.h (its branch-free forms for ordinary scales, proven equal to the scalar functions by
// test/numerics.test.ts), so the bytes equal the host's mx_quantize_block bit for bit.
#pragma once

#include <cstdint>

#include "core/numerics.h"

namespace fmoe::cuda {

constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// Each lane holds kPerLane consecutive bf16 values of a block; 32 / kPerLane consecutive lanes
// (aligned to that count) hold one block. Returns the block's e8m0 scale (the same value on every
// lane of the block), kE8m0Nan if it holds an Inf or NaN.
// Every lane of the warp must call this (full-mask shuffles); lanes without data pass zeros and
// ignore the result.
template <int kPerLane>
__device__ __forceinline__ uint8_t mx_scale_lanes(const uint16_t (&v)[kPerLane]) {
  static_assert(kPerLane >= 1 && kMxBlock % kPerLane == 0 && kMxBlock / kPerLane <= 32, "");
  constexpr int kLanes = kMxBlock / kPerLane;
  // Largest magnitude as bf16 bits: for finite values the integer order is the numeric order,
  // and Inf / NaN (>= 0x7F80) sort above every finite value, so one max finds both the amax and
  // whether the block is bad.
  uint32_t amax = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) amax = max(amax, uint32_t(v[i] & 0x7FFFu));
#pragma unroll
  for (int d = 1; d < kLanes; d <<= 1) amax = max(amax, __shfl_xor_sync(kFullWarp, amax, d));
  return amax >= 0x7F80u ? kE8m0Nan : e8m0_scale_for_amax(bf16_to_f32(uint16_t(amax)));
}

// As mx_scale_lanes; also writes the lane's e4m3 bytes. Blocks of ordinary scales take
// numerics.h's mx_quantize_fast, the rest (NaN, |s| > 110) mx_quantize_exact: the same bytes.
template <int kPerLane>
__device__ __forceinline__ uint8_t mx_quantize_lanes(const uint16_t (&v)[kPerLane],
                                                     uint8_t (&q)[kPerLane]) {
  const uint8_t scale = mx_scale_lanes<kPerLane>(v);
  if (mx_fast_scale_ok(scale)) {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) q[i] = mx_quantize_fast(v[i], scale);
  } else {
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) q[i] = mx_quantize_exact(v[i], scale);
  }
  return scale;
}

// ---- The k order of the register-dequantizing MXFP8 GEMM (grouped_mm_sm90.cu, "MXFP8 weights
// in registers") -----------------------------------------------------------------------------
// That GEMM reads 16 consecutive e4m3 weights of a row with one load and turns byte pairs into
// wgmma A-fragment registers; its bf16 activations must hold the same k in the same places.
// Position l of each 64-wide k block of such an activation row holds element
// mx_regs_k_source(l) of the block (a permutation inside the block; MXFP8 blocks of 32 are
// still whole in the source order). With l = 16 kk + 8 hi + 2 c + e: 16 c + 4 kk + hi + 2 e.
__host__ __device__ constexpr int mx_regs_k_source(int l) {
  return 16 * ((l >> 1) & 3) + 4 * (l >> 4) + ((l >> 3) & 1) + 2 * (l & 1);
}

// Chunk m (8 positions, 16 bytes) of a 64-block in that order, gathered from the block's 64 bf16
// values in source order; elem(i) returns source element i's bits.
template <class Elem>
__device__ __forceinline__ uint4 mx_regs_gather_chunk(int m, Elem elem) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = uint32_t(elem(mx_regs_k_source(8 * m + 2 * i))) |
           (uint32_t(elem(mx_regs_k_source(8 * m + 2 * i + 1))) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// The MXFP8 round trip of 8 consecutive bf16 (4 consecutive lanes hold one 32-block, as for
// mx_quantize_lanes): dequant(quant(v)) as bf16, exact (the value has 4 significant bits) but for
// results below bf16's normal range. Every lane of the warp must call it. Blocks of ordinary
// scales take numerics.h's mx_round_trip_fast (a few integer and f32 ops per element, no branch;
// the FC1 epilogue of the MXFP8 prefill GEMM runs this for each of its outputs), the rest
// (NaN, |s| > 110) the scalar functions; both give the same bits.
__device__ __forceinline__ void mx_round_trip_lanes(uint16_t (&v)[8]) {
  const uint8_t scale = mx_scale_lanes<8>(v);
  if (mx_fast_scale_ok(scale)) {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = mx_round_trip_fast(v[i], scale);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = mx_round_trip_exact(v[i], scale);
  }
}

// 8 bf16 <-> one 16-byte vector.
__device__ __forceinline__ void unpack8(const uint4& u, uint16_t (&v)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = uint16_t(w[i] & 0xFFFFu);
    v[2 * i + 1] = uint16_t(w[i] >> 16);
  }
}
__device__ __forceinline__ uint4 pack8(const uint16_t (&v)[8]) {
  return make_uint4(uint32_t(v[0]) | (uint32_t(v[1]) << 16),
                    uint32_t(v[2]) | (uint32_t(v[3]) << 16),
                    uint32_t(v[4]) | (uint32_t(v[5]) << 16),
                    uint32_t(v[6]) | (uint32_t(v[7]) << 16));
}
// 8 bytes <-> one 8-byte vector (e4m3 data).
__device__ __forceinline__ uint2 pack8_bytes(const uint8_t (&q)[8]) {
  return make_uint2(uint32_t(q[0]) | (uint32_t(q[1]) << 8) | (uint32_t(q[2]) << 16) |
                        (uint32_t(q[3]) << 24),
                    uint32_t(q[4]) | (uint32_t(q[5]) << 8) | (uint32_t(q[6]) << 16) |
                        (uint32_t(q[7]) << 24));
}

// The MXFP8 round trip of this lane's 8 consecutive bf16 (8 aligned lanes hold one 64-block),
// returned as this lane's 16-byte chunk of the block in the k order above; warp_buf is this
// warp's 512 bytes of shared memory (the reorder goes through it). Every lane of the warp must
// call it.
__device__ __forceinline__ uint4 mx_round_trip_k_order_lanes(const uint4& in, uint16_t* warp_buf,
                                                             int lane) {
  uint16_t v[8];
  unpack8(in, v);
  mx_round_trip_lanes(v);
  *reinterpret_cast<uint4*>(warp_buf + lane * 8) = pack8(v);
  __syncwarp();
  const uint16_t* block = warp_buf + (lane & ~7) * 8;
  const uint4 out = mx_regs_gather_chunk(lane & 7, [&](int src) { return block[src]; });
  __syncwarp();  // every lane has gathered before the buffer is written again
  return out;
}

__host__ __device__ __forceinline__ bool aligned_to(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

}  // namespace fmoe::cuda
