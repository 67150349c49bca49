// How fast the copy engine streams weights in the decode GEMMs' pattern, against layouts that
// would read the same bytes more sequentially. A question for the weight layout, not a kernel of
// the library: the decode kernels (grouped_mm_small.cu) give each CTA 64 weight rows and walk k in
// stages of 64 rows x 128 bytes (one 2-D box per stage, rows K bytes apart), and stream at 2.1-2.6
// TB/s where a device-to-device copy reaches ~3 (bench/NOTES.md items 64, 68). If the same stages
// stored as contiguous 8 KB tiles streamed measurably faster, weights laid out in stage tiles at
// load time would pay; if not, the pattern is not what holds the decode GEMMs back.
//
// Modes (every one moves 8 KB per stage into a ring of kStages stages per CTA, 1 thread issuing,
// 4 consumer warps waiting for each stage and releasing it, no math):
//   row-major  the decode kernels' box: 64 rows x 128 bytes of a [N, K] row-major matrix
//   gate-up    2 boxes of 32 rows x 128 bytes, N/2 rows apart (a gated FC1 tile: gate and up rows)
//   rows-256   2 boxes of 32 rows x 128 bytes side by side: 32 rows x 256 contiguous bytes
//   tiled      the same 64 x 128 B stage stored contiguously (tile (i, kb) at (i * K/128 + kb) * 8 KB)
//   tiled-32   2 tiles of 32 x 128 B stored contiguously (4 KB each), in two halves of the buffer
//              (the gated tile in 32-row tiles)
//   bulk       the tiled layout by a 1-D bulk copy (cp.async.bulk) instead of a tensor map
//   rm+x, rm+x+scales  the row-major box plus what the MXFP8 decode producer copies beside it: the
//              whole producer warp waits for the stage, 8 token rows of 128 bytes by 16-byte
//              cp.async (2 a lane), and in the second the weight rows' scale words, 2 words of 4
//              bytes a row by 4-byte cp.async (4 a lane) from a [N, K / 32] scale matrix; each
//              lane's copies complete on the stage's barrier (cp.async.mbarrier.arrive.noinc)
//              (at K = 4096 bytes rm+x+scales fails its checksum at speed, in every ring, and
//              passes under compute-sanitizer memcheck and racecheck: an ordering this check gets
//              wrong, not found yet; its times are not to be trusted beyond a few percent)
//   row-major-4d, tiled-4d  the row-major and tiled stages through one 4-D view of either layout,
//              (128 B, 64 rows, k tiles, n tiles), coordinates (0, 0, kb, item): whether the driver
//              takes the row-major view (its strides out of increasing order) and what it costs
// against a plain vectorised read of the buffer and cudaMemcpyAsync device to device. Every mode
// reads each byte of the matrix once: the XOR of all the words the consumers see must equal the
// buffer's (MISMATCH otherwise).
// Run with bench/dev/run-checks.sh stream, or alone with a row length and a mode to run only
// those cells (weight_stream 4096 rm+x+scales).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "check_common.cuh"
#include "cuda/ptx/cp_async.cuh"
#include "cuda/ptx/cp_async_mbarrier.cuh"
#include "cuda/ptx/mbarrier.cuh"
#include "cuda/ptx/tma.cuh"
#include "cuda/tensor_map.h"

namespace {

using namespace fmoe;

enum Mode {
  kRowMajor = 0, kGateUp, kRows256, kTiled, kTiled32, kBulk, kRowMajor4d, kTiled4d, kWithX,
  kWithXScales, kModes
};
const char* const kModeNames[] = {"row-major", "gate-up",      "rows-256", "tiled",
                                  "tiled-32",  "bulk",         "row-major-4d", "tiled-4d",
                                  "rm+x",      "rm+x+scales"};
constexpr int kTokens = 8;  // rm+x: token rows a stage copies beside the weights

constexpr int kStageBytes = 8192;
constexpr int kConsumerWarps = 4;
constexpr int kThreads = 32 * (1 + kConsumerWarps);

struct StreamArgs {
  const uint8_t* base;  // bulk mode's source
  int mode;
  int items;            // units of kStageBytes-sized stages along k
  int k_blocks;         // stages per item
  int k_bytes;          // bytes per row
  int half_rows;        // gate-up: rows from a gate row to its up row
  int64_t half_tiles;   // tiled-32: 4 KB tiles from the first half to the second
  uint32_t* checksum;   // XOR of every word the consumers see
  const uint8_t* x;     // rm+x: [kTokens, K] token rows
  const uint8_t* scales;  // rm+x+scales: [N, K / 32]
};

// A 4-D view of a [n, K] byte matrix (as bf16 pairs) in 8 KB stages: (64 elements = 128 B, 64
// rows, K / 128 k tiles, n / 64 n tiles), strides in bytes for dimensions 1-3.
cudaError_t make_map_4d(CUtensorMap* map, const void* base, uint64_t k_tiles, uint64_t n_tiles,
                        uint64_t stride_row, uint64_t stride_ktile, uint64_t stride_ntile) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[4] = {64, 64, k_tiles, n_tiles};
  const cuuint64_t strides[3] = {stride_row, stride_ktile, stride_ntile};
  const cuuint32_t box[4] = {64, 64, 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<void*>(base),
                            dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

__device__ __forceinline__ void tma_load_4d(void* smem_dst, const void* tensor_map, uint64_t* bar,
                                            int32_t c0, int32_t c1, int32_t c2, int32_t c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(ptx::smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(ptx::smem_addr(bar)), "r"(c0), "r"(c1),
      "r"(c2), "r"(c3)
      : "memory");
}

__device__ __forceinline__ void bulk_load(void* smem_dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(ptx::smem_addr(smem_dst)),
      "l"(src), "r"(bytes), "r"(ptx::smem_addr(bar))
      : "memory");
}

template <int kStages>
__global__ void __launch_bounds__(kThreads) stream_kernel(const __grid_constant__ CUtensorMap tm,
                                                          const StreamArgs a) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (ptx::smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      ptx::mbar_init(&full[s], a.mode == kWithX || a.mode == kWithXScales ? 1 + 32 : 1);
      ptx::mbar_init(&empty[s], kConsumerWarps);
    }
    ptx::mbar_fence_init();
  }
  __syncthreads();
  // rm+x modes: the whole warp, as the MXFP8 decode producer (lane 0's box, every lane's side
  // copies); the other modes: lane 0 alone.
  const bool side_copies = a.mode == kWithX || a.mode == kWithXScales;
  if (warp == 0) {
    if (!side_copies && lane != 0) return;
    int stage = 0;
    uint32_t phase = 0;
    for (int item = blockIdx.x; item < a.items; item += gridDim.x) {
      for (int kb = 0; kb < a.k_blocks; ++kb) {
        ptx::mbar_wait(&empty[stage], phase ^ 1);
        uint8_t* dst = smem + stage * kStageBytes;
        if (lane == 0) {
          ptx::mbar_arrive_expect_tx(&full[stage], kStageBytes);
          const int64_t tile = int64_t(item) * a.k_blocks + kb;
          switch (a.mode) {
            case kRowMajor:  // coordinates in bf16 elements: 64 per 128 bytes
            case kWithX:
            case kWithXScales:
              ptx::tma_load_2d(dst, &tm, &full[stage], kb * 64, item * 64);
              break;
            case kGateUp:
              ptx::tma_load_2d(dst, &tm, &full[stage], kb * 64, item * 32);
              ptx::tma_load_2d(dst + kStageBytes / 2, &tm, &full[stage], kb * 64,
                               a.half_rows + item * 32);
              break;
            case kRows256:
              ptx::tma_load_2d(dst, &tm, &full[stage], kb * 128, item * 32);
              ptx::tma_load_2d(dst + kStageBytes / 2, &tm, &full[stage], kb * 128 + 64, item * 32);
              break;
            case kTiled:
              ptx::tma_load_2d(dst, &tm, &full[stage], 0, int32_t(tile * 64));
              break;
            case kTiled32:
              ptx::tma_load_2d(dst, &tm, &full[stage], 0, int32_t(tile * 32));
              ptx::tma_load_2d(dst + kStageBytes / 2, &tm, &full[stage], 0,
                               int32_t((a.half_tiles + tile) * 32));
              break;
            case kBulk:
              bulk_load(dst, a.base + tile * kStageBytes, kStageBytes, &full[stage]);
              break;
            default:  // the 4-D views
              tma_load_4d(dst, &tm, &full[stage], 0, 0, kb, item);
              break;
          }
        }
        if (side_copies) {
          uint8_t* side = smem + kStages * kStageBytes + 2 * kStages * 8 + stage * 2048;
#pragma unroll
          for (int i = 0; i < kTokens / 4; ++i) {
            const int t = lane / 8 + 4 * i, chunk = lane % 8;
            ptx::cp_async_16_zfill(side + t * 128 + chunk * 16,
                                   a.x + int64_t(t) * a.k_bytes + kb * 128 + chunk * 16, true);
          }
          if (a.mode == kWithXScales) {
            const int ks = a.k_bytes / 32;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int w = lane + 32 * i;  // row w / 2 of the tile, word w % 2
              const int64_t at = ((int64_t(item) * 64 + w / 2) * ks & ~int64_t(3)) + 4 * (w % 2);
              ptx::cp_async_4_partial(side + kTokens * 128 + 4 * w, a.scales + at + 4 * kb, 4);
            }
          }
          ptx::cp_async_mbar_arrive_noinc(&full[stage]);
        }
        ptx::next_stage<kStages>(stage, phase);
      }
    }
    return;
  }
  // Consumers: wait for each stage, fold its words into the checksum, release it.
  int stage = 0;
  uint32_t phase = 0;
  uint32_t acc = 0;
  const int t = threadIdx.x - 32;
  for (int item = blockIdx.x; item < a.items; item += gridDim.x) {
    for (int kb = 0; kb < a.k_blocks; ++kb) {
      ptx::mbar_wait(&full[stage], phase);
      const uint4* words = reinterpret_cast<const uint4*>(smem + stage * kStageBytes);
#pragma unroll
      for (int i = 0; i < kStageBytes / 16 / (32 * kConsumerWarps); ++i) {
        const uint4 v = words[t + i * 32 * kConsumerWarps];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
      }
      __syncwarp();
      if (lane == 0) ptx::mbar_arrive(&empty[stage]);
      ptx::next_stage<kStages>(stage, phase);
    }
  }
  for (int o = 16; o > 0; o /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) atomicXor(a.checksum, acc);
}

__global__ void read_kernel(const uint4* p, int64_t count, uint32_t* checksum) {
  uint32_t acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p + i));
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  for (int o = 16; o > 0; o /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if (threadIdx.x % 32 == 0) atomicXor(checksum, acc);
}

__global__ void fill_bytes(uint32_t* p, int64_t words, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = hash64(i, seed);
}

// The kernel of a ring of `stages` stages (the rings main() runs: 4, 7, 10).
using StreamKernel = void (*)(CUtensorMap, StreamArgs);
StreamKernel stream_kernel_for(int stages) {
  return stages == 4 ? stream_kernel<4> : stages == 7 ? stream_kernel<7> : stream_kernel<10>;
}

}  // namespace

// Arguments (optional): a row length K in bytes and a mode name, to run only those cells.
int main(int argc, char** argv) {
  const int only_k = argc > 1 ? std::atoi(argv[1]) : 0;
  const char* only_mode = argc > 2 ? argv[2] : nullptr;
  int dev = 0, sms = 0, smem_optin = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs\n", prop.name, sms);

  // Two buffers of the size of qwen3's MXFP8 FC1 weights at T = 8 (~52 experts x 1536 rows x
  // 2048 bytes), alternated so that no pass finds the other's bytes in L2 (50 MB).
  const int64_t bytes = int64_t(160) << 20;
  uint8_t* buf[2];
  uint32_t* checksum;
  for (auto& b : buf) {
    CHECK_CUDA(cudaMalloc(&b, bytes));
    fill_bytes<<<sms * 4, 256>>>(reinterpret_cast<uint32_t*>(b), bytes / 4, 7);
  }
  CHECK_CUDA(cudaMalloc(&checksum, 4));
  uint8_t *x = nullptr, *scales = nullptr;  // rm+x: token rows; rm+x+scales: [N, K / 32]
  CHECK_CUDA(cudaMalloc(&x, kTokens * 4096));
  CHECK_CUDA(cudaMalloc(&scales, bytes / 32 + 64));
  fill_bytes<<<sms, 256>>>(reinterpret_cast<uint32_t*>(x), kTokens * 4096 / 4, 9);
  fill_bytes<<<sms, 256>>>(reinterpret_cast<uint32_t*>(scales), (bytes / 32 + 64) / 4, 11);
  // The XOR of the first `n` bytes' words (both buffers hold the same bytes).
  auto xor_of = [&](int64_t n) {
    uint32_t x = 0;
    CHECK_CUDA(cudaMemset(checksum, 0, 4));
    read_kernel<<<sms * 8, 256>>>(reinterpret_cast<const uint4*>(buf[0]), n / 16, checksum);
    CHECK_CUDA(cudaMemcpy(&x, checksum, 4, cudaMemcpyDeviceToHost));
    return x;
  };
  int mismatches = 0;
  CHECK_CUDA(cudaDeviceSynchronize());
  const double gb = double(bytes) / 1e9;
  int pass = 0;

  const LaunchTimes copy = time_launches("copy", 3, 20, [&] {
    CHECK_CUDA(cudaMemcpyAsync(buf[pass & 1], buf[(pass + 1) & 1], bytes / 2,
                               cudaMemcpyDeviceToDevice));
    ++pass;
  });
  std::printf("TIME copy (read + write of %.0f MB): %.1f us, %.2f TB/s moved\n", gb * 500,
              copy.median_ms * 1e3, gb / (copy.median_ms * 1e-3) / 1e3);
  const LaunchTimes read = time_launches("read", 3, 20, [&] {
    read_kernel<<<sms * 8, 256>>>(reinterpret_cast<const uint4*>(buf[pass++ & 1]), bytes / 16,
                                  checksum);
    CHECK_CUDA(cudaGetLastError());
  });
  std::printf("TIME read (ld.global.nc.v4): %.1f us, %.2f TB/s\n", read.median_ms * 1e3,
              gb / (read.median_ms * 1e-3) / 1e3);

  struct Ring {
    int ctas_per_sm, stages;
  };
  const Ring rings[] = {{4, 4}, {3, 7}, {2, 10}};
  const int k_rows_bytes[] = {768, 2048, 4096};
  for (const int K : k_rows_bytes) {
    if (only_k != 0 && K != only_k) continue;
    const int64_t rows = bytes / K / 128 * 128;  // whole items in every mode
    const int64_t used = rows * K;
    const double used_gb = double(used) / 1e9;
    const uint32_t expected = xor_of(used);
    for (const Ring ring : rings) {
      const int smem = std::min(smem_optin, (227 * 1024) / ring.ctas_per_sm - 1024);
      // + the side copies' area (2 KB a stage: 8 token rows, 128 scale words)
      const int need = ring.stages * kStageBytes + 1024 + 2 * ring.stages * 8 + ring.stages * 2048;
      if (need > smem) {
        std::printf("skip: %d stages do not fit %d CTAs per SM\n", ring.stages, ring.ctas_per_sm);
        continue;
      }
      for (int mode = 0; mode < kModes; ++mode) {
        if (only_mode != nullptr && std::strcmp(only_mode, kModeNames[mode]) != 0) continue;
        CUtensorMap tm[2];
        StreamArgs a[2];
        bool refused = false;
        for (int b = 0; b < 2; ++b) {
          cudaError_t e = cudaSuccess;
          a[b] = StreamArgs{buf[b], mode, 0, 0, K, int(rows / 2), used / 2 / (kStageBytes / 2),
                            checksum, x, scales};
          if (mode == kRowMajor4d || mode == kTiled4d) {
            const bool tiled = mode == kTiled4d;
            e = make_map_4d(&tm[b], buf[b], K / 128, rows / 64, tiled ? 128 : K,
                            tiled ? kStageBytes : 128, int64_t(kStageBytes) * (K / 128));
            a[b].items = int(rows / 64);
            a[b].k_blocks = K / 128;
            if (e != cudaSuccess) {
              refused = true;
              break;
            }
            continue;
          }
          if (mode == kRowMajor || mode == kGateUp || mode == kRows256 || mode == kWithX ||
              mode == kWithXScales) {
            const uint32_t box_rows = mode == kGateUp || mode == kRows256 ? 32 : 64;
            e = fmoe::cuda::make_tensor_map_bf16_2d_sw128(&tm[b], buf[b], K / 2, rows, K, 64, box_rows);
            a[b].items = int(mode == kRows256 ? rows / 32 : rows / 64);
            a[b].k_blocks = mode == kRows256 ? K / 256 : K / 128;
          } else if (mode == kTiled32) {
            // 4 KB tiles (32 rows of 128 B) in order (item, kb), the first half of the buffer the
            // "gate" tiles, the second the "up" tiles.
            e = fmoe::cuda::make_tensor_map_bf16_2d_sw128(&tm[b], buf[b], 64, used / 128, 128, 64, 32);
            a[b].items = int(rows / 64);
            a[b].k_blocks = K / 128;
          } else {
            // Stage tiles in order (item, kb): as 128-byte rows, 64 rows a tile.
            e = fmoe::cuda::make_tensor_map_bf16_2d_sw128(&tm[b], buf[b], 64, used / 128, 128, 64, 64);
            a[b].items = int(rows / 64);
            a[b].k_blocks = K / 128;
          }
          CHECK_CUDA(e);
        }
        if (refused) {
          std::printf("TIME K %4d B, %s: the driver refuses this tensor map\n", K, kModeNames[mode]);
          continue;
        }
        const int grid = std::min(a[0].items, sms * ring.ctas_per_sm);
        const StreamKernel kernel = stream_kernel_for(ring.stages);
        auto run = [&] {
          const int b = pass++ & 1;
          kernel<<<grid, kThreads, smem>>>(tm[b], a[b]);
          CHECK_CUDA(cudaGetLastError());
        };
        CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        int occupancy = 0;
        CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occupancy, kernel, kThreads, smem));
        // One launch on buffer 0 for the checksum, then the timed ones.
        CHECK_CUDA(cudaMemset(checksum, 0, 4));
        pass = 0;
        run();
        uint32_t got = 0;
        CHECK_CUDA(cudaMemcpy(&got, checksum, 4, cudaMemcpyDeviceToHost));
        if (got != expected) {
          ++mismatches;
          std::printf("MISMATCH K %d, %s: the consumers' XOR %08x, the matrix's %08x\n", K,
                      kModeNames[mode], got, expected);
        }
        const LaunchTimes t = time_launches(kModeNames[mode], 3, 20, run);
        std::printf("TIME K %4d B, %d CTAs/SM (%d fit) x %2d stages, %-12s: %7.1f us, %.2f TB/s "
                    "(%.2f of the read kernel)\n",
                    K, ring.ctas_per_sm, occupancy, ring.stages, kModeNames[mode],
                    t.median_ms * 1e3, used_gb / (t.median_ms * 1e-3) / 1e3,
                    (used_gb / t.median_ms) / (gb / read.median_ms));
      }
    }
  }
  for (auto& b : buf) CHECK_CUDA(cudaFree(b));
  CHECK_CUDA(cudaFree(checksum));
  CHECK_CUDA(cudaFree(x));
  CHECK_CUDA(cudaFree(scales));
  std::printf("summary: %d checksum mismatches\n", mismatches);
  return mismatches == 0 ? 0 : 1;
}
