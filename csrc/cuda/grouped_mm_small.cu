// Decode grouped GEMM for Hopper (sm_90a): c[r, :] = a[r, :] @ b[g]^T (+ bias[g]) (then FC1's
// activation, optionally) for groups of a few rows (tiles of up to 32), BF16 or MXFP8.
//
// Why a second kernel: at decode (T <= 32 tokens, or up to ~16 routed rows per expert) a group
// holds a few rows while its weights are megabytes. The prefill kernel (grouped_mm_sm90.cu) tiles
// 128 rows x 256 columns: it computes 128 rows to use a few, and its grid (used groups x n / 256)
// is a fraction of the SMs, each pulling far more than its share of the bandwidth. Here the time is
// the weight bytes over the memory bandwidth, and everything is arranged to keep every SM's copy
// engine busy.
//
// Design
// - Swap-AB: D^T = W x X^T. The weights are wgmma's A (M = 64 weight rows), the group's token rows
//   are its B (N = token_tile = 8, 16 or 32, padded), so no tensor-core work is wasted on padding
//   rows beyond the next multiple of 8, and the f32 accumulators are tiny (token_tile / 2 per
//   thread).
// - Work item = (unit, weight tile): a unit is up to token_tile rows of one group (one unit per
//   used group when the host's max_rows_per_group bound holds), a weight tile 64 weight rows of
//   that group (32 activation columns with a gated epilogue: gate rows and up rows side by side).
//   Each CTA reads the group offsets once (device side: graph-capturable), builds the unit prefix
//   of the valid groups in shared memory (as grouped_mm_sm90.cu: a bad group has no units) and
//   walks items blockIdx, blockIdx + grid, ... (persistent; empty groups cost nothing). MXFP8
//   with long items launches a CTA per item of the host's bound instead (kFp8PerItemMinKBlocks):
//   CTAs past the device-side count exit at once. Inside a group the items go tile-major: units
//   sharing a weight tile run side by side.
// - Routed (up to kMaxRoutedSlots routing entries; MXFP8 at the 8-token tile): each CTA builds the
//   same table, and the row -> token gather, from the routing map itself, in permute's layout at
//   alignment 1. The routing kernel ahead writes the offsets and maps the later steps read, but
//   this kernel needs nothing from it: at decode its weights no longer wait for the routing's
//   launch, run and write-back (bench/NOTES.md v13). MXFP8 gathers the tokens' quantized rows,
//   which a kernel beside the routing writes (weights_before_wait: the weights load first).
// - Launch overlap (ptx/griddep.cuh): every CTA lets the next kernel launch once it has waited
//   for the kernel ahead (the next one reads the routing's offsets before its own wait); with
//   weights_before_wait the producer issues the first item's weight stages before waiting for
//   the kernel ahead, so they load under its tail; routed, only the consumers wait, before their
//   first store.
// - Split-K (splits = 2 or 4, MXFP8 2) when items are too few to give every SM two: a cluster
//   of `splits` CTAs shares an item, CTA rank s reduces k-blocks [s*KB/S, (s+1)*KB/S), and the
//   partial tiles are summed through distributed shared memory in rank order (deterministic).
// - One producer warp (warp 4) fills a kStages ring of 128-byte-wide k slices: lane 0 issues the
//   weight tile by TMA (two 32-row boxes, 128-byte swizzle, arming the stage's `full` barrier with
//   the byte count); all 32 lanes gather the token rows (a_row_index) with cp.async into the same
//   swizzled layout, plus the e8m0 scale words for MXFP8, and arrive on `full` when their copies
//   land (cp.async.mbarrier.arrive.noinc: full expects 1 + 32 arrivals). One consumer warpgroup
//   (warps 0-3) runs the wgmmas and releases the stage (`empty`, 4 warp arrivals).
// - MXFP8: e4m3 x e4m3 wgmma (k32 = one scale block) into zeroed temporaries, then promoted:
//   acc += tmp * (scale_w[row] * scale_x[token]) in f32. A stage's four k32 blocks go to four
//   temporaries in one wgmma group (one wait per stage), and the stage goes back to the
//   producer as soon as that wait returns, ahead of the promotion (registers only). The scales
//   arrive as the two aligned words that cover the stage's 4 scale bytes of a row
//   (mx_scale_words.cuh: k/32 need not be a multiple of 4); while a thread's scale bytes are all
//   in [64, 191] (any but extreme scales) a product of two scales is one integer add of their
//   f32 exponent fields, else the bytes are decoded and multiplied: the same bits either way.
//   The token tile is 8 while the groups average at most 6 rows, else at most 16 (the promotion
//   costs per token column), and the ring is 4 deep, for 4 CTAs per SM. Both warps' per-stage
//   work is kept small: at 4 CTAs per SM the producer warp's and the consumers' instructions per
//   stage set the pace (bench/NOTES.md v14) until that work was cut; now the consumers wait for
//   data with the ring full (v19).
// - Epilogue: accumulators -> f32 tile in shared memory [token][weight row]; (split-K: cluster
//   barrier, then each rank finishes a share of the tile, summing the ranks' tiles in order);
//   + bias, round to bf16; with an activation: widen, activation in f32, round to bf16 (the
//   formulas of activation.cu); masked 16-byte stores (row in the group, row_map != -1, gather
//   index valid, column < out_cols).
//
// Shared memory per CTA: a stage is W 64 x 128 B = 8 KB + X token_tile x 128 B (1-4 KB) (+ 1 KB
// of scale words for MXFP8). bf16: 7, 6 or 8 stages at token tiles 8, 16, 32 (63-96 KB of ring)
// + the f32 tile (2-9 KB) + group tables (6 KB) = 72-111 KB, 3, 3 and 2 CTAs per SM; MXFP8: 4
// stages, 49-56 KB, 4 CTAs per SM. Either way 128-168 KB of weights in flight per SM, above the
// ~40 KB per SM that 3 TB/s needs at ~2 us of loaded memory latency; yet at 2 CTAs per SM each
// stage more measured faster (bench/NOTES.md v12).
//
// Expected (H100 SXM, ~2.9 TB/s achievable): time = launch and first-byte latency (~3-4 us)
// + weight bytes / 2.9 TB/s. bench/dev/grouped_mm_small_check.cu prints the achieved GB/s.
#include "cuda/grouped_mm_small.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "core/numerics.h"
#include "cuda/activation.cuh"
#include "cuda/block_scan.cuh"
#include "cuda/group_tiles.cuh"
#include "cuda/mx_scale_words.cuh"
#include "cuda/ptx/cp_async.cuh"
#include "cuda/ptx/cp_async_mbarrier.cuh"
#include "cuda/ptx/griddep.cuh"
#include "cuda/ptx/mbarrier.cuh"
#include "cuda/ptx/tma.cuh"
#include "cuda/ptx/wgmma.cuh"
#include "cuda/tensor_map.h"

namespace fmoe::cuda {

namespace {

namespace cg = cooperative_groups;

// ---- The configuration table ------------------------------------------------------------------
// kTileW = 64 weight rows: one wgmma M, one consumer warpgroup; small tiles make many items, so
//   the grid fills the SMs at T = 1 (e.g. 192 items for qwen3 fc1 with 8 experts).
// kStageK = 128 bytes of k per stage (64 bf16 or 128 e4m3): one 128-byte swizzle span.
// Stages: bf16 as deep as keeps the CTAs per SM of a 6-stage ring (bf16_ctas_per_sm: 3 CTAs at
//   token tiles 8 and 16, 2 at 32), since weights in flight set a decode kernel's bandwidth: 7,
//   6 and 8 stages (56, 48 and 64 KB of weights per CTA). MXFP8 4 (32 KB per CTA): its consumer
//   decodes scales and promotes every k32 block, so a CTA's one warpgroup is latency-bound; 4
//   stages fit 4 CTAs per SM (4 consumer warpgroups, 128 KB in flight). Measured on an H200
//   (bench/NOTES.md v19): 3 CTAs x 6 stages and 2 x 10 are 2% and 11% slower over the decode
//   cells, and the deeper ring slower even where a launch has only 2 CTAs per SM.
// kMaxGroups = 512: the group tables (6 KB) stay small next to the ring.
constexpr int kTileW = 64;
constexpr int kHalfTileW = kTileW / 2;  // rows per TMA box (gate and up halves of a gated tile)
constexpr int kStageK = 128;
// bf16 CTAs per SM: what a 6-stage ring fits, kept while the ring takes the rest of the shared
// memory (SmallLayout::kStages). Measured on an H200 (bench/NOTES.md v12): at tile 32 (T = 32 and
// 128) 7 stages 0-3% faster than 6, and 8 another 0-2%; at tile 8 (T = 1 and 8) 7 within noise.
constexpr int bf16_ctas_per_sm(int token_tile) { return token_tile == 32 ? 2 : 3; }
constexpr int kSmemPerSm = 228 * 1024;     // shared memory of an SM (H100, H200)
constexpr int kSmemReservedPerCta = 1024;  // of it, reserved for each resident CTA
constexpr int kFp8CtasPerSm = 4;
constexpr int kMaxGroups = 512;
// Routing entries (T * topk) up to which the kernel may build its group table from the routing
// itself (SmallMmArgs::routing_map): its row -> token table (1 KB) fits beside the ring without
// costing a stage at any bf16 token tile, and at MXFP8's 8-token tile (at 16, 4 CTAs per SM
// would lose a stage: MXFP8 routes at kFp8RoutedTokenTile only).
constexpr int kMaxRoutedSlots = 256;
constexpr int kFp8RoutedTokenTile = 8;
constexpr int kConsumerThreads = 128;
constexpr int kThreads = kConsumerThreads + 32;
constexpr int kRedStride = kTileW + 4;  // f32 words per token row: +4 makes fragment stores
                                        // conflict-free (bank = 4 * token + row)
// Split-K factors: 2 and 4; MXFP8 picks at most 2. Measured on an H100 (bench/NOTES.md v18),
// mixtral's FC2 at T = 1 (128 items over a 14336-long k) alone: MXFP8 68-69 us in clusters of 4
// (512 CTAs), 54-55 us in pairs (256 CTAs), 60 us unsplit; bf16 91, 88 and 90 us, yet the bf16
// layer was 1.2% slower with pairs, so bf16 keeps 4.
constexpr int kMaxSplits = 4;
constexpr int kMaxFp8Splits = 2;
// A split keeps at least this many stages of k per part. At 8 (the rule before) the decode chain
// split its T = 1 launches into parts of 8-23 stages, and most were faster whole: measured on an
// H100 in the layer (bench/NOTES.md v24, item 94), unsplit saved nemotron's bf16 FC2 (29 stages)
// 2.5 us of 58.6, gpt-oss's FC2 (bf16 45, MXFP8 23) 1.5 and 0.75 us, qwen3's FC1 (32, 16) 0.35 and
// 0.7 us, nemotron's MXFP8 FC1 (21) 0.3 us; only nemotron's bf16 FC1 (42) lost, 0.5 us. Mixtral's
// FC2 (224, 112) keeps its 4 and 2 parts.
constexpr int64_t kMinStagesPerSplit = 32;
// MXFP8's token tiles: the promotion costs per token column, padding included. The 32-wide tile
// (v1) spent the consumer's time on padding (qwen3 T = 32 at 2x the bf16 time), so 16 at most,
// and 8 while the groups average at most kFp8NarrowRows rows (measured on an H200 at T = 32 and
// 128: tile 8 faster at 2-6 rows per expert, tile 16 at 8).
constexpr int kMaxFp8TokenTile = 16;
constexpr int64_t kFp8NarrowRows = 6;
// MXFP8's grid: one CTA per item (a CTA that finishes early takes the next item from the block
// scheduler, so no SM idles behind a few CTAs that drew one item more) once a CTA's share of an
// item streams at least kFp8PerItemMinKBlocks stages; shorter items stay on the persistent grid,
// which pays the CTA's set-up (group table, barriers) once. Measured on an H200 (bench/NOTES.md
// v8, v14): per item, mixtral (32 and 112 stages) and deepseek (56) run 2-7% faster at T = 32
// and 128; nemotron (21) and gpt-oss (23) 3-7% slower since v14's cheaper producer; qwen3
// (16 and 6) 2-21% slower; bf16 (2-3 CTAs per SM) slower per item everywhere, up to 29%.
constexpr int64_t kFp8PerItemMinKBlocks = 32;
// Four e8m0 scale bytes of 0x7F (2^0: scale 1.0 each), the finite scale of the bytes no real
// scale covers (padding token columns, k blocks past a row's end), whose operands are zero.
constexpr uint32_t kScaleOneWord = 0x7F7F7F7Fu;

// kRouted: the kernel builds its group table from the routing map (SmallMmArgs::routing_map),
// with a row -> token table of kMaxRoutedSlots entries.
template <int NT, bool kFp8, bool kRouted = false>
struct SmallLayout {
  static constexpr int kWBytes = kTileW * kStageK;
  static constexpr int kXBytes = NT * kStageK;
  // MXFP8 scale words: 64 weight rows x 2 words (512 B), then NT tokens x 2 words (<= 256 B).
  static constexpr int kScaleBytes = kFp8 ? 1024 : 0;
  static constexpr int kStageBytes = kWBytes + kXBytes + kScaleBytes;
  static constexpr int kRedBytes = NT * kRedStride * 4;
  // Group tables: prefix, start, end; routed, then the row -> token table.
  static constexpr int kTableBytes = (3 * kMaxGroups + 1 + (kRouted ? kMaxRoutedSlots : 0)) * 4;
  // What does not grow with the ring: alignment slack, the f32 tile, the group tables.
  static constexpr int kFixedBytes = 1024 + kRedBytes + kTableBytes;
  // The deepest ring (a stage: its buffer and two barriers) that leaves the planned CTAs per SM
  // room for the rest: bf16 7, 6 and 8 stages at tiles 8, 16, 32; MXFP8 4 at tiles 8 and 16
  // (3 at 32, a width only a forced config launches).
  static constexpr int kPlannedCtasPerSm = kFp8 ? kFp8CtasPerSm : bf16_ctas_per_sm(NT);
  static constexpr int ring_stages(int fixed_bytes) {
    return (kSmemPerSm / kPlannedCtasPerSm - kSmemReservedPerCta - fixed_bytes) /
           (kStageBytes + 2 * 8);
  }
  static constexpr int kStages = ring_stages(kFixedBytes);
  static constexpr int kBarBytes = 2 * kStages * 8;
  // MXFP8, in each stage's scale area past the copied words: a pair of words of 0x7F bytes
  // (scale 1) that padding token columns read.
  static constexpr int kOneScaleAt = kWBytes + kXBytes + kScaleBytes - 8;
  static_assert(!kFp8 || kWBytes + kXBytes + 2 * kTileW * 4 + NT * 8 <= kOneScaleAt,
                "the copied scale words reach the scale-1 words");
  static constexpr int kSmemBytes = kFixedBytes + kStages * kStageBytes + kBarBytes;
  static_assert(kStageBytes % 1024 == 0, "stage buffers keep the 1024-byte swizzle alignment");
  static_assert(!kRouted || kRedBytes >= 2 * kMaxRoutedSlots * 4,
                "routed: the f32 tile holds the set-up's scratch");
  static_assert(!kRouted || kStages == ring_stages(kFixedBytes - kMaxRoutedSlots * 4),
                "the routed table costs a stage");
  static_assert(kStages >= 3, "a ring too shallow to stream");
  static_assert(kSmemBytes <= 227 * 1024, "exceeds the 227 KB of shared memory per block");
  // Every ring leaves its planned CTAs per SM room: 228 KB per SM, 1 KB of it reserved per CTA.
  static_assert(kPlannedCtasPerSm * (kSmemBytes + kSmemReservedPerCta) <= kSmemPerSm,
                "the ring costs a CTA per SM");
  // The launch bound: MXFP8 tiles up to kMaxFp8TokenTile (the widths the host picks) promise
  // ptxas the planned CTAs per SM, so their registers fit them.
  static constexpr int kMinCtasPerSm = kFp8 && NT <= kMaxFp8TokenTile ? kPlannedCtasPerSm : 1;
};

struct SmallParams {
  const uint8_t* a;        // [a_rows, k_bytes]
  const uint8_t* a_scale;  // [a_rows, ks]
  const int32_t* a_row_index;
  const uint8_t* b_scale;  // [groups * n, ks]
  const float* bias;
  __nv_bfloat16* c;
  const int32_t* offsets;
  const int32_t* row_map;
  int rows, a_rows, n, k_bytes, ks, groups, ldc;
  int k_blocks;     // stages of kStageK bytes over k
  int n_tiles;      // weight tiles per group
  int out_cols;     // columns of c written
  int activation;   // -1 = none
  int gated_halves; // gated activation with the halves layout: the tile's rows are gate | up
  float alpha, limit;
  int splits;
  int weights_before_wait;  // SmallMmArgs::weights_before_wait
};

// SmallMmArgs::routing_map and its two numbers, a kernel parameter of its own: growing SmallParams
// moved ptxas's register allocation in the unchanged MXFP8 kernels (16-token: a spill).
struct SmallRouting {
  const int32_t* map;  // or null
  int topk, expert_start;
};

// Global weight row (inside the group) of tile row m: gate rows then up rows for the halves
// layout, consecutive rows otherwise (the interleaved layout pairs 2i, 2i + 1 inside the tile).
__device__ __forceinline__ int weight_row(const SmallParams& p, int tile, int m) {
  if (p.gated_halves)
    return m < kHalfTileW ? tile * kHalfTileW + m : p.n / 2 + tile * kHalfTileW + (m - kHalfTileW);
  return tile * kTileW + m;
}

__device__ __forceinline__ float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

struct Item {
  int group, row0, row_end, tile;
};

// Item w of group g is (tile, unit) = divmod(w - prefix[g] * n_tiles, units of g): the units of
// one group that share a weight tile are consecutive items, so CTAs running them side by side
// read the tile from DRAM once and from L2 after (a group over the token tile costs L2 traffic,
// not DRAM bytes).
template <int NT>
__device__ __forceinline__ Item decode_item(int w, const int* prefix, const int* start,
                                            const int* end, int groups, int n_tiles) {
  const int u = w / n_tiles;
  int lo = 0, hi = groups - 1;  // largest g with prefix[g] <= u: the group that owns item w
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= u) lo = mid;
    else hi = mid - 1;
  }
  const int units = prefix[lo + 1] - prefix[lo];
  const int local = w - prefix[lo] * n_tiles;
  const int tile = local / units;
  const int row0 = start[lo] + (local - tile * units) * NT;
  return Item{lo, row0, min(end[lo], row0 + NT), tile};
}

// Source row of token row `row` (or -1: not computed, not written). s_token: the routed table.
__device__ __forceinline__ int source_row(const SmallParams& p, bool routed, const int* s_token,
                                          int row, int row_end) {
  if (row >= row_end) return -1;
  if (routed) return s_token[row];
  if (p.a_row_index == nullptr) return row;
  const int s = p.a_row_index[row];
  return (s >= 0 && s < p.a_rows) ? s : -1;
}

// build_group_tiles (group_tiles.cuh) from the routing instead of the offsets, for
// SmallMmArgs::routing_map: the groups and rows that permute lays out at alignment 1 (local group
// g = id - expert_start of each of `slots` entries, groups in order, a group's rows in slot
// order), and s_token[row] = the token (slot / topk) whose row it is. Every thread of the block
// calls this (it ends with a __syncthreads). scratch: 2 * slots ints.
__device__ __forceinline__ void build_routed_group_tiles(const SmallParams& p,
                                                         const SmallRouting& r, int tile_rows,
                                                         int* s_start, int* s_end, int* s_prefix,
                                                         int* s_token, int* scratch) {
  const int tid = threadIdx.x, lane = tid & 31;
  const int slots = p.a_rows * r.topk, groups = p.groups;
  int* slot_group = scratch;
  int* slot_rank = scratch + slots;
  for (int g = tid; g < groups; g += blockDim.x) s_end[g] = 0;  // rows per group, counted below
  for (int s = tid; s < slots; s += blockDim.x) {
    // Unsigned: ids below expert_start wrap past the groups, and nothing overflows. The plan keeps
    // the local experts inside [0, num_experts), so this is permute's rule for ids out of range.
    const unsigned g = unsigned(r.map[s]) - unsigned(r.expert_start);
    slot_group[s] = g < unsigned(groups) ? int(g) : -1;
  }
  __syncthreads();
  if (tid < 32) {  // warp 0 walks the slots in order: a slot's rank is its group's rows so far
    for (int base = 0; base < slots; base += 32) {
      const int s = base + lane;
      const int g = s < slots ? slot_group[s] : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, g);
      if (g >= 0) slot_rank[s] = s_end[g] + __popc(peers & ((1u << lane) - 1u));
      __syncwarp();
      if (g >= 0 && lane == __ffs(peers) - 1) s_end[g] += __popc(peers);
      __syncwarp();
    }
  }
  __syncthreads();
  for (int g = tid; g < groups; g += blockDim.x)
    s_prefix[g + 1] = (s_end[g] + tile_rows - 1) / tile_rows;
  __syncthreads();
  if (tid < 32) {
    // Warp 0, one pass over both: units -> the unit prefix (as build_group_tiles), rows -> each
    // group's end row. A lane takes a contiguous run of groups.
    const int run = (groups + 31) / 32;
    const int g0 = min(groups, lane * run), g1 = min(groups, g0 + run);
    int units = 0, rows = 0;
    for (int g = g0; g < g1; ++g) {
      units += s_prefix[g + 1];
      rows += s_end[g];
    }
    int units_before = warp_inclusive_scan(units) - units;
    int rows_before = warp_inclusive_scan(rows) - rows;
    for (int g = g0; g < g1; ++g) {
      units_before += s_prefix[g + 1];
      s_prefix[g + 1] = units_before;
      rows_before += s_end[g];
      s_end[g] = rows_before;
    }
    if (lane == 0) s_prefix[0] = 0;
  }
  __syncthreads();
  for (int g = tid; g < groups; g += blockDim.x) s_start[g] = g > 0 ? s_end[g - 1] : 0;
  for (int s = tid; s < slots; s += blockDim.x) {
    const int g = slot_group[s];
    if (g >= 0) s_token[(g > 0 ? s_end[g - 1] : 0) + slot_rank[s]] = s / r.topk;
  }
  __syncthreads();
}

// One stage of an item's weight tile by TMA: k-block kb of weight rows b_row0.. (first 32 tile
// rows) and b_row1.. (last 32: the up half of a gated tile) into `st`, arming `bar` with its
// bytes. Coordinates in bf16 units (an e4m3 tensor is mapped as pairs of bytes).
template <int kWBytes>
__device__ __forceinline__ void load_weight_stage(const CUtensorMap* tm_b, uint8_t* st,
                                                  uint64_t* bar, int kb, int b_row0, int b_row1) {
  ptx::mbar_arrive_expect_tx(bar, kWBytes);
  ptx::tma_load_2d(st, tm_b, bar, kb * (kStageK / 2), b_row0);
  ptx::tma_load_2d(st + kWBytes / 2, tm_b, bar, kb * (kStageK / 2), b_row1);
}

template <int NT, bool kFp8, bool kRouted>
__global__ void __launch_bounds__(kThreads, SmallLayout<NT, kFp8, kRouted>::kMinCtasPerSm)
    grouped_mm_small_kernel(const __grid_constant__ CUtensorMap tm_b, const SmallParams p,
                            const SmallRouting routing) {
  using L = SmallLayout<NT, kFp8, kRouted>;
  constexpr int kAcc = NT / 2;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);
  constexpr int kStages = L::kStages;
  float* red = reinterpret_cast<float*>(smem + kStages * L::kStageBytes);  // [NT][kRedStride]
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * L::kStageBytes + L::kRedBytes);
  uint64_t* empty = full + kStages;
  int* s_prefix = reinterpret_cast<int*>(empty + kStages);  // [groups + 1]
  int* s_start = s_prefix + kMaxGroups + 1;
  int* s_end = s_start + kMaxGroups;
  int* s_token = s_end + kMaxGroups;  // kRouted: [kMaxRoutedSlots]

  const int tid = threadIdx.x;
  const int groups = p.groups;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbar_init(&full[s], 1 + 32);  // producer lane 0's expect_tx + 32 cp.async arrivals
      ptx::mbar_init(&empty[s], 4);      // one arrival per consumer warp
      if constexpr (kFp8) {  // the scale-1 words of padding token columns (never copied over)
        uint32_t* one = reinterpret_cast<uint32_t*>(smem + s * L::kStageBytes + L::kOneScaleAt);
        one[0] = one[1] = kScaleOneWord;
      }
    }
    ptx::mbar_fence_init();
  }
  if (tid == kConsumerThreads) ptx::tma_prefetch_map(&tm_b);
  // Launch overlap. The next kernel (FC2 after FC1, unpermute after FC2) may start as SMs free
  // up once every CTA of this one has let it (griddep_launch_dependents) or exited. It reads
  // before its own wait what it takes to have been complete before this kernel started (FC2:
  // the routing kernel's offsets and row map), yet this kernel may itself have started before
  // the kernel ahead completed. So a CTA lets the next kernel launch only after one of its
  // threads has waited for the kernel ahead, and a routed CTA, which reads nothing from it,
  // still waits before it exits.
  // Routed: nothing this kernel reads comes from the kernel ahead, so its weights and tokens load
  // from the start; the consumers wait before their first store.
  if constexpr (kRouted) {
    build_routed_group_tiles(p, routing, NT, s_start, s_end, s_prefix, s_token,
                             reinterpret_cast<int*>(red));
  } else {
    if (!p.weights_before_wait) {  // the offsets may come from the kernel ahead
      ptx::griddep_wait();
      ptx::griddep_launch_dependents();
    }
    build_group_tiles(p.offsets, groups, p.rows, NT, s_start, s_end, s_prefix);
  }

  const int S = p.splits;
  const int rank = S > 1 ? int(cg::this_cluster().block_rank()) : 0;
  const int first_item = blockIdx.x / S, item_stride = gridDim.x / S;
  const int total_items = s_prefix[groups] * p.n_tiles;
  const int kb_begin = rank * p.k_blocks / S, kb_end = (rank + 1) * p.k_blocks / S;
  const int64_t b_scale_end = int64_t(groups) * p.n * p.ks;
  const int64_t a_scale_end = int64_t(p.a_rows) * p.ks;

  int stage = 0;
  uint32_t phase = 0;
  if (tid >= kConsumerThreads) {
    // ---- producer warp ----
    const int lane = tid - kConsumerThreads;
    // Weight stages of the first item already in flight (loaded before the wait; fresh ring, so
    // k-block kb_begin + i sits in stage i).
    int prefilled = 0;
    if (p.weights_before_wait && first_item < total_items) {
      const Item it = decode_item<NT>(first_item, s_prefix, s_start, s_end, groups, p.n_tiles);
      prefilled = min(kStages, kb_end - kb_begin);
      if (lane == 0) {
        const int b_row0 = it.group * p.n + weight_row(p, it.tile, 0);
        const int b_row1 = it.group * p.n + weight_row(p, it.tile, kHalfTileW);
        for (int i = 0; i < prefilled; ++i)
          load_weight_stage<L::kWBytes>(&tm_b, smem + i * L::kStageBytes, &full[i], kb_begin + i,
                                        b_row0, b_row1);
      }
    }
    if (p.weights_before_wait) ptx::griddep_wait();  // a / a_scale come from the kernel ahead
    for (int w = first_item; w < total_items; w += item_stride) {
      const Item it = decode_item<NT>(w, s_prefix, s_start, s_end, groups, p.n_tiles);
      // Token chunk i of this lane: token lane / 8 + 4 i, 16-byte chunk lane % 8 of the k slice.
      // What a stage copies is an item's address plus the stage's offset: the per-row address
      // work is done here, once per item (MXFP8 decode measured its single producer warp at ~290
      // instructions per stage with it in the k loop; bench/NOTES.md v14).
      const int chunk = lane & 7;
      const uint8_t* x_src[NT / 4];
#pragma unroll
      for (int i = 0; i < NT / 4; ++i) {
        const int s = source_row(p, kRouted, s_token, it.row0 + lane / 8 + 4 * i, it.row_end);
        x_src[i] = s < 0 ? nullptr : p.a + int64_t(s) * p.k_bytes + chunk * 16;
      }
      // MXFP8: the scale words this lane copies, wd = lane + 32 i: weight rows wd / 2 of the
      // tile, then the tokens' (padding tokens read as zero, then get the scale-1 words).
      constexpr int kWWords = kFp8 ? 2 * kTileW / 32 : 1, kXWords = kFp8 ? (2 * NT + 31) / 32 : 1;
      ScaleWordCursor w_scale[kWWords], x_scale[kXWords];
      if constexpr (kFp8) {
#pragma unroll
        for (int i = 0; i < kWWords; ++i) {
          const int wd = lane + 32 * i;
          const int64_t row = int64_t(it.group) * p.n + weight_row(p, it.tile, wd >> 1);
          w_scale[i] = scale_word_cursor(p.b_scale, row, p.ks, b_scale_end, wd & 1);
        }
#pragma unroll
        for (int i = 0; i < kXWords; ++i) {
          const int wd = lane + 32 * i, t = wd >> 1;
          const int s = t < NT ? source_row(p, kRouted, s_token, it.row0 + t, it.row_end) : -1;
          x_scale[i] = scale_word_cursor(p.a_scale, s, p.ks, a_scale_end, wd & 1);
        }
      }
      const int b_row0 = it.group * p.n + weight_row(p, it.tile, 0);
      const int b_row1 = it.group * p.n + weight_row(p, it.tile, kHalfTileW);
      for (int kb = kb_begin; kb < kb_end; ++kb) {
        ptx::mbar_wait(&empty[stage], phase ^ 1);
        uint8_t* st = smem + stage * L::kStageBytes;
        if (prefilled > 0) {
          --prefilled;
        } else if (lane == 0) {
          load_weight_stage<L::kWBytes>(&tm_b, st, &full[stage], kb, b_row0, b_row1);
        }
        uint8_t* xs = st + L::kWBytes;
        const bool k_in = kb * kStageK + chunk * 16 < p.k_bytes;
#pragma unroll
        for (int i = 0; i < NT / 4; ++i) {
          const int t = lane / 8 + 4 * i;
          const bool ok = x_src[i] != nullptr && k_in;
          // 128-byte swizzle, as TMA writes it: chunk c of row t lands at chunk c ^ (t % 8).
          ptx::cp_async_16_zfill(xs + t * 128 + ((chunk ^ (t & 7)) * 16),
                                 ok ? x_src[i] + kb * kStageK : p.a, ok);
        }
        if constexpr (kFp8) {
          uint32_t* sw = reinterpret_cast<uint32_t*>(xs + L::kXBytes);  // [64][2]
          uint32_t* sx = sw + 2 * kTileW;                                // [NT][2]
#pragma unroll
          for (int i = 0; i < kWWords; ++i) copy_scale_word_at(sw + lane + 32 * i, w_scale[i], kb);
#pragma unroll
          for (int i = 0; i < kXWords; ++i)
            if (lane + 32 * i < 2 * NT) copy_scale_word_at(sx + lane + 32 * i, x_scale[i], kb);
        }
        ptx::cp_async_mbar_arrive_noinc(&full[stage]);
        ptx::next_stage<kStages>(stage, phase);
      }
      if (S > 1) {  // the consumers' two cluster barriers of this item
        cg::this_cluster().sync();
        cg::this_cluster().sync();
      }
    }
    return;
  }

  // ---- consumer warpgroup ----
  // Nothing before the first full stage needs the kernel ahead; waiting here keeps every global
  // store of this kernel after it (the producer's tokens arrive after its own wait anyway).
  if (p.weights_before_wait) {
    ptx::griddep_wait();
    ptx::griddep_launch_dependents();
  }
  const int warp = tid / 32, lane = tid & 31, q = lane & 3;
  const int r0 = warp * 16 + lane / 4;  // fragment rows r0, r0 + 8 (weight rows of the tile)
  // Stage 0's wgmma descriptors; stage s and k step kk add (s * kStageBytes + 32 kk) >> 4 (the
  // address field counts 16-byte units, and no shared address carries out of its 14 bits).
  const uint64_t desc_w0 = ptx::wgmma_desc_sw128(ptx::smem_addr(smem));
  const uint64_t desc_x0 = ptx::wgmma_desc_sw128(ptx::smem_addr(smem + L::kWBytes));
  for (int w = first_item; w < total_items; w += item_stride) {
    const Item it = decode_item<NT>(w, s_prefix, s_start, s_end, groups, p.n_tiles);
    float acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
    // MXFP8: where each of this thread's weight rows (h = 0, 1) and tokens (j: token
    // 8 (j / 2) + 2q + (j % 2)) finds its pair of scale words in a stage, and the bit shift of
    // its first byte in them. Padding tokens read the stage's scale-1 words: their operands are
    // zero-filled, and a finite scale keeps their products zero.
    constexpr int kWords = 2 + NT / 4;
    int word_at[kWords], word_shift[kWords];
    if constexpr (kFp8) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = r0 + 8 * h;
        const int64_t row = int64_t(it.group) * p.n + weight_row(p, it.tile, m);
        word_at[h] = 8 * m;
        word_shift[h] = 8 * scale_skew(row, p.ks);
      }
#pragma unroll
      for (int j = 0; j < NT / 4; ++j) {
        const int t = 8 * (j / 2) + 2 * q + (j % 2);
        const int s = source_row(p, kRouted, s_token, it.row0 + t, it.row_end);
        word_at[2 + j] = s < 0 ? L::kOneScaleAt - L::kWBytes - L::kXBytes : 2 * kTileW * 4 + 8 * t;
        word_shift[2 + j] = s < 0 ? 0 : 8 * scale_skew(s, p.ks);
      }
    }
    int prev_stage = -1;
    for (int kb = kb_begin; kb < kb_end; ++kb) {
      ptx::mbar_wait(&full[stage], phase);
      // The token tile was written by cp.async (generic proxy); wgmma reads through the async
      // proxy.
      ptx::fence_proxy_async_smem();
      if constexpr (!kFp8) {
        const uint64_t desc_w = desc_w0 + uint32_t(stage * (L::kStageBytes >> 4));
        const uint64_t desc_x = desc_x0 + uint32_t(stage * (L::kStageBytes >> 4));
#pragma unroll
        for (int i = 0; i < kAcc; ++i) ptx::wgmma_fence_operand(acc[i]);
        ptx::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kStageK / 32; ++kk)
          ptx::wgmma_m64k16_bf16_narrow<NT>(acc, desc_w + 2 * kk, desc_x + 2 * kk, 1);
        ptx::wgmma_commit();
#pragma unroll
        for (int i = 0; i < kAcc; ++i) ptx::wgmma_fence_operand(acc[i]);
        ptx::wgmma_wait<1>();  // the previous stage's group is complete: release its stage
        if (prev_stage >= 0 && lane == 0) ptx::mbar_arrive(&empty[prev_stage]);
        prev_stage = stage;
      } else {
        const uint8_t* sc = smem + stage * L::kStageBytes + L::kWBytes + L::kXBytes;
        // The stage's scales, each row's or token's 4 bytes as one word (mx_scale_words.cuh).
        uint32_t word[kWords];
#pragma unroll
        for (int i = 0; i < kWords; ++i) {
          const uint2 pair = *reinterpret_cast<const uint2*>(sc + word_at[i]);
          word[i] = __funnelshift_r(pair.x, pair.y, word_shift[i]);
        }
        const int nkb = p.ks - kb * (kStageK / 32);  // scale blocks left in the row
        if (nkb < kStageK / 32) {
          // A last stage past k: its bytes beyond the row's end belong to the next row (possibly
          // NaN); its operands there are zero-filled, so scale 1 keeps those products zero.
          const uint32_t keep = (1u << (8 * nkb)) - 1u;
#pragma unroll
          for (int i = 0; i < kWords; ++i) word[i] = (word[i] & keep) | (kScaleOneWord & ~keep);
        }
        // Whether every scale byte of the thread's words is in [64, 191], as all but extreme
        // scales are: then a product of two scales is one integer add of their f32 exponent
        // fields (mx_scale_words.cuh), else the bytes are decoded and multiplied.
        uint32_t in_range = ~0u;
#pragma unroll
        for (int i = 0; i < kWords; ++i) in_range &= e8m0x4_in_product_range(word[i]);
        // The four k32 blocks go to four temporaries in one wgmma group and one wait: waiting
        // after each block (v1) exposed four wgmma latencies per stage. All four run even in a
        // last, partial stage (wgmma inside a branch is serialised by ptxas): past k both
        // operands were zero-filled, so those temporaries are exact zeros, times scale 1.
        // The descriptors step in their low word (ptx::wgmma_desc_sw128_lo), in 32 bits.
        const uint32_t lo_w = uint32_t(desc_w0) + uint32_t(stage * (L::kStageBytes >> 4));
        const uint32_t lo_x = uint32_t(desc_x0) + uint32_t(stage * (L::kStageBytes >> 4));
        float t[kStageK / 32][kAcc];
#pragma unroll
        for (int j4 = 0; j4 < kStageK / 32; ++j4)
#pragma unroll
          for (int i = 0; i < kAcc; ++i) {
            t[j4][i] = 0.0f;
            ptx::wgmma_fence_operand(t[j4][i]);
          }
        ptx::wgmma_fence();
#pragma unroll
        for (int j4 = 0; j4 < kStageK / 32; ++j4)
          ptx::wgmma_m64k32_e4m3_narrow<NT>(t[j4], ptx::wgmma_desc_sw128_lo(lo_w + 2 * j4),
                                            ptx::wgmma_desc_sw128_lo(lo_x + 2 * j4), 0);
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();
#pragma unroll
        for (int j4 = 0; j4 < kStageK / 32; ++j4)
#pragma unroll
          for (int i = 0; i < kAcc; ++i) ptx::wgmma_fence_operand(t[j4][i]);
        // Every wgmma of this stage is complete and its scale words are in registers: release it
        // before the promotion, which reads registers only, so the producer refills it sooner.
        __syncwarp();
        if (lane == 0) ptx::mbar_arrive(&empty[stage]);
        // acc += t * (scale_w * scale_x): the scales' product first, since a sum of 32 e4m3
        // products reaches 2^22.6, and times one extreme scale alone (2^111 against a token's
        // 2^-127) it overflows where the dequantized products are finite. Both branches give
        // that product's f32 bits, so the same sums.
        if ((in_range & 0x80808080u) == 0x80808080u) {
          uint32_t field[kWords][kStageK / 32];
#pragma unroll
          for (int i = 0; i < kWords; ++i) {
            field[i][0] = e8m0_exponent_field<0>(word[i]);
            field[i][1] = e8m0_exponent_field<1>(word[i]);
            field[i][2] = e8m0_exponent_field<2>(word[i]);
            field[i][3] = e8m0_exponent_field<3>(word[i]);
          }
#pragma unroll
          for (int j4 = 0; j4 < kStageK / 32; ++j4)
#pragma unroll
            for (int j = 0; j < NT / 4; ++j) {
              const int a0 = 4 * (j / 2) + (j % 2);
              const uint32_t x = field[2 + j][j4] - kE8m0BiasField;
              acc[a0] = fmaf(t[j4][a0], __uint_as_float(field[0][j4] + x), acc[a0]);
              acc[a0 + 2] = fmaf(t[j4][a0 + 2], __uint_as_float(field[1][j4] + x), acc[a0 + 2]);
            }
        } else {
          float f[kWords][kStageK / 32];
#pragma unroll
          for (int i = 0; i < kWords; ++i) {
            const uint32_t special = e8m0x4_special(word[i]);
            f[i][0] = e8m0x4_to_f32<0>(word[i], special);
            f[i][1] = e8m0x4_to_f32<1>(word[i], special);
            f[i][2] = e8m0x4_to_f32<2>(word[i], special);
            f[i][3] = e8m0x4_to_f32<3>(word[i], special);
          }
#pragma unroll
          for (int j4 = 0; j4 < kStageK / 32; ++j4)
#pragma unroll
            for (int j = 0; j < NT / 4; ++j) {
              const int a0 = 4 * (j / 2) + (j % 2);
              acc[a0] = fmaf(t[j4][a0], f[0][j4] * f[2 + j][j4], acc[a0]);
              acc[a0 + 2] = fmaf(t[j4][a0 + 2], f[1][j4] * f[2 + j][j4], acc[a0 + 2]);
            }
        }
      }
      ptx::next_stage<kStages>(stage, phase);
    }
    if constexpr (!kFp8) {
      ptx::wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < kAcc; ++i) ptx::wgmma_fence_operand(acc[i]);
      if (prev_stage >= 0 && lane == 0) ptx::mbar_arrive(&empty[prev_stage]);
    }

    // ---- epilogue ----
    // Routed: the kernel ahead completes before this one's first store, and before the next
    // kernel launches (above). Free after the first item.
    if constexpr (kRouted) {
      ptx::griddep_wait();
      ptx::griddep_launch_dependents();
    }
    // Fragment -> red[token][weight row] (f32).
#pragma unroll
    for (int j = 0; j < NT / 8; ++j) {
      const int t = 8 * j + 2 * q;
      red[t * kRedStride + r0] = acc[4 * j + 0];
      red[(t + 1) * kRedStride + r0] = acc[4 * j + 1];
      red[t * kRedStride + r0 + 8] = acc[4 * j + 2];
      red[(t + 1) * kRedStride + r0 + 8] = acc[4 * j + 3];
    }
    if (S > 1) cg::this_cluster().sync();
    else asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");

    const bool gated = p.activation >= FMOE_ACT_SILU;
    const int tile_cols = gated ? kHalfTileW : kTileW;  // output columns of this tile
    const int vec_per_token = tile_cols / 8;
    const int col_base = it.tile * tile_cols;
    const float* bias = p.bias ? p.bias + int64_t(it.group) * p.n : nullptr;
    for (int v = rank * kConsumerThreads + tid; v < NT * vec_per_token;
         v += S * kConsumerThreads) {
      const int t = v / vec_per_token, o0 = (v - t * vec_per_token) * 8;
      const int row = it.row0 + t;
      const int col = col_base + o0;
      if (col >= p.out_cols || source_row(p, kRouted, s_token, row, it.row_end) < 0) continue;
      if (p.row_map != nullptr && p.row_map[row] == -1) continue;
      // Tile rows feeding the 8 outputs: m(o) = o (plain), o and 32 + o (halves), 2o and 2o + 1
      // (interleaved).
      float x[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) x[i] = 0.0f;
      for (int s = 0; s < S; ++s) {  // rank order: the same sum on every run
        const float* src = S > 1 ? cg::this_cluster().map_shared_rank(red, s) : red;
        src += t * kRedStride;
        if (!gated) {
          const float4 u0 = *reinterpret_cast<const float4*>(src + o0);
          const float4 u1 = *reinterpret_cast<const float4*>(src + o0 + 4);
          x[0] += u0.x; x[1] += u0.y; x[2] += u0.z; x[3] += u0.w;
          x[4] += u1.x; x[5] += u1.y; x[6] += u1.z; x[7] += u1.w;
        } else if (p.gated_halves) {  // x[0..7] gate, x[8..15] up
          const float4 g0 = *reinterpret_cast<const float4*>(src + o0);
          const float4 g1 = *reinterpret_cast<const float4*>(src + o0 + 4);
          const float4 u0 = *reinterpret_cast<const float4*>(src + kHalfTileW + o0);
          const float4 u1 = *reinterpret_cast<const float4*>(src + kHalfTileW + o0 + 4);
          x[0] += g0.x; x[1] += g0.y; x[2] += g0.z; x[3] += g0.w;
          x[4] += g1.x; x[5] += g1.y; x[6] += g1.z; x[7] += g1.w;
          x[8] += u0.x; x[9] += u0.y; x[10] += u0.z; x[11] += u0.w;
          x[12] += u1.x; x[13] += u1.y; x[14] += u1.z; x[15] += u1.w;
        } else {  // interleaved: tile rows 2o0 .. 2o0 + 15 alternate gate, up
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            const float4 z = *reinterpret_cast<const float4*>(src + 2 * o0 + 4 * h);
            x[2 * h] += z.x;      // gate of output 2h
            x[8 + 2 * h] += z.y;  // up of output 2h
            x[2 * h + 1] += z.z;  // gate of output 2h + 1
            x[8 + 2 * h + 1] += z.w;
          }
        }
      }
      uint16_t out[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (!gated) {
          const int wr = col + i;  // plain tile: weight row == output column
          const float h = x[i] + (bias ? __ldg(bias + wr) : 0.0f);
          out[i] = p.activation < 0 ? f32_to_bf16(h)
                                    : f32_to_bf16(activation_value(p.activation, round_bf16(h),
                                                                   0.f, p.alpha, p.limit));
        } else {
          const int o = col + i;
          const int wg = p.gated_halves ? o : 2 * o;
          const int wu = p.gated_halves ? p.n / 2 + o : 2 * o + 1;
          const float g = round_bf16(x[i] + (bias ? __ldg(bias + wg) : 0.0f));
          const float u = round_bf16(x[8 + i] + (bias ? __ldg(bias + wu) : 0.0f));
          out[i] = f32_to_bf16(activation_value(p.activation, g, u, p.alpha, p.limit));
        }
      }
      uint4 packed;
      packed.x = uint32_t(out[0]) | (uint32_t(out[1]) << 16);
      packed.y = uint32_t(out[2]) | (uint32_t(out[3]) << 16);
      packed.z = uint32_t(out[4]) | (uint32_t(out[5]) << 16);
      packed.w = uint32_t(out[6]) | (uint32_t(out[7]) << 16);
      *reinterpret_cast<uint4*>(p.c + int64_t(row) * p.ldc + col) = packed;
    }
    // The tile is rewritten by the next item (and, split-K, read by the other ranks until here).
    if (S > 1) cg::this_cluster().sync();
    else asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
  }
  if constexpr (kRouted) ptx::griddep_wait();  // a CTA without items: done after the kernel ahead
}

bool aligned(const void* ptr, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0;
}

bool is_gated(const SmallMmArgs& a) { return a.epilogue.activation >= FMOE_ACT_SILU; }

int64_t out_cols(const SmallMmArgs& a) { return is_gated(a) ? a.n / 2 : a.n; }

int64_t tiles_per_group(const SmallMmArgs& a) {
  return is_gated(a) ? (a.n / 2 + kHalfTileW - 1) / kHalfTileW : (a.n + kTileW - 1) / kTileW;
}

int64_t k_bytes(const SmallMmArgs& a) {
  return a.format == FMOE_WEIGHTS_MXFP8 ? a.k : 2 * a.k;
}

// Stages of kStageK bytes in a row of b.
int64_t k_stages(const SmallMmArgs& a) { return (k_bytes(a) + kStageK - 1) / kStageK; }

// MXFP8's widest token tile: 8 while the groups average at most kFp8NarrowRows rows, else
// kMaxFp8TokenTile; FMOE_MX_DECODE_TILE=8|16 forces one (comparisons).
int fp8_token_tile_cap(const SmallMmArgs& a) {
  static const int forced = [] {
    const char* e = std::getenv("FMOE_MX_DECODE_TILE");
    const int v = e ? std::atoi(e) : 0;
    return v == 8 || v == 16 ? v : 0;
  }();
  if (forced) return forced;
  return a.rows <= kFp8NarrowRows * a.groups ? 8 : kMaxFp8TokenTile;
}

// Whether the MXFP8 grid launches one CTA per item (kFp8PerItemMinKBlocks);
// FMOE_MX_DECODE_GRID=items|persistent forces one (comparisons).
bool fp8_grid_per_item(const SmallMmArgs& a, int splits) {
  static const int forced = [] {
    const char* e = std::getenv("FMOE_MX_DECODE_GRID");
    if (!e) return 0;
    return std::strcmp(e, "items") == 0 ? 1 : std::strcmp(e, "persistent") == 0 ? -1 : 0;
  }();
  if (forced) return forced > 0;
  return k_stages(a) / splits >= kFp8PerItemMinKBlocks;
}

int token_tile_for(int64_t max_rows) { return max_rows <= 8 ? 8 : (max_rows <= 16 ? 16 : 32); }

// The token tile the configuration picks. MXFP8 promotes every k32 block per token column: its
// consumer's work grows with the token tile, so it stops at 8 or 16 and a larger group takes
// several units (consecutive items, the weight tile read again from L2). bf16's consumer is cheap
// at any width.
int token_tile_of(const SmallMmArgs& a) {
  const bool fp8 = a.format == FMOE_WEIGHTS_MXFP8;
  return token_tile_for(std::min<int64_t>(a.max_rows_per_group, fp8 ? fp8_token_tile_cap(a) : 32));
}

// Host bound of the unit count: one unit per used group while groups respect the token tile
// (used groups <= min(groups, rows)), plus rows / tile when they may not.
int64_t units_bound(const SmallMmArgs& a, int token_tile) {
  int64_t u = std::min(a.groups, a.rows);
  if (a.max_rows_per_group > token_tile) u += a.rows / token_tile;
  return u;
}

// The grid, in CTAs: one per item where MXFP8 items are long (fp8_grid_per_item), else
// persistent (as many as stay resident, at most one per item); times the split-K cluster.
int grid_for(const SmallMmArgs& a, int token_tile, bool fp8, int ctas_per_sm, int splits,
             int num_sms) {
  const int64_t items = units_bound(a, token_tile) * tiles_per_group(a);
  const int64_t resident =
      std::max<int64_t>(1, int64_t(std::max(ctas_per_sm, 1)) * num_sms / splits);
  const bool per_item = fp8 && fp8_grid_per_item(a, splits);
  return int(std::max<int64_t>(1, per_item ? items : std::min(items, resident)) * splits);
}

template <int NT, bool kFp8, bool kRouted>
cudaError_t launch(const SmallMmArgs& a, SmallMmConfig cfg, int num_sms, cudaStream_t stream) {
  using L = SmallLayout<NT, kFp8, kRouted>;
  const int64_t kb = k_bytes(a);
  CUtensorMap tm_b;
  // An e4m3 tensor is mapped as bf16 pairs: a plain tile copy moves bytes whatever their type.
  cudaError_t err = make_tensor_map_bf16_2d_sw128(&tm_b, a.b, uint64_t(kb / 2),
                                                  uint64_t(a.groups * a.n), uint64_t(kb),
                                                  kStageK / 2, kHalfTileW);
  if (err != cudaSuccess) return err;

  SmallParams p;
  p.a = static_cast<const uint8_t*>(a.a);
  p.a_scale = a.a_scale;
  p.a_row_index = a.a_row_index;
  p.b_scale = a.b_scale;
  p.bias = a.bias;
  p.c = static_cast<__nv_bfloat16*>(a.c);
  p.offsets = a.group_offsets;
  p.row_map = a.routing_map ? nullptr : a.row_map;
  p.rows = int(a.rows);
  p.a_rows = int(a.a_row_index || a.routing_map ? a.a_rows : a.rows);
  p.n = int(a.n);
  p.k_bytes = int(kb);
  p.ks = kFp8 ? int(a.k / 32) : 0;
  p.groups = int(a.groups);
  p.ldc = int(a.ldc);
  p.k_blocks = int(k_stages(a));
  p.n_tiles = int(tiles_per_group(a));
  p.out_cols = int(out_cols(a));
  p.activation = int(a.epilogue.activation);
  p.gated_halves = is_gated(a) && a.epilogue.layout == FMOE_LAYOUT_HALVES;
  p.alpha = float(a.epilogue.alpha);
  p.limit = float(a.epilogue.limit);
  p.splits = cfg.splits;
  p.weights_before_wait = a.overlap_previous && a.weights_before_wait;

  auto kernel = grouped_mm_small_kernel<NT, kFp8, kRouted>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmemBytes);
  if (err != cudaSuccess) return err;
  if (cfg.grid <= 0) {
    int per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, L::kSmemBytes);
    if (err != cudaSuccess) return err;
    cfg.grid = grid_for(a, NT, kFp8, per_sm, cfg.splits, num_sms);
  }
  cudaLaunchConfig_t lc = {};
  lc.gridDim = dim3(unsigned(cfg.grid));
  lc.blockDim = dim3(kThreads);
  lc.dynamicSmemBytes = L::kSmemBytes;
  lc.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned num_attrs = 0;
  if (cfg.splits > 1) {
    attr[num_attrs].id = cudaLaunchAttributeClusterDimension;
    attr[num_attrs].val.clusterDim.x = unsigned(cfg.splits);
    attr[num_attrs].val.clusterDim.y = 1;
    attr[num_attrs].val.clusterDim.z = 1;
    ++num_attrs;
  }
  if (a.overlap_previous) {
    attr[num_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[num_attrs].val.programmaticStreamSerializationAllowed = 1;
    ++num_attrs;
  }
  lc.attrs = num_attrs ? attr : nullptr;
  lc.numAttrs = num_attrs;
  SmallRouting routing{a.routing_map, int(a.topk), int(a.expert_start)};
  err = cudaLaunchKernelEx(&lc, kernel, tm_b, p, routing);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <bool kFp8, bool kRouted>
cudaError_t launch_tile(const SmallMmArgs& a, SmallMmConfig cfg, int num_sms,
                        cudaStream_t stream) {
  switch (cfg.token_tile) {
    case 8: return launch<8, kFp8, kRouted>(a, cfg, num_sms, stream);
    case 16: return launch<16, kFp8, kRouted>(a, cfg, num_sms, stream);
    case 32: return launch<32, kFp8, kRouted>(a, cfg, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <int NT, bool kFp8>
void describe(SmallMmConfig* cfg, const SmallMmArgs& a, int num_sms) {
  using L = SmallLayout<NT, kFp8>;
  auto kernel = grouped_mm_small_kernel<NT, kFp8, false>;
  cfg->smem_bytes = L::kSmemBytes;
  int per_sm = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmemBytes) ==
          cudaSuccess &&
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, L::kSmemBytes) ==
          cudaSuccess) {
    cfg->ctas_per_sm = per_sm;
  } else {
    (void)cudaGetLastError();
  }
  cfg->grid = grid_for(a, NT, kFp8, cfg->ctas_per_sm, cfg->splits, num_sms);
}

}  // namespace

bool grouped_mm_small_supported(const SmallMmArgs& a) {
  const bool fp8 = a.format == FMOE_WEIGHTS_MXFP8;
  if (a.format != FMOE_WEIGHTS_BF16 && !fp8) return false;
  if (!a.a || !a.b || !a.c || (!a.group_offsets && !a.routing_map)) return false;
  // Routed: slots = a_rows * topk entries, each at most one row of c.
  if (a.routing_map && (a.topk < 1 || a.a_rows < 0 || a.expert_start < 0 ||
                        a.a_rows * a.topk > std::min<int64_t>(kMaxRoutedSlots, a.rows)))
    return false;
  if (fp8 && (!a.a_scale || !a.b_scale)) return false;
  if (a.rows < 0 || a.n < 8 || a.k < 8 || a.groups < 1 || a.groups > kMaxGroups) return false;
  if (a.max_rows_per_group < 1) return false;
  if (a.routing_map && fp8 && token_tile_of(a) != kFp8RoutedTokenTile) return false;
  const int64_t act = a.epilogue.activation;
  if (act < -1 || act > FMOE_ACT_SWIGLU_OAI) return false;
  if (is_gated(a) && a.epilogue.layout != FMOE_LAYOUT_HALVES &&
      a.epilogue.layout != FMOE_LAYOUT_INTERLEAVED)
    return false;
  if (a.n % (is_gated(a) ? 16 : 8) != 0) return false;
  if (a.k % (fp8 ? 32 : 8) != 0) return false;
  if (a.ldc < out_cols(a) || a.ldc % 8 != 0) return false;
  if (a.a_row_index && a.a_rows < 0) return false;
  if (!aligned(a.a, 16) || !aligned(a.b, 16) || !aligned(a.c, 16)) return false;
  if (a.bias && !aligned(a.bias, 4)) return false;
  if (fp8 && (!aligned(a.a_scale, 4) || !aligned(a.b_scale, 4))) return false;
  // The kernel's row, column and TMA coordinates are int32; byte offsets are 64-bit.
  if (a.rows >= INT_MAX || a.a_rows >= INT_MAX || a.groups * a.n >= INT_MAX) return false;
  if (k_bytes(a) >= INT_MAX || a.ldc >= INT_MAX) return false;
  if ((a.rows + a.groups) * tiles_per_group(a) >= INT_MAX) return false;
  return true;
}

SmallMmConfig grouped_mm_small_config(const SmallMmArgs& a, int num_sms) {
  SmallMmConfig cfg;
  const bool fp8 = a.format == FMOE_WEIGHTS_MXFP8;
  cfg.token_tile = token_tile_of(a);
  // Split-K while the items cannot give every SM two CTAs (the fewest that keep ~100 KB in
  // flight per SM) and each part keeps >= kMinStagesPerSplit stages of k (launches of shorter
  // parts measured faster whole).
  const int64_t items = units_bound(a, cfg.token_tile) * tiles_per_group(a);
  const int64_t k_blocks = k_stages(a);
  const int max_splits = fp8 ? kMaxFp8Splits : kMaxSplits;
  while (cfg.splits < max_splits && items * cfg.splits < 2 * int64_t(num_sms) &&
         k_blocks >= kMinStagesPerSplit * 2 * cfg.splits)
    cfg.splits *= 2;
  switch (cfg.token_tile) {
    case 8: fp8 ? describe<8, true>(&cfg, a, num_sms) : describe<8, false>(&cfg, a, num_sms); break;
    case 16: fp8 ? describe<16, true>(&cfg, a, num_sms) : describe<16, false>(&cfg, a, num_sms); break;
    default: fp8 ? describe<32, true>(&cfg, a, num_sms) : describe<32, false>(&cfg, a, num_sms); break;
  }
  return cfg;
}

cudaError_t grouped_mm_small_with(const SmallMmArgs& a, SmallMmConfig cfg, int num_sms,
                                  cudaStream_t stream) {
  if (cfg.splits != 1 && cfg.splits != 2 && cfg.splits != 4) return cudaErrorInvalidValue;
  if (cfg.grid > 0 && cfg.grid % cfg.splits != 0) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;  // no row can be written
  if (a.format == FMOE_WEIGHTS_MXFP8 && a.routing_map)
    return cfg.token_tile == kFp8RoutedTokenTile
               ? launch<kFp8RoutedTokenTile, true, true>(a, cfg, num_sms, stream)
               : cudaErrorInvalidValue;
  if (a.format == FMOE_WEIGHTS_MXFP8) return launch_tile<true, false>(a, cfg, num_sms, stream);
  if (a.routing_map) return launch_tile<false, true>(a, cfg, num_sms, stream);
  return launch_tile<false, false>(a, cfg, num_sms, stream);
}

cudaError_t grouped_mm_small(const SmallMmArgs& a, int num_sms, cudaStream_t stream) {
  SmallMmConfig cfg = grouped_mm_small_config(a, num_sms);
  return grouped_mm_small_with(a, cfg, num_sms, stream);
}

}  // namespace fmoe::cuda
