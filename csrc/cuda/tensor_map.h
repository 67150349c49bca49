// CUtensorMap construction for the bulk tensor copy engine (TMA), without linking libcuda.
//
// The library links the CUDA runtime statically and must load on machines without a driver, so
// the driver's cuTensorMapEncodeTiled is fetched at run time through the runtime's entry-point
// query; <cuda.h> is used for its types only.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fmoe::cuda {

// A 2-D bf16 tensor [outer, inner] (inner contiguous, rows `row_stride_bytes` apart) read in
// boxes of box_outer x box_inner elements into shared memory with 128-byte swizzle. Out-of-bounds
// box elements read as zero. Requirements (checked by the driver, reported as an error here):
// base 16-byte aligned, row_stride_bytes a multiple of 16, box_inner * 2 <= 128, box_outer <= 256.
// Returns cudaErrorInvalidValue when the driver refuses the map, cudaErrorNotSupported (or the
// query's own error) when the entry point cannot be found.
cudaError_t make_tensor_map_bf16_2d_sw128(CUtensorMap* map, const void* base, uint64_t inner,
                                          uint64_t outer, uint64_t row_stride_bytes,
                                          uint32_t box_inner, uint32_t box_outer);

// The same without swizzle: box rows land densely, box_inner * 2 bytes apart (a multiple of 16).
cudaError_t make_tensor_map_bf16_2d_plain(CUtensorMap* map, const void* base, uint64_t inner,
                                          uint64_t outer, uint64_t row_stride_bytes,
                                          uint32_t box_inner, uint32_t box_outer);

}  // namespace fmoe::cuda
