// See tensor_map.h.
#include "cuda/tensor_map.h"

#include <cudaTypedefs.h>

namespace fmoe::cuda {

namespace {

struct EncodeTiledEntry {
  PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  cudaError_t err = cudaSuccess;
};

// Looked up once per process (thread-safe static initialisation). The 12.0 ABI of the function
// is the one whose signature PFN_..._v12000 describes.
const EncodeTiledEntry& encode_tiled_entry() {
  static const EncodeTiledEntry entry = [] {
    EncodeTiledEntry e;
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
    e.err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                             cudaEnableDefault, &status);
    if (e.err == cudaSuccess && (status != cudaDriverEntryPointSuccess || fn == nullptr))
      e.err = cudaErrorNotSupported;
    if (e.err == cudaSuccess) e.fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    return e;
  }();
  return entry;
}

}  // namespace

namespace {

cudaError_t make_tensor_map_bf16_2d(CUtensorMap* map, const void* base, uint64_t inner,
                                    uint64_t outer, uint64_t row_stride_bytes, uint32_t box_inner,
                                    uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  const EncodeTiledEntry& entry = encode_tiled_entry();
  if (entry.err != cudaSuccess) return entry.err;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {row_stride_bytes};  // dimension 0 is implicitly contiguous
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t elem_strides[2] = {1, 1};
  // L2 promotion of 256 bytes: each box row is 64 or 128 bytes, and neighbouring boxes (the next
  // k block) follow soon; FLOAT_OOB_FILL_NONE means zero fill.
  CUresult r = entry.fn(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims,
                        strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace

cudaError_t make_tensor_map_bf16_2d_sw128(CUtensorMap* map, const void* base, uint64_t inner,
                                          uint64_t outer, uint64_t row_stride_bytes,
                                          uint32_t box_inner, uint32_t box_outer) {
  return make_tensor_map_bf16_2d(map, base, inner, outer, row_stride_bytes, box_inner, box_outer,
                                 CU_TENSOR_MAP_SWIZZLE_128B);
}

cudaError_t make_tensor_map_bf16_2d_plain(CUtensorMap* map, const void* base, uint64_t inner,
                                          uint64_t outer, uint64_t row_stride_bytes,
                                          uint32_t box_inner, uint32_t box_outer) {
  return make_tensor_map_bf16_2d(map, base, inner, outer, row_stride_bytes, box_inner, box_outer,
                                 CU_TENSOR_MAP_SWIZZLE_NONE);
}

}  // namespace fmoe::cuda
