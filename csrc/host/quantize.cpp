// MXFP8 quantization, dequantization and the 128x4 swizzled scale layout (fmoe.h), built on the
// scalar rules of core/numerics.h that the CUDA backend shares.
#include <cstring>

#include "core/numerics.h"
#include "host/host_backend.h"

namespace fmoe::host {

Status quantize_mxfp8(ThreadPool& pool, const uint16_t* in, int64_t rows, int64_t cols,
                      uint8_t* data, uint8_t* scale) {
  const int64_t blocks = cols / kMxBlock;
  pool.parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t b = 0; b < blocks; ++b)
        scale[r * blocks + b] =
            mx_quantize_block(in + r * cols + b * kMxBlock, data + r * cols + b * kMxBlock);
  });
  return FMOE_OK;
}

Status dequantize_mxfp8(ThreadPool& pool, const uint8_t* data, const uint8_t* scale,
                        int64_t rows, int64_t cols, float* out) {
  const int64_t blocks = cols / kMxBlock;
  pool.parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t c = 0; c < cols; ++c)
        out[r * cols + c] = mx_dequantize(data[r * cols + c], scale[r * blocks + c / kMxBlock]);
  });
  return FMOE_OK;
}

Status swizzle_scales(const uint8_t* in, int64_t batch, int64_t rows, int64_t scale_cols,
                      bool to_swizzled, uint8_t* out) {
  const int64_t padded_rows = (rows + 127) / 128 * 128;
  const int64_t padded_cols = (scale_cols + 3) / 4 * 4;
  const int64_t swizzled_bytes = padded_rows * padded_cols;  // one matrix
  const int64_t linear_bytes = rows * scale_cols;
  for (int64_t b = 0; b < batch; ++b) {
    if (to_swizzled) {
      const uint8_t* src = in + b * linear_bytes;
      uint8_t* dst = out + b * swizzled_bytes;
      std::memset(dst, 0, size_t(swizzled_bytes));  // padding bytes are 0
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < scale_cols; ++c)
          dst[swizzled_scale_offset(r, c, padded_cols)] = src[r * scale_cols + c];
    } else {
      const uint8_t* src = in + b * swizzled_bytes;
      uint8_t* dst = out + b * linear_bytes;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < scale_cols; ++c)
          dst[r * scale_cols + c] = src[swizzled_scale_offset(r, c, padded_cols)];
    }
  }
  return FMOE_OK;
}

}  // namespace fmoe::host
