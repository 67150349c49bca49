// How fast the prefill GEMM's wide tile can be fed FC1's operands, and by which copies. First
// asked: whether the producer could gather FC1's A rows from `hidden` by one bulk tensor copy per
// row, instead of the permute copy writing them out first (bench/NOTES.md items 10 and 36
// gathered with cp.async from the producer warpgroup and lost 5-15% of the GEMM); then what the
// copies wait for (the ring, DRAM, the L2) and whether sharing operands between CTAs relieves the
// L2. Questions for the producer, not a kernel of the library.
//
// The pattern is FC1's at qwen3 T = 8192 (65536 routed rows, k 2048, n 1536 in 256-wide tiles,
// 128 experts' weights): persistent CTAs walk 128 x 256 tiles of k-blocks of 64 into a ring of
// four 48 KB stages (A 128 x 64, B 256 x 64, 128-byte swizzle), two consumer warpgroups wait for
// each stage and release it. No math: the time is what the copies alone cost. Tiles are dealt
// statically (CTA i takes tiles i, i + grid, ...) except in the dyn modes; static CTAs sharing a
// B tile drift apart and the cold modes read ~1.8 GB from DRAM where the library's tiles, drawn in
// order from a counter, read the operands' 1.07 GB once: those modes are bound by DRAM, FC1 is
// not, and dyn is the mode that models FC1 (bench/NOTES.md items 116, 118 and 119).
//   box          A as one 128-row box from the permuted copy (what the library does now)
//   gather-1     A as 128 one-row boxes from `hidden`, all issued by lane 0
//   gather-32    the same 128 boxes issued by the producer warp's 32 lanes, 4 each
//   box-a, gather-32-a  A alone (no B): the copy engine's rate for each way of filling A
//   box-hot      the box mode with every tile's operands in L2 (A from the first 8 row tiles, B
//                from one expert): the ring's rate when nothing comes from DRAM
//   box-3, box-hot-3  the two box modes through a ring of 3 stages: how the rate depends on the
//                bytes in flight
//   box-b4       the box mode with bands of 4 m-tiles (the tiles of about one expert) instead of 8
//   box-c2, box-c4, box-c8  the box mode launched in clusters of 2, 4 or 8 CTAs, which the hardware
//                places in one GPC (one side of the L2): the raster's consecutive tiles, which
//                mostly share a B tile, go to one cluster, so that tile's readers sit on one side
//                of the L2: whether the L2's forwarding between its sides (in box ~40% on top of
//                the SMs' requests, in box-hot ~0) follows where the readers sit
//   dyn          the box mode with tiles drawn in order from a counter, as the library draws them
//   dyn-mc2      dyn in clusters of 2 CTAs: the leader draws two consecutive tiles (mostly two row
//                tiles of one B tile), one for each CTA, and where their B tiles are the same each
//                CTA copies half of it into both CTAs' stages (`.multicast::cluster`); a stage
//                is refilled once both CTAs' consumers have released it. Whether a B tile asked
//                of the L2 once for two CTAs speeds the delivery (bench/NOTES.md item 26 tried
//                it in the GEMM on an H200, where the L2 was less loaded)
//   dyn-mc2-cta  dyn-mc2 with the releases and the producer's waits at CTA scope (a consumer only
//                vouches that it is done reading; item 26 found cluster scope 13-43% dearer)
// A one-row box lands at its row's 128-byte offset in the stage; the swizzle is a function of the
// shared-memory address, so the stage must equal the one-box fill: each consumer thread sums the
// A words it sees, weighted by their position in the stage, and every gather mode's sum must
// equal the box mode's (MISMATCH otherwise). Rows routed nowhere (-1) are asked for at row T,
// past the tensor, and read as zeros, as the permuted copy holds them.
// Run with bench/dev/run-checks.sh gather.
#include <cuda.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "check_common.cuh"
#include "cuda/ptx/cluster.cuh"
#include "cuda/ptx/mbarrier.cuh"
#include "cuda/ptx/tma.cuh"
#include "cuda/tensor_map.h"

namespace {

using namespace fmoe;

enum Mode {
  kBox = 0, kGather1, kGather32, kBoxA, kGather32A, kBoxHot, kBox3, kBoxHot3,
  kBoxB4, kBoxC2, kBoxC4, kBoxC8, kDyn, kDynMc2, kDynMc2Cta, kModes
};
const char* const kModeNames[] = {"box",     "gather-1", "gather-32", "box-a",
                                  "gather-32-a", "box-hot", "box-3", "box-hot-3",
                                  "box-b4",  "box-c2",  "box-c4",   "box-c8",
                                  "dyn",     "dyn-mc2",  "dyn-mc2-cta"};
// CTAs per cluster of each mode's launch (1: no clusters).
constexpr int kClusterCtas[kModes] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 4, 8, 1, 2, 2};

constexpr int kT = 8192, kTopk = 8, kH = 2048, kN = 1536, kExperts = 128;
constexpr int kRows = kT * kTopk;
constexpr int kBM = 128, kBN = 256, kBK = 64, kMaxStages = 4;
constexpr int kABytes = kBM * kBK * 2, kBBytes = kBN * kBK * 2, kStageBytes = kABytes + kBBytes;
constexpr int kMTiles = kRows / kBM, kNTiles = kN / kBN, kKBlocks = kH / kBK;
constexpr int kBand = 8;  // m-tiles per raster band, m fastest inside it (the GEMM's raster)
constexpr int kThreads = 384;

struct GatherArgs {
  int mode;
  int verify;                // consumers sum the A words they see
  const int32_t* row_token;  // [kRows]: the token of each routed row, or -1
  const int32_t* tile_expert;  // [kMTiles]: the expert whose weights a row tile multiplies
  uint32_t* checksum;
};

__device__ __forceinline__ void tile_of(int t, int band_tiles, int& m, int& n) {
  const int band = t / (band_tiles * kNTiles), in = t % (band_tiles * kNTiles);
  m = band * band_tiles + in % band_tiles;
  n = in / band_tiles;
}

// A consumer thread's share (ct of 256) of a stage's A words, each weighted by its position.
__device__ __forceinline__ uint32_t a_words_sum(const uint8_t* stage, int ct) {
  const uint4* words = reinterpret_cast<const uint4*>(stage);
  uint32_t acc = 0;
#pragma unroll
  for (int i = 0; i < kABytes / 16 / 256; ++i) {
    const uint32_t at = uint32_t(ct + 256 * i);
    const uint4 v = words[at];
    acc += v.x * (8 * at + 1) + v.y * (8 * at + 3) + v.z * (8 * at + 5) + v.w * (8 * at + 7);
  }
  return acc;
}

template <int kStages>
__global__ void __launch_bounds__(kThreads, 1)
    gather_kernel(const __grid_constant__ CUtensorMap tm_box, const __grid_constant__ CUtensorMap tm_row,
                  const __grid_constant__ CUtensorMap tm_b, const GatherArgs a) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool with_b = a.mode != kBoxA && a.mode != kGather32A;
  const bool gather = a.mode == kGather1 || a.mode == kGather32 || a.mode == kGather32A;
  const bool warp_issues = a.mode == kGather32 || a.mode == kGather32A;
  const bool hot = a.mode == kBoxHot || a.mode == kBoxHot3;
  const uint32_t stage_tx = kABytes + (with_b ? kBBytes : 0);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbar_init(&full[s], 1);
      ptx::mbar_init(&empty[s], 8);
    }
    ptx::mbar_fence_init();
  }
  __syncthreads();
  const int tiles = kMTiles * kNTiles;
  if (warp == 0) {
    if (!warp_issues && lane != 0) return;
    int stage = 0;
    uint32_t phase = 0;
    for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
      int m, n;
      tile_of(t, a.mode == kBoxB4 ? 4 : kBand, m, n);
      // Row r of the tile -> its token (the coordinate past the tensor for -1: zeros).
      int32_t tok[kBM / 32];
      if (gather) {
#pragma unroll
        for (int i = 0; i < kBM / 32; ++i) {
          const int32_t v = a.row_token[m * kBM + lane + 32 * i];
          tok[i] = v < 0 ? kT : v;
        }
      }
      const int b_row = (hot ? 0 : a.tile_expert[m]) * kN + n * kBN;
      const int a_tile = hot ? m % kBand : m;
      for (int kb = 0; kb < kKBlocks; ++kb) {
        ptx::mbar_wait(&empty[stage], phase ^ 1);
        uint8_t* sa = smem + stage * kStageBytes;
        if (lane == 0) {
          ptx::mbar_arrive_expect_tx(&full[stage], stage_tx);
          if (with_b) ptx::tma_load_2d(sa + kABytes, &tm_b, &full[stage], kb * kBK, b_row);
        }
        if (!gather) {
          ptx::tma_load_2d(sa, &tm_box, &full[stage], kb * kBK, a_tile * kBM);
        } else if (warp_issues) {
#pragma unroll
          for (int i = 0; i < kBM / 32; ++i)
            ptx::tma_load_2d(sa + (lane + 32 * i) * 128, &tm_row, &full[stage], kb * kBK, tok[i]);
        } else {
          for (int r = 0; r < kBM; ++r) {
            const int32_t v = a.row_token[m * kBM + r];
            ptx::tma_load_2d(sa + r * 128, &tm_row, &full[stage], kb * kBK, v < 0 ? kT : v);
          }
        }
        ptx::next_stage<kStages>(stage, phase);
      }
    }
    return;
  }
  if (warp < 4) return;  // the producer warpgroup's other warps
  int stage = 0;
  uint32_t phase = 0;
  uint32_t acc = 0;
  const int ct = threadIdx.x - 128;  // 0..255
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    for (int kb = 0; kb < kKBlocks; ++kb) {
      ptx::mbar_wait(&full[stage], phase);
      if (a.verify) acc += a_words_sum(smem + stage * kStageBytes, ct);
      __syncwarp();
      if (lane == 0) ptx::mbar_arrive(&empty[stage]);
      ptx::next_stage<kStages>(stage, phase);
    }
  }
  if (a.verify) {
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) atomicAdd(a.checksum, acc);
  }
}

// ---- The dyn modes: tiles drawn from a counter, B optionally multicast to a pair -------------
constexpr int kMailSlots = 128;  // draws a pair's leader can pass on (a pair makes ~24)

// How the dyn kernel's CTAs work: alone, or in pairs releasing stages at cluster or CTA scope.
enum DynKind { kSingle = 0, kPairCluster = 1, kPairCta = 2 };

template <int kKind>
__global__ void __launch_bounds__(kThreads, 1)
    dyn_kernel(const __grid_constant__ CUtensorMap tm_box,
               const __grid_constant__ CUtensorMap tm_b,
               const __grid_constant__ CUtensorMap tm_b_half, const GatherArgs a, int* counter) {
  constexpr int kStages = 4;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  uint64_t* mail_full = empty + kStages;
  int* mailbox = reinterpret_cast<int*>(mail_full + kMailSlots);
  volatile int* stop_seq = mailbox + kMailSlots;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t rank = 0;
  if (kKind != kSingle) rank = ptx::cluster_ctarank();
  const uint32_t peer = rank ^ 1;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbar_init(&full[s], 1);
      // A pair's stage is released by both CTAs' consumer warps.
      ptx::mbar_init(&empty[s], kKind != kSingle ? 16 : 8);
    }
    for (int i = 0; i < kMailSlots; ++i) ptx::mbar_init(&mail_full[i], 1);
    *stop_seq = INT_MAX;
    ptx::mbar_fence_init();
  }
  // A pair's barriers exist in both CTAs before either arrives on the other's.
  if (kKind != kSingle) ptx::cluster_sync(); else __syncthreads();
  const int tiles = kMTiles * kNTiles;
  // A pair's stage is free once both CTAs' consumers (some arriving from the peer) released it.
  auto wait_empty = [](uint64_t* bar, uint32_t parity) {
    if (kKind == kPairCluster) ptx::mbar_wait_cluster(bar, parity);
    else ptx::mbar_wait(bar, parity);
  };
  if (threadIdx.x == 0) {
    int stage = 0, seq = 0;
    uint32_t phase = 0;
    for (int i = 0;; ++i) {
      int t0;  // the draw: this CTA's tile, or the pair's first
      if (kKind == kSingle) {
        t0 = atomicAdd(counter, 1);
      } else if (rank == 0) {
        t0 = i < kMailSlots ? atomicAdd(counter, 2) : tiles;
        if (i < kMailSlots) {
          ptx::st_shared_peer_u32(ptx::cluster_peer_addr(&mailbox[i], peer), uint32_t(t0));
          ptx::mbar_arrive_peer<true>(ptx::cluster_peer_addr(&mail_full[i], peer));
        }
      } else {
        if (i < kMailSlots) {
          ptx::mbar_wait_cluster(&mail_full[i], 0);
          t0 = *reinterpret_cast<volatile int*>(&mailbox[i]);
        } else {
          t0 = tiles;
        }
      }
      if (t0 >= tiles) break;  // tiles is even: a pair's two tiles run out together
      int m, n, m0, n0, m1, n1;
      tile_of(t0 + int(rank), kBand, m, n);
      const int b_row = a.tile_expert[m] * kN + n * kBN;
      bool shared = false;
      if (kKind != kSingle) {
        tile_of(t0, kBand, m0, n0);
        tile_of(t0 + 1, kBand, m1, n1);
        shared = a.tile_expert[m0] == a.tile_expert[m1] && n0 == n1;
      }
      for (int kb = 0; kb < kKBlocks; ++kb, ++seq) {
        wait_empty(&empty[stage], phase ^ 1);
        uint8_t* sa = smem + stage * kStageBytes;
        ptx::mbar_arrive_expect_tx(&full[stage], kStageBytes);
        ptx::tma_load_2d(sa, &tm_box, &full[stage], kb * kBK, m * kBM);
        if (shared)
          ptx::tma_load_2d_multicast(sa + kABytes + rank * (kBBytes / 2), &tm_b_half, &full[stage],
                                kb * kBK, b_row + int(rank) * (kBN / 2), uint16_t(3));
        else
          ptx::tma_load_2d(sa + kABytes, &tm_b, &full[stage], kb * kBK, b_row);
        ptx::next_stage<kStages>(stage, phase);
      }
    }
    // The end: the next stage's fill carries no bytes, only the count of stages before it.
    wait_empty(&empty[stage], phase ^ 1);
    *stop_seq = seq;
    ptx::mbar_arrive(&full[stage]);
  } else if (warp >= 4) {
    int stage = 0;
    uint32_t phase = 0;
    uint32_t acc = 0;
    const int ct = threadIdx.x - 128;
    for (int seq = 0;; ++seq) {
      ptx::mbar_wait(&full[stage], phase);
      if (seq == *stop_seq) break;
      if (a.verify) acc += a_words_sum(smem + stage * kStageBytes, ct);
      __syncwarp();
      if (lane == 0) {
        ptx::mbar_arrive(&empty[stage]);
        if (kKind != kSingle)
          ptx::mbar_arrive_peer<kKind == kPairCluster>(ptx::cluster_peer_addr(&empty[stage], peer));
      }
      ptx::next_stage<kStages>(stage, phase);
    }
    if (a.verify) {
      for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) atomicAdd(a.checksum, acc);
    }
  }
  // No CTA of a pair leaves while the other may still arrive on its barriers.
  if (kKind != kSingle) ptx::cluster_sync();
}

__global__ void fill_bf16(uint16_t* p, int64_t count, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = uint16_t(0x3c00u | (hash64(i, seed) & 0x03ffu)) ^ uint16_t((i & 1) << 15);
}

__global__ void permute_rows(const uint16_t* hidden, const int32_t* row_token, uint16_t* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < int64_t(kRows) * kH / 8;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / (kH / 8), c = i % (kH / 8);
    const int32_t t = row_token[r];
    reinterpret_cast<uint4*>(out)[i] =
        t < 0 ? make_uint4(0, 0, 0, 0) : reinterpret_cast<const uint4*>(hidden + int64_t(t) * kH)[c];
  }
}

}  // namespace

int main() {
  int dev = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs\n", prop.name, sms);

  // Routing: each token to kTopk distinct experts, rows grouped by expert (the permute's order,
  // without the padding of groups to whole tiles: the copies do not depend on it); one row in 97
  // is -1, as a padding row or a slot routed to another rank leaves it.
  std::mt19937 rng(1);
  std::vector<std::vector<int32_t>> by_expert(kExperts);
  for (int t = 0; t < kT; ++t) {
    std::vector<int> e(kExperts);
    std::iota(e.begin(), e.end(), 0);
    for (int k = 0; k < kTopk; ++k) {
      std::swap(e[k], e[k + rng() % (kExperts - k)]);
      by_expert[e[k]].push_back(t);
    }
  }
  std::vector<int32_t> row_token, tile_expert(kMTiles);
  for (int e = 0; e < kExperts; ++e)
    for (int32_t t : by_expert[e]) row_token.push_back(row_token.size() % 97 == 5 ? -1 : t);
  for (int m = 0; m < kMTiles; ++m) {
    // The expert of the tile's first row: which weights it reads (L2 behaviour, not values).
    int64_t seen = 0;
    int e = 0;
    while (seen + int64_t(by_expert[e].size()) <= int64_t(m) * kBM) seen += by_expert[e++].size();
    tile_expert[m] = e;
  }

  uint16_t *hidden, *permuted, *weights;
  int32_t *d_row_token, *d_tile_expert;
  uint32_t* checksum;
  CHECK_CUDA(cudaMalloc(&hidden, int64_t(kT) * kH * 2));
  CHECK_CUDA(cudaMalloc(&permuted, int64_t(kRows) * kH * 2));
  CHECK_CUDA(cudaMalloc(&weights, int64_t(kExperts) * kN * kH * 2));
  CHECK_CUDA(cudaMalloc(&d_row_token, kRows * 4));
  CHECK_CUDA(cudaMalloc(&d_tile_expert, kMTiles * 4));
  CHECK_CUDA(cudaMalloc(&checksum, 4));
  CHECK_CUDA(cudaMemcpy(d_row_token, row_token.data(), kRows * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_tile_expert, tile_expert.data(), kMTiles * 4, cudaMemcpyHostToDevice));
  fill_bf16<<<sms * 8, 256>>>(hidden, int64_t(kT) * kH, 3);
  fill_bf16<<<sms * 8, 256>>>(weights, int64_t(kExperts) * kN * kH, 5);
  permute_rows<<<sms * 8, 256>>>(hidden, d_row_token, permuted);
  CHECK_CUDA(cudaDeviceSynchronize());

  CUtensorMap tm_box, tm_row, tm_b;
  CHECK_CUDA(cuda::make_tensor_map_bf16_2d_sw128(&tm_box, permuted, kH, kRows, kH * 2, kBK, kBM));
  CHECK_CUDA(cuda::make_tensor_map_bf16_2d_sw128(&tm_row, hidden, kH, kT, kH * 2, kBK, 1));
  CHECK_CUDA(cuda::make_tensor_map_bf16_2d_sw128(&tm_b, weights, kH, int64_t(kExperts) * kN,
                                                 kH * 2, kBK, kBN));
  CUtensorMap tm_b_half;  // half a B tile: what each CTA of a dyn-mc2 pair copies for both
  CHECK_CUDA(cuda::make_tensor_map_bf16_2d_sw128(&tm_b_half, weights, kH,
                                                 int64_t(kExperts) * kN, kH * 2, kBK, kBN / 2));
  int* counter;
  CHECK_CUDA(cudaMalloc(&counter, 4));
  const int smem = kMaxStages * kStageBytes + 2 * kMaxStages * 8 + 1024;
  CHECK_CUDA(cudaFuncSetAttribute(gather_kernel<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CHECK_CUDA(cudaFuncSetAttribute(gather_kernel<3>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int smem_dyn = smem + kMailSlots * 12 + 16;
  for (auto k : {dyn_kernel<kSingle>, dyn_kernel<kPairCluster>, dyn_kernel<kPairCta>})
    CHECK_CUDA(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dyn));

  int mismatches = 0;
  uint32_t reference = 0;
  for (int mode = 0; mode < kModes; ++mode) {
    const bool three = mode == kBox3 || mode == kBoxHot3;
    const bool hot = mode == kBoxHot || mode == kBoxHot3;
    const bool dyn = mode == kDyn || mode == kDynMc2 || mode == kDynMc2Cta;
    auto kernel = three ? gather_kernel<3> : gather_kernel<4>;
    auto kernel_dyn = mode == kDynMc2      ? dyn_kernel<kPairCluster>
                      : mode == kDynMc2Cta ? dyn_kernel<kPairCta>
                                           : dyn_kernel<kSingle>;
    const int cluster = kClusterCtas[mode];
    cudaLaunchConfig_t cfg{};
    cudaLaunchAttribute attr{};
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = dyn ? smem_dyn : smem;
    int ctas = sms / cluster * cluster;
    if (cluster > 1) {
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = cluster;
      attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
      cfg.attrs = &attr;
      cfg.numAttrs = 1;
      cfg.gridDim = dim3(ctas);
      int clusters = 0;
      if (dyn)
        CHECK_CUDA(cudaOccupancyMaxActiveClusters(&clusters, kernel_dyn, &cfg));
      else
        CHECK_CUDA(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
      ctas = std::min(ctas, clusters * cluster);
    }
    cfg.gridDim = dim3(ctas);
    GatherArgs a{mode, 1, d_row_token, d_tile_expert, checksum};
    auto launch = [&] {
      if (!dyn) {
        CHECK_CUDA(cudaLaunchKernelEx(&cfg, kernel, tm_box, tm_row, tm_b, a));
        return;
      }
      CHECK_CUDA(cudaMemsetAsync(counter, 0, 4));
      CHECK_CUDA(cudaLaunchKernelEx(&cfg, kernel_dyn, tm_box, tm_b, tm_b_half, a, counter));
    };
    CHECK_CUDA(cudaMemset(checksum, 0, 4));
    launch();
    sync_or_die(0, kModeNames[mode]);
    uint32_t got = 0;
    CHECK_CUDA(cudaMemcpy(&got, checksum, 4, cudaMemcpyDeviceToHost));
    if (mode == kBox) reference = got;
    if (!hot && got != reference) {  // the hot modes read other rows
      ++mismatches;
      std::printf("MISMATCH %s: A words sum %08x, the box mode's %08x\n", kModeNames[mode], got,
                  reference);
    }
    a.verify = 0;
    const LaunchTimes t = time_launches(kModeNames[mode], 2, 9, launch);
    const bool with_b = mode != kBoxA && mode != kGather32A;
    const bool one_box = mode != kGather1 && mode != kGather32 && mode != kGather32A;
    const double stages = double(kMTiles) * kNTiles * kKBlocks;
    const double stage_bytes = kABytes + (with_b ? kBBytes : 0);
    const double copies = one_box ? 1 : kBM;  // A copies a stage
    const double s = t.median_ms * 1e-3;
    std::printf("TIME %-12s %8.1f us (min %8.1f), %3d CTAs, %.3f us a stage per CTA, %.1f GB/s "
                "into each SM, %.2f TB/s in all, %.0f M A copies/s per SM\n",
                kModeNames[mode], t.median_ms * 1e3, t.min_ms * 1e3, ctas, s * 1e6 * ctas / stages,
                stages * stage_bytes / ctas / s / 1e9, stages * stage_bytes / s / 1e12,
                stages * copies / ctas / s / 1e6);
  }
  std::printf("summary: %d mismatches\n", mismatches);
  return mismatches == 0 ? 0 : 1;
}
