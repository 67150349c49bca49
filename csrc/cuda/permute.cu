// permute: group the token copies of local slots by local expert (stable in (token, slot) order),
// pad each group to `alignment` rows, and copy the rows (optionally scaled by their prob and/or
// quantized to MXFP8). Also the skip-permute helper expand_group_ids.
//
// Routing (expert_offsets, permutation_map, inverse_map) has two paths, chosen from static
// arguments only (graph-capturable), that give the same bits:
//  - Small T*topk (decode): permute_route_kernel, ONE block, one launch. It counts slots per
//    (warp segment, expert), scans them into padded expert offsets, then ranks every slot. The
//    launch is what costs at decode, so one launch wins there.
//  - Large T*topk (prefill): one block walking 65536 slots is latency-bound (each warp steps
//    through thousands of slots one dependent load after another), so the slots are cut into
//    chunks of kChunkSlots and three launches share the work:
//      A. permute_chunk_count_kernel, a block per chunk: per-expert counts of the chunk; also the
//         -1 fill of permutation_map and the invalid-id count.
//      B. permute_chunk_scan_kernel, one block: per expert, the exclusive prefix of the chunk
//         counts plus the expert's padded offset = the row of the chunk's first slot of that
//         expert; writes expert_offsets.
//      C. permute_chunk_rank_kernel, a block per chunk: the single-block algorithm restricted to
//         the chunk (warp segments, __match_any_sync ranks) on top of B's bases.
//    Stable: a slot's row is its expert's offset + the slots of that expert in earlier chunks
//    + earlier warp segments of its chunk + earlier lanes of its step, i.e. its rank in slot
//    order. Deterministic: no atomics decide a row.
//
//    Scratch: the op has no workspace, and a buffer owned by the backend (per context or per
//    stream) would be shared by every graph captured from it: two replays on different streams,
//    or a replay next to a direct call, would race on it. So the chunk table lives in the op's
//    own output, inverse_map: chunk c keeps its E_local counts in inverse_map[c*kChunkSlots, +E),
//    the head of its OWN slot range (a chunk has >= kChunkSlots >= E_local slots; a layer with
//    more local experts keeps the single-block path). The table, written by A and rewritten in
//    place by B, is complete before C starts (stream order); in C, block c reads its table into
//    shared memory and passes a barrier before any thread writes inverse_map in that range, and
//    no other block writes there. Concurrent permutes on distinct buffers therefore share
//    nothing, and a captured graph needs nothing but its arguments. The -1 fill in A is ordered
//    before C's writes of real rows by stream order too.
//
// Copy: permute_copy_kernel, a warp per (token, 1024-column piece), grid-stride: the warp loads
// the token's piece once (four 16-byte loads per lane in flight) and stores it to each of the
// token's local rows (scaled per slot when probs are given; the MXFP8 copy quantized once per
// token when no prob changes the values). Each token is read from memory once, not topk times,
// and padding rows are never touched.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cuda/backend.h"
#include "cuda/block_scan.cuh"
#include "cuda/configs.h"
#include "cuda/mx_block.cuh"
#include "cuda/ptx/griddep.cuh"

namespace fmoe {
namespace cuda {
namespace {

// ---- Launch configuration of the multi-block route and the copy ----------------------------
// Slots per chunk of the multi-block route (the last chunk takes the remainder too, so it holds
// up to 2*kChunkSlots - 1). It bounds E_local for that path: a chunk stores its table in its own
// slot range.
constexpr int kChunkSlots = 1024;
constexpr int kChunkThreads = 256;
constexpr int kChunkWarps = kChunkThreads / 32;
constexpr int kChunkSlotsPerThread = 2 * kChunkSlots / kChunkThreads;  // covers the last chunk
constexpr int kChunkMaxExperts = kChunkSlots;
// Above this many slots the multi-block route is used (one block ranks 4096 slots in ~4 steps
// per warp; beyond, the chunks' parallelism pays for the two extra launches).
constexpr int64_t kSingleBlockMaxSlots = 4096;
// Copy: 4 warps per block; a warp moves kCopyStrips strips of 256 columns (32 lanes x 8 bf16).
constexpr int kCopyThreads = 128;
constexpr int kStripCols = 32 * 8;

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

// Local expert of a routing id, or -1 (non-local, or invalid: *invalid incremented).
__device__ __forceinline__ int local_expert(int32_t id, const RouteParams& p, int* invalid) {
  if (id < 0 || id >= p.num_experts) {
    ++*invalid;
    return -1;
  }
  int e = id - p.expert_start;
  return (e >= 0 && e < p.num_local) ? e : -1;
}

__device__ __forceinline__ int padded_size(int count, int alignment) {
  // Fits in int32: the padded total is at most max_rows, checked by the launcher.
  return (count + alignment - 1) / alignment * alignment;
}

__device__ __forceinline__ void add_invalid(int invalid, const RouteParams& p) {
  invalid = __reduce_add_sync(kFullWarp, invalid);
  if (threadIdx.x % 32 == 0 && invalid != 0 && p.invalid_count) atomicAdd(p.invalid_count, invalid);
}

// The contiguous slot range [*begin, *end) of warp `warp` of `warps` inside [0, len): warps take
// consecutive segments so that (warp, step, lane) order is slot order.
__device__ __forceinline__ void warp_segment(int64_t len, int warps, int warp, int64_t* begin,
                                             int64_t* end) {
  const int64_t seg = (len + warps - 1) / warps;
  *begin = std::min<int64_t>(seg * warp, len);
  *end = std::min<int64_t>(*begin + seg, len);
}

// Adds the warp's slots of [begin, end) per expert to my_count (the warp's own row: no atomics;
// the lowest lane of each __match_any_sync group adds the group).
template <class ExpertOf>
__device__ __forceinline__ void warp_count(int64_t begin, int64_t end, ExpertOf expert_of,
                                           int32_t* my_count) {
  const int lane = threadIdx.x % 32;
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t s = base + lane;
    const int e = s < end ? expert_of(s) : -1;
    const unsigned peers = __match_any_sync(kFullWarp, e);
    if (e >= 0 && lane == __ffs(peers) - 1) my_count[e] += __popc(peers);
    __syncwarp();
  }
}

// Ranks the warp's slots of [begin, end): row = expert_row0[e] + my_base[e] (rows of expert e
// taken by earlier slots outside this warp's walk, advanced as it walks) + earlier lanes of the
// step with the same expert. Writes inverse_map and permutation_map.
template <class ExpertOf>
__device__ __forceinline__ void warp_rank(int64_t begin, int64_t end, ExpertOf expert_of,
                                          int32_t* my_base, const int32_t* expert_row0,
                                          const RouteParams& p) {
  const int lane = threadIdx.x % 32;
  const int32_t topk = p.topk;
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t s = base + lane;
    const int e = s < end ? expert_of(s) : -1;
    const unsigned peers = __match_any_sync(kFullWarp, e);
    int r = -1;
    if (e >= 0) r = expert_row0[e] + my_base[e] + __popc(peers & ((1u << lane) - 1u));
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) my_base[e] += __popc(peers);
    __syncwarp();
    if (s < end) {
      p.inverse_map[s] = r;
      if (r >= 0) p.permutation_map[r] = int32_t(s / topk);
    }
  }
}

// warp_base [warps][E] holds per-warp counts; turns column e into its exclusive prefix over
// warps and returns the column's total.
__device__ __forceinline__ int exclusive_over_warps(int32_t* warp_base, int warps, int E, int e) {
  int run = 0;
  for (int w = 0; w < warps; ++w) {
    const int c = warp_base[w * E + e];
    warp_base[w * E + e] = run;
    run += c;
  }
  return run;
}

// ---- Single-block route (small T*topk) ------------------------------------------------------
// Dynamic shared memory: warp_base [warps][E] (counts, then each warp's running row base inside
// its expert) and expert_row0 [E].
__global__ void permute_route_kernel(RouteParams p) {
  // The decode FC1 is launched as a programmatic dependent (fused_moe.cu): it may set up while
  // this block ranks (routed, stream its weights), and waits for it before reading the offsets
  // and before letting FC2 launch.
  ptx::griddep_launch_dependents();
  extern __shared__ int32_t route_smem[];
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32;
  const int E = p.num_local;
  int32_t* warp_base = route_smem;
  int32_t* expert_row0 = route_smem + warps * E;
  int32_t* my_base = warp_base + warp * E;

  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) warp_base[i] = 0;
  __syncthreads();

  int64_t s_begin, s_end;
  warp_segment(p.num_slots, warps, warp, &s_begin, &s_end);

  // Pass 1: per-warp counts and the invalid ids.
  int invalid = 0;
  warp_count(s_begin, s_end,
             [&](int64_t s) { return local_expert(p.routing[s], p, &invalid); }, my_base);
  add_invalid(invalid, p);
  __syncthreads();

  // Pass 2: per expert, the exclusive prefix over warps (in place) and the padded group size;
  // then the exclusive scan of padded sizes over experts. Thread i owns a contiguous run of
  // experts so that the block scan sees them in order.
  const int per = (E + blockDim.x - 1) / blockDim.x;
  const int e0 = std::min<int>(threadIdx.x * per, E), e1 = std::min<int>(e0 + per, E);
  int run_total = 0;
  for (int e = e0; e < e1; ++e) {
    const int padded = padded_size(exclusive_over_warps(warp_base, warps, E, e), p.alignment);
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

  // Pass 3: rank.
  int ignored = 0;
  warp_rank(s_begin, s_end, [&](int64_t s) { return local_expert(p.routing[s], p, &ignored); },
            my_base, expert_row0, p);
}

// ---- Multi-block route (large T*topk) -------------------------------------------------------
// Chunk c spans slots [c*kChunkSlots, (c+1)*kChunkSlots), the last one up to num_slots. Its
// table entry for expert e is inverse_map[c*kChunkSlots + e] (see the top of the file).
__device__ __forceinline__ void chunk_range(const RouteParams& p, int64_t num_chunks,
                                            int64_t* begin, int64_t* end) {
  *begin = int64_t(blockIdx.x) * kChunkSlots;
  *end = blockIdx.x == num_chunks - 1 ? p.num_slots : *begin + kChunkSlots;
}

// A: counts per expert of one chunk; the -1 fill of permutation_map (grid-stride, all blocks);
// the invalid-id count.
__global__ void __launch_bounds__(kChunkThreads) permute_chunk_count_kernel(RouteParams p,
                                                                           int64_t num_chunks) {
  __shared__ int32_t count[kChunkMaxExperts];
  const int E = p.num_local, lane = threadIdx.x % 32;
  int64_t begin, end;
  chunk_range(p, num_chunks, &begin, &end);
  for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
  __syncthreads();

  // All of the thread's loads first (they are independent), then the warp-aggregated adds.
  int invalid = 0;
  int e[kChunkSlotsPerThread];
#pragma unroll
  for (int j = 0; j < kChunkSlotsPerThread; ++j) {
    const int64_t s = begin + j * kChunkThreads + threadIdx.x;
    e[j] = s < end ? local_expert(p.routing[s], p, &invalid) : -1;
  }
#pragma unroll
  for (int j = 0; j < kChunkSlotsPerThread; ++j) {
    const unsigned peers = __match_any_sync(kFullWarp, e[j]);
    if (e[j] >= 0 && lane == __ffs(peers) - 1) atomicAdd(&count[e[j]], __popc(peers));
  }
  add_invalid(invalid, p);

  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < p.max_rows; r += stride)
    p.permutation_map[r] = -1;

  __syncthreads();
  for (int i = threadIdx.x; i < E; i += blockDim.x) p.inverse_map[begin + i] = count[i];
}

// B: one block, thread e = expert e (E <= blockDim.x <= 1024). Padded totals, their exclusive
// scan (expert_offsets), then each chunk's count replaced in place by the absolute row of the
// chunk's first slot of expert e.
__global__ void permute_chunk_scan_kernel(RouteParams p, int64_t num_chunks) {
  const int e = threadIdx.x, E = p.num_local;
  int32_t* table = p.inverse_map;
  int total = 0;
  if (e < E) {
#pragma unroll 8
    for (int64_t c = 0; c < num_chunks; ++c) total += table[c * kChunkSlots + e];
  }
  const int padded = e < E ? padded_size(total, p.alignment) : 0;
  int n_used = 0;
  int row = block_exclusive_scan(padded, &n_used);
  if (e < E) {
    p.expert_offsets[e] = row;
#pragma unroll 8
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int32_t n = table[c * kChunkSlots + e];
      table[c * kChunkSlots + e] = row;
      row += n;
    }
  }
  if (e == 0) p.expert_offsets[E] = n_used;
}

// C: ranks one chunk. Dynamic shared memory: local [2*kChunkSlots] (the chunk's local experts),
// warp_base [kChunkWarps][E], expert_row0 [E]: at most 45 KiB, under the default 48 KiB.
__global__ void __launch_bounds__(kChunkThreads) permute_chunk_rank_kernel(RouteParams p,
                                                                          int64_t num_chunks) {
  extern __shared__ int32_t rank_smem[];
  const int E = p.num_local, warp = threadIdx.x / 32;
  int32_t* local = rank_smem;
  int32_t* warp_base = local + 2 * kChunkSlots;
  int32_t* expert_row0 = warp_base + kChunkWarps * E;
  int64_t begin, end;
  chunk_range(p, num_chunks, &begin, &end);
  const int64_t len = end - begin;

  int ignored = 0;
  int e[kChunkSlotsPerThread];
#pragma unroll
  for (int j = 0; j < kChunkSlotsPerThread; ++j) {
    const int64_t i = j * kChunkThreads + threadIdx.x;
    e[j] = i < len ? local_expert(p.routing[begin + i], p, &ignored) : -1;
  }
#pragma unroll
  for (int j = 0; j < kChunkSlotsPerThread; ++j) {
    const int64_t i = j * kChunkThreads + threadIdx.x;
    if (i < len) local[i] = e[j];
  }
  for (int i = threadIdx.x; i < E; i += blockDim.x) expert_row0[i] = p.inverse_map[begin + i];
  for (int i = threadIdx.x; i < kChunkWarps * E; i += blockDim.x) warp_base[i] = 0;
  // Also the point after which this chunk's table (the head of its inverse_map range) is dead.
  __syncthreads();

  int64_t s_begin, s_end;
  warp_segment(len, kChunkWarps, warp, &s_begin, &s_end);
  auto expert_of = [&](int64_t s) { return local[s - begin]; };
  warp_count(begin + s_begin, begin + s_end, expert_of, warp_base + warp * E);
  __syncthreads();
  for (int i = threadIdx.x; i < E; i += blockDim.x)
    exclusive_over_warps(warp_base, kChunkWarps, E, i);
  __syncthreads();
  warp_rank(begin + s_begin, begin + s_end, expert_of, warp_base + warp * E, expert_row0, p);
}

// ---- Copy -----------------------------------------------------------------------------------
struct CopyParams {
  const uint16_t* hidden;  // [T, H]
  const float* probs;      // [T*topk] or null
  uint16_t* permuted;      // [max_rows, H] or null
  uint8_t* permuted_q;     // [max_rows, H] or null
  uint8_t* permuted_scale; // [max_rows, H/32], with permuted_q
  const int32_t* inverse_map;
  int64_t num_tokens, topk, H;
  int64_t pieces;          // pieces of a row: ceil(H / (strips per piece * kStripCols))
};

// 8 consecutive bf16 (or their 8 e4m3 bytes) through one 16-byte (8-byte) access when kVec, or
// element by element when the caller's pointers are not aligned for that.
template <bool kVec>
__device__ __forceinline__ uint4 load8(const uint16_t* src) {
  if constexpr (kVec) {
    return *reinterpret_cast<const uint4*>(src);
  } else {
    uint16_t v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = src[i];
    return pack8(v);
  }
}
template <bool kVec>
__device__ __forceinline__ void store8(uint16_t* dst, const uint4& u) {
  if constexpr (kVec) {
    *reinterpret_cast<uint4*>(dst) = u;
  } else {
    uint16_t v[8];
    unpack8(u, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = v[i];
  }
}
template <bool kVec>
__device__ __forceinline__ void store8_bytes(uint8_t* dst, const uint2& u) {
  if constexpr (kVec) {
    *reinterpret_cast<uint2*>(dst) = u;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[i] = uint8_t(u.x >> (8 * i));
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[4 + i] = uint8_t(u.y >> (8 * i));
  }
}

__device__ __forceinline__ uint16_t scale_bf16(uint16_t x, float prob) {
  return f32_to_bf16(bf16_to_f32(x) * prob);
}
__device__ __forceinline__ uint4 scale8(const uint4& u, float prob) {
  uint16_t v[8];
  unpack8(u, v);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = scale_bf16(v[i], prob);
  return pack8(v);
}
// MXFP8 of one strip: 4 consecutive lanes hold one 32-element block. Every lane of the warp must
// call it (full-warp shuffles); lanes past the row's end hold zeros and ignore the result.
__device__ __forceinline__ uint2 quantize8(const uint4& u, uint8_t* scale) {
  uint16_t v[8];
  uint8_t q[8];
  unpack8(u, v);
  *scale = mx_quantize_lanes<8>(v, q);
  return pack8_bytes(q);
}

// H % 8 == 0. A warp per (token, piece of kStrips * 256 columns); lane l holds columns
// piece + i*256 + 8l .. +8 of strip i. Strip existence (col < H) is warp-uniform; a partial
// last strip has whole 4-lane MXFP8 blocks (H % 32 == 0 whenever permuted_q is set).
// kQuant: permuted_q is set (a separate instantiation keeps the plain bf16 copy lean).
// kRoundTrip (the fused MXFP8 prefill, H % 64 == 0): the bf16 copy holds the MXFP8 round trip of
// each row in the k order of the register-dequantizing GEMM (mx_block.cuh), as
// CudaBackend::mx_round_trip_k_order would leave it.
template <bool kVec, int kStrips, bool kQuant, bool kRoundTrip = false>
__global__ void __launch_bounds__(kCopyThreads) permute_copy_kernel(CopyParams p) {
  static_assert(kStrips >= 1 && kStrips <= 4, "scale bytes of the strips are packed in a word");
  static_assert(!kRoundTrip || (kVec && !kQuant), "the round trip writes the bf16 copy only");
  const int lane = threadIdx.x % 32;
  uint16_t* warp_buf = nullptr;  // kRoundTrip: this warp's reorder buffer
  if constexpr (kRoundTrip) {
    __shared__ uint16_t round_trip_buf[kCopyThreads / 32][256];
    warp_buf = round_trip_buf[threadIdx.x / 32];
  }
  const int64_t warps = int64_t(gridDim.x) * (kCopyThreads / 32);
  const int64_t items = p.num_tokens * p.pieces;
  const bool quantize_once = kQuant && p.probs == nullptr;
  for (int64_t item = int64_t(blockIdx.x) * (kCopyThreads / 32) + threadIdx.x / 32;
       item < items; item += warps) {
    const int64_t t = item / p.pieces;
    const int64_t piece0 = (item % p.pieces) * (kStrips * kStripCols);
    const uint16_t* src = p.hidden + t * p.H;
    uint4 x[kStrips];
#pragma unroll
    for (int i = 0; i < kStrips; ++i) {
      const int64_t c = piece0 + i * kStripCols + lane * 8;
      x[i] = c < p.H ? load8<kVec>(src + c) : make_uint4(0, 0, 0, 0);
    }
    // Without probs every copy of the token holds the same values: quantize them once.
    // (The scale bytes are packed into one word: kStrips <= 4.)
    uint2 q[kStrips];
    uint32_t qs = 0;
#pragma unroll
    for (int i = 0; i < kStrips; ++i) q[i] = make_uint2(0, 0);
    if (quantize_once) {
#pragma unroll
      for (int i = 0; i < kStrips; ++i) {
        if (piece0 + i * kStripCols >= p.H) continue;
        uint8_t sc;
        q[i] = quantize8(x[i], &sc);
        qs |= uint32_t(sc) << (8 * i);
      }
    }
    // kRoundTrip without probs: every copy of the token is the same round trip.
    uint4 rt[kStrips];
    if constexpr (kRoundTrip) {
#pragma unroll
      for (int i = 0; i < kStrips; ++i)
        rt[i] = piece0 + i * kStripCols < p.H ? mx_round_trip_k_order_lanes(x[i], warp_buf, lane)
                                              : x[i];
    }
    // Lane j fetches slot k0 + j's row and prob; the warp then walks them by shuffles.
    for (int64_t k0 = 0; k0 < p.topk; k0 += 32) {
      const int64_t slot = t * p.topk + k0 + lane;
      const bool mine = k0 + lane < p.topk;
      const int32_t my_row = mine ? p.inverse_map[slot] : -1;
      const float my_prob = mine && p.probs ? p.probs[slot] : 1.0f;
      const int n = int(std::min<int64_t>(32, p.topk - k0));
      for (int j = 0; j < n; ++j) {
        const int32_t row = __shfl_sync(kFullWarp, my_row, j);
        const float prob = __shfl_sync(kFullWarp, my_prob, j);
        if (row < 0) continue;  // warp-uniform: slot not local
        uint16_t* dst = p.permuted ? p.permuted + int64_t(row) * p.H : nullptr;
        uint8_t* dst_q = kQuant ? p.permuted_q + int64_t(row) * p.H : nullptr;
#pragma unroll
        for (int i = 0; i < kStrips; ++i) {
          if (piece0 + i * kStripCols >= p.H) continue;  // warp-uniform
          const int64_t c = piece0 + i * kStripCols + lane * 8;
          const bool active = c < p.H;
          uint4 y = p.probs ? scale8(x[i], prob) : x[i];
          if constexpr (kRoundTrip)
            y = p.probs ? mx_round_trip_k_order_lanes(y, warp_buf, lane) : rt[i];
          if (dst && active) store8<kVec>(dst + c, y);
          if constexpr (kQuant) {
            uint8_t sc;
            uint2 yq;
            if (quantize_once) {
              yq = q[i];
              sc = uint8_t(qs >> (8 * i));
            } else {
              yq = quantize8(y, &sc);
            }
            if (active) {
              store8_bytes<kVec>(dst_q + c, yq);
              if (lane % 4 == 0) p.permuted_scale[int64_t(row) * (p.H / 32) + c / 32] = sc;
            }
          }
        }
      }
    }
  }
}

template <bool kVec, int kStrips>
void launch_copy_quant(const CopyParams& cp, bool quant, unsigned grid, cudaStream_t st) {
  if (quant)
    permute_copy_kernel<kVec, kStrips, true><<<grid, kCopyThreads, 0, st>>>(cp);
  else
    permute_copy_kernel<kVec, kStrips, false><<<grid, kCopyThreads, 0, st>>>(cp);
}
void launch_copy(const CopyParams& cp, bool vec, bool wide, bool quant, bool round_trip,
                 unsigned grid, cudaStream_t st) {
  if (round_trip && wide)  // vec and !quant: see permute_launch
    permute_copy_kernel<true, 4, false, true><<<grid, kCopyThreads, 0, st>>>(cp);
  else if (round_trip)
    permute_copy_kernel<true, 1, false, true><<<grid, kCopyThreads, 0, st>>>(cp);
  else if (vec && wide)
    launch_copy_quant<true, 4>(cp, quant, grid, st);
  else if (vec)
    launch_copy_quant<true, 1>(cp, quant, grid, st);
  else if (wide)
    launch_copy_quant<false, 4>(cp, quant, grid, st);
  else
    launch_copy_quant<false, 1>(cp, quant, grid, st);
}

// H % 8 != 0 (no MXFP8 copy possible): a block per slot, one element per thread step. No real
// model has such a width; kept simple.
__global__ void permute_copy_scalar_kernel(CopyParams p) {
  const int64_t num_slots = p.num_tokens * p.topk;
  for (int64_t s = blockIdx.x; s < num_slots; s += gridDim.x) {
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
// with E), at most 32, and no more than the work needs: one warp per 32 slots (a warp steps
// over 32 at a time) or per 256 rows of the -1 fill of permutation_map, at least one. At decode
// a few dozen slots keep one or two warps busy; 32 warps would mostly clear, prefix and scan
// empty per-warp tables, on the critical path of every decode step. 0 when shared memory cannot
// hold one warp's table.
int route_warps(int64_t num_local, int64_t num_slots, int64_t max_rows, int max_smem_optin) {
  const int64_t fit = int64_t(route_smem_budget(max_smem_optin)) / (4 * num_local) - 1;
  const int64_t need = (std::max(num_slots, max_rows / 8) + 31) / 32;
  return int(std::max<int64_t>(0, std::min({fit, int64_t(kPermuteRouteMaxThreads / 32),
                                            std::max<int64_t>(need, 1)})));
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
  return permute_launch(s, a, /*mx_round_trip=*/false);
}

Status CudaBackend::permute_launch(BackendStream* s, const fmoe_permute_args& a,
                                   bool mx_round_trip) {
  FMOE_TRY(activate());
  cudaStream_t st = stream_of(s);
  int64_t max_rows = 0;
  FMOE_TRY(fmoe_max_rows(a.num_tokens, a.topk, a.num_local_experts, a.alignment, &max_rows));
  if (max_rows > INT32_MAX)
    return set_error(FMOE_ERR_UNSUPPORTED,
                     "fmoe_permute: %lld permuted rows exceed the i32 row indices",
                     (long long)max_rows);

  // The route kernels run even when T = 0: expert_offsets and the -1 fill of permutation_map
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

  if (rp.num_slots > kSingleBlockMaxSlots && a.num_local_experts <= kChunkMaxExperts) {
    // >= 4 chunks (num_slots > 4096); the last one absorbs the remainder.
    const int64_t chunks = rp.num_slots / kChunkSlots;
    permute_chunk_count_kernel<<<unsigned(chunks), kChunkThreads, 0, st>>>(rp, chunks);
    FMOE_CHECK_LAUNCH("permute_chunk_count_kernel");
    const int scan_threads = int((a.num_local_experts + 31) / 32 * 32);
    permute_chunk_scan_kernel<<<1, scan_threads, 0, st>>>(rp, chunks);
    FMOE_CHECK_LAUNCH("permute_chunk_scan_kernel");
    const size_t smem = (size_t(2 * kChunkSlots) + size_t(kChunkWarps + 1) * rp.num_local) *
                        sizeof(int32_t);
    permute_chunk_rank_kernel<<<unsigned(chunks), kChunkThreads, smem, st>>>(rp, chunks);
    FMOE_CHECK_LAUNCH("permute_chunk_rank_kernel");
  } else {
    const int warps = route_warps(a.num_local_experts, rp.num_slots, max_rows, max_smem_optin_);
    if (warps < 1)
      return set_error(FMOE_ERR_UNSUPPORTED,
                       "fmoe_permute: num_local_experts = %lld is more than the CUDA backend's "
                       "routing block holds in shared memory",
                       (long long)a.num_local_experts);
    const size_t smem = size_t(warps + 1) * size_t(a.num_local_experts) * sizeof(int32_t);
    permute_route_kernel<<<1, warps * 32, smem, st>>>(rp);
    FMOE_CHECK_LAUNCH("permute_route_kernel");
  }

  if (rp.num_slots == 0 || (!a.permuted && !a.permuted_q)) return FMOE_OK;
  CopyParams cp;
  cp.hidden = static_cast<const uint16_t*>(a.hidden);
  cp.probs = a.probs;
  cp.permuted = static_cast<uint16_t*>(a.permuted);
  cp.permuted_q = a.permuted_q;
  cp.permuted_scale = a.permuted_scale;
  cp.inverse_map = a.inverse_map;
  cp.num_tokens = a.num_tokens;
  cp.topk = a.topk;
  cp.H = a.hidden_size;
  if (a.hidden_size % 8 == 0) {
    const bool vec = aligned_to(cp.hidden, 16) && aligned_to(cp.permuted, 16) &&
                     aligned_to(cp.permuted_q, 8);
    // Wide pieces (4 loads in flight per lane) when there are enough of them to fill the GPU;
    // at decode, one-strip pieces spread a few tokens over more SMs.
    const int64_t wide_pieces = (a.hidden_size + 4 * kStripCols - 1) / (4 * kStripCols);
    const bool wide = a.num_tokens * wide_pieces >= int64_t(props_.multiProcessorCount) * 8;
    const int strips = wide ? 4 : 1;
    cp.pieces = (a.hidden_size + strips * kStripCols - 1) / (strips * kStripCols);
    const unsigned grid = grid_blocks(a.num_tokens * cp.pieces, kCopyThreads / 32);
    // The round trip in the copy where the copy is vectorised and bf16 only; else a pass after it
    // (also with FMOE_MX_ROUND_TRIP=pass, for comparisons).
    static const bool pass = [] {
      const char* e = std::getenv("FMOE_MX_ROUND_TRIP");
      return e != nullptr && std::strcmp(e, "pass") == 0;
    }();
    const bool in_copy = mx_round_trip && !pass && vec && a.hidden_size % 64 == 0 &&
                         a.permuted != nullptr && a.permuted_q == nullptr;
    launch_copy(cp, vec, wide, a.permuted_q != nullptr, in_copy, grid, st);
    FMOE_CHECK_LAUNCH("permute_copy_kernel");
    if (mx_round_trip && !in_copy) {
      auto* rows = static_cast<uint16_t*>(a.permuted);
      FMOE_TRY(mx_round_trip_k_order(s, rows, max_rows, a.hidden_size, rows));
    }
  } else {
    // permuted_q needs hidden_size % 32 == 0 (validated), so only the bf16 copy lands here.
    cp.pieces = 0;
    const unsigned grid = unsigned(std::min<int64_t>(rp.num_slots, kMaxGridBlocks));
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
