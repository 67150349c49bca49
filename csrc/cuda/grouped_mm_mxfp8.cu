// grouped_mm_mxfp8: the grouped GEMM of grouped_mm.cuh with MXFP8 operands (e4m3 data, one e8m0
// scale per 32 along k). Hopper has no block-scaled tensor-core instruction, so the loader
// dequantizes each k-slice to bf16 while staging it in shared memory and the bf16 MMAs do the
// rest, accumulating in f32.
//
// Exactness: e4m3 * 2^s has at most 4 significant bits, so it is exact in bf16 (8 bits) whenever
// it lies in bf16's normal range, i.e. for every scale a real tensor has. Only extreme scales
// differ from the host's f32 products: results below 2^-126 (s < -117 or so), which bf16 rounds
// to its subnormals, and 448 * 2^127, which overflows to Inf in both. The kBlockK = 32 slice is
// exactly one MX block, so each row needs one scale per slice.
#include "cuda/backend.h"
#include "cuda/configs.h"
#include "cuda/grouped_mm.cuh"
#include "cuda/grouped_mm_sm90.h"
#include "cuda/mx_block.cuh"

namespace fmoe {
namespace cuda {
namespace {

// Each thread stages one 16-byte e4m3 chunk (half a 32-byte row slice) of A and one of B per
// slice: row threadIdx.x / 2, k half threadIdx.x % 2. It expands to 16 bf16 = two 16-byte
// chunks of the bf16 tile. kVec: the data pointers are 16-byte aligned (k % 32 == 0 keeps every
// row aligned then); otherwise byte loads.
template <class Cfg, bool kVec>
struct Mxfp8Loader {
  static_assert(Cfg::kBlockM * 2 == Cfg::kThreads && Cfg::kBlockN * 2 == Cfg::kThreads,
                "one e4m3 chunk of A and of B per thread");
  const uint8_t* a_row;  // null: masked row
  const uint8_t* a_srow;
  const uint8_t* b_row;
  const uint8_t* b_srow;
  uint4 a_raw, b_raw;
  uint8_t a_sc, b_sc;
  uint8_t* smem;
  float* lut;  // e4m3 byte -> f32, in shared memory
  int row, half;

  __device__ Mxfp8Loader(const GroupedMmParams& p, const GroupTile& t, int64_t n0,
                         uint8_t* smem_)
      : smem(smem_) {
    __shared__ float e4m3_lut[256];
    lut = e4m3_lut;
    for (int i = threadIdx.x; i < 256; i += blockDim.x) e4m3_lut[i] = e4m3_to_f32(uint8_t(i));
    row = threadIdx.x / 2;
    half = threadIdx.x % 2;
    const int64_t kb = p.k / kMxBlock;
    const int r = t.row0 + row;
    const bool a_ok = r < t.row_end;
    a_row = a_ok ? static_cast<const uint8_t*>(p.a) + int64_t(r) * p.k : nullptr;
    a_srow = a_ok ? p.a_scale + int64_t(r) * kb : nullptr;
    const int64_t n = n0 + row;
    const int64_t bn = int64_t(t.group) * p.n + n;  // row of b viewed as [groups * n, k]
    const bool b_ok = n < p.n;
    b_row = b_ok ? static_cast<const uint8_t*>(p.b) + bn * p.k : nullptr;
    b_srow = b_ok ? p.b_scale + bn * kb : nullptr;
    __syncthreads();  // the table is read by the first store()
  }

  __device__ static uint4 load16(const uint8_t* src) {
    if constexpr (kVec) {
      return *reinterpret_cast<const uint4*>(src);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w[i] = uint32_t(src[4 * i]) | (uint32_t(src[4 * i + 1]) << 8) |
               (uint32_t(src[4 * i + 2]) << 16) | (uint32_t(src[4 * i + 3]) << 24);
      return make_uint4(w[0], w[1], w[2], w[3]);
    }
  }

  __device__ void fetch(int kt) {
    const int64_t kk = int64_t(kt) * Cfg::kBlockK + half * 16;
    // Masked rows stage zeros with scale 2^0 (byte 127): never a NaN from unused memory.
    a_raw = a_row ? load16(a_row + kk) : make_uint4(0, 0, 0, 0);
    a_sc = a_row ? a_srow[kt] : uint8_t(127);
    b_raw = b_row ? load16(b_row + kk) : make_uint4(0, 0, 0, 0);
    b_sc = b_row ? b_srow[kt] : uint8_t(127);
  }

  // 16 e4m3 bytes * 2^s -> two 16-byte chunks of bf16 (chunks 2*half, 2*half + 1 of the row).
  __device__ void expand(const uint4& raw, uint8_t sc, uint8_t* tile) const {
    const float scale = e8m0_to_f32(sc);
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      uint16_t v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint8_t byte = uint8_t(w[c * 2 + j / 4] >> (8 * (j % 4)));
        // lut[byte] * scale is numerics.h's mx_dequantize (e4m3_to_f32 * e8m0_to_f32).
        v[j] = f32_to_bf16(lut[byte] * scale);
      }
      *reinterpret_cast<uint4*>(tile + tile_offset(row, half * 2 + c)) = pack8(v);
    }
  }

  __device__ void store(int kt) {
    uint8_t* stage = smem + (kt % Cfg::kStages) * Cfg::kStageBytes;
    expand(a_raw, a_sc, stage);
    expand(b_raw, b_sc, stage + Cfg::kBlockM * Cfg::kBlockK * 2);
  }
};

}  // namespace

Status grouped_mm_mxfp8_prepare_device() {
  FMOE_TRY((grouped_mm_prepare<GemmLarge, Mxfp8Loader<GemmLarge, true>>()));
  FMOE_TRY((grouped_mm_prepare<GemmLarge, Mxfp8Loader<GemmLarge, false>>()));
  return FMOE_OK;
}

}  // namespace cuda

using namespace cuda;

Status CudaBackend::grouped_mm_mxfp8(BackendStream* s, const fmoe_grouped_mm_args& a) {
  FMOE_TRY(activate());
  if (a.rows == 0) return FMOE_OK;
  // Hopper: the wgmma kernel dequantizing in its producer warpgroup (grouped_mm_sm90.cu).
  if (sm90_gemm_enabled() && grouped_mm_sm90_mxfp8_supported(a)) {
    FMOE_CHECK_CUDA(grouped_mm_sm90_mxfp8(a, props_.multiProcessorCount, stream_of(s)));
    return FMOE_OK;
  }
  GroupedMmParams p{};
  p.a = a.a;
  p.a_scale = a.a_scale;
  p.b = a.b;
  p.b_scale = a.b_scale;
  p.bias = a.bias;
  p.c = static_cast<uint16_t*>(a.c);
  p.offsets = a.group_offsets;
  p.row_map = a.row_map;
  p.n = a.n;
  p.k = a.k;
  using Cfg = GemmLarge;
  if (aligned_to(a.a, 16) && aligned_to(a.b, 16))
    return launch_grouped_mm<Cfg, Mxfp8Loader<Cfg, true>>("fmoe_grouped_mm_mxfp8", p, a.rows,
                                                          a.groups, stream_of(s));
  return launch_grouped_mm<Cfg, Mxfp8Loader<Cfg, false>>("fmoe_grouped_mm_mxfp8", p, a.rows,
                                                         a.groups, stream_of(s));
}

}  // namespace fmoe
