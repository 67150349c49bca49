// grouped_mm_bf16: c = a @ b[g]^T (+ bias) per group on the tensor cores (grouped_mm.cuh), with
// the loaders that bring bf16 k-slices into shared memory.
#include <cstdlib>
#include <cstring>

#include "cuda/backend.h"
#include "cuda/configs.h"
#include "cuda/grouped_mm.cuh"
#include "cuda/grouped_mm_sm90.h"
#include "cuda/mx_block.cuh"

namespace fmoe {
namespace cuda {
namespace {

// The 16-byte chunks one thread stages per slice: chunk i of the thread is chunk id
// threadIdx.x + i * kThreads of the tile, i.e. row id / 4, k chunk id % 4.
template <class Cfg, int kRows>
struct ChunkPlan {
  static constexpr int kCount = kRows * Cfg::kChunksPerRow / Cfg::kThreads;
  __device__ static int id(int i) { return int(threadIdx.x) + i * Cfg::kThreads; }
  __device__ static int row(int i) { return id(i) / Cfg::kChunksPerRow; }
  __device__ static int chunk(int i) { return id(i) % Cfg::kChunksPerRow; }
};

// Fast path: k % 8 == 0 and a, b 16-byte aligned, so every 16-byte chunk is either wholly inside
// k or wholly past it, and cp.async (zero-filling masked chunks) copies straight to shared memory.
template <class Cfg>
struct Bf16AsyncLoader {
  using A = ChunkPlan<Cfg, Cfg::kBlockM>;
  using B = ChunkPlan<Cfg, Cfg::kBlockN>;
  const uint16_t* a_row[A::kCount];  // null: row masked (past the group's end)
  const uint16_t* b_row[B::kCount];  // null: column past n
  const uint16_t* any;               // a valid address for zero-filled chunks
  uint8_t* smem;
  int64_t k;

  __device__ Bf16AsyncLoader(const GroupedMmParams& p, const GroupTile& t, int64_t n0,
                             uint8_t* smem_)
      : smem(smem_), k(p.k) {
    const uint16_t* a = static_cast<const uint16_t*>(p.a);
    const uint16_t* b = static_cast<const uint16_t*>(p.b) + int64_t(t.group) * p.n * p.k;
    any = a;
#pragma unroll
    for (int i = 0; i < A::kCount; ++i) {
      const int r = t.row0 + A::row(i);
      a_row[i] = r < t.row_end ? a + int64_t(r) * p.k : nullptr;
    }
#pragma unroll
    for (int i = 0; i < B::kCount; ++i) {
      const int64_t n = n0 + B::row(i);
      b_row[i] = n < p.n ? b + n * p.k : nullptr;
    }
  }

  __device__ void fetch(int kt) {
    uint8_t* stage = smem + (kt % Cfg::kStages) * Cfg::kStageBytes;
    uint8_t* b_stage = stage + Cfg::kBlockM * Cfg::kBlockK * 2;
#pragma unroll
    for (int i = 0; i < A::kCount; ++i) {
      const int64_t kk = int64_t(kt) * Cfg::kBlockK + A::chunk(i) * 8;
      const bool ok = a_row[i] && kk < k;
      ptx::cp_async_16_zfill(stage + tile_offset(A::row(i), A::chunk(i)),
                             ok ? a_row[i] + kk : any, ok);
    }
#pragma unroll
    for (int i = 0; i < B::kCount; ++i) {
      const int64_t kk = int64_t(kt) * Cfg::kBlockK + B::chunk(i) * 8;
      const bool ok = b_row[i] && kk < k;
      ptx::cp_async_16_zfill(b_stage + tile_offset(B::row(i), B::chunk(i)),
                             ok ? b_row[i] + kk : any, ok);
    }
  }
  __device__ void store(int) {}
};

// Any k and alignment (k = 33, or a caller's unaligned view): element loads into registers,
// zero past k or the tile's rows, then 16-byte shared stores.
template <class Cfg>
struct Bf16GenericLoader {
  using A = ChunkPlan<Cfg, Cfg::kBlockM>;
  using B = ChunkPlan<Cfg, Cfg::kBlockN>;
  const uint16_t* a_row[A::kCount];
  const uint16_t* b_row[B::kCount];
  uint4 a_reg[A::kCount], b_reg[B::kCount];
  uint8_t* smem;
  int64_t k;

  __device__ Bf16GenericLoader(const GroupedMmParams& p, const GroupTile& t, int64_t n0,
                               uint8_t* smem_)
      : smem(smem_), k(p.k) {
    const uint16_t* a = static_cast<const uint16_t*>(p.a);
    const uint16_t* b = static_cast<const uint16_t*>(p.b) + int64_t(t.group) * p.n * p.k;
#pragma unroll
    for (int i = 0; i < A::kCount; ++i) {
      const int r = t.row0 + A::row(i);
      a_row[i] = r < t.row_end ? a + int64_t(r) * p.k : nullptr;
    }
#pragma unroll
    for (int i = 0; i < B::kCount; ++i) {
      const int64_t n = n0 + B::row(i);
      b_row[i] = n < p.n ? b + n * p.k : nullptr;
    }
  }

  __device__ uint4 load_chunk(const uint16_t* row, int64_t kk) const {
    uint16_t v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = (row && kk + j < k) ? row[kk + j] : uint16_t(0);
    return pack8(v);
  }

  __device__ void fetch(int kt) {
#pragma unroll
    for (int i = 0; i < A::kCount; ++i)
      a_reg[i] = load_chunk(a_row[i], int64_t(kt) * Cfg::kBlockK + A::chunk(i) * 8);
#pragma unroll
    for (int i = 0; i < B::kCount; ++i)
      b_reg[i] = load_chunk(b_row[i], int64_t(kt) * Cfg::kBlockK + B::chunk(i) * 8);
  }

  __device__ void store(int kt) {
    uint8_t* stage = smem + (kt % Cfg::kStages) * Cfg::kStageBytes;
    uint8_t* b_stage = stage + Cfg::kBlockM * Cfg::kBlockK * 2;
#pragma unroll
    for (int i = 0; i < A::kCount; ++i)
      *reinterpret_cast<uint4*>(stage + tile_offset(A::row(i), A::chunk(i))) = a_reg[i];
#pragma unroll
    for (int i = 0; i < B::kCount; ++i)
      *reinterpret_cast<uint4*>(b_stage + tile_offset(B::row(i), B::chunk(i))) = b_reg[i];
  }
};

}  // namespace

// FMOE_CUDA_GEMM=mma forces the portable mma.sync kernel everywhere (comparisons, bisecting a
// wrong result); the default uses the Hopper wgmma kernel wherever its shape rules allow.
bool sm90_gemm_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FMOE_CUDA_GEMM");
    return !(v && std::strcmp(v, "mma") == 0);
  }();
  return enabled;
}

Status grouped_mm_bf16_prepare_device() {
  FMOE_TRY((grouped_mm_prepare<GemmLarge, Bf16AsyncLoader<GemmLarge>>()));
  FMOE_TRY((grouped_mm_prepare<GemmLarge, Bf16GenericLoader<GemmLarge>>()));
  return FMOE_OK;
}

}  // namespace cuda

using namespace cuda;

Status CudaBackend::grouped_mm_bf16(BackendStream* s, const fmoe_grouped_mm_args& a) {
  return grouped_mm_bf16_launch(s, a, /*tile_counter=*/nullptr);
}

Status CudaBackend::grouped_mm_bf16_launch(BackendStream* s, const fmoe_grouped_mm_args& a,
                                           int32_t* tile_counter) {
  FMOE_TRY(activate());
  if (a.rows == 0) return FMOE_OK;  // no group can hold a row
  GroupedMmParams p{};
  p.a = a.a;
  p.b = a.b;
  p.bias = a.bias;
  p.c = static_cast<uint16_t*>(a.c);
  p.offsets = a.group_offsets;
  p.row_map = a.row_map;
  p.n = a.n;
  p.k = a.k;
  if (sm90_gemm_enabled() && grouped_mm_sm90_supported(a)) {
    FMOE_CHECK_CUDA(
        grouped_mm_sm90_bf16(a, props_.multiProcessorCount, stream_of(s), tile_counter));
    return FMOE_OK;
  }
  const bool fast = a.k % 8 == 0 && aligned_to(a.a, 16) && aligned_to(a.b, 16);
  using Cfg = GemmLarge;
  if (fast)
    return launch_grouped_mm<Cfg, Bf16AsyncLoader<Cfg>>("fmoe_grouped_mm_bf16", p, a.rows,
                                                         a.groups, stream_of(s));
  return launch_grouped_mm<Cfg, Bf16GenericLoader<Cfg>>("fmoe_grouped_mm_bf16", p, a.rows,
                                                        a.groups, stream_of(s));
}

}  // namespace fmoe
