// Grouped BF16 GEMM for Hopper (sm_90a): c[r, :] = a[r, :] @ b[g]^T (+ bias[g]) for the rows r of
// each group g, the prefill workhorse of FC1 and FC2.
//
// Design
// - One CTA per SM, persistent. The work is a linear list of 128 x BN output tiles: for each
//   group (in order), ceil(size_g / 128) m-tiles times ceil(n / BN) n-tiles. A group's m-tiles
//   start exactly at offsets[g] + i*128 (TMA takes any row coordinate), so a tile may reach into
//   the next group's rows: it computes them (harmless) and its stores are masked by the group end.
//   CTA i takes tiles i, i + grid, i + 2*grid, ...
// - The group offsets live on the device (graph capture: no host sync). Each CTA reads them once,
//   validates them (a group is computed iff 0 <= off[g] <= off[g+1] <= rows, else it has no
//   tiles: bad offsets never fault) and builds in shared memory the exclusive prefix of m-tile
//   counts; a tile index is mapped to its group by binary search over that prefix. Empty groups
//   own no tiles and cost nothing.
// - Raster: inside a group, tiles go in bands of kRasterBand m-tiles, m fastest within a band, so
//   the CTAs resident together share both A rows (across n) and B columns (across m) in L2.
// - Warp specialisation, 3 warpgroups (384 threads):
//     warpgroup 0  producer: one thread issues the TMA loads of the A tile (128 x 64) and B tile
//                  (BN x 64) of each k-block into a kStages ring (128-byte swizzle), arming the
//                  stage's `full` barrier with the byte count; it waits on the stage's `empty`
//                  barrier before reusing it. setmaxnreg drops it to 40 registers.
//     warpgroups 1, 2  consumers: each owns one 64-row half of the 128-row tile and issues
//                  4 x wgmma.m64nBNk16 per k-block (f32 accumulators in registers: BN/2 per
//                  thread), keeps one wgmma group in flight and releases the previous stage
//                  (one arrival per warp, 8 per stage) once wait_group(1) proves it consumed.
//                  setmaxnreg raises them to 232 registers.
//   The producer runs ahead across tile boundaries, so the next tile's first stages load while
//   the consumers run the epilogue of the current one.
// - B is one 2-D tensor map over [groups * n, k]: rows of the next group that a partial n-tile
//   reads are harmless (those columns are never stored); rows past the end read as zero. A is
//   [rows, k]; rows past the buffer read as zero. k need not be a multiple of 64: the last
//   k-block's columns past k read as zero in both operands, adding nothing.
// - Epilogue: accumulators + bias[g, n] (f32) -> bf16 round-to-nearest-even, transposed within
//   each quad of lanes by two shuffles so that every lane holds 8 consecutive columns of one row
//   -> masked 16-byte global stores (row < group end, row_map[row] != -1, col < n). No TMA
//   store: a tile's rows may belong to another group. (v1 stored the fragment's bf16 pairs
//   directly with 4-byte stores: 4x the store instructions and half-filled sectors.)
//
// Shared memory (per CTA, 227 KB usable on H100):
//   wide   (BN = 256): 4 stages x (A 128x64x2 = 16 KB + B 256x64x2 = 32 KB) = 192 KB
//   narrow (BN = 128): 6 stages x (A 16 KB + B 16 KB)                     = 192 KB
//   + barriers 2 x stages x 8 B + group tables (3 x 1024 + 1) x 4 B = 12 KB + 1 KB alignment slack
//   = ~205 KB. A fifth wide stage (240 KB) does not fit.
//
// Performance (H100 SXM 80GB, 132 SMs, 989 TFLOP/s dense bf16 peak). Expected: 128x256 tiles
// with two consumer warpgroups and a 4-deep TMA ring reach 600-750 TFLOP/s on large GEMMs; no
// cluster multicast and no epilogue/mainloop overlap inside a consumer cost some of that.
// Measured with bench/dev/grouped_mm_sm90_check.cu (median of 20), BN = 256 / BN = 128:
//                                               v1 (4-byte stores)   v2 (16-byte stores, kept)
//   qwen3 fc1, 128 groups x 512 rows, n1536 k2048   624 / 552             683 / 659
//   qwen3 fc2, 128 groups x 512 rows, n2048 k768    419 / 374             578 / 542
//   dense 16384 x 4096 x 7168, 1 group              718 / 547             790 / 655
// Next steps if more is needed: 2-CTA clusters with TMA multicast of B (halves L2 -> SM traffic),
// and consumers on alternating tiles so one's epilogue hides under the other's mainloop.
#include "cuda/grouped_mm_sm90.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda/ptx/mbarrier.cuh"
#include "cuda/ptx/tma.cuh"
#include "cuda/ptx/wgmma.cuh"
#include "cuda/tensor_map.h"

namespace fmoe::cuda {

namespace {

// ---- Tile configurations: the one table ------------------------------------------------------
// kBlockM = 128: two consumer warpgroups x wgmma's fixed m = 64.
// kBlockK = 64: 64 bf16 = 128 bytes, exactly one 128-byte swizzle span per row (the widest
//   swizzle, conflict-free for wgmma), 4 wgmma k16 steps per stage.
// kBlockN = 256 (wide): the most math per byte staged (wgmma's largest n); 128 f32 accumulators
//   per consumer thread. 128 (narrow): for shapes with too few wide tiles to fill the SMs, or
//   whose n wastes much of a last 256-wide tile (n = 2880: 12 wide tiles for 11.25 of work).
// kStages: as many as fit in 227 KB next to the group tables (4 wide, 6 narrow); >= 4 stages of
//   64 k hide the TMA latency (~1 us) behind ~0.5 us of wgmma per stage.
// kRasterBand = 8 m-tiles: 8 x 128 rows of A and a band of B columns stay in L2 together.
// Registers: 128 x 40 (producer) + 256 x 232 (consumers) = 64512 <= 65536.
template <int BN, int STAGES>
struct Sm90TileConfig {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = BN;
  static constexpr int kBlockK = 64;
  static constexpr int kStages = STAGES;
  static constexpr int kRasterBand = 8;
  static constexpr int kMaxGroups = 1024;
  static constexpr int kThreads = 384;
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;
  static constexpr int kABytes = kBlockM * kBlockK * 2;
  static constexpr int kBBytes = kBlockN * kBlockK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kBarrierBytes = 2 * kStages * 8;
  static constexpr int kTableBytes = (3 * kMaxGroups + 1) * 4;
  static constexpr int kSmemBytes = 1024 + kStages * kStageBytes + kBarrierBytes + kTableBytes;
  static_assert(kSmemBytes <= 227 * 1024, "exceeds the 227 KB of shared memory per block");
  static_assert(kBlockK * 2 == 128, "one k-block row must be one 128-byte swizzle span");
  static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= 65536, "register file");
};
using Sm90Wide = Sm90TileConfig<256, 4>;
using Sm90Narrow = Sm90TileConfig<128, 6>;

struct Sm90Params {
  __nv_bfloat16* c;
  const float* bias;
  const int32_t* offsets;
  const int32_t* row_map;
  int rows;
  int n;
  int k_blocks;
  int groups;
  int n_tiles;
};

struct TileCoord {
  int group;
  int m0;       // first row of the tile
  int row_end;  // end of the group's rows (exclusive): stores stop here
  int n0;       // first column
};

// Group tables in shared memory: prefix[g] = m-tiles of groups < g; start/end = valid row range.
template <class Cfg>
__device__ __forceinline__ TileCoord decode_tile(int t, const int* prefix, const int* start,
                                                 const int* end, int groups, int n_tiles) {
  int lo = 0, hi = groups - 1;  // largest g with prefix[g] * n_tiles <= t (non-empty by construction)
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (prefix[mid] * n_tiles <= t) lo = mid;
    else hi = mid - 1;
  }
  const int g = lo;
  const int first = prefix[g];
  const int m_tiles = prefix[g + 1] - first;
  const int local = t - first * n_tiles;
  const int band_tiles = Cfg::kRasterBand * n_tiles;
  const int band = local / band_tiles;
  const int in_band = local - band * band_tiles;
  const int band_rows = min(Cfg::kRasterBand, m_tiles - band * Cfg::kRasterBand);
  const int m_tile = band * Cfg::kRasterBand + in_band % band_rows;
  const int n_tile = in_band / band_rows;
  return TileCoord{g, start[g] + m_tile * Cfg::kBlockM, end[g], n_tile * Cfg::kBlockN};
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    grouped_mm_sm90_kernel(const __grid_constant__ CUtensorMap tm_a,
                           const __grid_constant__ CUtensorMap tm_b, const Sm90Params p) {
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, BK = Cfg::kBlockK, S = Cfg::kStages;
  extern __shared__ uint8_t smem_raw[];
  // TMA with 128-byte swizzle and the wgmma descriptors (base offset 0) need 1024-byte aligned
  // stage buffers; dynamic shared memory only promises 16.
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* smem_a = smem;
  uint8_t* smem_b = smem + S * Cfg::kABytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + S * Cfg::kStageBytes);
  uint64_t* empty = full + S;
  int* s_prefix = reinterpret_cast<int*>(empty + S);  // [groups + 1]
  int* s_start = s_prefix + Cfg::kMaxGroups + 1;      // [groups]
  int* s_end = s_start + Cfg::kMaxGroups;             // [groups]

  const int tid = threadIdx.x;
  const int groups = p.groups;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      ptx::mbar_init(&full[s], 1);  // the producer's arrive_expect_tx
      ptx::mbar_init(&empty[s], 8);  // one arrival per consumer warp
    }
    ptx::mbar_fence_init();
  }
  if (tid == 32) {
    ptx::tma_prefetch_map(&tm_a);
    ptx::tma_prefetch_map(&tm_b);
  }
  // Validate the offsets: a bad group gets no tiles (and its start/end are never used).
  for (int g = tid; g < groups; g += Cfg::kThreads) {
    const int lo = p.offsets[g], hi = p.offsets[g + 1];
    const bool ok = lo >= 0 && lo <= hi && hi <= p.rows;
    s_start[g] = ok ? lo : 0;
    s_end[g] = ok ? hi : 0;
    s_prefix[g + 1] = ok ? (hi - lo + BM - 1) / BM : 0;
  }
  __syncthreads();
  if (tid < 32) {  // inclusive scan of s_prefix[1..groups]: each lane owns a contiguous chunk
    const int chunk = (groups + 31) / 32;
    const int lo = min(groups, tid * chunk), hi = min(groups, lo + chunk);
    int sum = 0;
    for (int i = lo; i < hi; ++i) sum += s_prefix[i + 1];
    int incl = sum;
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (tid >= d) incl += v;
    }
    int run = incl - sum;
    for (int i = lo; i < hi; ++i) {
      run += s_prefix[i + 1];
      s_prefix[i + 1] = run;
    }
    if (tid == 0) s_prefix[0] = 0;
  }
  __syncthreads();
  const int total_tiles = s_prefix[groups] * p.n_tiles;

  if (tid < 128) {
    // ---- producer warpgroup ----
    ptx::setmaxnreg_dec<Cfg::kProducerRegs>();
    if (tid == 0) {
      int stage = 0;
      uint32_t phase = 0;
      for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
        const TileCoord tc = decode_tile<Cfg>(t, s_prefix, s_start, s_end, groups, p.n_tiles);
        const int b_row = tc.group * p.n + tc.n0;
        for (int kb = 0; kb < p.k_blocks; ++kb) {
          ptx::mbar_wait(&empty[stage], phase ^ 1);
          ptx::mbar_arrive_expect_tx(&full[stage], Cfg::kStageBytes);
          ptx::tma_load_2d(smem_a + stage * Cfg::kABytes, &tm_a, &full[stage], kb * BK, tc.m0);
          ptx::tma_load_2d(smem_b + stage * Cfg::kBBytes, &tm_b, &full[stage], kb * BK, b_row);
          if (++stage == S) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
  } else {
    // ---- consumer warpgroups ----
    ptx::setmaxnreg_inc<Cfg::kConsumerRegs>();
    const int half = tid / 128 - 1;  // which 64-row half of the tile
    const int warp = (tid / 32) & 3;
    const int lane = tid & 31;
    int stage = 0;
    uint32_t phase = 0;
    float acc[BN / 2];
    for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
      const TileCoord tc = decode_tile<Cfg>(t, s_prefix, s_start, s_end, groups, p.n_tiles);
      int prev_stage = 0;
      for (int kb = 0; kb < p.k_blocks; ++kb) {
        ptx::mbar_wait(&full[stage], phase);
        const uint32_t a_addr =
            ptx::smem_addr(smem_a + stage * Cfg::kABytes) + half * (BM / 2) * (BK * 2);
        const uint32_t b_addr = ptx::smem_addr(smem_b + stage * Cfg::kBBytes);
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) ptx::wgmma_fence_operand(acc[i]);
        ptx::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          // k16 step = 32 bytes along the swizzled 128-byte row.
          ptx::wgmma_m64k16_bf16<BN>(acc, ptx::wgmma_desc_sw128(a_addr + kk * 32),
                                     ptx::wgmma_desc_sw128(b_addr + kk * 32), (kb | kk) != 0);
        }
        ptx::wgmma_commit();
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) ptx::wgmma_fence_operand(acc[i]);
        // The group of the previous k-block is now complete: its stage can be refilled.
        ptx::wgmma_wait<1>();
        if (kb > 0 && lane == 0) ptx::mbar_arrive(&empty[prev_stage]);
        prev_stage = stage;
        if (++stage == S) {
          stage = 0;
          phase ^= 1;
        }
      }
      ptx::wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) ptx::wgmma_fence_operand(acc[i]);
      if (lane == 0) ptx::mbar_arrive(&empty[prev_stage]);

      // ---- epilogue ----
      // The wgmma fragment: thread (warp, lane) holds rows r0 = 16*warp + lane/4 and r1 = r0 + 8,
      // columns 8*j + 2*(lane%4) + {0, 1} of every 8-column block j (acc[4j..4j+1] on r0,
      // acc[4j+2..4j+3] on r1). The 4 lanes of a quad together hold, for blocks j and j+1, four
      // 8-column segments (r0 j, r0 j+1, r1 j, r1 j+1) of which each lane owns a quarter; a 4x4
      // transpose across the quad (two xor-shuffle steps) gives each lane one whole segment, so
      // each lane stores 16 bytes and a warp store covers 16 full 32-byte sectors.
      const int q = lane & 3, hi = q >> 1, lo = q & 1;
      const int r0 = tc.m0 + half * (BM / 2) + warp * 16 + (lane >> 2);
      const int row = r0 + 8 * hi;  // the row of the segment this lane stores
      const bool row_ok = row < tc.row_end && (p.row_map == nullptr || p.row_map[row] != -1);
      const float* bias = p.bias ? p.bias + int64_t(tc.group) * p.n : nullptr;
      __nv_bfloat16* c_row = p.c + int64_t(row) * p.n;
#pragma unroll
      for (int j = 0; j < BN / 8; j += 2) {
        uint32_t x[4];  // this lane's quarter of segments (r0 j, r0 j+1, r1 j, r1 j+1)
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int col = tc.n0 + (j + jj) * 8 + q * 2;
          float b0 = 0.f, b1 = 0.f;
          if (bias != nullptr && col < p.n) {  // n % 8 == 0: col + 1 < n too
            b0 = __ldg(bias + col);
            b1 = __ldg(bias + col + 1);
          }
          const int a = 4 * (j + jj);
          __nv_bfloat162 v0 = __floats2bfloat162_rn(acc[a + 0] + b0, acc[a + 1] + b1);
          __nv_bfloat162 v1 = __floats2bfloat162_rn(acc[a + 2] + b0, acc[a + 3] + b1);
          x[jj] = *reinterpret_cast<uint32_t*>(&v0);
          x[2 + jj] = *reinterpret_cast<uint32_t*>(&v1);
        }
        // Step 1 (lanes q, q^2): keep the segments whose row half (bit 1) is ours, trade the
        // others. After it, for segments 2*hi + {0, 1}: pieces of lanes (q & 1) and (q & 1) | 2.
        const uint32_t keep_a = hi ? x[2] : x[0], keep_b = hi ? x[3] : x[1];
        const uint32_t recv_a = __shfl_xor_sync(0xffffffffu, hi ? x[0] : x[2], 2);
        const uint32_t recv_b = __shfl_xor_sync(0xffffffffu, hi ? x[1] : x[3], 2);
        const uint32_t a_p0 = hi ? recv_a : keep_a, a_p2 = hi ? keep_a : recv_a;  // segment 2hi
        const uint32_t b_p0 = hi ? recv_b : keep_b, b_p2 = hi ? keep_b : recv_b;  // 2hi + 1
        // Step 2 (lanes q, q^1): keep segment 2*hi + lo, trade the other.
        const uint32_t keep0 = lo ? b_p0 : a_p0, keep2 = lo ? b_p2 : a_p2;
        const uint32_t recv0 = __shfl_xor_sync(0xffffffffu, lo ? a_p0 : b_p0, 1);
        const uint32_t recv2 = __shfl_xor_sync(0xffffffffu, lo ? a_p2 : b_p2, 1);
        uint4 seg;  // columns 0-1, 2-3, 4-5, 6-7 come from lanes 0, 1, 2, 3 of the quad
        seg.x = lo ? recv0 : keep0;
        seg.y = lo ? keep0 : recv0;
        seg.z = lo ? recv2 : keep2;
        seg.w = lo ? keep2 : recv2;
        const int col = tc.n0 + (j + lo) * 8;
        if (row_ok && col < p.n) *reinterpret_cast<uint4*>(c_row + col) = seg;
      }
    }
  }
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0;
}

// Upper bound of the tile count: sum_g ceil(size_g / 128) <= rows / 128 + groups.
int64_t max_m_tiles(const fmoe_grouped_mm_args& a) { return a.rows / 128 + a.groups; }

template <class Cfg>
cudaError_t launch(const fmoe_grouped_mm_args& a, int num_sms, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;  // no row can be written (and a 0-row map is invalid)
  CUtensorMap tm_a, tm_b;
  cudaError_t err = make_tensor_map_bf16_2d_sw128(&tm_a, a.a, uint64_t(a.k), uint64_t(a.rows),
                                                  uint64_t(a.k) * 2, Cfg::kBlockK, Cfg::kBlockM);
  if (err != cudaSuccess) return err;
  err = make_tensor_map_bf16_2d_sw128(&tm_b, a.b, uint64_t(a.k), uint64_t(a.groups * a.n),
                                      uint64_t(a.k) * 2, Cfg::kBlockK, Cfg::kBlockN);
  if (err != cudaSuccess) return err;

  Sm90Params p;
  p.c = static_cast<__nv_bfloat16*>(a.c);
  p.bias = a.bias;
  p.offsets = a.group_offsets;
  p.row_map = a.row_map;
  p.rows = int(a.rows);
  p.n = int(a.n);
  p.k_blocks = int((a.k + Cfg::kBlockK - 1) / Cfg::kBlockK);
  p.groups = int(a.groups);
  p.n_tiles = int((a.n + Cfg::kBlockN - 1) / Cfg::kBlockN);

  auto kernel = grouped_mm_sm90_kernel<Cfg>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t tiles = max_m_tiles(a) * p.n_tiles;
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(std::max(num_sms, 1), tiles)));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(tm_a, tm_b, p);
  return cudaGetLastError();
}

}  // namespace

bool grouped_mm_sm90_supported(const fmoe_grouped_mm_args& a) {
  if (!a.a || !a.b || !a.c || !a.group_offsets) return false;
  if (a.rows < 0 || a.n < 8 || a.k < 8 || a.groups < 1) return false;
  if (a.n % 8 != 0 || a.k % 8 != 0) return false;
  if (a.groups > Sm90Wide::kMaxGroups) return false;
  if (!aligned(a.a, 16) || !aligned(a.b, 16) || !aligned(a.c, 16)) return false;
  if (a.bias && !aligned(a.bias, 4)) return false;
  // TMA coordinates and the kernel's row / tile indices are int32.
  if (a.rows >= INT_MAX || a.k >= INT_MAX || a.groups * a.n >= INT_MAX) return false;
  if (max_m_tiles(a) * ((a.n + 127) / 128) >= INT_MAX) return false;
  return true;
}

int grouped_mm_sm90_pick_block_n(const fmoe_grouped_mm_args& a, int num_sms) {
  // Too few wide tiles to give every SM one (rows is the static capacity: an upper bound of the
  // real count, so this errs toward wide): narrow tiles double the parallelism.
  const int64_t wide_tiles = ((a.rows + 127) / 128) * ((a.n + 255) / 256);
  if (wide_tiles < num_sms) return 128;
  // A last wide tile mostly empty wastes more than narrow tiles lose in efficiency (~3%).
  const int64_t waste_wide = (a.n + 255) / 256 * 256 - a.n;
  const int64_t waste_narrow = (a.n + 127) / 128 * 128 - a.n;
  if ((waste_wide - waste_narrow) * 32 > a.n) return 128;
  return 256;
}

cudaError_t grouped_mm_sm90_bf16_block_n(const fmoe_grouped_mm_args& a, int num_sms, int block_n,
                                         cudaStream_t stream) {
  if (block_n == 256) return launch<Sm90Wide>(a, num_sms, stream);
  if (block_n == 128) return launch<Sm90Narrow>(a, num_sms, stream);
  return cudaErrorInvalidValue;
}

cudaError_t grouped_mm_sm90_bf16(const fmoe_grouped_mm_args& a, int num_sms, cudaStream_t stream) {
  return grouped_mm_sm90_bf16_block_n(a, num_sms, grouped_mm_sm90_pick_block_n(a, num_sms),
                                      stream);
}

}  // namespace fmoe::cuda
