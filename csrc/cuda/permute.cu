// permute: group the token copies of local slots by local expert (stable in (token, slot) order),
// pad each group to `alignment` rows, and copy the rows (optionally scaled by their prob and/or
// quantized to MXFP8). Also the skip-permute helper expand_group_ids.
//
// Two kernels, both sized by static arguments only (graph-capturable):
//  1. permute_route_kernel, ONE block: counts slots per (warp segment, expert), scans them into
//     padded expert offsets, then ranks every slot and writes expert_offsets, permutation_map and
//     inverse_map. One block makes the result deterministic and stable without any global
//     scratch memory (the op has no workspace), and it is cheap: each warp walks T*topk/32 slots
//     twice, one __match_any_sync per 32 slots (65536 slots: ~64 steps per warp).
//  2. permute_copy_kernel, one block per slot: reads inverse_map and copies the token's row.
#include <algorithm>

#include "cuda/backend.h"
#include "cuda/block_scan.cuh"
#include "cuda/configs.h"
#include "cuda/mx_block.cuh"

namespace fmoe {
namespace cuda {
namespace {

struct RouteParams {
  const int32_t* routing;  // [num_slots]
  int64_t num_slots;       // T * topk
  int64_t max_rows;
  int topk, num_experts, expert_start, num_local, alignment;
  int32_t* expert_offsets;
  int32_t* permutation_map;
  int32_t* inverse_map;
  int32_t* invalid_count;  // may be null
};

// Local expert of a routing id, or -1 (non-local, or invalid: *invalid set).
__device__ __forceinline__ int local_expert(int32_t id, const RouteParams& p, int* invalid) {
  if (id < 0 || id >= p.num_experts) {
    ++*invalid;
    return -1;
  }
  int e = id - p.expert_start;
  return (e >= 0 && e < p.num_local) ? e : -1;
}

// Dynamic shared memory: warp_base [warps][E] (counts, then each warp's running row base inside
// its expert) and expert_start [E].
__global__ void permute_route_kernel(RouteParams p) {
  extern __shared__ int32_t route_smem[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int E = p.num_local;
  int32_t* warp_base = route_smem;
  int32_t* expert_row0 = route_smem + warps * E;
  int32_t* my_base = warp_base + warp * E;

  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) warp_base[i] = 0;
  __syncthreads();

  // Warp w owns the contiguous slot range [w*seg, (w+1)*seg): slots of one expert are ranked by
  // (warp, position inside the warp's walk), which is slot order, with no cross-warp atomics.
  const int64_t seg = (p.num_slots + warps - 1) / warps;
  const int64_t s_begin = std::min<int64_t>(seg * warp, p.num_slots);
  const int64_t s_end = std::min<int64_t>(s_begin + seg, p.num_slots);

  // Pass 1: per-warp counts (the order of these shared atomics does not matter).
  int invalid = 0;
  for (int64_t s = s_begin + lane; s < s_end; s += 32) {
    int e = local_expert(p.routing[s], p, &invalid);
    if (e >= 0) atomicAdd(&my_base[e], 1);
  }
  invalid = __reduce_add_sync(kFullWarp, invalid);
  if (lane == 0 && invalid != 0 && p.invalid_count) atomicAdd(p.invalid_count, invalid);
  __syncthreads();

  // Pass 2: per expert, the exclusive prefix over warps (in place) and the padded group size;
  // then the exclusive scan of padded sizes over experts. Thread i owns a contiguous run of
  // experts so that the block scan sees them in order.
  const int per = (E + blockDim.x - 1) / blockDim.x;
  const int e0 = std::min<int>(threadIdx.x * per, E), e1 = std::min<int>(e0 + per, E);
  int run_total = 0;
  for (int e = e0; e < e1; ++e) {
    int run = 0;
    for (int w = 0; w < warps; ++w) {
      int c = warp_base[w * E + e];
      warp_base[w * E + e] = run;
      run += c;
    }
    // Fits in int32: the padded total is at most max_rows, checked by the launcher.
    int padded = (run + p.alignment - 1) / p.alignment * p.alignment;
    expert_row0[e] = padded;
    run_total += padded;
  }
  int n_used = 0;
  int row = block_exclusive_scan(run_total, &n_used);
  for (int e = e0; e < e1; ++e) {
    int size = expert_row0[e];
    expert_row0[e] = row;
    p.expert_offsets[e] = row;
    row += size;
  }
  if (threadIdx.x == 0) p.expert_offsets[E] = n_used;
  // Every row starts as padding (-1): padding rows inside groups and rows >= n_used, which may
  // hold a longer batch's tokens from a previous call. Pass 3 overwrites the real rows after
  // the barrier below, which orders these global writes before those.
  for (int64_t r = threadIdx.x; r < p.max_rows; r += blockDim.x) p.permutation_map[r] = -1;
  __syncthreads();

  // Pass 3: rank. In each step a warp takes 32 consecutive slots; lanes with the same expert
  // find each other with __match_any_sync, rank by lane order, and the lowest such lane advances
  // the warp's counter for that expert.
  const int32_t topk = p.topk;
  for (int64_t base = s_begin; base < s_end; base += 32) {
    const int64_t s = base + lane;
    int e = -1;
    if (s < s_end) {
      int ignored = 0;
      e = local_expert(p.routing[s], p, &ignored);
    }
    const unsigned peers = __match_any_sync(kFullWarp, e);
    int r = -1;
    if (e >= 0) r = expert_row0[e] + my_base[e] + __popc(peers & ((1u << lane) - 1u));
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) my_base[e] += __popc(peers);
    __syncwarp();
    if (s < s_end) {
      p.inverse_map[s] = r;
      if (r >= 0) p.permutation_map[r] = int32_t(s / topk);
    }
  }
}

struct CopyParams {
  const uint16_t* hidden;  // [T, H]
  const float* probs;      // [T*topk] or null
  uint16_t* permuted;      // [max_rows, H] or null
  uint8_t* permuted_q;     // [max_rows, H] or null
  uint8_t* permuted_scale; // [max_rows, H/32], with permuted_q
  const int32_t* inverse_map;
  int64_t num_slots, topk, H;
};

// 8 consecutive bf16 through one 16-byte access (kVec) or eight 2-byte ones (the caller's
// pointers are not 16-byte aligned).
template <bool kVec>
__device__ __forceinline__ void load8(const uint16_t* src, uint16_t (&v)[8]) {
  if constexpr (kVec) {
    unpack8(*reinterpret_cast<const uint4*>(src), v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = src[i];
  }
}
template <bool kVec>
__device__ __forceinline__ void store8(uint16_t* dst, const uint16_t (&v)[8]) {
  if constexpr (kVec) {
    *reinterpret_cast<uint4*>(dst) = pack8(v);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = v[i];
  }
}
template <bool kVec>
__device__ __forceinline__ void store8_bytes(uint8_t* dst, const uint8_t (&q)[8]) {
  if constexpr (kVec) {
    *reinterpret_cast<uint2*>(dst) = pack8_bytes(q);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = q[i];
  }
}

__device__ __forceinline__ uint16_t scale_bf16(uint16_t x, float prob) {
  return f32_to_bf16(bf16_to_f32(x) * prob);
}

// H % 8 == 0: each thread moves groups of 8 columns; 4 consecutive lanes hold one MXFP8 block
// (H % 32 == 0 whenever permuted_q is set), so the whole warp runs every loop step together.
template <bool kVec>
__global__ void permute_copy_kernel(CopyParams p) {
  const int64_t groups = p.H / 8;
  for (int64_t s = blockIdx.x; s < p.num_slots; s += gridDim.x) {
    const int32_t row = p.inverse_map[s];
    if (row < 0) continue;  // block-uniform
    const float prob = p.probs ? p.probs[s] : 1.0f;
    const uint16_t* src = p.hidden + (s / p.topk) * p.H;
    for (int64_t g0 = 0; g0 < groups; g0 += blockDim.x) {
      const int64_t g = g0 + threadIdx.x;
      const bool active = g < groups;
      uint16_t v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (active) {
        load8<kVec>(src + g * 8, v);
        if (p.probs) {
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = scale_bf16(v[i], prob);
        }
        if (p.permuted) store8<kVec>(p.permuted + int64_t(row) * p.H + g * 8, v);
      }
      if (p.permuted_q) {
        uint8_t q[8];
        const uint8_t sc = mx_quantize_lanes<8>(v, q);
        if (active) {
          store8_bytes<kVec>(p.permuted_q + int64_t(row) * p.H + g * 8, q);
          if (g % 4 == 0) p.permuted_scale[int64_t(row) * (p.H / 32) + g / 4] = sc;
        }
      }
    }
  }
}

// H % 8 != 0 (no MXFP8 copy possible): one element per thread step.
__global__ void permute_copy_scalar_kernel(CopyParams p) {
  for (int64_t s = blockIdx.x; s < p.num_slots; s += gridDim.x) {
    const int32_t row = p.inverse_map[s];
    if (row < 0) continue;
    const float prob = p.probs ? p.probs[s] : 1.0f;
    const uint16_t* src = p.hidden + (s / p.topk) * p.H;
    uint16_t* dst = p.permuted + int64_t(row) * p.H;
    for (int64_t c = threadIdx.x; c < p.H; c += blockDim.x)
      dst[c] = p.probs ? scale_bf16(src[c], prob) : src[c];
  }
}

// Block e < E writes routing_rows for group e; block E writes -1 past the last group.
__global__ void expand_group_ids_kernel(const int32_t* tokens_per_expert, int num_local,
                                        int expert_start, int64_t rows, int32_t* routing_rows) {
  const int e = blockIdx.x;
  // Counts are device data the host never checked: negative ones count as 0, and the int64
  // sums cannot overflow.
  int64_t part = 0;
  for (int i = threadIdx.x; i < e; i += blockDim.x) part += max(tokens_per_expert[i], 0);
  int64_t begin = block_sum(part);
  int64_t end = e < num_local ? begin + max(tokens_per_expert[e], 0) : rows;
  begin = std::min(begin, rows);
  end = std::min(end, rows);
  const int32_t id = e < num_local ? expert_start + e : -1;
  for (int64_t r = begin + threadIdx.x; r < end; r += blockDim.x) routing_rows[r] = id;
}

// Dynamic shared memory the route kernel may use: the opt-in maximum less room for its static
// shared memory (the block scan's), since the two together must fit.
int route_smem_budget(int max_smem_optin) { return max_smem_optin - 1024; }

// Warps of the route block: as many as shared memory holds (the per-warp count table grows
// with E), at most 32.
int route_warps(int64_t num_local, int max_smem_optin) {
  int64_t w = int64_t(route_smem_budget(max_smem_optin)) / (4 * num_local) - 1;
  return int(std::min<int64_t>(w, kPermuteRouteMaxThreads / 32));
}

}  // namespace

Status permute_prepare_device(int max_smem_optin) {
  FMOE_CHECK_CUDA(cudaFuncSetAttribute(permute_route_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       route_smem_budget(max_smem_optin)));
  return FMOE_OK;
}

}  // namespace cuda

using namespace cuda;

Status CudaBackend::permute(BackendStream* s, const fmoe_permute_args& a) {
  FMOE_TRY(activate());
  cudaStream_t st = stream_of(s);
  int64_t max_rows = 0;
  FMOE_TRY(fmoe_max_rows(a.num_tokens, a.topk, a.num_local_experts, a.alignment, &max_rows));
  if (max_rows > INT32_MAX)
    return set_error(FMOE_ERR_UNSUPPORTED,
                     "fmoe_permute: %lld permuted rows exceed the i32 row indices",
                     (long long)max_rows);
  const int warps = route_warps(a.num_local_experts, max_smem_optin_);
  if (warps < 1)
    return set_error(FMOE_ERR_UNSUPPORTED,
                     "fmoe_permute: num_local_experts = %lld is more than the CUDA backend's "
                     "routing block holds in shared memory",
                     (long long)a.num_local_experts);

  // The route kernel runs even when T = 0: expert_offsets and the -1 fill of permutation_map
  // (max_rows can be > 0 with no token) are outputs too.
  RouteParams rp;
  rp.routing = a.routing_map;
  rp.num_slots = a.num_tokens * a.topk;
  rp.max_rows = max_rows;
  rp.topk = int(a.topk);
  rp.num_experts = int(a.num_experts);
  rp.expert_start = int(a.local_expert_start);
  rp.num_local = int(a.num_local_experts);
  rp.alignment = int(a.alignment);
  rp.expert_offsets = a.expert_offsets;
  rp.permutation_map = a.permutation_map;
  rp.inverse_map = a.inverse_map;
  rp.invalid_count = a.invalid_count;
  const size_t smem = size_t(warps + 1) * size_t(a.num_local_experts) * sizeof(int32_t);
  permute_route_kernel<<<1, warps * 32, smem, st>>>(rp);
  FMOE_CHECK_LAUNCH("permute_route_kernel");

  if (rp.num_slots == 0 || (!a.permuted && !a.permuted_q)) return FMOE_OK;
  CopyParams cp;
  cp.hidden = static_cast<const uint16_t*>(a.hidden);
  cp.probs = a.probs;
  cp.permuted = static_cast<uint16_t*>(a.permuted);
  cp.permuted_q = a.permuted_q;
  cp.permuted_scale = a.permuted_scale;
  cp.inverse_map = a.inverse_map;
  cp.num_slots = rp.num_slots;
  cp.topk = a.topk;
  cp.H = a.hidden_size;
  const unsigned grid = unsigned(std::min<int64_t>(rp.num_slots, kMaxGridBlocks));
  if (a.hidden_size % 8 == 0) {
    const bool vec = aligned_to(cp.hidden, 16) && aligned_to(cp.permuted, 16) &&
                     aligned_to(cp.permuted_q, 8);
    const int threads = row_threads(a.hidden_size / 8);
    if (vec)
      permute_copy_kernel<true><<<grid, threads, 0, st>>>(cp);
    else
      permute_copy_kernel<false><<<grid, threads, 0, st>>>(cp);
    FMOE_CHECK_LAUNCH("permute_copy_kernel");
  } else {
    // permuted_q needs hidden_size % 32 == 0 (validated), so only the bf16 copy lands here.
    permute_copy_scalar_kernel<<<grid, row_threads(a.hidden_size), 0, st>>>(cp);
    FMOE_CHECK_LAUNCH("permute_copy_scalar_kernel");
  }
  return FMOE_OK;
}

Status CudaBackend::expand_group_ids(BackendStream* s, const int32_t* tokens_per_expert,
                                     int64_t num_local_experts, int64_t local_expert_start,
                                     int64_t rows, int32_t* routing_rows) {
  FMOE_TRY(activate());
  if (rows == 0) return FMOE_OK;
  expand_group_ids_kernel<<<unsigned(num_local_experts + 1), kElementwiseThreads, 0,
                            stream_of(s)>>>(tokens_per_expert, int(num_local_experts),
                                            int(local_expert_start), rows, routing_rows);
  FMOE_CHECK_LAUNCH("expand_group_ids_kernel");
  return FMOE_OK;
}

}  // namespace fmoe
