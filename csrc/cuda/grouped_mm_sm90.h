// Hopper (sm_90a) grouped BF16 GEMM: wgmma + TMA, warp-specialised, persistent over device-side
// group offsets. The prefill path of fmoe_grouped_mm_bf16; semantics exactly those of fmoe.h
// ("Op: grouped GEMM"). The design notes are at the top of grouped_mm_sm90.cu.
#pragma once

#include <cuda_runtime.h>

#include "fmoe.h"

namespace fmoe::cuda {

// Whether this kernel handles the shape: n % 8 == 0, k % 8 == 0 (16-byte rows for the copy
// engine), 1 <= groups <= 1024, a / b / c 16-byte aligned, bias 4-byte aligned, rows, groups*n
// and the tile count within int32. False means the caller falls back; nothing is enqueued.
bool grouped_mm_sm90_supported(const fmoe_grouped_mm_args& a);

// Enqueues c = grouped a @ b^T (+ bias) on `stream` over a persistent grid of at most `num_sms`
// CTAs (one per SM). Reads the group offsets on the device only (graph-capturable). A group g is
// computed iff 0 <= offsets[g] <= offsets[g+1] <= rows; any other group is skipped (fmoe.h: a bad
// offset skips its group), rows of no computed group are never written. Returns cudaSuccess when
// launched (or when there is nothing to do), else the error; call only when supported() holds.
cudaError_t grouped_mm_sm90_bf16(const fmoe_grouped_mm_args& a, int num_sms, cudaStream_t stream);

// The same with the tile width forced (block_n = 128 or 256): for tests and benchmarks that
// exercise both configurations. grouped_mm_sm90_bf16 picks it from the shape.
cudaError_t grouped_mm_sm90_bf16_block_n(const fmoe_grouped_mm_args& a, int num_sms, int block_n,
                                         cudaStream_t stream);

// The tile width grouped_mm_sm90_bf16 would pick (128 or 256).
int grouped_mm_sm90_pick_block_n(const fmoe_grouped_mm_args& a, int num_sms);

}  // namespace fmoe::cuda
