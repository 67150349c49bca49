// Grouped BF16 GEMM for Hopper (sm_90a): c[r, :] = a[r, :] @ b[g]^T (+ bias[g]) for the rows r of
// each group g, the prefill workhorse of FC1 and FC2.
//
// Design
// - One CTA per SM, persistent. The work is a linear list of 128 x BN output tiles: for each
//   group (in order), ceil(size_g / 128) m-tiles times ceil(n / BN) n-tiles. A group's m-tiles
//   start exactly at offsets[g] + i*128 (TMA takes any row coordinate), so a tile may reach into
//   the next group's rows: it computes them (harmless) and its stores are masked by the group end.
//   Tiles go to CTAs statically (CTA i takes tiles i, i + grid, i + 2*grid, ...) or, for launches
//   given a zeroed counter, in the order the CTAs ask for them ("Tile scheduler" below).
// - The group offsets live on the device (graph capture: no host sync). Each CTA reads them once,
//   validates them (a group is computed iff 0 <= off[g] <= off[g+1] <= rows, else it has no
//   tiles: bad offsets never fault) and builds in shared memory the exclusive prefix of m-tile
//   counts; a tile index is mapped to its group by binary search over that prefix. Empty groups
//   own no tiles and cost nothing.
// - Raster: inside a group, tiles go in bands of kRasterBand m-tiles, m fastest within a band, so
//   the CTAs resident together share both A rows (across n) and B columns (across m) in L2.
// - A group of at most 64 rows is a half tile: both consumer warpgroups take its 64 rows, each
//   against half of the B tile ("Half tiles" below).
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
//   the consumers run the epilogue of the current one. Where 128-wide tiles are picked, each
//   consumer warpgroup owns whole tiles instead ("Ping-pong tiles").
// - B is one 2-D tensor map over [groups * n, k]: rows of the next group that a partial n-tile
//   reads are harmless (those columns are never stored); rows past the end read as zero. A is
//   [rows, k]; rows past the buffer read as zero. k need not be a multiple of 64: the last
//   k-block's columns past k read as zero in both operands, adding nothing.
// - Epilogue: accumulators + bias[g, n] (f32) -> bf16 round-to-nearest-even, transposed within
//   each quad of lanes by two shuffles so that every lane holds 8 consecutive columns of one row
//   -> masked 16-byte global stores (row < group end, row_map[row] >= 0, col < n). No TMA
//   store: a tile's rows may belong to another group. (v1 stored the fragment's bf16 pairs
//   directly with 4-byte stores: 4x the store instructions and half-filled sectors.)
//
// Shared memory (per CTA, 227 KB usable on H100):
//   wide   (BN = 256): 4 stages x (A 128x64x2 = 16 KB + B 256x64x2 = 32 KB) = 192 KB
//   narrow (BN = 128): 6 stages x (A 16 KB + B 16 KB)                     = 192 KB
//   + barriers 2 x stages x 8 B + the tile queue (80 B) + group tables (3 x 1024 + 1) x 4 B = 12 KB
//   + 1 KB alignment slack
//   = ~205 KB. A fifth wide stage (240 KB) does not fit. The fused-activation kernels add the
//   tile-bias buffers: 2 warpgroups x 2 x BN x 4 B (4 KB wide).
//
// Performance (H100 SXM 80GB, 132 SMs, 989 TFLOP/s dense bf16 peak). Expected: 128x256 tiles
// with two consumer warpgroups and a 4-deep TMA ring reach 600-750 TFLOP/s on large GEMMs; no
// cluster multicast and no epilogue/mainloop overlap inside a consumer cost some of that.
// Measured with bench/dev/grouped_mm_sm90_check.cu (median of 20), BN = 256 / BN = 128:
//                                               v1 (4-byte stores)   v2 (16-byte stores, kept)
//   qwen3 fc1, 128 groups x 512 rows, n1536 k2048   624 / 552             683 / 659
//   qwen3 fc2, 128 groups x 512 rows, n2048 k768    419 / 374             578 / 542
//   dense 16384 x 4096 x 7168, 1 group              718 / 547             790 / 655
// 2-CTA clusters sharing B by TMA multicast, both rings in lockstep, measured 4-21% slower than
// single CTAs on an H200 (bench/NOTES.md v10) and were dropped; "CTA pairs" below bring them back
// with CTA-scope barriers (v31-v33, items 119-121: on an H100, up to 7% faster layers). Where
// the layer's time goes now (ncu, H200, bench/NOTES.md v11): FC1 reads its operands' bytes from
// DRAM once (qwen3 at 8192 tokens: 1.09 GB against 1.07; v7 measured 2.05). Where groups are one or
// two m-tiles (512-2048 tokens) the L2 is the busiest unit (85-90% of its throughput, DRAM 68-80%):
// every m-tile reads its B tile from L2, every n-tile its A rows. The epilogue costs 10% (FC1) to
// 20% (FC2) of a compute-bound launch, ~60% of it in the stores, which also slow the next tile's
// loads (one stage less makes them 1.6-1.9x dearer). Deferring the stores into the next mainloop,
// staging them for bulk copies (one stage less) and copying only a half tile's A rows measured no
// gain (v11).
//
// Fused activation epilogue (FC1 of the fused layer: grouped_mm_sm90_bf16_act)
// - The unfused pipeline writes h [rows, N1] bf16 and the activation op reads it back and writes
//   [rows, I]: for qwen3 at 8192 tokens that pass alone costs ~220 us of pure memory traffic.
//   Here the epilogue applies the activation to the accumulators and writes [rows, I] directly,
//   with the numerics of the op-by-op path: bf16(acc + bias) widened back to f32, activation in
//   f32 (cuda/activation.cuh), one rounding to bf16.
// - A gated activation needs gate and up of the same column in the same thread. The wgmma m64nN
//   fragment gives thread (warp, lane) columns 8*i + 2*(lane%4) + {0, 1}, i = 0..N/8-1, so:
//     halves: the stage's BN-row B tile is filled by four TMA copies of BN/4 rows: gate rows
//       [j0, j0 + BN/4), their up rows I further, then the same for [j0 + BN/4, j0 + BN/2)
//       (halves_b_row); accumulator column c of a gate run and c + BN/4 (its up) then sit in the
//       same thread, registers BN/8 apart. A gate box reaching past I reads up rows, an up box
//       past 2I the next group's rows or zeros past the tensor: those columns (>= I) are never
//       stored. (Runs of BN/4 rather than BN/2: a half tile's warpgroup then multiplies one
//       contiguous run pair, "Half tiles".)
//     interleaved: B rows [2 j0, 2 j0 + BN) in one copy; gate and up are the thread's adjacent
//       column pair, and one quad shuffle round regroups the results into the usual fragment.
//   Either way a tile of 128 x BN accumulators yields 128 x BN/2 outputs, stored with the same
//   quad transpose and 16-byte stores as the plain epilogue. squared_relu is elementwise on a
//   128 x BN tile.
// - The bias of the tile's BN accumulator columns is loaded by the consumer threads when the tile
//   starts (latency hidden by the mainloop) and staged in shared memory for the epilogue (two
//   BN-float buffers per consumer warpgroup, alternating by tile, one named barrier per tile):
//   read from global memory in the epilogue, a lane's 128 bias values of a wide gated tile do not
//   fit in registers next to its 128 accumulators.
// - One kernel per (layout, activation): the activation is a template parameter (a run-time
//   switch over three gated epilogues in one kernel spilled on the wide tile).
// - Same work in the mainloop (N1 columns of tiles over I outputs), half the bytes stored:
//   expected FC1 time about that of the plain kernel (~0.70 ms for qwen3 at T = 8192), and the
//   activation pass (~0.22 ms) gone.
//
// MXFP8 operands (grouped_mm_sm90_mxfp8[_act]): the same scheduler and epilogues with one of two
// mainloops. (a) kOpMxFp8, the default: TMA stages the e4m3 bytes, the consumers run fp8 wgmma
// per 32-wide scale block and promote with the scales in f32 ("MXFP8 operands: fp8 wgmma"
// below). (b) kOpMxDequant: the 128 producer threads load e4m3 + e8m0 with plain loads,
// dequantize to bf16 and store the tile that TMA would have staged for bf16 operands ("MXFP8
// operands: dequantized by the producer warpgroup"). Measured on an H200 (bench/NOTES.md v5):
// (a) 296-346 TFLOP/s, (b) 226-238, bf16 617-795: neither reaches the bf16 kernel yet.
// (c) The fused layer's prefill uses a third kernel (grouped_mm_sm90_mx_regs*, "MXFP8 weights in
// registers"): weights on wgmma's M side, dequantized into its A registers, activations as bf16
// MXFP8 values; 1.2-1.6x faster in the layer than (a) at T >= 2048 (bench/NOTES.md v6).
#include "cuda/grouped_mm_sm90.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "core/numerics.h"
#include "cuda/activation.cuh"
#include "cuda/group_tiles.cuh"
#include "cuda/mx_block.cuh"
#include "cuda/mx_scale_words.cuh"
#include "cuda/ptx/cluster.cuh"
#include "cuda/ptx/cp_async_mbarrier.cuh"
#include "cuda/ptx/mma.cuh"
#include "cuda/ptx/mbarrier.cuh"
#include "cuda/ptx/prmt.cuh"
#include "cuda/ptx/tma.cuh"
#include "cuda/ptx/wgmma.cuh"
#include "cuda/tensor_map.h"

namespace fmoe::cuda {

namespace {

// ---- Tile scheduler -----------------------------------------------------------------------------
// Thread 0 of the producer warpgroup draws the CTA's tiles and publishes them through a ring of
// kTileSlots entries in shared memory; every warp that walks the tiles (the consumers, and the
// producer threads that need the coordinates) takes them from there.
// - Static (no counter): CTA i draws tiles i, i + grid, i + 2*grid, ...
// - Dynamic (a counter, zeroed before the launch): each draw is an atomicAdd on it, so the tiles
//   start in index order whatever each CTA's pace. Why: the raster puts the m-tiles that share a
//   B tile next to each other, and they share it through L2 only while they run at the same time.
//   Statically, a CTA whose tiles are shorter (half tiles) runs ahead of the CTAs it shares B
//   tiles with, and over a launch of many waves they stop meeting: with every last tile halved,
//   deepseek-v3 at 8192 tokens took 16.0 ms with static tiles and 12.1 ms with dynamic ones (H200,
//   bench/NOTES.md v9). On equal tiles the two measure the same. The order of the draws decides
//   which CTA computes a tile, never what it computes: results are the same in both modes.
constexpr int kTileSlots = 4;
struct TileQueue {
  uint64_t full[kTileSlots];   // one arrival: the producer's, after writing the entry
  uint64_t empty[kTileSlots];  // one arrival per reading warp
  int tile[kTileSlots];

  __device__ void init(int reading_warps) {
    for (int i = 0; i < kTileSlots; ++i) {
      ptx::mbar_init(&full[i], 1);
      ptx::mbar_init(&empty[i], reading_warps);
    }
  }
  // The i-th tile this CTA works on (>= total: none left), on the draw of thread 0 of the producer.
  static __device__ __forceinline__ int draw(int* counter, int i) {
    return counter != nullptr ? atomicAdd(counter, 1) : int(blockIdx.x + i * gridDim.x);
  }
  // Thread 0 of the producer: publishes tile t as the CTA's i-th (t >= total for the last).
  __device__ __forceinline__ void put(int i, int t) {
    const int slot = i % kTileSlots;
    ptx::mbar_wait(&empty[slot], ((i / kTileSlots) & 1) ^ 1);
    tile[slot] = t;
    ptx::mbar_arrive(&full[slot]);  // release: the entry is visible to whoever waits on `full`
  }
  // Every lane of a reading warp, converged: the CTA's i-th tile.
  __device__ __forceinline__ int take(int i) {
    const int slot = i % kTileSlots;
    ptx::mbar_wait(&full[slot], (i / kTileSlots) & 1);
    const int t = tile[slot];
    __syncwarp();
    if ((threadIdx.x & 31) == 0) ptx::mbar_arrive(&empty[slot]);
    return t;
  }
};
// Shared memory of the queue, kept a multiple of 16 bytes (what follows it stays aligned).
constexpr int kTileQueueBytes = (int(sizeof(TileQueue)) + 15) / 16 * 16;

// ---- CTA pairs ----------------------------------------------------------------------------------
// Sm90WidePairs: the wide cooperative kernel in clusters of two CTAs (FMOE_SM90_PAIRS=0: single
// CTAs, for comparisons). Why: at 8192 tokens FC1 is bound by the L2's throughput (bench/NOTES.md
// items 77, 118), and its operand copies alone are ~82% of its time; in a copies-only check, B
// tiles multicast to CTA pairs arrived 10% faster than single CTAs' (item 119), with the pairs'
// barriers at CTA scope (at cluster scope they lost 45%). In the layer on an H100 (item 121):
// deepseek-v3 T = 8192 4-7% and mixtral T = 2048 5-6% faster (long mainloops); the short-k
// layers (qwen3, nemotron) 1.5-2% slower, alternated on one boot. Sharing A tiles too (a pair's
// tiles of one row tile) gained nothing and was dropped.
// - A pair draws two consecutive tiles of the raster (mostly two row tiles of one B tile): the
//   leader (rank 0) takes them from the counter and passes the draw to the other CTA through its
//   shared memory (PairMail); statically, pair q takes tiles 2q + i * grid and 2q + 1 + i * grid.
// - Where both tiles read the same B tile, the leader copies it into both CTAs' stages by one
//   multicast copy; otherwise each CTA copies its own. A stage is refilled only after both CTAs'
//   consumer warps released it (each releases on both `empty` barriers, at CTA scope: a consumer
//   only vouches that it has finished reading), so the two walk the same stages in step.
// - A pair whose second tile is past the end gives the second CTA a stand-in (the first tile
//   again, computed and not stored): both CTAs must walk the same number of stages.
struct PairMail {
  uint64_t full[kTileSlots];   // in the second CTA: the leader's arrival after writing `tile`
  uint64_t empty[kTileSlots];  // in the leader: the second CTA's arrival after reading it
  int tile[kTileSlots];        // in the second CTA: the pair's draw (its first tile)

  __device__ void init() {
    for (int i = 0; i < kTileSlots; ++i) {
      ptx::mbar_init(&full[i], 1);
      ptx::mbar_init(&empty[i], 1);
    }
  }
  // The pair's i-th draw in both CTAs: the first of its two tiles (>= total: none left).
  __device__ __forceinline__ int draw(int* counter, int i, uint32_t rank) {
    if (counter == nullptr) return int(blockIdx.x & ~1u) + i * int(gridDim.x);
    const int slot = i % kTileSlots;
    const uint32_t pass = (i / kTileSlots) & 1;
    if (rank == 0) {
      ptx::mbar_wait_cluster(&empty[slot], pass ^ 1);  // the other CTA read the slot's last draw
      const int t0 = atomicAdd(counter, 2);
      ptx::st_shared_peer_u32(ptx::cluster_peer_addr(&tile[slot], 1), uint32_t(t0));
      ptx::mbar_arrive_peer<true>(ptx::cluster_peer_addr(&full[slot], 1));
      return t0;
    }
    ptx::mbar_wait_cluster(&full[slot], pass);
    const int t0 = *reinterpret_cast<volatile int*>(&tile[slot]);
    ptx::mbar_arrive_peer<true>(ptx::cluster_peer_addr(&empty[slot], 0));
    return t0;
  }
};
constexpr int kPairMailBytes = (int(sizeof(PairMail)) + 15) / 16 * 16;

// Ping-pong tiles: a warpgroup waits for its tile's first stage (sequence number seq) by the
// parity of that fill, which only means "landed" once the stage's previous fill (seq - S) has
// landed. That one may be the other warpgroup's and still in flight when the tile is published
// (with k_blocks = S it is the other's first stage, issued before this warpgroup's last tile
// ended). The producer waits for it before publishing the tile; it would wait for the stage's
// release, which follows, before filling it anyway.
template <int S>
__device__ __forceinline__ void wait_previous_fill(uint64_t* full, int64_t seq) {
  if (seq >= S) ptx::mbar_wait(&full[seq % S], uint32_t(seq / S - 1) & 1u);
}

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
// MXFP8 (kMx, see "MXFP8 operands" below): same stage ring and tile shapes as bf16, but the e4m3
//   bytes of the next k-block are staged in the producer threads' registers instead of a shared
//   memory ring. A producer thread holds two k-blocks in flight: 2 x (BM + BN) / 32 chunks of
//   16 bytes (+ one scale each) = 2 x 12 x 5 = 120 registers wide, 2 x 8 x 5 = 80 narrow, plus
//   row offsets and the converter's temporaries. Both roles keep the launch's 168 registers
//   (ptxas fits producer and consumer code in 168 without spilling): setmaxnreg can only move
//   registers inside the pool the CTA got at launch, 384 x 168 = 64512, so raising the producer
//   without lowering the consumers would wait forever for registers nobody frees (v1 of this
//   producer asked for 176 and hung).
//   Shared memory: exactly that of the bf16 configuration of the same width (no staging ring).
// MXFP8 by fp8 wgmma (kOpMxFp8, see "MXFP8 operands: fp8 wgmma" below): a k-block is 128 e4m3
//   (still one 128-byte swizzle span), loaded by TMA as bytes; each stage also holds the
//   k-block's 4 scales of every A and B row as f32 (4 KB) and their raw words (2 KB), so 5
//   stages of 38 KB fit. BN = 128: a consumer thread keeps 64 accumulators and two 32-register
//   temporaries of its half-width k32 wgmmas. Registers: producer 56 (the scale-word ring's state:
//   40 spilled), consumers 224: 56 x 128 + 224 x 256 = 64512.
enum Sm90Operands : int {
  kOpBf16 = 0,      // bf16 A and B by TMA
  kOpMxDequant = 1, // e4m3 + e8m0 dequantized to bf16 by the producer warpgroup
  kOpMxFp8 = 2,     // e4m3 by TMA, fp8 wgmma per k32 block, promoted with the scales in f32
};
template <int BN, int STAGES, int kProducerRegs_ = 40, int kConsumerRegs_ = 232,
          int kOperands_ = kOpBf16, bool kPingPong_ = false, bool kPairs_ = false>
struct Sm90TileConfig {
  static constexpr int kOperands = kOperands_;
  static constexpr bool kPingPong = kPingPong_;  // "Ping-pong tiles": a tile per warpgroup
  static constexpr bool kPairs = kPairs_;        // "CTA pairs": clusters of two sharing B tiles
  static constexpr bool kMx = kOperands == kOpMxDequant;
  static constexpr bool kFp8 = kOperands == kOpMxFp8;
  static constexpr int kElemBytes = kFp8 ? 1 : 2;  // of A and B as staged for the tensor cores
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = BN;
  static constexpr int kBlockK = 128 / kElemBytes;
  static constexpr int kStages = STAGES;
  static constexpr int kRasterBand = 8;
  static constexpr int kMaxGroups = 1024;
  static constexpr int kThreads = 384;
  static constexpr int kProducerRegs = kProducerRegs_;
  static constexpr int kConsumerRegs = kConsumerRegs_;
  static constexpr int kABytes = kBlockM * kBlockK * kElemBytes;
  static constexpr int kBBytes = kBlockN * kBlockK * kElemBytes;
  static constexpr int kTmaBytes = kABytes + kBBytes;  // what the stage's TMA copies deliver
  static_assert(kTmaBytes < (1 << 20), "an mbarrier's transaction count is below 2^20 bytes");
  static constexpr int kBRows = kBlockN;     // rows of the B tile
  static constexpr int kHalvesPairs = 2;     // halves layout: (gate, up) run pairs per B tile
  static constexpr int kHalvesRun = kBRows / (2 * kHalvesPairs);  // rows per run (halves_b_row)
  // kOpMxFp8: f32 scales of the stage, A as [BM][4] then B as [4][BN] (k32 block j of row r),
  // and the raw scale words they are made from, [BM + BN][2] (mx_scale_words.cuh).
  static constexpr int kScaleFloats = kFp8 ? 4 * (kBlockM + kBlockN) : 0;
  static constexpr int kRawWords = kFp8 ? 2 * (kBlockM + kBlockN) : 0;
  static constexpr int kStageBytes = kABytes + kBBytes + kScaleFloats * 4 + kRawWords * 4;
  static constexpr int kBarrierBytes =
      2 * kStages * 8 + kTileQueueBytes + (kPairs ? kPairMailBytes : 0);  // + queue (+ mail)
  static constexpr int kTableBytes = (3 * kMaxGroups + 1) * 4;
  static constexpr int kSmemBytes = 1024 + kStages * kStageBytes + kBarrierBytes + kTableBytes;
  static_assert(kSmemBytes <= 227 * 1024, "exceeds the 227 KB of shared memory per block");
  // Fused-activation epilogues only: per consumer warpgroup two tile-bias buffers of BN floats
  // (double-buffered by tile parity), after the group tables.
  static constexpr int kBiasOffset =
      (kStages * kStageBytes + kBarrierBytes + kTableBytes + 15) / 16 * 16;
  static constexpr int kBiasBytes = 2 * 2 * kBlockN * 4;
  static constexpr int kSmemBytesAct = 1024 + kBiasOffset + kBiasBytes;
  static_assert(kSmemBytesAct <= 227 * 1024, "exceeds the 227 KB of shared memory per block");
  static_assert(kBlockK * kElemBytes == 128, "one k-block row must be one 128-byte swizzle span");
  // setmaxnreg redistributes the CTA's launch allocation (168 per thread: __launch_bounds__(384,
  // 1)); it cannot grow it.
  static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= 168 * kThreads, "register pool");
  static_assert(kProducerRegs % 8 == 0 && kConsumerRegs % 8 == 0, "setmaxnreg granularity");
  // Halves-layout B tiles are four boxes of BN/4 rows; each must start on a swizzle atom (1024
  // bytes = 8 rows of 128 bytes) so that all land as one BN-row box would.
  static_assert((kBlockN / 4 * kBlockK * kElemBytes) % 1024 == 0, "B run off the swizzle atom");
  static_assert(!kFp8 || (kBlockN == 128 && kBlockM == 128), "fp8 producer: one A and one B row per thread");
  static_assert(!kPingPong || (kOperands == kOpBf16 && kBlockN == 128),
                "ping-pong tiles: bf16 operands, 128 accumulators per thread (2 x m64n128)");
  static_assert(!kPairs || (kOperands == kOpBf16 && !kPingPong),
                "CTA pairs: the cooperative bf16 kernel (TMA producer)");
  // Consumer warps that read each stage and each tile-queue entry: both warpgroups, or the one
  // warpgroup that owns the tile.
  static constexpr int kStageReaders = kPingPong ? 4 : 8;
  // Arrivals that free a stage: its readers, in both CTAs of a pair.
  static constexpr int kStageReleases = kStageReaders * (kPairs ? 2 : 1);
};
using Sm90Wide = Sm90TileConfig<256, 4>;
using Sm90WidePairs = Sm90TileConfig<256, 4, 40, 232, kOpBf16, false, true>;
using Sm90Narrow = Sm90TileConfig<128, 6>;
using Sm90PingPong = Sm90TileConfig<128, 6, 40, 232, kOpBf16, true>;
using Sm90MxWide = Sm90TileConfig<256, 4, 168, 168, kOpMxDequant>;
using Sm90MxNarrow = Sm90TileConfig<128, 6, 168, 168, kOpMxDequant>;
using Sm90Fp8 = Sm90TileConfig<128, 5, 56, 224, kOpMxFp8>;

// What the epilogue writes (the kernel's template parameter).
enum Epilogue : int {
  kEpiStore = 0,       // c = bf16(acc + bias): the plain GEMM, n columns
  kEpiActElementwise,  // c = bf16(act(bf16(acc + bias))), non-gated (squared_relu): I = N1
  kEpiActHalves,       // gated, gate = B rows [0, I), up = [I, 2I) of each group (halves_b_row)
  kEpiActInterleaved,  // gated, gate = B row 2j, up = 2j + 1
};
__host__ __device__ constexpr bool epilogue_gated(int epi) {
  return epi == kEpiActHalves || epi == kEpiActInterleaved;
}

struct Sm90Params {
  __nv_bfloat16* c;
  const float* bias;
  const int32_t* offsets;
  const int32_t* row_map;
  int rows;
  int n;         // columns of c (and of the tile raster)
  int n1;        // rows of b (and bias entries) per group: n for the plain GEMM, N1 fused
  int ffn;       // I: offset of the up half in halves layout
  int k_blocks;
  int groups;
  int n_tiles;
  float alpha, limit;  // swiglu_oai (fused epilogues)
  // MXFP8 operands (kMx configurations only): e4m3 data and e8m0 scales, k_scales = k / 32.
  const uint8_t* a8;
  const uint8_t* b8;
  const uint8_t* a_scale;
  const uint8_t* b_scale;
  int k;
  int k_scales;
  int b_rows;  // groups * n1: rows of b
  int half_tiles;     // HalfTiles: which tiles of <= 64 rows the bf16 mainloop halves
  int* tile_counter;  // dynamic tile scheduling when set, zeroed before the launch (TileQueue)
};

// Which tiles of at most 64 rows are computed as half tiles ("Half tiles").
enum HalfTiles : int {
  kHalfTilesNone = 0,
  kHalfTilesWholeGroups = 1,  // only groups of one such tile
  kHalfTilesAll = 2,          // every last tile of a group
};

struct TileCoord {
  int group;
  int m0;       // first row of the tile
  int row_end;  // end of the group's rows (exclusive): stores stop here
  int n0;       // first column of c
};

// Whether the epilogue stores row `row` of tile tc: inside the group, and not a padding row
// (row_map -1). Read before the mainloop by both prefill kernels, so the load's latency hides.
__device__ __forceinline__ bool tile_row_stored(const Sm90Params& p, const TileCoord& tc,
                                                int row) {
  return row < tc.row_end && (p.row_map == nullptr || p.row_map[row] >= 0);
}

// Group tables in shared memory: prefix[g] = m-tiles of groups < g; start/end = valid row range.
// kTileCols: columns of c per tile (BN, or BN/2 for the gated epilogues).
template <class Cfg, int kTileCols>
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
  return TileCoord{g, start[g] + m_tile * Cfg::kBlockM, end[g], n_tile * kTileCols};
}

// ---- Epilogue -----------------------------------------------------------------------------------
// The wgmma fragment: thread (warp, lane) holds rows r0 = 16*warp + lane/4 and r1 = r0 + 8,
// columns 8*j + 2*(lane%4) + {0, 1} of every 8-column block j (acc[4j..4j+1] on r0,
// acc[4j+2..4j+3] on r1). The 4 lanes of a quad together hold, for blocks j and j+1, four
// 8-column segments (r0 j, r0 j+1, r1 j, r1 j+1) of which each lane owns a quarter; a 4x4
// transpose across the quad (two xor-shuffle steps) gives each lane one whole segment, so each
// lane stores 16 bytes and a warp store covers 16 full 32-byte sectors.

// Where a lane stores: its quad position q = lane % 4, whether its row is written, the row.
struct EpilogueRow {
  int q;
  bool row_ok;
  __nv_bfloat16* c_row;
};

// Stores output blocks j and j + 1 (8 columns each, block j starting at column col_j of c) from
// x = this lane's bf16 pairs of (r0 j, r0 j+1, r1 j, r1 j+1), columns 2q, 2q + 1 of each.
__device__ __forceinline__ void store_block_pair(const uint32_t (&x)[4], const EpilogueRow& er,
                                                 int col_j, int n) {
  const int hi = er.q >> 1, lo = er.q & 1;
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
  const int col = col_j + lo * 8;
  if (er.row_ok && col < n) *reinterpret_cast<uint4*>(er.c_row + col) = seg;
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo in the low half: the lower column
  return *reinterpret_cast<uint32_t*>(&v);
}

// The FC1 output as the op-by-op pipeline stores it, widened back: the activation's input.
__device__ __forceinline__ float bf16_rounded(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

// The plain GEMM: c = bf16(acc + bias).
template <int BN>
__device__ __forceinline__ void epilogue_store(const float (&acc)[BN / 2], const Sm90Params& p,
                                               const TileCoord& tc, const EpilogueRow& er) {
  const float* bias = p.bias ? p.bias + int64_t(tc.group) * p.n1 : nullptr;
#pragma unroll
  for (int j = 0; j < BN / 8; j += 2) {
    uint32_t x[4];  // this lane's quarter of segments (r0 j, r0 j+1, r1 j, r1 j+1)
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int col = tc.n0 + (j + jj) * 8 + er.q * 2;
      float b0 = 0.f, b1 = 0.f;
      if (bias != nullptr && col < p.n) {  // n % 8 == 0: col + 1 < n too
        b0 = __ldg(bias + col);
        b1 = __ldg(bias + col + 1);
      }
      const int a = 4 * (j + jj);
      x[jj] = pack_bf16x2(acc[a + 0] + b0, acc[a + 1] + b1);
      x[2 + jj] = pack_bf16x2(acc[a + 2] + b0, acc[a + 3] + b1);
    }
    store_block_pair(x, er, tc.n0 + j * 8, p.n);
  }
}

// The bias of the tile's accumulator column c (0 <= c < BN) in the fused epilogues, 0 where there
// is none or the column is never stored (then no load: it may lie past the bias array). Halves:
// the columns come in runs of kRun gate, then kRun up columns (halves_b_row).
template <int BN, int kEpi, int kRun>
__device__ __forceinline__ float act_tile_bias(const Sm90Params& p, const TileCoord& tc, int c) {
  if (p.bias == nullptr) return 0.f;
  const float* bias = p.bias + int64_t(tc.group) * p.n1;
  if constexpr (kEpi == kEpiActHalves) {
    const int run = c / kRun;
    const int col = tc.n0 + (run >> 1) * kRun + c % kRun;
    return col < p.n ? __ldg(bias + ((run & 1) ? p.ffn + col : col)) : 0.f;
  } else if constexpr (kEpi == kEpiActInterleaved) {
    const int row = 2 * tc.n0 + c;
    return row < p.n1 ? __ldg(bias + row) : 0.f;
  } else {
    const int col = tc.n0 + c;
    return col < p.n ? __ldg(bias + col) : 0.f;
  }
}

// Named barrier over the `count` threads of one consumer warpgroup (PTX ISA: "bar.sync").
__device__ __forceinline__ void warpgroup_bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// The fused activation: c[:, j] = bf16(act(bf16(gate_j + bias), bf16(up_j + bias))) over the
// tile's kTileCols output columns (I % 8 == 0: an 8-column block is wholly inside I or past it).
// s_bias[c] = bias of accumulator column c (act_tile_bias), staged in shared memory: per lane the
// bias of a wide tile is 128 values, which next to 128 accumulators do not fit in registers.
template <int BN, int kEpi, int kAct, int kRun>
__device__ __forceinline__ void epilogue_act(const float (&acc)[BN / 2], const Sm90Params& p,
                                             const TileCoord& tc, const EpilogueRow& er,
                                             const float* s_bias, int lane) {
  constexpr int kTileCols = epilogue_gated(kEpi) ? BN / 2 : BN;
  const float alpha = p.alpha, limit = p.limit;
  const int q = er.q;
  // Bias pair of columns 8i + 2q + {0, 1}, the lane's columns of accumulator block i.
  auto bias2 = [&](int i) { return *reinterpret_cast<const float2*>(s_bias + 8 * i + 2 * q); };
  uint32_t x[4];  // as in epilogue_store: (r0 j, r0 j+1, r1 j, r1 j+1), columns 2q, 2q + 1
#pragma unroll
  for (int j = 0; j < kTileCols / 8; j += 2) {
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int blk = j + jj;  // output block
      if constexpr (kEpi == kEpiActElementwise) {
        const float2 b = bias2(blk);
        const int a = 4 * blk;
        float y[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)  // e: (r0, c), (r0, c+1), (r1, c), (r1, c+1)
          y[e] = activation_value<kAct>(bf16_rounded(acc[a + e] + ((e & 1) ? b.y : b.x)), 0.f,
                                        alpha, limit);
        x[jj] = pack_bf16x2(y[0], y[1]);
        x[2 + jj] = pack_bf16x2(y[2], y[3]);
      } else if constexpr (kEpi == kEpiActHalves) {
        // The accumulator columns are runs of kRun gate then kRun up columns (halves_b_row):
        // output block blk is in run pair blk / kRunBlocks, its up block kRunBlocks further.
        constexpr int kRunBlocks = kRun / 8, kUp = 4 * kRunBlocks;
        const int gate_blk = blk / kRunBlocks * 2 * kRunBlocks + blk % kRunBlocks;
        const float2 bg = bias2(gate_blk), bu = bias2(gate_blk + kRunBlocks);
        const int a = 4 * gate_blk;
        float y[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float g = bf16_rounded(acc[a + e] + ((e & 1) ? bg.y : bg.x));
          const float u = bf16_rounded(acc[a + kUp + e] + ((e & 1) ? bu.y : bu.x));
          y[e] = activation_value<kAct>(g, u, alpha, limit);
        }
        x[jj] = pack_bf16x2(y[0], y[1]);
        x[2 + jj] = pack_bf16x2(y[2], y[3]);
      } else {
        static_assert(kEpi == kEpiActInterleaved, "unknown epilogue");
        // Output block blk = accumulator blocks 2blk (output columns 0-3 of the block) and
        // 2blk + 1 (columns 4-7); in each, the lane holds the (gate, up) pair of output column
        // q, resp. 4 + q.
        const float2 b_lo = bias2(2 * blk), b_hi = bias2(2 * blk + 1);
        float y[4];  // (r0, q), (r0, 4+q), (r1, q), (r1, 4+q)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int a = 4 * (2 * blk + (e & 1)) + (e & 2);  // the pair's gate register
          const float2 b = (e & 1) ? b_hi : b_lo;
          const float g = bf16_rounded(acc[a] + b.x);
          const float u = bf16_rounded(acc[a + 1] + b.y);
          y[e] = activation_value<kAct>(g, u, alpha, limit);
        }
        // Regroup into the usual fragment: lane q needs output columns 2q and 2q + 1, held by
        // lanes (2q) % 4 and (2q + 1) % 4 of the quad, as their low (q < 2) or high (q >= 2) half.
        const uint32_t p0 = pack_bf16x2(y[0], y[1]), p1 = pack_bf16x2(y[2], y[3]);
        const int base = lane & ~3;
        const int src0 = base | ((2 * q) & 3), src1 = base | ((2 * q + 1) & 3);
        const uint32_t r0a = __shfl_sync(0xffffffffu, p0, src0);
        const uint32_t r0b = __shfl_sync(0xffffffffu, p0, src1);
        const uint32_t r1a = __shfl_sync(0xffffffffu, p1, src0);
        const uint32_t r1b = __shfl_sync(0xffffffffu, p1, src1);
        const uint32_t sel = q < 2 ? 0x5410u : 0x7632u;  // low halves / high halves of (a, b)
        x[jj] = __byte_perm(r0a, r0b, sel);
        x[2 + jj] = __byte_perm(r1a, r1b, sel);
      }
    }
    store_block_pair(x, er, tc.n0 + j * 8, p.n);
  }
}

// The kernel starts with kLaunchRegs per thread (__launch_bounds__(384, 1): 65536 / 384, rounded
// down to 8); each warpgroup then moves to its budget of the config table.
constexpr int kLaunchRegs = 168;
template <int kRegs>
__device__ __forceinline__ void set_warpgroup_regs() {
  if constexpr (kRegs < kLaunchRegs) ptx::setmaxnreg_dec<kRegs>();
  if constexpr (kRegs > kLaunchRegs) ptx::setmaxnreg_inc<kRegs>();
}

// ---- Half tiles ---------------------------------------------------------------------------------
// A tile of at most 64 rows (the last of its group) is a half tile: both consumer warpgroups
// multiply the same 64 A rows (the first of the stage's A tile), warpgroup h against its half of
// the B tile, so the tile costs half the tensor time of a 128-row tile of mostly padding. The
// stage's copies are unchanged. With static tiles only whole groups are halved, never the last
// tile of a larger group: a shorter tile lets its CTA run ahead of the CTAs that share its B
// tile, and over a launch of many waves they no longer read it from L2 together (measured on an
// H200 with every last tile halved: deepseek-v3 at 8192 tokens 12.7 -> 16.6 ms; with whole
// groups only: qwen3 at 512 tokens -7.5%, gpt-oss at 2048 -7%; bench/NOTES.md v7). Dynamic tiles
// start in index order whatever their durations (TileQueue), so there every last tile is halved
// (bench/NOTES.md v9).
// Warpgroup h's half of the B tile, as accumulator columns 0..BN/2 of an m64n(BN/2) fragment:
// B rows [h BN/2, (h + 1) BN/2) (output columns h kTileCols/2 on; for halves, run pair h of
// halves_b_row: its gate then its up columns, the layout of an m64n(BN/2) tile). v7 took the
// halves layout's gate and up rows as two m64n(BN/4) products into parts of the accumulators;
// ptxas then serialised every wgmma of those kernels (C7511, "insufficient register resources").
// Whether tile tc runs as a half tile under p.half_tiles (start: the groups' first rows).
template <class Cfg>
__device__ __forceinline__ bool is_half_tile(const Sm90Params& p, const TileCoord& tc,
                                             const int* start) {
  return p.half_tiles != kHalfTilesNone && tc.row_end - tc.m0 <= Cfg::kBlockM / 2 &&
         (p.half_tiles == kHalfTilesAll || tc.m0 == start[tc.group]);
}

template <int BN, int BK>
__device__ __forceinline__ void mma_half_tile(float (&acc)[BN / 2], uint32_t a_addr,
                                              uint32_t b_addr, int h, int kb) {
  float(&part)[BN / 4] = *reinterpret_cast<float(*)[BN / 4]>(&acc[0]);
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk) {
    const int accumulate = (kb | kk) != 0;
    ptx::wgmma_m64k16_bf16<BN / 2>(part, ptx::wgmma_desc_sw128(a_addr + kk * 32),
                                   ptx::wgmma_desc_sw128(b_addr + h * (BN / 2) * 128 + kk * 32),
                                   accumulate);
  }
}

// The bf16 k-block loop of a consumer: per k-block, waits for the stage, issues one wgmma group
// (issue(a_addr, b_addr, kb): the stage's A and B tiles) between fences of the first kLive
// accumulators, keeps one group in flight and releases the previous k-block's stage once
// wait_group(1) proves it consumed; `empty` counts one arrival per consuming warp.
// A consumer warp's release of a stage (lane 0): in a CTA pair, on both CTAs' barriers.
template <class Cfg>
__device__ __forceinline__ void release_stage(uint64_t* empty_stage) {
  ptx::mbar_arrive(empty_stage);
  if constexpr (Cfg::kPairs)
    ptx::mbar_arrive_peer<false>(ptx::cluster_peer_addr(empty_stage, ptx::cluster_ctarank() ^ 1));
}

template <class Cfg, int kLive, int N, class Issue>
__device__ __forceinline__ void bf16_kblock_loop(float (&acc)[N], const uint8_t* smem_a,
                                                 const uint8_t* smem_b, uint64_t* full,
                                                 uint64_t* empty, int k_blocks, int lane,
                                                 int& stage, uint32_t& phase, Issue&& issue) {
  static_assert(kLive <= N, "fenced accumulators");
  int prev_stage = 0;
  for (int kb = 0; kb < k_blocks; ++kb) {
    ptx::mbar_wait(&full[stage], phase);
    const uint32_t a_addr = ptx::smem_addr(smem_a + stage * Cfg::kABytes);
    const uint32_t b_addr = ptx::smem_addr(smem_b + stage * Cfg::kBBytes);
#pragma unroll
    for (int i = 0; i < kLive; ++i) ptx::wgmma_fence_operand(acc[i]);
    ptx::wgmma_fence();
    issue(a_addr, b_addr, kb);
    ptx::wgmma_commit();
#pragma unroll
    for (int i = 0; i < kLive; ++i) ptx::wgmma_fence_operand(acc[i]);
    // The group of the previous k-block is now complete: its stage can be refilled.
    ptx::wgmma_wait<1>();
    if (kb > 0 && lane == 0) release_stage<Cfg>(&empty[prev_stage]);
    prev_stage = stage;
    ptx::next_stage<Cfg::kStages>(stage, phase);
  }
  ptx::wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < kLive; ++i) ptx::wgmma_fence_operand(acc[i]);
  if (lane == 0) release_stage<Cfg>(&empty[prev_stage]);
}

// The bf16 consumer mainloop of one tile (kHalf: a half tile): warpgroup `half` multiplies its 64
// A rows (a half tile: the first 64) by the B tile (a half tile: its half of it).
// Separate instantiations rather than a branch around the wgmmas inside one loop: there ptxas
// injects warpgroup arrives and serialises every wgmma of the kernel (C7520).
template <class Cfg, int kEpi, bool kHalf>
__device__ __forceinline__ void consume_bf16(float (&acc)[Cfg::kBlockN / 2], const uint8_t* smem_a,
                                             const uint8_t* smem_b, uint64_t* full,
                                             uint64_t* empty, int k_blocks, int half, int lane,
                                             int& stage, uint32_t& phase) {
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, BK = Cfg::kBlockK;
  const uint8_t* smem_a_rows = smem_a + (kHalf ? 0 : half * (BM / 2) * 128);  // its 64 A rows
  bf16_kblock_loop<Cfg, BN / 2>(
      acc, smem_a_rows, smem_b, full, empty, k_blocks, lane, stage, phase,
      [&](uint32_t a_addr, uint32_t b_addr, int kb) {
        if constexpr (kHalf) {
          mma_half_tile<BN, BK>(acc, a_addr, b_addr, half, kb);
        } else {
#pragma unroll
          for (int kk = 0; kk < BK / 16; ++kk) {
            // k16 step = 32 bytes along the swizzled 128-byte row.
            ptx::wgmma_m64k16_bf16<BN>(acc, ptx::wgmma_desc_sw128(a_addr + kk * 32),
                                       ptx::wgmma_desc_sw128(b_addr + kk * 32), (kb | kk) != 0);
          }
        }
      });
}

// ---- Ping-pong tiles ------------------------------------------------------------------------------
// Sm90PingPong: each consumer warpgroup owns whole 128 x 128 tiles (two m64n128 products per k16
// step, 128 accumulators per thread: the registers of a wide tile's half), warpgroup 0 the CTA's
// even tiles, warpgroup 1 its odd ones. Why: in the cooperative kernels both warpgroups finish a
// tile together and run its epilogue together, so the tensor cores idle for it, 10% of FC1 and
// 20% of FC2 at compute-bound sizes (bench/NOTES.md v11, item 30). Here one warpgroup's epilogue
// runs under the other's mainloop.
// - No ordering barrier: the producer fills the one ring in tile order, so a warpgroup's first
//   stage lands only as the other frees the stages of its tile; their mainloops overlap by at
//   most the ring's depth, and the epilogues fall in the other's mainloop.
// - The i-th tile of the CTA starts at stage sequence number i * k_blocks (every tile of a launch
//   has k_blocks stages), which gives a warpgroup its stage and phase without counting the other's.
//   That phase is sound because the producer publishes a tile only once the previous fill of its
//   first stage has landed (wait_previous_fill).
// - A stage is released by the 4 warps of its owner; the tile queue's entries alternate between
//   the warpgroups (kTileSlots is even: a slot always serves the same one), and the producer
//   publishes the end twice, once for each.
// - Measured on an H200 (bench/NOTES.md v16): 2-9% faster than the cooperative 128-wide kernel
//   on every shape timed, but no faster than the 256-wide one (qwen3's FC1 and FC2 alike, gpt-oss
//   FC1 5% slower; in the layer forced everywhere, mixtral and deepseek-v3 at 2048-8192 tokens up
//   to 9% slower): a 128-wide tile reads more from L2 per product, which costs what the hidden
//   epilogue saves. So the pick takes it where it would take the narrow kernel.
// - A half tile (at most 64 rows, "Half tiles") is the top product alone.
template <class Cfg, bool kHalf>
__device__ __forceinline__ void consume_pingpong(float (&acc)[Cfg::kBlockN], const uint8_t* smem_a,
                                                 const uint8_t* smem_b, uint64_t* full,
                                                 uint64_t* empty, int k_blocks, int lane,
                                                 int stage, uint32_t phase) {
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, BK = Cfg::kBlockK;
  float(&top)[BN / 2] = *reinterpret_cast<float(*)[BN / 2]>(&acc[0]);
  float(&bottom)[BN / 2] = *reinterpret_cast<float(*)[BN / 2]>(&acc[BN / 2]);
  bf16_kblock_loop<Cfg, kHalf ? BN / 2 : BN>(
      acc, smem_a, smem_b, full, empty, k_blocks, lane, stage, phase,
      [&](uint32_t a_addr, uint32_t b_addr, int kb) {
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          const int accumulate = (kb | kk) != 0;
          const uint64_t b_desc = ptx::wgmma_desc_sw128(b_addr + kk * 32);
          ptx::wgmma_m64k16_bf16<BN>(top, ptx::wgmma_desc_sw128(a_addr + kk * 32), b_desc,
                                     accumulate);
          if constexpr (!kHalf)
            ptx::wgmma_m64k16_bf16<BN>(
                bottom, ptx::wgmma_desc_sw128(a_addr + (BM / 2) * 128 + kk * 32), b_desc,
                accumulate);
        }
      });
}

// The tile loop of a ping-pong consumer warpgroup `wg` (0 or 1): its mainloop and epilogue per
// tile, as the cooperative loop in grouped_mm_sm90_kernel does for its half.
template <class Cfg, int kEpi, int kAct>
__device__ __forceinline__ void consume_tiles_pingpong(const Sm90Params& p, TileQueue* queue,
                                                       const int* s_prefix, const int* s_start,
                                                       const int* s_end, int total_tiles,
                                                       const uint8_t* smem_a, const uint8_t* smem_b,
                                                       uint64_t* full, uint64_t* empty,
                                                       float* s_bias, int wg, int wg_tid) {
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, S = Cfg::kStages;
  constexpr int kTileCols = epilogue_gated(kEpi) ? BN / 2 : BN;
  const int warp = wg_tid / 32, lane = wg_tid & 31;
  float acc[BN];
  float(&top)[BN / 2] = *reinterpret_cast<float(*)[BN / 2]>(&acc[0]);
  float(&bottom)[BN / 2] = *reinterpret_cast<float(*)[BN / 2]>(&acc[BN / 2]);
  int tile_parity = 0;
  for (int i = wg;; i += 2) {
    const int t = queue->take(i);
    if (t >= total_tiles) break;
    const TileCoord tc =
        decode_tile<Cfg, kTileCols>(t, s_prefix, s_start, s_end, p.groups, p.n_tiles);
    const bool half_tile = is_half_tile<Cfg>(p, tc, s_start);
    float bias_pre[BN / 128];
    if constexpr (kEpi != kEpiStore) {
#pragma unroll
      for (int u = 0; u < BN / 128; ++u)
        bias_pre[u] = act_tile_bias<BN, kEpi, Cfg::kHalvesRun>(p, tc, wg_tid + 128 * u);
    }
    // Rows of the lane's stored segments in the top and bottom 64 rows, looked up before the
    // mainloop (latency hidden under it).
    EpilogueRow er_top, er_bottom;
    er_top.q = er_bottom.q = lane & 3;
    const int row = tc.m0 + warp * 16 + (lane >> 2) + 8 * (er_top.q >> 1);
    er_top.row_ok = tile_row_stored(p, tc, row);
    er_bottom.row_ok = !half_tile && tile_row_stored(p, tc, row + BM / 2);
    const int64_t seq = int64_t(i) * p.k_blocks;  // the tile's first stage in the ring's order
    const int stage = int(seq % S);
    const uint32_t phase = uint32_t(seq / S) & 1u;
    if (!half_tile)
      consume_pingpong<Cfg, false>(acc, smem_a, smem_b, full, empty, p.k_blocks, lane, stage, phase);
    else
      consume_pingpong<Cfg, true>(acc, smem_a, smem_b, full, empty, p.k_blocks, lane, stage, phase);

    er_top.c_row = p.c + int64_t(row) * p.n;
    er_bottom.c_row = p.c + int64_t(row + BM / 2) * p.n;
    if constexpr (kEpi == kEpiStore) {
      epilogue_store<BN>(top, p, tc, er_top);
      if (!half_tile) epilogue_store<BN>(bottom, p, tc, er_bottom);
    } else {
      float* tile_bias = s_bias + tile_parity * BN;  // last read two tiles ago, as in the kernel
      tile_parity ^= 1;
#pragma unroll
      for (int u = 0; u < BN / 128; ++u) tile_bias[wg_tid + 128 * u] = bias_pre[u];
      warpgroup_bar_sync(1 + wg, 128);
      epilogue_act<BN, kEpi, kAct, Cfg::kHalvesRun>(top, p, tc, er_top, tile_bias, lane);
      if (!half_tile)
        epilogue_act<BN, kEpi, kAct, Cfg::kHalvesRun>(bottom, p, tc, er_bottom, tile_bias, lane);
    }
  }
}

// ---- Producers ---------------------------------------------------------------------------------
struct TileTables {
  const int* prefix;
  const int* start;
  const int* end;
  int groups;
  int total_tiles;
  TileQueue* queue;
};

// First row of b (viewed as [groups * n1, k]) of tile tc: the B tile is rows [b_row, b_row +
// kBRows), or for halves the runs of halves_b_row.
template <int kEpi>
__device__ __forceinline__ int tile_b_row(const Sm90Params& p, const TileCoord& tc) {
  return tc.group * p.n1 + (kEpi == kEpiActInterleaved ? 2 * tc.n0 : tc.n0);
}

// Halves layout: the B tile holds kHalvesPairs pairs of runs of kRun = kHalvesRun rows, the gate
// rows of kRun output columns, then their up rows (I further on in b): tile row R is row
// halves_b_row(R) of b. Two pairs in the prefill kernel, so that a half tile's warpgroup
// finds its gate and up columns next to each other (one m64n(BN/2) product: "Half tiles").
template <class Cfg>
__device__ __forceinline__ int halves_b_row(const Sm90Params& p, int b_row, int tile_row) {
  constexpr int kRun = Cfg::kHalvesRun;
  const int run = tile_row / kRun;
  return b_row + (run & 1) * p.ffn + (run >> 1) * kRun + tile_row % kRun;
}

// The TMA copies of a stage's B tile at k coordinate `k_coord` (in the map's element units): one
// box, or for halves one box per run.
// ctas: 0 copies into this CTA only, else multicast into the CTAs of that mask (CTA pairs).
template <class Cfg, int kEpi>
__device__ __forceinline__ void tma_load_b(const Sm90Params& p, const CUtensorMap* tm_b,
                                           uint8_t* b_dst, uint64_t* bar, int k_coord, int b_row,
                                           uint16_t ctas = 0) {
  auto copy = [&](uint8_t* dst, int row) {
    if (ctas == 0) ptx::tma_load_2d(dst, tm_b, bar, k_coord, row);
    else ptx::tma_load_2d_multicast(dst, tm_b, bar, k_coord, row, ctas);
  };
  if constexpr (kEpi == kEpiActHalves) {
    constexpr int kRuns = 2 * Cfg::kHalvesPairs, kRun = Cfg::kHalvesRun;
#pragma unroll
    for (int j = 0; j < kRuns; ++j)
      copy(b_dst + j * (Cfg::kBBytes / kRuns), halves_b_row<Cfg>(p, b_row, j * kRun));
  } else {
    copy(b_dst, b_row);
  }
}

// bf16: one thread issues the TMA copies of each k-block.
template <class Cfg, int kEpi>
__device__ __forceinline__ void produce_tma(const Sm90Params& p, const TileTables& tt,
                                            const CUtensorMap* tm_a, const CUtensorMap* tm_b,
                                            uint8_t* smem_a, uint8_t* smem_b, uint64_t* full,
                                            uint64_t* empty, PairMail* mail) {
  constexpr int BK = Cfg::kBlockK, S = Cfg::kStages;
  constexpr int kTileCols = epilogue_gated(kEpi) ? Cfg::kBlockN / 2 : Cfg::kBlockN;
  int stage = 0;
  uint32_t phase = 0;
  const uint32_t rank = Cfg::kPairs ? ptx::cluster_ctarank() : 0;
  auto decode = [&](int t) {
    return decode_tile<Cfg, kTileCols>(t, tt.prefix, tt.start, tt.end, tt.groups, p.n_tiles);
  };
  for (int i = 0;; ++i) {
    int t;
    uint16_t b_ctas = 0;  // CTA pairs: the B tile multicast to both (by the leader), or not
    bool b_copy = true;   // whether this CTA issues the B copy
    if constexpr (Cfg::kPairs) {
      const int t0 = mail->draw(p.tile_counter, i, rank);
      t = t0 + int(rank);
      // The second CTA of a pair with one tile left: the stand-in entry (total + 1 + t0).
      const bool stand_in = t0 < tt.total_tiles && t >= tt.total_tiles;
      tt.queue->put(i, stand_in ? tt.total_tiles + 1 + t0 : min(t, tt.total_tiles));
      if (t0 >= tt.total_tiles) break;
      if (stand_in) t = t0;
      if (t0 + 1 < tt.total_tiles &&
          tile_b_row<kEpi>(p, decode(t0)) == tile_b_row<kEpi>(p, decode(t0 + 1))) {
        b_ctas = 3;
        b_copy = rank == 0;
      }
    } else {
      t = TileQueue::draw(p.tile_counter, i);
      if constexpr (Cfg::kPingPong) wait_previous_fill<S>(full, int64_t(i) * p.k_blocks);
      tt.queue->put(i, min(t, tt.total_tiles));
      if (t >= tt.total_tiles) {
        // Ping-pong: the entries alternate between the warpgroups, so each needs its own end.
        if constexpr (Cfg::kPingPong) tt.queue->put(i + 1, tt.total_tiles);
        break;
      }
    }
    const TileCoord tc = decode(t);
    const int b_row = tile_b_row<kEpi>(p, tc);
    for (int kb = 0; kb < p.k_blocks; ++kb) {
      // In a pair, `empty` counts both CTAs' consumers: the leader's multicast writes into the
      // other CTA's stage only once that CTA has released it too.
      ptx::mbar_wait(&empty[stage], phase ^ 1);
      ptx::mbar_arrive_expect_tx(&full[stage], Cfg::kTmaBytes);
      ptx::tma_load_2d(smem_a + stage * Cfg::kABytes, tm_a, &full[stage], kb * BK, tc.m0);
      if (b_copy)
        tma_load_b<Cfg, kEpi>(p, tm_b, smem_b + stage * Cfg::kBBytes, &full[stage], kb * BK,
                              b_row, b_ctas);
      ptx::next_stage<S>(stage, phase);
    }
  }
}

// ---- e4m3 + e8m0 -> bf16, exact (both dequantizing designs) ----------------------------------
// The 7 magnitude bits of an e4m3 byte shifted left by 4 are the bf16 bits of value * 2^-120
// (exponent bias 7 vs 127; e4m3 subnormals land on bf16 subnormals, zero on zero), the sign moves
// to bit 15: 3-4 integer ops per 2 elements, no table. One bf16x2 multiply by 2^(s + 120) then
// gives value * 2^s, exact whenever the result is a bf16 normal; 2^(s + 120) exceeds bf16 for
// s > 7, so such blocks (|x| >= 2^15, rare) take a second, exact multiply by 2^(s - 7). Results
// below bf16's normal range (s < about -118) round to bf16 subnormals. A NaN scale (0xFF) gives
// NaN; an e4m3 NaN code under a finite scale does not (the quantizer never writes one: NaN blocks
// carry scale 0xFF).
struct MxMultipliers {
  uint32_t m1x2, m2x2;  // bf16x2 of 2^min(s + 120, 127) and 2^max(s - 7, 0), s = scale byte - 127
};
__device__ __forceinline__ MxMultipliers mx_multipliers(uint32_t sb) {
  const uint32_t m1 = sb == 0xFFu ? 0x7FC0u : min(sb + 120u, 254u) << 7;
  const uint32_t m2 = (max(int(sb) - 134, 0) + 127) << 7;
  return MxMultipliers{m1 * 0x10001u, m2 * 0x10001u};
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t x, uint32_t y) {
  uint32_t r;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(x), "r"(y));
  return r;
}

// m1x2 of the largest first multiplier, 2^127: the blocks that may need the second multiply
// (s >= 7; for s = 7 that multiply is by 1).
constexpr uint32_t kMxMaxFirstMultiplier = 0x7F007F00u;

// The 4 e4m3 bytes (k0, k1, k2, k3) of w times m1x2 = 2^min(s + 120, 127) (mx_multipliers):
// *even = bf16x2 (k0, k2), *odd = (k1, k3), low half first. Blocks with a second multiplier
// still need it (the caller does it once for all its words). The even pair's bytes go to the
// low byte of each half with their sign replicated over the high byte (one byte permute), so
// that one shift puts the sign at bit 15 and the magnitude at bits 10..4; the odd pair's bytes
// already sit in the high bytes, with the sign at bit 15.
__device__ __forceinline__ void e4m3x4_to_bf16x2(uint32_t w, uint32_t m1x2, uint32_t* even,
                                                 uint32_t* odd) {
  const uint32_t e = (ptx::prmt<0xA280u>(w, 0u) << 4) & 0x87F087F0u;
  const uint32_t o = ((w >> 4) & 0x07F007F0u) | (w & 0x80008000u);
  *even = bf16x2_mul(e, m1x2);
  *odd = bf16x2_mul(o, m1x2);
}

// ---- MXFP8 operands: dequantized by the producer warpgroup -----------------------------------
// Hopper has no block-scaled MMA, so the 128 producer threads turn each k-block of e4m3 + e8m0
// into exactly the bf16 tile a TMA copy of bf16 operands would have staged (same 128-byte swizzle),
// and the consumers, the scheduler and the epilogues are those of the bf16 kernel.
// - Work split: thread t owns the 16-byte e4m3 chunk t % 4 (k 16c..16c+15 of the k-block: half
//   of one MX block, so one scale byte) of rows t / 4 + 32 i of A (i < 4) and of B (i < BN / 32).
//   A warp's load instruction reads 8 whole 64-byte row slices (full sectors); each chunk becomes
//   two 16-byte bf16 chunks, stored at the swizzled positions (chunk ^ (row % 8)).
// - Latency: plain 16-byte loads (read-only path) into registers, two k-blocks in flight: while
//   block kb is converted and stored, the loads of kb + 1 are outstanding (no shared-memory
//   staging ring: it would add a write and a read of every byte to the shared-memory traffic,
//   which wgmma already nearly saturates).
// - Conversion, exact: e4m3x4_to_bf16x2 above.
// - Element order: to pair bytes with shifts instead of byte permutes, each group of 4 k is
//   stored as k0, k2, k1, k3. A and B use the same order, so every product pairs the same k and
//   only the f32 summation order inside the tensor core changes.
// - Rows past the tensors and k past the end read as zeros (scale 2^0), like TMA's fill.
template <class Cfg, int kEpi>
struct MxProducer {
  static constexpr int kA = Cfg::kBlockM / 32;  // chunks of A per thread and k-block
  static constexpr int kB = Cfg::kBlockN / 32;
  static constexpr int kChunks = kA + kB;
  struct Block {  // one k-block's bytes of this thread
    uint4 v[kChunks];
    uint32_t s[kChunks];
  };

  const Sm90Params& p;
  int c;  // chunk within the 64-byte row slice
  int r;  // first row (of 32) this thread serves in each operand
  // Per tile: the thread's first row of A, of b (gate rows for halves) and of the up rows. The
  // chunks' rows are 32 i further; their offsets are recomputed from these at each load (32-bit
  // steps) rather than kept per chunk: 12 64-bit pointer pairs would not fit next to two blocks.
  int a_row0, b_row0, b_row_up;

  __device__ __forceinline__ void tile(const TileCoord& tc) {
    a_row0 = tc.m0 + r;
    b_row0 = tile_b_row<kEpi>(p, tc) + r;
    b_row_up = b_row0 + p.ffn;
  }

  // The chunk at `col` of rows row0 + 32 i, i < kN, of one operand into v[0..kN), s[0..kN).
  template <int kN>
  __device__ __forceinline__ void load_rows(const uint8_t* data, const uint8_t* scale, int row0,
                                            int limit, int col, int scol, uint4* v,
                                            uint32_t* s) const {
    const bool col_ok = col < p.k;
    const uint8_t* d0 = data + int64_t(row0) * p.k + col;
    const uint8_t* s0 = scale + int64_t(row0) * p.k_scales + scol;
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const bool ok = col_ok && row0 + 32 * i < limit;
      v[i] = ok ? __ldg(reinterpret_cast<const uint4*>(d0 + uint32_t(32 * i) * uint32_t(p.k)))
                : make_uint4(0, 0, 0, 0);
      s[i] = ok ? __ldg(s0 + uint32_t(32 * i) * uint32_t(p.k_scales)) : 127u;
    }
  }

  __device__ __forceinline__ void load(Block& blk, int kb) const {
    const int col = kb * Cfg::kBlockK + c * 16;
    const int scol = kb * (Cfg::kBlockK / 32) + (c >> 1);
    load_rows<kA>(p.a8, p.a_scale, a_row0, p.rows, col, scol, blk.v, blk.s);
    if constexpr (kEpi == kEpiActHalves) {
      // Chunk i is tile row r + 32 i, in run j = i / (kB / kRuns): gate or up rows (j odd) of
      // the run pair's columns (halves_b_row).
      constexpr int kRuns = 2 * Cfg::kHalvesPairs, kRun = Cfg::kHalvesRun;
      constexpr int kRunChunks = kB / kRuns;
      static_assert(kRunChunks * kRuns == kB, "a run is whole 32-row chunk sets");
#pragma unroll
      for (int j = 0; j < kRuns; ++j)
        load_rows<kRunChunks>(p.b8, p.b_scale, (j & 1 ? b_row_up : b_row0) + (j >> 1) * kRun,
                              p.b_rows, col, scol, blk.v + kA + j * kRunChunks,
                              blk.s + kA + j * kRunChunks);
    } else {
      load_rows<kB>(p.b8, p.b_scale, b_row0, p.b_rows, col, scol, blk.v + kA, blk.s + kA);
    }
  }

  // 16 e4m3 bytes with scale byte sb -> bf16 chunks 2c, 2c + 1 of `row` of a swizzled tile.
  __device__ __forceinline__ void convert(const uint4& v, uint32_t sb, uint8_t* tile,
                                          int row) const {
    const MxMultipliers m = mx_multipliers(sb);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    uint32_t o[8];  // (k0, k2), (k1, k3) of each word: the order this kernel stores
#pragma unroll
    for (int j = 0; j < 4; ++j) e4m3x4_to_bf16x2(w[j], m.m1x2, &o[2 * j], &o[2 * j + 1]);
    if (sb > 134u && sb != 0xFFu) {  // s > 7: a second multiply (mx_multipliers)
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = bf16x2_mul(o[j], m.m2x2);
    }
    uint8_t* row_ptr = tile + row * 128;
    const int swz = row & 7;
    *reinterpret_cast<uint4*>(row_ptr + (((2 * c) ^ swz) << 4)) =
        make_uint4(o[0], o[1], o[2], o[3]);
    *reinterpret_cast<uint4*>(row_ptr + (((2 * c + 1) ^ swz) << 4)) =
        make_uint4(o[4], o[5], o[6], o[7]);
  }

  // Waits for the stage, writes the block's bf16 tiles, publishes them to the tensor cores.
  __device__ __forceinline__ void put(const Block& blk, uint8_t* smem_a, uint8_t* smem_b,
                                      uint64_t* full, uint64_t* empty, int& stage,
                                      uint32_t& phase) const {
    ptx::mbar_wait(&empty[stage], phase ^ 1);
    uint8_t* a_dst = smem_a + stage * Cfg::kABytes;
    uint8_t* b_dst = smem_b + stage * Cfg::kBBytes;
#pragma unroll
    for (int i = 0; i < kA; ++i) convert(blk.v[i], blk.s[i], a_dst, r + 32 * i);
#pragma unroll
    for (int i = 0; i < kB; ++i) convert(blk.v[kA + i], blk.s[kA + i], b_dst, r + 32 * i);
    // Generic-proxy stores -> visible to wgmma (async proxy), then this thread's arrival.
    ptx::fence_proxy_async_smem();
    ptx::mbar_arrive(&full[stage]);
    ptx::next_stage<Cfg::kStages>(stage, phase);
  }
};

template <class Cfg, int kEpi>
__device__ __forceinline__ void produce_mx(const Sm90Params& p, const TileTables& tt,
                                           uint8_t* smem_a, uint8_t* smem_b, uint64_t* full,
                                           uint64_t* empty, int tid) {
  constexpr int kTileCols = epilogue_gated(kEpi) ? Cfg::kBlockN / 2 : Cfg::kBlockN;
  using Producer = MxProducer<Cfg, kEpi>;
  Producer pr{p, tid & 3, tid >> 2, 0, 0, 0};
  int stage = 0;
  uint32_t phase = 0;
  typename Producer::Block x, y;
  // Static tiles only (its launches get no counter); thread 0 publishes them to the consumers.
  for (int i = 0;; ++i) {
    const int t = TileQueue::draw(nullptr, i);
    if (tid == 0) tt.queue->put(i, min(t, tt.total_tiles));
    if (t >= tt.total_tiles) break;
    pr.tile(decode_tile<Cfg, kTileCols>(t, tt.prefix, tt.start, tt.end, tt.groups, p.n_tiles));
    // Two k-blocks in flight: x holds the even ones, y the odd ones.
    pr.load(x, 0);
    for (int kb = 0; kb < p.k_blocks; kb += 2) {
      const bool odd = kb + 1 < p.k_blocks;
      if (odd) pr.load(y, kb + 1);
      pr.put(x, smem_a, smem_b, full, empty, stage, phase);
      if (odd) {
        if (kb + 2 < p.k_blocks) pr.load(x, kb + 2);
        pr.put(y, smem_a, smem_b, full, empty, stage, phase);
      }
    }
  }
}

// ---- MXFP8 operands: fp8 wgmma, promoted per scale block -----------------------------------------
// The e4m3 bytes go to the tensor cores as they are: TMA stages A (128 x 128 bytes) and B (128 x
// 128 bytes, two boxes for halves) of a 128-wide k-block, and each consumer issues two
// wgmma.m64n64k32 (e4m3 x e4m3, f32, scale-d = 0) per k32 step, i.e. exactly one MX block of both
// operands, then promotes: acc[r][c] += tmp[r][c] * scale_b[c] * scale_a[r], in f32
// (consume_fp8).
// - Scales: the 128 producer threads each own one A row and one B row of the tile. A thread
//   copies its rows' scale words (mx_scale_words.cuh) with cp.async S k-blocks ahead, over tile
//   boundaries; per k-block it waits for that k-block's words, turns the 4 bytes of each row into
//   f32 (numerics.h e8m0_to_f32: 0xFF is NaN, 0 the f32 subnormal 2^-127) and stores them A as
//   [row][4], B as [4][col], so that a consumer thread reads its two rows' scales as float4s and
//   its columns' pairs as float2s. k32 blocks past k and rows past a tensor get scale 0 (their
//   bytes are TMA zeros: 0 x 0 adds nothing). v1 loaded the bytes with plain loads right before
//   the stage: one global latency per k-block held the kernel to ~250 TFLOP/s, the same ceiling
//   as the dequantizing producer (two k-blocks per latency of half the k).
// - The stage's `full` barrier counts the 128 producer threads: thread 0's arrival carries the
//   TMA byte count; every thread arrives after its scale stores (mbarrier arrive has release
//   semantics, the consumers' wait acquire: plain stores need no proxy fence here).
// - Cost: two f32 operations per accumulator per k32 (FMUL + FFMA) on the consumers' FMA pipes:
//   for a 128 x 128 tile 256 cycles of FMA issue per k32 against 128 of fp8 tensor work, i.e. at
//   best the bf16 kernel's rate. Measured 296-346 TFLOP/s on an H200 (bf16: 617-795), the same
//   with one temporary (v1) and with the pipelined halves (v2): ncu shows FMUL + FFMA at half of
//   the executed instructions, issue slots 56% busy, and a fifth of the stall samples in barrier
//   waits (bench/NOTES.md v5).
template <class Cfg, int kEpi>
__device__ __forceinline__ void produce_fp8(const Sm90Params& p, const TileTables& tt,
                                            const CUtensorMap* tm_a, const CUtensorMap* tm_b,
                                            uint8_t* smem_a, uint8_t* smem_b, float* smem_scale,
                                            uint32_t* smem_raw_scale, uint64_t* full,
                                            uint64_t* empty, int tid) {
  constexpr int BK = Cfg::kBlockK, S = Cfg::kStages, BM = Cfg::kBlockM, BN = Cfg::kBlockN;
  constexpr int kTileCols = epilogue_gated(kEpi) ? BN / 2 : BN;
  const int64_t a_end = int64_t(p.rows) * p.k_scales, b_end = int64_t(p.b_rows) * p.k_scales;
  // This thread's scale rows of tile t: A row m0 + tid, B tile row tid (halves: gate, then up).
  auto scale_rows = [&](int t, int64_t* a_row, int64_t* b_row) {
    const TileCoord tc =
        decode_tile<Cfg, kTileCols>(t, tt.prefix, tt.start, tt.end, tt.groups, p.n_tiles);
    const int b0 = tile_b_row<kEpi>(p, tc);
    const int a = tc.m0 + tid;
    const int b = kEpi == kEpiActHalves ? halves_b_row<Cfg>(p, b0, tid) : b0 + tid;
    *a_row = a < p.rows ? a : -1;
    *b_row = b < p.b_rows ? b : -1;
  };
  // The scale words run S k-blocks ahead of the stages, over tile boundaries, one cp.async group
  // per k-block (empty past the last): the ring of raw words is the stage ring itself.
  int copy_tile = blockIdx.x, copy_kb = 0;
  int64_t copy_a = -1, copy_b = -1;
  if (copy_tile < tt.total_tiles) scale_rows(copy_tile, &copy_a, &copy_b);
  auto copy_next = [&](int slot) {
    if (copy_tile < tt.total_tiles) {
      uint32_t* raw = smem_raw_scale + slot * Cfg::kRawWords + 2 * tid;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        copy_scale_words(raw, p.a_scale, copy_a, p.k_scales, copy_kb, a_end, h);
        copy_scale_words(raw + 2 * BM, p.b_scale, copy_b, p.k_scales, copy_kb, b_end, h);
      }
      if (++copy_kb == p.k_blocks) {
        copy_kb = 0;
        copy_tile += gridDim.x;
        if (copy_tile < tt.total_tiles) scale_rows(copy_tile, &copy_a, &copy_b);
      }
    }
    ptx::cp_async_commit();
  };
  for (int s = 0; s < S; ++s) copy_next(s);

  int stage = 0;
  uint32_t phase = 0;
  // Static tiles only (the scale words above run ahead along that sequence); thread 0 publishes
  // them to the consumers.
  for (int i = 0;; ++i) {
    const int t = TileQueue::draw(nullptr, i);
    if (tid == 0) tt.queue->put(i, min(t, tt.total_tiles));
    if (t >= tt.total_tiles) break;
    const TileCoord tc =
        decode_tile<Cfg, kTileCols>(t, tt.prefix, tt.start, tt.end, tt.groups, p.n_tiles);
    const int b_row = tile_b_row<kEpi>(p, tc);
    int64_t a_row, b_tile_row;
    scale_rows(t, &a_row, &b_tile_row);
    const int skew_a = a_row >= 0 ? scale_skew(a_row, p.k_scales) : 0;
    const int skew_b = b_tile_row >= 0 ? scale_skew(b_tile_row, p.k_scales) : 0;
    for (int kb = 0; kb < p.k_blocks; ++kb) {
      ptx::cp_async_wait<S - 1>();  // this k-block's words (issued S groups ago) have landed
      const uint32_t* raw = smem_raw_scale + stage * Cfg::kRawWords + 2 * tid;
      const uint32_t wa[2] = {raw[0], raw[1]}, wb[2] = {raw[2 * BM], raw[2 * BM + 1]};
      float fa[4], fb[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const bool in_k = kb * 4 + j < p.k_scales;
        fa[j] = a_row >= 0 && in_k ? e8m0_to_f32(scale_byte(wa, skew_a, j)) : 0.f;
        fb[j] = b_tile_row >= 0 && in_k ? e8m0_to_f32(scale_byte(wb, skew_b, j)) : 0.f;
      }
      copy_next(stage);  // the words are in registers: the slot takes k-block + S
      ptx::mbar_wait(&empty[stage], phase ^ 1);
      float* sc = smem_scale + stage * Cfg::kScaleFloats;
      *reinterpret_cast<float4*>(sc + 4 * tid) = make_float4(fa[0], fa[1], fa[2], fa[3]);
#pragma unroll
      for (int j = 0; j < 4; ++j) sc[4 * BM + j * BN + tid] = fb[j];
      if (tid == 0) {
        ptx::mbar_arrive_expect_tx(&full[stage], Cfg::kTmaBytes);
        // Coordinates in bf16 units: the e4m3 tensors are mapped as pairs of bytes.
        ptx::tma_load_2d(smem_a + stage * Cfg::kABytes, tm_a, &full[stage], kb * (BK / 2), tc.m0);
        tma_load_b<Cfg, kEpi>(p, tm_b, smem_b + stage * Cfg::kBBytes, &full[stage], kb * (BK / 2),
                              b_row);
      } else {
        ptx::mbar_arrive(&full[stage]);
      }
      ptx::next_stage<S>(stage, phase);
    }
  }
  ptx::cp_async_wait<0>();  // nothing may be in flight into shared memory at exit
}

// One half-width k32 step of the fp8 consumer promoted: acc[r][c] += t[r][c] * (scale_b[c] *
// scale_a[r]) over the tile columns 64 * kHalf + 8i + 2q + {0, 1} (accumulator block 8 kHalf + i)
// of rows r0 and r0 + 8, with the scales of k32 block j of the stage whose scales start at sc.
template <class Cfg, int kHalf>
__device__ __forceinline__ void promote_fp8_half(float (&acc)[Cfg::kBlockN / 2],
                                                 const float (&t)[32], const float* sc, int j,
                                                 int r0, int q) {
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN;
  const float sa0 = sc[4 * r0 + j], sa1 = sc[4 * (r0 + 8) + j];
  const float* sb = sc + 4 * BM + j * BN + 64 * kHalf + 2 * q;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float2 b = *reinterpret_cast<const float2*>(sb + 8 * i);
    float* a = acc + 4 * (8 * kHalf + i);
    // The scales' product first: t (up to 2^22.6) times one extreme scale alone can overflow
    // where the dequantized products are finite.
    a[0] = fmaf(t[4 * i + 0], b.x * sa0, a[0]);
    a[1] = fmaf(t[4 * i + 1], b.y * sa0, a[1]);
    a[2] = fmaf(t[4 * i + 2], b.x * sa1, a[2]);
    a[3] = fmaf(t[4 * i + 3], b.y * sa1, a[3]);
  }
}

// Issues the wgmma of one half-width k32 step into t (the products alone: scale-d = 0).
__device__ __forceinline__ void issue_fp8_half(float (&t)[32], uint32_t a_addr, uint32_t b_addr) {
#pragma unroll
  for (int i = 0; i < 32; ++i) ptx::wgmma_fence_operand(t[i]);
  ptx::wgmma_fence();
  ptx::wgmma_m64n64k32_e4m3(t, ptx::wgmma_desc_sw128(a_addr), ptx::wgmma_desc_sw128(b_addr), 0);
  ptx::wgmma_commit();
}

// Waits until at most kPending wgmma groups are in flight and orders t's reads after it.
template <int kPending>
__device__ __forceinline__ void wait_fp8_half(float (&t)[32]) {
  ptx::wgmma_wait<kPending>();
#pragma unroll
  for (int i = 0; i < 32; ++i) ptx::wgmma_fence_operand(t[i]);
}

// The fp8 consumer mainloop of one tile: acc = sum over k32 blocks of (A x B block) * scales.
// Software-pipelined over half-width steps (64 columns x k32): the wgmma of a step runs while the
// step before it is promoted, two 32-register temporaries in turn (t0: columns 0-63, t1: 64-127).
// The pipeline drains at the end of each stage (wait<0>, the last half promoted alone): a wgmma
// left in flight across the k-block loop's back edge makes ptxas serialise every wgmma of the
// kernel (C7514). v1 ran one m64n128k32 per k32 into a single temporary and waited for it before
// promoting, so its warpgroup's tensor work stopped through every promotion.
template <class Cfg>
__device__ __forceinline__ void consume_fp8(float (&acc)[Cfg::kBlockN / 2], const Sm90Params& p,
                                            const uint8_t* smem_a, const uint8_t* smem_b,
                                            const float* smem_scale, uint64_t* full,
                                            uint64_t* empty, int half, int warp, int lane,
                                            int& stage, uint32_t& phase) {
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, S = Cfg::kStages;
  static_assert(BN == 128, "two half-width steps of 64 columns");
  constexpr uint32_t kHalfB = 64 * 128;  // bytes of 64 B rows: the second half's first row
  const int q = lane & 3;
  const int r0 = half * (BM / 2) + warp * 16 + (lane >> 2);  // tile rows r0, r0 + 8
  float t0[32], t1[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) t0[i] = t1[i] = 0.f;  // defined before the first wgmma reads them
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
  for (int kb = 0; kb < p.k_blocks; ++kb) {
    ptx::mbar_wait(&full[stage], phase);
    const uint32_t a_addr = ptx::smem_addr(smem_a + stage * Cfg::kABytes) + half * (BM / 2) * 128;
    const uint32_t b_addr = ptx::smem_addr(smem_b + stage * Cfg::kBBytes);
    const float* sc = smem_scale + stage * Cfg::kScaleFloats;
    // k32 step j = 32 bytes along the swizzled 128-byte rows; half-steps (j, 0), (j, 1) in order.
    issue_fp8_half(t0, a_addr, b_addr);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      issue_fp8_half(t1, a_addr + j * 32, b_addr + kHalfB + j * 32);
      wait_fp8_half<1>(t0);
      promote_fp8_half<Cfg, 0>(acc, t0, sc, j, r0, q);
      if (j < 3) {
        issue_fp8_half(t0, a_addr + (j + 1) * 32, b_addr + (j + 1) * 32);
        wait_fp8_half<1>(t1);
        promote_fp8_half<Cfg, 1>(acc, t1, sc, j, r0, q);
      }
    }
    wait_fp8_half<0>(t1);
    promote_fp8_half<Cfg, 1>(acc, t1, sc, 3, r0, q);
    // Every wgmma of the stage is complete and its scales are read: release it.
    __syncwarp();
    if (lane == 0) ptx::mbar_arrive(&empty[stage]);
    ptx::next_stage<S>(stage, phase);
  }
}

// kAct: the fmoe_activation of the fused epilogues (a template parameter, not a run-time switch:
// one kernel holding all three gated epilogues spilled a register on the wide tile).
template <class Cfg, int kEpi, int kAct>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    grouped_mm_sm90_kernel(const __grid_constant__ CUtensorMap tm_a,
                           const __grid_constant__ CUtensorMap tm_b, const Sm90Params p) {
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, S = Cfg::kStages;
  constexpr int kTileCols = epilogue_gated(kEpi) ? BN / 2 : BN;
  constexpr int kHalvesRun = Cfg::kHalvesRun;  // halves: gate / up column runs
  extern __shared__ uint8_t smem_raw[];
  // TMA with 128-byte swizzle and the wgmma descriptors (base offset 0) need 1024-byte aligned
  // stage buffers; dynamic shared memory only promises 16.
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* smem_a = smem;
  uint8_t* smem_b = smem + S * Cfg::kABytes;
  float* smem_scale = reinterpret_cast<float*>(smem_b + S * Cfg::kBBytes);  // kOpMxFp8 only
  uint32_t* smem_raw_scale = reinterpret_cast<uint32_t*>(smem_scale + S * Cfg::kScaleFloats);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + S * Cfg::kStageBytes);
  uint64_t* empty = full + S;
  TileQueue* queue = reinterpret_cast<TileQueue*>(empty + S);
  PairMail* mail = reinterpret_cast<PairMail*>(reinterpret_cast<uint8_t*>(queue) + kTileQueueBytes);
  int* s_prefix = reinterpret_cast<int*>(reinterpret_cast<uint8_t*>(mail) +
                                         (Cfg::kPairs ? kPairMailBytes : 0));
  int* s_start = s_prefix + Cfg::kMaxGroups + 1;      // [groups]
  int* s_end = s_start + Cfg::kMaxGroups;             // [groups]

  const int tid = threadIdx.x;
  const int groups = p.groups;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      // bf16: the producer's arrive_expect_tx; MXFP8: every producer thread after its stores.
      ptx::mbar_init(&full[s], Cfg::kMx || Cfg::kFp8 ? 128 : 1);
      ptx::mbar_init(&empty[s], Cfg::kStageReleases);  // one arrival per consumer warp (of both)
    }
    queue->init(Cfg::kStageReaders);  // read by the consumer warps
    if constexpr (Cfg::kPairs) mail->init();
    ptx::mbar_fence_init();
  }
  // A pair's barriers exist in both CTAs before either CTA arrives on the other's.
  if constexpr (Cfg::kPairs) ptx::cluster_sync();
  if (!Cfg::kMx && tid == 32) {  // bf16 and fp8 operands come by TMA
    ptx::tma_prefetch_map(&tm_a);
    ptx::tma_prefetch_map(&tm_b);
  }
  build_group_tiles(p.offsets, groups, p.rows, BM, s_start, s_end, s_prefix);
  const int total_tiles = s_prefix[groups] * p.n_tiles;

  if (tid < 128) {
    // ---- producer warpgroup ----
    set_warpgroup_regs<Cfg::kProducerRegs>();
    const TileTables tables{s_prefix, s_start, s_end, groups, total_tiles, queue};
    if constexpr (Cfg::kMx) {
      produce_mx<Cfg, kEpi>(p, tables, smem_a, smem_b, full, empty, tid);
    } else if constexpr (Cfg::kFp8) {
      produce_fp8<Cfg, kEpi>(p, tables, &tm_a, &tm_b, smem_a, smem_b, smem_scale, smem_raw_scale,
                             full, empty, tid);
    } else if (tid == 0) {
      produce_tma<Cfg, kEpi>(p, tables, &tm_a, &tm_b, smem_a, smem_b, full, empty, mail);
    }
  } else {
    // ---- consumer warpgroups ----
    set_warpgroup_regs<Cfg::kConsumerRegs>();
    if constexpr (Cfg::kPingPong) {
      const int wg = tid / 128 - 1;
      consume_tiles_pingpong<Cfg, kEpi, kAct>(
          p, queue, s_prefix, s_start, s_end, total_tiles, smem_a, smem_b, full, empty,
          reinterpret_cast<float*>(smem + Cfg::kBiasOffset) + wg * 2 * BN, wg, tid & 127);
      return;
    }
    const int half = tid / 128 - 1;  // which 64-row half of the tile
    const int warp = (tid / 32) & 3;
    const int lane = tid & 31;
    int stage = 0;
    uint32_t phase = 0;
    float acc[BN / 2];
    // Fused epilogues: this warpgroup's two tile-bias buffers and its thread index in them.
    float* s_bias = reinterpret_cast<float*>(smem + Cfg::kBiasOffset) + half * 2 * BN;
    const int wg_tid = tid & 127;
    int tile_parity = 0;
    for (int i = 0;; ++i) {
      int t = queue->take(i);
      // CTA pairs: a stand-in (total + 1 + tile) is computed like its tile and not stored.
      const bool stand_in = Cfg::kPairs && t > total_tiles;
      if (stand_in) t -= total_tiles + 1;
      if (t >= total_tiles) break;
      const TileCoord tc =
          decode_tile<Cfg, kTileCols>(t, s_prefix, s_start, s_end, groups, p.n_tiles);
      // A half tile (at most 64 rows left in the group; p.half_tiles, "Half tiles"): both
      // warpgroups take the same 64 A rows, each against half of the B tile. bf16 operands only
      // (the dequantizing MXFP8 kernel, kept for comparisons, would spill at its 168 registers).
      constexpr bool kHalfTiles = Cfg::kOperands == kOpBf16;
      const bool half_tile = kHalfTiles && is_half_tile<Cfg>(p, tc, s_start);
      // What this warpgroup computes of a half tile: BN / 2 accumulator columns, its output
      // columns starting half * kTileCols / 2 into the tile's.
      TileCoord sub = tc;
      sub.n0 += half * (kTileCols / 2);
      // The tile's bias, loaded now so that the latency hides under the mainloop, and staged in
      // shared memory for the epilogue.
      float bias_pre[BN / 128];
      if constexpr (kEpi != kEpiStore) {
#pragma unroll
        for (int u = 0; u < BN / 128; ++u) {
          const int c = wg_tid + 128 * u;
          bias_pre[u] = !half_tile ? act_tile_bias<BN, kEpi, kHalvesRun>(p, tc, c)
                        : c < BN / 2 ? act_tile_bias<BN / 2, kEpi, kHalvesRun>(p, sub, c)
                                     : 0.f;
        }
      }
      // The row this lane stores in the epilogue, and whether it is written: the row_map load is
      // issued here so that its latency hides under the mainloop rather than ahead of the stores.
      EpilogueRow er;
      er.q = lane & 3;
      const int r0 = tc.m0 + (half_tile ? 0 : half * (BM / 2)) + warp * 16 + (lane >> 2);
      const int row = r0 + 8 * (er.q >> 1);  // the row of the segment this lane stores
      er.row_ok = !stand_in && tile_row_stored(p, tc, row);
      if constexpr (Cfg::kFp8) {
        consume_fp8<Cfg>(acc, p, smem_a, smem_b, smem_scale, full, empty, half, warp, lane, stage,
                         phase);
      } else if (!half_tile) {
        consume_bf16<Cfg, kEpi, false>(acc, smem_a, smem_b, full, empty, p.k_blocks, half, lane,
                                       stage, phase);
      } else if constexpr (kHalfTiles) {
        consume_bf16<Cfg, kEpi, true>(acc, smem_a, smem_b, full, empty, p.k_blocks, half, lane,
                                      stage, phase);
      }

      // ---- epilogue ----
      er.c_row = p.c + int64_t(row) * p.n;
      float(&acc_half)[BN / 4] = *reinterpret_cast<float(*)[BN / 4]>(&acc[0]);
      if constexpr (kEpi == kEpiStore) {
        if (!half_tile) epilogue_store<BN>(acc, p, tc, er);
        else epilogue_store<BN / 2>(acc_half, p, sub, er);
      } else {
        // Buffer reuse: the buffer written here was last read two tiles ago, before every thread
        // of the warpgroup passed the previous tile's barrier.
        float* tile_bias = s_bias + tile_parity * BN;
        tile_parity ^= 1;
#pragma unroll
        for (int u = 0; u < BN / 128; ++u) tile_bias[wg_tid + 128 * u] = bias_pre[u];
        warpgroup_bar_sync(1 + half, 128);
        if (!half_tile) epilogue_act<BN, kEpi, kAct, kHalvesRun>(acc, p, tc, er, tile_bias, lane);
        else epilogue_act<BN / 2, kEpi, kAct, kHalvesRun>(acc_half, p, sub, er, tile_bias, lane);
      }
    }
  }
  // No CTA of a pair exits while the other may still arrive on its barriers or copy into it.
  if constexpr (Cfg::kPairs) ptx::cluster_sync();
}

// ---- MXFP8 weights in registers: dequantized into the wgmma A fragment -------------------------
// The third MXFP8 design, for the fused layer's prefill (fused_moe.cu). The weights take the M
// side of wgmma, its "RS" form (A from registers), and the tokens the N side, as bf16 in shared
// memory: activations whose values are already MXFP8 (exact in bf16: quantized, then
// dequantized), so only the weights need converting, once per tile and not once per output.
// - Two tile shapes (kMBlocks): 256 weight rows x 128 tokens (each consumer warpgroup two m64
//   blocks against n128) for groups of few rows, 128 weight rows x 256 tokens (one m64 block
//   against n256) for large groups, where each converted weight serves twice the tokens. Per
//   stage (k64) TMA stages the tokens (bf16, 128-byte swizzle) and the weights (e4m3, dense
//   64-byte rows); each producer thread copies the scale words of its weight rows with
//   cp.async, arriving on the stage's barrier once they land (1 expect_tx + 128 arrivals).
// - Rows of a warpgroup: plain and squared_relu tiles, consecutive weight rows. Gated tiles,
//   kMBlocks = 2: gate (block 0) and up (block 1) of the same 64 features, so every thread
//   holds both inputs of its outputs; kMBlocks = 1: warpgroup 0 the gate rows, 1 the up rows of
//   64 features, and the epilogue trades halves of the accumulators through shared memory so
//   that each warpgroup finishes half of the tokens. Halves tiles copy gate and up rows as two
//   boxes; interleaved tiles one box, gate row 2f and up row 2f + 1.
// - Fragments: a thread owns rows g = lane / 4 and g + 8 of its warp's 16 (per m block) and
//   reads the 16 bytes at k 16c..16c+15 (c = lane % 4) of each per stage: one conflict-free
//   16-byte shared load per row, one scale byte (block c / 2). Word kk of those bytes becomes the
//   fragment of k16 step kk through e4m3x4_to_bf16x2: its even bytes as k 2c, 2c + 1, its odd
//   bytes as k 2c + 8, 2c + 9 of the step. That assignment is a permutation of each 64-block of
//   k, which the activations follow (mx_block.cuh: mx_regs_k_source): written in that order by
//   the permute copy for FC1's input (permute.cu) and by the FC1 epilogue below for FC2.
// - Pipeline: each k16 step is one commit group; its fragments go to one of kFragmentSets
//   register sets, rewritten only after wait_group retired the step that read it. A stage is
//   released once every step that read it is retired.
// - Epilogue: the accumulators are the transpose of c (rows = features, columns = tokens).
//   stmatrix .trans puts 128 tokens x 64 features at a time in a per-warpgroup staging buffer
//   (16-byte chunks swizzled by token % 8), from where each thread stores 16-byte pieces of token
//   rows. FC1 (kRoundTrip) rounds each 32-block of the activation through MXFP8 there and writes
//   it in the k order of FC2: the activation that FC2 reads, with no quantize pass in between.
// - Issue cost per stage and consumer warp (256 x 128 tiles): 355 SASS instructions in v1, 295
//   with the first multipliers from a table (s_multiplier) and the even bytes placed by one byte
//   permute; the blocks that need a second multiply are found per stage by a vote, but ptxas
//   still if-converts their 32 multiplies into predicated ones. ncu (qwen3 FC1, 8192 tokens,
//   H200): tensor pipe 45%, issue slots 42%, 0.62 eligible of 3 warps per scheduler, 6.8 cycles
//   per issued instruction: bound by the latency of each warp's conversion chains, not by issue
//   (bench/NOTES.md v7). The 128 x 256 tile converts half the words per product.
template <int kMBlocks_>
struct Sm90MxRegsConfig {
  // Register sets of A fragments: kFragmentSets - 1 k16 steps stay in flight per warpgroup
  // (4 sets, three steps in flight, measured 1-3% slower: bench/NOTES.md v6).
  static constexpr int kFragmentSets = 2;
  static constexpr int kMBlocks = kMBlocks_;  // m64 blocks of weight rows per warpgroup
  static_assert(kMBlocks == 1 || kMBlocks == 2, "");
  static constexpr int kBlockM = 256 / kMBlocks;        // token rows of a tile (the scheduler's m)
  static constexpr int kWeightRows = 128 * kMBlocks;    // weight rows of a tile
  static constexpr int kAccPerBlock = kBlockM / 2;      // f32 accumulators per m block and thread
  static constexpr int kBlockK = 64;
  static constexpr int kStages = kMBlocks == 2 ? 5 : 4;
  static constexpr int kRasterBand = 8;
  static constexpr int kMaxGroups = 1024;
  static constexpr int kThreads = 384;
  static constexpr int kProducerRegs = 56;
  static constexpr int kConsumerRegs = 224;
  static constexpr int kABytes = kBlockM * kBlockK * 2;  // tokens (bf16)
  static constexpr int kBBytes = kWeightRows * kBlockK;  // weights (e4m3): 64-byte rows
  static constexpr int kTmaBytes = kABytes + kBBytes;
  static constexpr int kBRows = kWeightRows;  // rows of the B tile
  static constexpr int kHalvesPairs = 1;      // halves layout: gate rows, then up rows
  static constexpr int kHalvesRun = kBRows / (2 * kHalvesPairs);  // rows per run (halves_b_row)
  static constexpr int kScaleWords = kWeightRows;  // per row, the aligned word of its 2 scale bytes
  static constexpr int kStageBytes = kABytes + kBBytes + kScaleWords * 4;
  static constexpr int kStagingBytes = 2 * 128 * 64 * 2;  // per warpgroup [128 tokens][64] bf16
  static constexpr int kBarrierBytes = 2 * kStages * 8 + kTileQueueBytes;  // + TileQueue
  static constexpr int kTableBytes = (3 * kMaxGroups + 1) * 4;
  static constexpr int kMultiplierBytes = 256 * 4;  // first multiplier of each scale byte
  static constexpr int kSmemBytes = 1024 + kStages * kStageBytes + kStagingBytes + kBarrierBytes +
                                    kTableBytes + kMultiplierBytes;
  static_assert(kSmemBytes <= 227 * 1024, "exceeds the 227 KB of shared memory per block");
  static_assert(kProducerRegs * 128 + kConsumerRegs * 256 <= 168 * kThreads, "register pool");
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "tiles start on a swizzle atom");
  static_assert(kWeightRows <= 256 && kBlockM <= 256, "one TMA box per operand");
};

// Output columns (features) of a tile.
template <class Cfg, int kEpi>
constexpr int mx_regs_tile_cols() {
  return epilogue_gated(kEpi) ? Cfg::kWeightRows / 2 : Cfg::kWeightRows;
}

// Shared-memory weight row of fragment row r (0..63) of m block mb of consumer warpgroup h.
template <class Cfg, int kEpi>
__device__ __forceinline__ int mx_regs_smem_row(int h, int mb, int r) {
  if constexpr (Cfg::kMBlocks == 2) {
    if constexpr (kEpi == kEpiActHalves) return 128 * mb + 64 * h + r;
    else if constexpr (kEpi == kEpiActInterleaved) return 128 * h + 2 * r + mb;
    else return 128 * h + 64 * mb + r;
  } else {
    // Gated: warpgroup 0 holds the gate rows of the tile's 64 features, warpgroup 1 the up rows.
    if constexpr (kEpi == kEpiActInterleaved) return 2 * r + h;
    else return 64 * h + r;
  }
}

// Output feature (column of c, from the tile's first) of fragment row r of (h, mb).
template <class Cfg, int kEpi>
__device__ __forceinline__ int mx_regs_feature(int h, int mb, int r) {
  if constexpr (epilogue_gated(kEpi)) return Cfg::kMBlocks == 2 ? 64 * h + r : r;
  else return Cfg::kMBlocks == 2 ? 128 * h + 64 * mb + r : 64 * h + r;
}

// Row of b (viewed as [groups * n1, k]) of shared-memory weight row `row` of the tile whose first
// b row is b_row; -1 past the tensor (its bytes are TMA zeros).
template <class Cfg, int kEpi>
__device__ __forceinline__ int64_t mx_regs_b_row(const Sm90Params& p, int b_row, int row) {
  const int r = kEpi == kEpiActHalves ? halves_b_row<Cfg>(p, b_row, row) : b_row + row;
  return r < p.b_rows ? r : -1;
}

template <class Cfg, int kEpi>
__device__ __forceinline__ void produce_mx_regs(const Sm90Params& p, const TileTables& tt,
                                                const CUtensorMap* tm_a, const CUtensorMap* tm_b,
                                                uint8_t* smem_a, uint8_t* smem_b,
                                                uint32_t* smem_scale, uint64_t* full,
                                                uint64_t* empty, int tid) {
  constexpr int BK = Cfg::kBlockK, S = Cfg::kStages;
  constexpr int kRowsPerThread = Cfg::kWeightRows / 128;
  const int64_t scale_end = int64_t(p.b_rows) * p.k_scales;
  int stage = 0;
  uint32_t phase = 0;
  for (int i = 0;; ++i) {
    // Thread 0 draws; every producer thread needs the tile for its scale rows.
    if (tid == 0) tt.queue->put(i, min(TileQueue::draw(p.tile_counter, i), tt.total_tiles));
    const int t = tt.queue->take(i);
    if (t >= tt.total_tiles) break;
    const TileCoord tc = decode_tile<Cfg, mx_regs_tile_cols<Cfg, kEpi>()>(
        t, tt.prefix, tt.start, tt.end, tt.groups, p.n_tiles);
    const int b_row = tile_b_row<kEpi>(p, tc);
    int64_t rows[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
      rows[i] = mx_regs_b_row<Cfg, kEpi>(p, b_row, tid + 128 * i);
    for (int kb = 0; kb < p.k_blocks; ++kb) {
      ptx::mbar_wait(&empty[stage], phase ^ 1);
      if (tid == 0) {
        ptx::mbar_arrive_expect_tx(&full[stage], Cfg::kTmaBytes);
        ptx::tma_load_2d(smem_a + stage * Cfg::kABytes, tm_a, &full[stage], kb * BK, tc.m0);
        // Coordinates in bf16 units: the e4m3 weights are mapped as pairs of bytes.
        tma_load_b<Cfg, kEpi>(p, tm_b, smem_b + stage * Cfg::kBBytes, &full[stage], kb * (BK / 2),
                              b_row);
      }
      uint32_t* words = smem_scale + stage * Cfg::kScaleWords;
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
        copy_scale_pair_word(words + tid + 128 * i, p.b_scale, rows[i], p.k_scales, kb, scale_end);
      ptx::cp_async_mbar_arrive_noinc(&full[stage]);
      ptx::next_stage<S>(stage, phase);
    }
  }
  // Nothing may be in flight into shared memory at exit (the consumers wait for every stage
  // anyway: this only makes it explicit).
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
}

// Keeps fragment registers live (and unmodified) up to this point: a wgmma reading them
// asynchronously must be retired before the compiler may reuse them.
template <int kMBlocks>
__device__ __forceinline__ void keep_fragment(uint32_t (&a)[kMBlocks][4]) {
#pragma unroll
  for (int mb = 0; mb < kMBlocks; ++mb)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[mb][i])::"memory");
}

template <class Cfg>
using MxRegsAcc = float[Cfg::kMBlocks][Cfg::kAccPerBlock];

template <class Cfg>
__device__ __forceinline__ void fence_acc(MxRegsAcc<Cfg>& acc) {
#pragma unroll
  for (int mb = 0; mb < Cfg::kMBlocks; ++mb)
#pragma unroll
    for (int i = 0; i < Cfg::kAccPerBlock; ++i) ptx::wgmma_fence_operand(acc[mb][i]);
}

template <class Cfg, int kEpi>
__device__ __forceinline__ void consume_mx_regs(MxRegsAcc<Cfg>& acc, const Sm90Params& p,
                                                const TileCoord& tc, const uint8_t* smem_a,
                                                const uint8_t* smem_b, const uint32_t* smem_scale,
                                                const uint32_t* s_multiplier, uint64_t* full,
                                                uint64_t* empty, int h, int warp, int lane,
                                                int& stage, uint32_t& phase) {
  constexpr int S = Cfg::kStages, MB = Cfg::kMBlocks, kSets = Cfg::kFragmentSets;
  const int g = lane >> 2, c = lane & 3;
  const int b_row = tile_b_row<kEpi>(p, tc);
  // This thread's weight rows (m block mb, row g + 8 rr of the warp's 16): the byte offset of
  // its 16-byte chunk in a stage's weight tile, and where its scale byte sits in the row's word:
  // at (row * ks + 2 kb) % 4 + c / 2, ks even, i.e. `skew` for even kb, skew ^ 2 for odd.
  uint32_t w_off[MB][2];
  int row_of[MB][2];
  int skew[MB][2];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = mx_regs_smem_row<Cfg, kEpi>(h, mb, 16 * warp + g + 8 * rr);
      const int64_t grow = mx_regs_b_row<Cfg, kEpi>(p, b_row, row);
      row_of[mb][rr] = row;
      w_off[mb][rr] = uint32_t(row * Cfg::kBlockK + 16 * c);
      skew[mb][rr] = (grow >= 0 ? int((grow * p.k_scales) & 3) : 0) + (c >> 1);
    }
  uint32_t frag[kSets][MB][4];  // register sets x m blocks
  int prev_stage = -1;
  for (int kb = 0; kb < p.k_blocks; ++kb) {
    ptx::mbar_wait(&full[stage], phase);
    const uint8_t* wt = smem_b + stage * Cfg::kBBytes;
    const uint32_t* words = smem_scale + stage * Cfg::kScaleWords;
    uint4 raw[MB][2];
    uint32_t m1[MB][2];  // first multipliers, from the table
    uint32_t sb[MB][2];  // scale bytes
    bool big = false;    // some block of this thread may need the second multiply
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        raw[mb][rr] = *reinterpret_cast<const uint4*>(wt + w_off[mb][rr]);
        // Byte `at` of the row's word, zero-extended (selector nibbles 4: zero bytes).
        const uint32_t at = uint32_t(skew[mb][rr] ^ ((kb & 1) << 1));
        sb[mb][rr] = __byte_perm(words[row_of[mb][rr]], 0u, 0x4440u | at);
        m1[mb][rr] = s_multiplier[sb[mb][rr]];
        big |= m1[mb][rr] == kMxMaxFirstMultiplier;
      }
    // Blocks of |x| >= 2^15 are rare: the warp takes their second multiply only when one of its
    // lanes has one (a uniform branch, skipped otherwise).
    const bool second = __any_sync(0xffffffffu, big);
    uint32_t m2[MB][2];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) m2[mb][rr] = second ? mx_multipliers(sb[mb][rr]).m2x2 : 0u;
    const uint32_t b_addr = ptx::smem_addr(smem_a + stage * Cfg::kABytes);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t (&a)[MB][4] = frag[kk % kSets];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const uint4& v = raw[mb][rr];
          const uint32_t w = kk == 0 ? v.x : kk == 1 ? v.y : kk == 2 ? v.z : v.w;
          e4m3x4_to_bf16x2(w, m1[mb][rr], &a[mb][rr], &a[mb][2 + rr]);
          if (second) {
            a[mb][rr] = bf16x2_mul(a[mb][rr], m2[mb][rr]);
            a[mb][2 + rr] = bf16x2_mul(a[mb][2 + rr], m2[mb][rr]);
          }
        }
      fence_acc<Cfg>(acc);
      ptx::wgmma_fence();
      const uint64_t desc = ptx::wgmma_desc_sw128(b_addr + kk * 32);
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
        ptx::wgmma_m64k16_bf16_rs<Cfg::kBlockM>(acc[mb], a[mb], desc, (kb | kk) != 0);
      ptx::wgmma_commit();
      fence_acc<Cfg>(acc);
      // Step kk - (kSets - 1) is retired: its register set may be rewritten by the next step,
      // and at step kSets - 2 of a stage every step of the previous stage is done.
      ptx::wgmma_wait<kSets - 1>();
      keep_fragment<MB>(frag[(kk + 1) % kSets]);
      if (kk == kSets - 2 && prev_stage >= 0 && lane == 0) ptx::mbar_arrive(&empty[prev_stage]);
    }
    prev_stage = stage;
    ptx::next_stage<S>(stage, phase);
  }
  ptx::wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < kSets; ++i) keep_fragment<MB>(frag[i]);
  fence_acc<Cfg>(acc);
  if (prev_stage >= 0 && lane == 0) ptx::mbar_arrive(&empty[prev_stage]);
}

// The bias of weight row r (0..63) of (h, mb) for the epilogue: of the gate or up row for the
// gated tiles; 0 where there is none or the feature is never stored.
template <class Cfg, int kEpi>
__device__ __forceinline__ float mx_regs_bias(const Sm90Params& p, const TileCoord& tc, int h,
                                              int mb, int r) {
  if (p.bias == nullptr) return 0.f;
  const float* bias = p.bias + int64_t(tc.group) * p.n1;
  const int col = tc.n0 + mx_regs_feature<Cfg, kEpi>(h, mb, r);
  if (col >= p.n) return 0.f;
  if constexpr (epilogue_gated(kEpi)) {
    const bool up = Cfg::kMBlocks == 2 ? mb == 1 : h == 1;
    if constexpr (kEpi == kEpiActHalves) return __ldg(bias + (up ? p.ffn + col : col));
    else return __ldg(bias + 2 * col + (up ? 1 : 0));
  } else {
    return __ldg(bias + col);
  }
}

// The output of an accumulator (gate and up for the gated epilogues) with its bias.
template <int kEpi, int kAct>
__device__ __forceinline__ float mx_regs_output(float x, float bx, float up, float bu,
                                                const Sm90Params& p) {
  if constexpr (kEpi == kEpiStore) return x + bx;
  else if constexpr (kEpi == kEpiActElementwise)
    return activation_value<kAct>(bf16_rounded(x + bx), 0.f, p.alpha, p.limit);
  else
    return activation_value<kAct>(bf16_rounded(x + bx), bf16_rounded(up + bu), p.alpha, p.limit);
}

// The token rows a consumer thread stores in mx_regs_store_chunk: tc.m0 + 128 hh + 16 i +
// wg_tid / 8 for token half hh and i < 8. Bit 8 hh + i of the mask: that row is written (inside
// the group, row_map kept). Read once per tile, before the mainloop: read in the store loop
// instead, each row_map load stood between a staged chunk and its store, for every chunk.
template <class Cfg>
__device__ __forceinline__ uint32_t mx_regs_row_mask(const Sm90Params& p, const TileCoord& tc,
                                                     int wg_tid) {
  uint32_t mask = 0;
#pragma unroll
  for (int b = 0; b < Cfg::kBlockM / 16; ++b) {
    const int row = tc.m0 + 16 * b + (wg_tid >> 3);
    if (tile_row_stored(p, tc, row)) mask |= 1u << b;
  }
  return mask;
}

// 128 tokens (token0 ..) x 64 features (col0 ..) of the output: y(j, e) is the output of
// accumulator element 4j + e of this thread's 16 token blocks (rows g, g + 8 of the warp's 16
// features: e = 0, 1 on row g, 2, 3 on row g + 8). row_mask: mx_regs_row_mask.
template <bool kRoundTrip, class Y>
__device__ __forceinline__ void mx_regs_store_chunk(const Sm90Params& p, const TileCoord& tc,
                                                    uint8_t* stage_buf, int col0, int token0,
                                                    uint32_t row_mask, int warp, int lane,
                                                    int wg_tid, int h, Y y) {
  // Swizzled staging: token row t (128 bytes), 16-byte chunk q at ((q ^ (t % 8)) * 16).
  auto at = [&](int t, int q) { return stage_buf + t * 128 + ((q ^ (t & 7)) << 4); };
  warpgroup_bar_sync(1 + h, 128);  // the previous chunk's reads are done
  const int mat = lane >> 3, mrow = lane & 7;
#pragma unroll
  for (int j = 0; j < 16; j += 2) {
    uint32_t r[4];
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      r[2 * jj] = pack_bf16x2(y(j + jj, 0), y(j + jj, 1));      // features 16w + g
      r[2 * jj + 1] = pack_bf16x2(y(j + jj, 2), y(j + jj, 3));  // features 16w + 8 + g
    }
    // Matrix `mat` holds tokens 8 (j + mat / 2) .. +7 of features 16 warp + 8 (mat % 2) .. +7.
    ptx::stmatrix_x4_trans(at(8 * (j + (mat >> 1)) + mrow, 2 * warp + (mat & 1)), r);
  }
  warpgroup_bar_sync(1 + h, 128);
  const int q = wg_tid & 7;
#pragma unroll 2
  for (int i = 0; i < 8; ++i) {
    const int t = 16 * i + (wg_tid >> 3);
    uint4 v = *reinterpret_cast<const uint4*>(at(t, q));
    if constexpr (kRoundTrip) {
      uint16_t e[8];
      unpack8(v, e);
      mx_round_trip_lanes(e);  // lanes 4 apart hold a 32-block: 8 | 32, chunks q / 4 aligned
      *reinterpret_cast<uint4*>(at(t, q)) = pack8(e);
      __syncwarp();
      v = mx_regs_gather_chunk(q, [&](int src) {
        return *reinterpret_cast<const uint16_t*>(at(t, src >> 3) + 2 * (src & 7));
      });
      __syncwarp();  // every lane has gathered before the next token's round trip writes
    }
    const int row = tc.m0 + token0 + t;
    const int col = col0 + 8 * q;
    if (((row_mask >> (token0 / 16 + i)) & 1u) && col < p.n)
      *reinterpret_cast<uint4*>(p.c + int64_t(row) * p.n + col) = v;
  }
}

// kEpi != kEpiStore (FC1): the output is round-tripped into FC2's k order (kRoundTrip).
template <class Cfg, int kEpi, int kAct>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    grouped_mm_sm90_mx_regs_kernel(const __grid_constant__ CUtensorMap tm_a,
                                   const __grid_constant__ CUtensorMap tm_b, const Sm90Params p) {
  constexpr int S = Cfg::kStages, MB = Cfg::kMBlocks;
  constexpr int kTileCols = mx_regs_tile_cols<Cfg, kEpi>();
  constexpr bool kRoundTrip = kEpi != kEpiStore;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* smem_a = smem;
  uint8_t* smem_b = smem + S * Cfg::kABytes;
  uint32_t* smem_scale = reinterpret_cast<uint32_t*>(smem_b + S * Cfg::kBBytes);
  uint8_t* staging = smem + S * Cfg::kStageBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(staging + Cfg::kStagingBytes);
  uint64_t* empty = full + S;
  TileQueue* queue = reinterpret_cast<TileQueue*>(empty + S);
  int* s_prefix = reinterpret_cast<int*>(reinterpret_cast<uint8_t*>(queue) + kTileQueueBytes);
  int* s_start = s_prefix + Cfg::kMaxGroups + 1;
  int* s_end = s_start + Cfg::kMaxGroups;
  uint32_t* s_multiplier = reinterpret_cast<uint32_t*>(s_end + Cfg::kMaxGroups);  // [256]

  const int tid = threadIdx.x;
  const int groups = p.groups;
  // The first multiplier of every scale byte: a table load instead of its arithmetic in the
  // consumers' loop (published by build_group_tiles' barriers).
  for (int i = tid; i < 256; i += Cfg::kThreads) s_multiplier[i] = mx_multipliers(i).m1x2;
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      ptx::mbar_init(&full[s], 1 + 128);  // expect_tx + one cp.async arrival per producer thread
      ptx::mbar_init(&empty[s], 8);       // one arrival per consumer warp
    }
    queue->init(12);  // read by every warp: the producers need the tile's scale rows
    ptx::mbar_fence_init();
  }
  if (tid == 32) {
    ptx::tma_prefetch_map(&tm_a);
    ptx::tma_prefetch_map(&tm_b);
  }
  build_group_tiles(p.offsets, groups, p.rows, Cfg::kBlockM, s_start, s_end, s_prefix);
  const int total_tiles = s_prefix[groups] * p.n_tiles;

  if (tid < 128) {
    set_warpgroup_regs<Cfg::kProducerRegs>();
    const TileTables tables{s_prefix, s_start, s_end, groups, total_tiles, queue};
    produce_mx_regs<Cfg, kEpi>(p, tables, &tm_a, &tm_b, smem_a, smem_b, smem_scale, full, empty,
                               tid);
  } else {
    set_warpgroup_regs<Cfg::kConsumerRegs>();
    const int h = tid / 128 - 1;
    const int warp = (tid / 32) & 3;
    const int lane = tid & 31;
    const int wg_tid = tid & 127;
    const int g = lane >> 2;
    uint8_t* stage_buf = staging + h * (Cfg::kStagingBytes / 2);
    int stage = 0;
    uint32_t phase = 0;
    MxRegsAcc<Cfg> acc;
    for (int i = 0;; ++i) {
      const int t = queue->take(i);
      if (t >= total_tiles) break;
      const TileCoord tc =
          decode_tile<Cfg, kTileCols>(t, s_prefix, s_start, s_end, groups, p.n_tiles);
      float bias[MB][2];  // [m block][row g, g + 8], loaded now: the latency hides under the loop
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
          bias[mb][rr] = mx_regs_bias<Cfg, kEpi>(p, tc, h, mb, 16 * warp + g + 8 * rr);
      const uint32_t row_mask = mx_regs_row_mask<Cfg>(p, tc, wg_tid);
      consume_mx_regs<Cfg, kEpi>(acc, p, tc, smem_a, smem_b, smem_scale, s_multiplier, full,
                                 empty, h, warp, lane, stage, phase);
      if constexpr (epilogue_gated(kEpi) && MB == 2) {
        mx_regs_store_chunk<kRoundTrip>(
            p, tc, stage_buf, tc.n0 + 64 * h, 0, row_mask, warp, lane, wg_tid, h,
            [&](int j, int e) {
              return mx_regs_output<kEpi, kAct>(acc[0][4 * j + e], bias[0][e >> 1],
                                                acc[1][4 * j + e], bias[1][e >> 1], p);
            });
      } else if constexpr (epilogue_gated(kEpi)) {
        // Warpgroup 0 holds the gate, 1 the up accumulators of the same fragment positions. Each
        // finishes tokens [128 h, 128 h + 128): it hands the other its values of the other half
        // (bf16(acc + bias): what the activation reads), through the staging buffers, thread by
        // thread in fragment order (conflict-free words).
        // The accumulator halves are indexed by template constants (registers, not local
        // memory), so each warpgroup runs its own instantiation between barriers that both
        // reach at the same place.
        uint32_t* mine = reinterpret_cast<uint32_t*>(stage_buf);
        const uint32_t* theirs =
            reinterpret_cast<const uint32_t*>(staging + (1 - h) * (Cfg::kStagingBytes / 2));
        auto hand_over = [&](auto h_const) {
          constexpr int H = decltype(h_const)::value;
#pragma unroll
          for (int i = 0; i < 32; ++i) {  // the other token half: accumulators 64 (1 - H) + ...
            const float b = bias[0][i & 1];  // elements 2i, 2i + 1: e = 2 (i % 2) + {0, 1}
            mine[i * 128 + wg_tid] = pack_bf16x2(acc[0][64 * (1 - H) + 2 * i] + b,
                                                 acc[0][64 * (1 - H) + 2 * i + 1] + b);
          }
        };
        warpgroup_bar_sync(3, 256);  // the staging buffers' last readers are done
        if (h == 0) hand_over(std::integral_constant<int, 0>{});
        else hand_over(std::integral_constant<int, 1>{});
        warpgroup_bar_sync(3, 256);
        uint32_t partner[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) partner[i] = theirs[i * 128 + wg_tid];
        warpgroup_bar_sync(3, 256);  // both have read before either restages
        auto finish = [&](auto h_const) {
          constexpr int H = decltype(h_const)::value;
          mx_regs_store_chunk<kRoundTrip>(
              p, tc, stage_buf, tc.n0, 128 * H, row_mask, warp, lane, wg_tid, H,
              [&](int j, int e) {
                const int i = 4 * j + e;  // accumulator element of the token half
                const uint32_t w = partner[i >> 1];
                const float x = __uint_as_float(i & 1 ? w & 0xFFFF0000u : w << 16);
                const float own = bf16_rounded(acc[0][64 * H + i] + bias[0][e >> 1]);
                return mx_regs_output<kEpiActHalves, kAct>(H == 0 ? own : x, 0.f,
                                                           H == 0 ? x : own, 0.f, p);
              });
        };
        if (h == 0) finish(std::integral_constant<int, 0>{});
        else finish(std::integral_constant<int, 1>{});
      } else {
#pragma unroll
        for (int mb = 0; mb < MB; ++mb)
#pragma unroll
          for (int half = 0; half < 3 - MB; ++half)  // token halves of the n256 tile
            mx_regs_store_chunk<kRoundTrip>(
                p, tc, stage_buf, tc.n0 + mx_regs_feature<Cfg, kEpi>(h, mb, 0), 128 * half,
                row_mask, warp, lane, wg_tid, h, [&](int j, int e) {
                  return mx_regs_output<kEpi, kAct>(acc[mb][64 * half + 4 * j + e],
                                                    bias[mb][e >> 1], 0.f, 0.f, p);
                });
      }
    }
  }
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0;
}

// Upper bound of the tile count: sum_g ceil(size_g / 128) <= rows / 128 + groups.
int64_t max_m_tiles(const fmoe_grouped_mm_args& a) { return a.rows / 128 + a.groups; }


// The kernel parameters of a launch whose c has `n_out` columns (n plain, I fused) in tiles of
// tile_cols, over k blocks of block_k. `act` is used by the fused epilogues only.
Sm90Params sm90_params(const fmoe_grouped_mm_args& a, const ActEpilogue& act, int64_t n_out,
                       int block_k, int tile_cols, int32_t* tile_counter) {
  Sm90Params p;
  p.c = static_cast<__nv_bfloat16*>(a.c);
  p.bias = a.bias;
  p.offsets = a.group_offsets;
  p.row_map = a.row_map;
  p.rows = int(a.rows);
  p.n = int(n_out);
  p.n1 = int(a.n);
  p.ffn = int(n_out);
  p.k_blocks = int((a.k + block_k - 1) / block_k);
  p.groups = int(a.groups);
  p.n_tiles = int((n_out + tile_cols - 1) / tile_cols);
  p.alpha = act.alpha;
  p.limit = act.limit;
  p.a8 = static_cast<const uint8_t*>(a.a);
  p.b8 = static_cast<const uint8_t*>(a.b);
  p.a_scale = a.a_scale;
  p.b_scale = a.b_scale;
  p.k = int(a.k);
  p.k_scales = int(a.k / 32);
  p.b_rows = int(a.groups * a.n);
  // FMOE_SM90_SCHEDULE=static ignores the counter (static tiles), for comparisons.
  static const bool force_static = [] {
    const char* e = std::getenv("FMOE_SM90_SCHEDULE");
    return e != nullptr && std::strcmp(e, "static") == 0;
  }();
  p.tile_counter = force_static ? nullptr : tile_counter;
  // Half tiles ("Half tiles"): every last tile of <= 64 rows with dynamic tiles, whole groups
  // only with static ones. FMOE_SM90_HALF_TILES=0|whole|all forces none / whole groups / all,
  // for comparisons.
  static const int forced_half_tiles = [] {
    const char* e = std::getenv("FMOE_SM90_HALF_TILES");
    if (e == nullptr) return -1;
    if (std::strcmp(e, "0") == 0) return int(kHalfTilesNone);
    if (std::strcmp(e, "whole") == 0) return int(kHalfTilesWholeGroups);
    return std::strcmp(e, "all") == 0 ? int(kHalfTilesAll) : -1;
  }();
  p.half_tiles = forced_half_tiles >= 0 ? forced_half_tiles
                 : p.tile_counter       ? int(kHalfTilesAll)
                                        : int(kHalfTilesWholeGroups);
  return p;
}

// Whether the wide cooperative kernel runs in CTA pairs ("CTA pairs") for this GEMM: where one
// group's weight matrix (n x k bf16) holds at least kPairsMinWeightMiB. The pairs walk their
// stages in step, which costs more than the shared B copies save where the matrices are small.
// On an H100, in single CTAs: qwen3's layer (3 and 6 MiB) and nemotron's (9.5 MiB) 1-2% faster;
// deepseek-v3 T = 8192 with its FC2 alone single (28 MiB, k = 2048, as qwen3's FC1) 1.2% slower;
// in pairs, mixtral (224 and 112 MiB) up to 5% and gpt-oss (31.6 and 15.8 MiB) ~1% faster
// (bench/NOTES.md items 121, 123, 125). FMOE_SM90_PAIRS=0 never pairs, FMOE_SM90_PAIRS_MIN_MIB=N
// pairs from N MiB (comparisons).
constexpr int64_t kPairsMinWeightMiB = 12;
bool sm90_pairs(const fmoe_grouped_mm_args& a) {
  static const int64_t min_bytes = [] {
    const char* off = std::getenv("FMOE_SM90_PAIRS");
    if (off != nullptr && std::strcmp(off, "0") == 0) return INT64_MAX;
    const char* e = std::getenv("FMOE_SM90_PAIRS_MIN_MIB");
    const int64_t mib = e != nullptr && std::atoi(e) >= 0 ? std::atoi(e) : kPairsMinWeightMiB;
    return mib << 20;
  }();
  return a.n * a.k * int64_t(sizeof(uint16_t)) >= min_bytes;
}

// The launch attribute of clusters of two CTAs (CTA pairs).
cudaLaunchAttribute cluster_of_two() {
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = 2;
  cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
  return cluster;
}

// How many clusters of two CTAs of kKernel the current device holds at once (0: unknown), asked
// once per kernel and device.
template <auto kKernel>
int resident_pairs(int threads, int smem_bytes) {
  constexpr int kDevices = 64;
  static std::atomic<int> cached[kDevices];  // pairs + 1; 0: not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kDevices) {
    (void)cudaGetLastError();
    return 0;
  }
  int known = cached[device].load(std::memory_order_relaxed);
  if (known > 0) return known - 1;
  cudaLaunchAttribute cluster = cluster_of_two();
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(2);
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = size_t(smem_bytes);
  cfg.attrs = &cluster;
  cfg.numAttrs = 1;
  int pairs = 0;
  if (cudaOccupancyMaxActiveClusters(&pairs, kKernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    pairs = 0;
  }
  cached[device].store(pairs + 1, std::memory_order_relaxed);
  return pairs;
}

// tile_counter: dynamic tiles (bf16 operands only; nullptr: static).
template <class Cfg, int kEpi, int kAct = 0>
cudaError_t launch(const fmoe_grouped_mm_args& a, const ActEpilogue& act, int num_sms,
                   cudaStream_t stream, int32_t* tile_counter = nullptr) {
  if (a.rows == 0) return cudaSuccess;  // no row can be written (and a 0-row map is invalid)
  constexpr int kTileCols = epilogue_gated(kEpi) ? Cfg::kBlockN / 2 : Cfg::kBlockN;
  const int64_t n_out = epilogue_gated(kEpi) ? a.n / 2 : a.n;
  CUtensorMap tm_a{}, tm_b{};  // unused (zero) for the dequantizing MXFP8 producer (plain loads)
  cudaError_t err = cudaSuccess;
  if constexpr (!Cfg::kMx) {
    // e4m3 tensors are mapped as bf16 pairs (a tile copy moves bytes whatever their type): k / 2
    // elements a row, a box of 128 bytes either way.
    const uint64_t inner = Cfg::kFp8 ? uint64_t(a.k) / 2 : uint64_t(a.k);
    const uint64_t row_bytes = uint64_t(a.k) * Cfg::kElemBytes;
    err = make_tensor_map_bf16_2d_sw128(&tm_a, a.a, inner, uint64_t(a.rows), row_bytes, 64,
                                        Cfg::kBlockM);
    if (err != cudaSuccess) return err;
    const uint32_t b_box_rows =
        kEpi == kEpiActHalves ? Cfg::kHalvesRun : Cfg::kBRows;
    err = make_tensor_map_bf16_2d_sw128(&tm_b, a.b, inner, uint64_t(a.groups * a.n), row_bytes,
                                        64, b_box_rows);
    if (err != cudaSuccess) return err;
  }

  // The MXFP8 producers walk the static sequence (produce_mx, produce_fp8).
  const Sm90Params p = sm90_params(a, act, n_out, Cfg::kBlockK, kTileCols,
                                   Cfg::kOperands == kOpBf16 ? tile_counter : nullptr);
  auto kernel = grouped_mm_sm90_kernel<Cfg, kEpi, kAct>;
  constexpr int kSmem = kEpi == kEpiStore ? Cfg::kSmemBytes : Cfg::kSmemBytesAct;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  const int64_t tiles = max_m_tiles(a) * p.n_tiles;
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(std::max(num_sms, 1), tiles)));
  if constexpr (Cfg::kPairs) {  // clusters of two: an even grid, a pair per two tiles
    cudaLaunchAttribute cluster = cluster_of_two();
    cudaLaunchConfig_t cfg{};
    // Static tiles: no more pairs than fit at once, as a pair started after others finish would
    // compute its share last. Tiles drawn from the counter need no cap: a late pair draws what is
    // left.
    int pairs_grid = std::min<int>(grid, int(tiles) + 1);
    if (p.tile_counter == nullptr) {
      const int resident =
          2 * resident_pairs<grouped_mm_sm90_kernel<Cfg, kEpi, kAct>>(Cfg::kThreads, kSmem);
      if (resident > 0) pairs_grid = std::min(pairs_grid, resident);
    }
    cfg.gridDim = dim3(unsigned(std::max(2, pairs_grid / 2 * 2)));
    cfg.blockDim = dim3(Cfg::kThreads);
    cfg.dynamicSmemBytes = kSmem;
    cfg.stream = stream;
    cfg.attrs = &cluster;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, tm_a, tm_b, p);
  }
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(tm_a, tm_b, p);
  return cudaGetLastError();
}

// Calls run(epilogue, activation) with both as std::integral_constant: the fused epilogue
// instantiation of an (activation, layout) pair.
template <class Run>
cudaError_t dispatch_act(const ActEpilogue& act, Run&& run) {
  using std::integral_constant;
  if (act.activation == FMOE_ACT_SQUARED_RELU)
    return run(integral_constant<int, kEpiActElementwise>{},
               integral_constant<int, FMOE_ACT_SQUARED_RELU>{});
  const bool inter = act.layout == FMOE_LAYOUT_INTERLEAVED;
  auto gated = [&](auto activation) {
    return inter ? run(integral_constant<int, kEpiActInterleaved>{}, activation)
                 : run(integral_constant<int, kEpiActHalves>{}, activation);
  };
  switch (act.activation) {
    case FMOE_ACT_SILU: return gated(integral_constant<int, FMOE_ACT_SILU>{});
    case FMOE_ACT_GELU: return gated(integral_constant<int, FMOE_ACT_GELU>{});
    default: return gated(integral_constant<int, FMOE_ACT_SWIGLU_OAI>{});
  }
}

template <class Cfg>
cudaError_t launch_act(const fmoe_grouped_mm_args& a, const ActEpilogue& act, int num_sms,
                       cudaStream_t stream, int32_t* tile_counter = nullptr) {
  return dispatch_act(act, [&](auto epi, auto activation) {
    return launch<Cfg, decltype(epi)::value, decltype(activation)::value>(a, act, num_sms, stream,
                                                                           tile_counter);
  });
}

// The register-dequantizing MXFP8 kernel ("MXFP8 weights in registers"). a is bf16 here.
template <class Cfg, int kEpi, int kAct = 0>
cudaError_t launch_mx_regs_cfg(const fmoe_grouped_mm_args& a, const ActEpilogue& act,
                               int num_sms, cudaStream_t stream, int32_t* tile_counter) {
  if (a.rows == 0) return cudaSuccess;
  constexpr int kTileCols = mx_regs_tile_cols<Cfg, kEpi>();
  const int64_t n_out = epilogue_gated(kEpi) ? a.n / 2 : a.n;
  CUtensorMap tm_a{}, tm_b{};
  cudaError_t err = make_tensor_map_bf16_2d_sw128(&tm_a, a.a, uint64_t(a.k), uint64_t(a.rows),
                                                  uint64_t(a.k) * 2, 64, Cfg::kBlockM);
  if (err != cudaSuccess) return err;
  // e4m3 weights as bf16 pairs: 32 pairs = one 64-byte row of the tile.
  const uint32_t b_box_rows =
      kEpi == kEpiActHalves ? Cfg::kHalvesRun : Cfg::kBRows;
  err = make_tensor_map_bf16_2d_plain(&tm_b, a.b, uint64_t(a.k) / 2, uint64_t(a.groups * a.n),
                                      uint64_t(a.k), 32, b_box_rows);
  if (err != cudaSuccess) return err;
  const Sm90Params p = sm90_params(a, act, n_out, Cfg::kBlockK, kTileCols, tile_counter);
  auto kernel = grouped_mm_sm90_mx_regs_kernel<Cfg, kEpi, kAct>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t tiles = max_m_tiles(a) * p.n_tiles;
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(std::max(num_sms, 1), tiles)));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(tm_a, tm_b, p);
  return cudaGetLastError();
}

template <int kEpi, int kAct = 0>
cudaError_t launch_mx_regs(const fmoe_grouped_mm_args& a, const ActEpilogue& act, int num_sms,
                           cudaStream_t stream, int32_t* tile_counter) {
  // The 128 x 256 tile where groups average 1024 rows or more, or 512 with n >= 4096 (a.rows /
  // a.groups: the capacity, an upper bound of the real average). Measured on an H200
  // (bench/NOTES.md v6): 11% faster on mixtral at T = 8192 (16384 rows per expert), within
  // -4..+4% at 256-640 rows per expert (qwen3 T = 8192, 512 rows, n 1536 and 2048: 1.6% slower);
  // on an H100 (v23): mixtral T = 2048 (512 rows, n 28672 and 4096) 8-10% faster, T = 512 (128)
  // 5% slower. FMOE_MX_REGS_TOKENS=128|256 forces a shape.
  static const int forced = [] {
    const char* e = std::getenv("FMOE_MX_REGS_TOKENS");
    return e != nullptr ? std::atoi(e) : 0;
  }();
  const bool wide = forced ? forced == 256
                          : a.rows >= 1024 * a.groups || (a.rows >= 512 * a.groups && a.n >= 4096);
  return wide ? launch_mx_regs_cfg<Sm90MxRegsConfig<1>, kEpi, kAct>(a, act, num_sms, stream,
                                                                    tile_counter)
              : launch_mx_regs_cfg<Sm90MxRegsConfig<2>, kEpi, kAct>(a, act, num_sms, stream,
                                                                    tile_counter);
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
  // Tile indices, and the dynamic scheduler's tickets (up to one past the last tile per CTA).
  if (max_m_tiles(a) * ((a.n + 127) / 128) >= INT_MAX - 4096) return false;
  return true;
}

namespace {
constexpr int64_t kNarrowWasteDivisor = 8;

// The cooperative tile width for the shape (256 or 128).
int cooperative_block_n(const fmoe_grouped_mm_args& a, int num_sms) {
  // Too few wide tiles to give every SM one (rows is the static capacity: an upper bound of the
  // real count, so this errs toward wide): narrow tiles double the parallelism.
  const int64_t wide_tiles = ((a.rows + 127) / 128) * ((a.n + 255) / 256);
  if (wide_tiles < num_sms) return 128;
  // A last wide tile mostly empty wastes more than narrow tiles lose in efficiency: narrow where
  // the wide tiles compute more than n / kNarrowWasteDivisor columns beyond the narrow ones'. At
  // 32 (the rule before: narrow tiles taken to lose ~3%), nemotron's FC1 (n = 1856: 6.9% more)
  // and FC2 (2688: 4.8%) and gpt-oss's FC2 (2880: 4.4%) took ping-pong tiles; on an H100 their
  // layers at T = 8192 ran 10% (nemotron) and 4% (gpt-oss) faster on wide ones (bench/NOTES.md
  // v24, item 95), on an H200 4% and 2% (v25, item 102).
  // FMOE_SM90_NARROW_WASTE=N sets the divisor (comparisons).
  static const int64_t divisor = [] {
    const char* e = std::getenv("FMOE_SM90_NARROW_WASTE");
    const int v = e ? std::atoi(e) : 0;
    return v > 0 ? int64_t(v) : kNarrowWasteDivisor;
  }();
  const int64_t waste_wide = (a.n + 255) / 256 * 256 - a.n;
  const int64_t waste_narrow = (a.n + 127) / 128 * 128 - a.n;
  if ((waste_wide - waste_narrow) * divisor > a.n) return 128;
  return 256;
}
}  // namespace

int grouped_mm_sm90_pick_block_n(const fmoe_grouped_mm_args& a, int num_sms) {
  // FMOE_SM90_TILE=wide|narrow|pingpong forces a kernel; FMOE_SM90_PINGPONG=0 keeps the
  // cooperative narrow kernel where ping-pong tiles replace it. For comparisons.
  static const int forced = [] {
    const char* e = std::getenv("FMOE_SM90_TILE");
    if (e == nullptr) return 0;
    if (std::strcmp(e, "wide") == 0) return 256;
    if (std::strcmp(e, "narrow") == 0) return 128;
    return std::strcmp(e, "pingpong") == 0 ? kSm90PingPong : 0;
  }();
  static const bool pingpong = [] {
    const char* e = std::getenv("FMOE_SM90_PINGPONG");
    return e == nullptr || std::strcmp(e, "0") != 0;
  }();
  if (forced != 0) return forced;
  // 128-wide tiles run faster one per warpgroup than shared by both (H200, bench/NOTES.md v16:
  // 2-9% per launch); 256-wide cooperative tiles stay where they are picked (faster again).
  const int block_n = cooperative_block_n(a, num_sms);
  return block_n == 128 && pingpong ? kSm90PingPong : block_n;
}

cudaError_t grouped_mm_sm90_bf16_block_n(const fmoe_grouped_mm_args& a, int num_sms, int block_n,
                                         cudaStream_t stream, int32_t* tile_counter) {
  const ActEpilogue none{};
  if (block_n == 256)
    return sm90_pairs(a)
               ? launch<Sm90WidePairs, kEpiStore>(a, none, num_sms, stream, tile_counter)
               : launch<Sm90Wide, kEpiStore>(a, none, num_sms, stream, tile_counter);
  if (block_n == 128) return launch<Sm90Narrow, kEpiStore>(a, none, num_sms, stream, tile_counter);
  if (block_n == kSm90PingPong)
    return launch<Sm90PingPong, kEpiStore>(a, none, num_sms, stream, tile_counter);
  return cudaErrorInvalidValue;
}

cudaError_t grouped_mm_sm90_bf16(const fmoe_grouped_mm_args& a, int num_sms, cudaStream_t stream,
                                 int32_t* tile_counter) {
  return grouped_mm_sm90_bf16_block_n(a, num_sms, grouped_mm_sm90_pick_block_n(a, num_sms),
                                      stream, tile_counter);
}

bool grouped_mm_sm90_act_supported(const fmoe_grouped_mm_args& a, const ActEpilogue& act) {
  if (act.activation < FMOE_ACT_SQUARED_RELU || act.activation > FMOE_ACT_SWIGLU_OAI) return false;
  const bool gated = act.activation != FMOE_ACT_SQUARED_RELU;
  if (gated && act.layout != FMOE_LAYOUT_HALVES && act.layout != FMOE_LAYOUT_INTERLEAVED)
    return false;
  if (!grouped_mm_sm90_supported(a)) return false;  // a.n = N1: B, bias and tile-count rules
  const int64_t ffn = gated ? a.n / 2 : a.n;
  if (gated && a.n % 2 != 0) return false;
  return ffn % 8 == 0;  // whole 16-byte segments per row of c (and I-aligned output blocks)
}

cudaError_t grouped_mm_sm90_bf16_act_block_n(const fmoe_grouped_mm_args& a, const ActEpilogue& act,
                                             int num_sms, int block_n, cudaStream_t stream,
                                             int32_t* tile_counter) {
  if (block_n == 256)
    return sm90_pairs(a) ? launch_act<Sm90WidePairs>(a, act, num_sms, stream, tile_counter)
                         : launch_act<Sm90Wide>(a, act, num_sms, stream, tile_counter);
  if (block_n == 128) return launch_act<Sm90Narrow>(a, act, num_sms, stream, tile_counter);
  if (block_n == kSm90PingPong)
    return launch_act<Sm90PingPong>(a, act, num_sms, stream, tile_counter);
  return cudaErrorInvalidValue;
}

cudaError_t grouped_mm_sm90_bf16_act(const fmoe_grouped_mm_args& a, const ActEpilogue& act,
                                     int num_sms, cudaStream_t stream, int32_t* tile_counter) {
  // A gated tile spans BN accumulator columns of N1 for BN/2 outputs, so the tile count and the
  // waste of a last partial tile are those of the plain FC1 GEMM: the same choice applies.
  return grouped_mm_sm90_bf16_act_block_n(a, act, num_sms, grouped_mm_sm90_pick_block_n(a, num_sms),
                                          stream, tile_counter);
}

// ---- MXFP8 operands ------------------------------------------------------------------------------
bool grouped_mm_sm90_mxfp8_supported(const fmoe_grouped_mm_args& a) {
  // The bf16 rules (16-byte aligned rows hold for e4m3 as k % 32 == 0), plus the scales.
  if (!grouped_mm_sm90_supported(a) || !a.a_scale || !a.b_scale) return false;
  return a.k % 32 == 0;
}

cudaError_t grouped_mm_sm90_mxfp8_block_n(const fmoe_grouped_mm_args& a, int num_sms, int block_n,
                                          cudaStream_t stream) {
  const ActEpilogue none{};
  if (block_n == kSm90MxFp8Wgmma) return launch<Sm90Fp8, kEpiStore>(a, none, num_sms, stream);
  if (block_n == 256) return launch<Sm90MxWide, kEpiStore>(a, none, num_sms, stream);
  if (block_n == 128) return launch<Sm90MxNarrow, kEpiStore>(a, none, num_sms, stream);
  return cudaErrorInvalidValue;
}

int grouped_mm_sm90_mxfp8_pick(const fmoe_grouped_mm_args& a, int num_sms) {
  static const bool dequant = [] {
    const char* e = std::getenv("FMOE_MX_GEMM");
    return e != nullptr && std::strcmp(e, "dequant") == 0;
  }();
  if (!dequant) return kSm90MxFp8Wgmma;
  const int bf16_pick = grouped_mm_sm90_pick_block_n(a, num_sms);
  return bf16_pick == kSm90PingPong ? 128 : bf16_pick;  // no ping-pong MXFP8 kernel
}

cudaError_t grouped_mm_sm90_mxfp8(const fmoe_grouped_mm_args& a, int num_sms,
                                  cudaStream_t stream) {
  return grouped_mm_sm90_mxfp8_block_n(a, num_sms, grouped_mm_sm90_mxfp8_pick(a, num_sms), stream);
}

bool grouped_mm_sm90_mxfp8_act_supported(const fmoe_grouped_mm_args& a, const ActEpilogue& act) {
  return grouped_mm_sm90_mxfp8_supported(a) && grouped_mm_sm90_act_supported(a, act);
}

cudaError_t grouped_mm_sm90_mxfp8_act_block_n(const fmoe_grouped_mm_args& a,
                                              const ActEpilogue& act, int num_sms, int block_n,
                                              cudaStream_t stream) {
  if (block_n == kSm90MxFp8Wgmma) return launch_act<Sm90Fp8>(a, act, num_sms, stream);
  if (block_n == 256) return launch_act<Sm90MxWide>(a, act, num_sms, stream);
  if (block_n == 128) return launch_act<Sm90MxNarrow>(a, act, num_sms, stream);
  return cudaErrorInvalidValue;
}

cudaError_t grouped_mm_sm90_mxfp8_act(const fmoe_grouped_mm_args& a, const ActEpilogue& act,
                                      int num_sms, cudaStream_t stream) {
  return grouped_mm_sm90_mxfp8_act_block_n(a, act, num_sms, grouped_mm_sm90_mxfp8_pick(a, num_sms),
                                           stream);
}

// ---- MXFP8 weights in registers --------------------------------------------------------------
bool grouped_mm_sm90_mx_regs_supported(const fmoe_grouped_mm_args& a) {
  return grouped_mm_sm90_supported(a) && a.b_scale != nullptr && a.k % 64 == 0;
}

cudaError_t grouped_mm_sm90_mx_regs(const fmoe_grouped_mm_args& a, int num_sms,
                                    cudaStream_t stream, int32_t* tile_counter) {
  return launch_mx_regs<kEpiStore>(a, ActEpilogue{}, num_sms, stream, tile_counter);
}

bool grouped_mm_sm90_mx_regs_act_supported(const fmoe_grouped_mm_args& a, const ActEpilogue& act) {
  if (!grouped_mm_sm90_mx_regs_supported(a) || !grouped_mm_sm90_act_supported(a, act)) return false;
  const int64_t ffn = act.activation == FMOE_ACT_SQUARED_RELU ? a.n : a.n / 2;
  return ffn % 64 == 0;  // whole 64-blocks of FC2's k order
}

cudaError_t grouped_mm_sm90_mx_regs_act(const fmoe_grouped_mm_args& a, const ActEpilogue& act,
                                        int num_sms, cudaStream_t stream, int32_t* tile_counter) {
  return dispatch_act(act, [&](auto epi, auto activation) {
    return launch_mx_regs<decltype(epi)::value, decltype(activation)::value>(a, act, num_sms,
                                                                            stream, tile_counter);
  });
}

}  // namespace fmoe::cuda
