// Launch configurations of every CUDA kernel, in one place. Kernels take their shapes from these
// types as template parameters; launchers pick an entry here from the problem shape.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fmoe::cuda {

// ---- Grouped GEMM (mma.sync m16n8k16, bf16 operands in shared memory, f32 accumulators) ------
// A block computes a kBlockM x kBlockN tile of one group; warps tile it kWarpsM x kWarpsN, each
// warp a (kBlockM / kWarpsM) x (kBlockN / kWarpsN) sub-tile. The k loop is a kStages-deep
// shared-memory ring of kBlockK-wide slices. kBlockK = 32 also equals the MXFP8 block, so an
// MXFP8 slice has exactly one scale per row.
template <int BM, int BN, int BK, int WM, int WN, int STAGES>
struct GemmTileConfig {
  static constexpr int kBlockM = BM, kBlockN = BN, kBlockK = BK;
  static constexpr int kWarpsM = WM, kWarpsN = WN, kStages = STAGES;
  static constexpr int kThreads = WM * WN * 32;
  static constexpr int kWarpTileM = BM / WM, kWarpTileN = BN / WN;
  static constexpr int kFragsM = kWarpTileM / 16, kFragsN = kWarpTileN / 8;
  // bf16 tiles as staged in shared memory (both operands: k contiguous, 16-byte chunks swizzled).
  static constexpr int kChunksPerRow = BK / 8;
  static constexpr int kStageBytes = (BM + BN) * BK * 2;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static_assert(BK == 32, "the smem swizzle and the MXFP8 loader assume 32-wide k slices");
  static_assert(kWarpTileM % 16 == 0 && kWarpTileN % 16 == 0, "ldmatrix.x4 covers 16 n per load");
  static_assert((BM * kChunksPerRow) % kThreads == 0 && (BN * kChunksPerRow) % kThreads == 0,
                "every thread stages the same number of 16-byte chunks");
};

// Prefill-sized tile: 128x128x32, 8 warps of 64x32, 4 stages (64 KiB of shared memory). Decode
// (a few rows per group) wastes most of the M tile but is bound by reading B, which this tile
// streams once per 128 columns; a narrow-M config is the next entry to add.
using GemmLarge = GemmTileConfig<128, 128, 32, 2, 4, 4>;

// ---- Row-wise and elementwise kernels ------------------------------------------------------
constexpr int kPermuteRouteMaxThreads = 1024;  // one block ranks every slot (see permute.cu)
constexpr int kRowThreadsMax = 256;            // threads of a block that walks one row
constexpr int kElementwiseThreads = 256;
// Grid-stride kernels never need more blocks than this to fill an H100 (132 SMs x 16 blocks);
// capping keeps gridDim.x far below its limit for any size.
constexpr int64_t kMaxGridBlocks = 132 * 16 * 4;

// Threads for a kernel where a block walks one row of `units` work items (vectors or columns):
// a multiple of 32 between 32 and kRowThreadsMax.
inline int row_threads(int64_t units) {
  int64_t t = (units + 31) / 32 * 32;
  return int(std::clamp<int64_t>(t, 32, kRowThreadsMax));
}

inline unsigned grid_blocks(int64_t work, int64_t per_block) {
  int64_t b = (work + per_block - 1) / per_block;
  return unsigned(std::clamp<int64_t>(b, 1, kMaxGridBlocks));
}

}  // namespace fmoe::cuda
