// fused_moe on the CUDA backend: the default composition (core/fused_moe.cpp) with FC1 and the
// activation fused into one kernel,
//   permute -> FC1 + activation (grouped_mm_sm90_bf16_act) -> FC2 -> unpermute,
// for bf16 weights wherever the Hopper GEMM handles the FC1 shape. The FC1 output [rows, N1]
// never reaches memory: the GEMM's epilogue writes act_out [rows, I] directly, which saves the
// activation pass (a write of [rows, N1] and its read back: ~0.22 ms of 1.56 ms for qwen3 at
// T = 8192). The numbers are those of the op-by-op path (fmoe.h "Precision": h rounded to bf16,
// activation in f32, rounded once).
//
// Same workspace layout as the default (plan_workspace_layout; bf16 leaves the fc1_out region
// unused), same static sizes, no host synchronisation or allocation: graph-capturable like the
// default. The prefill GEMMs draw their tiles from the workspace's tile counters (dynamic
// scheduling, grouped_mm_sm90.h), zeroed by one memset node per call ahead of them.
// MXFP8 weights (H % 64 == 0, I % 64 == 0) take the kernels that dequantize the weights into the
// wgmma registers (grouped_mm_sm90_mx_regs*), whose activations are bf16 holding MXFP8 values in
// the kernels' k order:
//   permute (bf16 copy, rounded through MXFP8) -> FC1 + activation + round trip (into the
//   fc1_out region) -> FC2 -> unpermute.
// The numbers are those of the op-by-op path (fmoe.h "Precision": the input and the activation
// quantized to MXFP8, the products exact, sums in f32) up to the order of the sums. Other MXFP8
// shapes take the fp8-wgmma kernel (grouped_mm_sm90_mxfp8_act), then quantize the bf16
// activation (written to the fc1_out region) into act_out / act_scale for FC2.
// FMOE_CUDA_GEMM=mma and shapes the fused kernel refuses take the default path.
//
// Decode (T <= kDecodeMaxTokens, or few routed rows per expert; both formats): a group holds at
// most T real rows, mostly far fewer (a group over the token tile takes several tiles, correct and
// a little slower), so the weights-as-M "swap-AB" kernel of grouped_mm_small.cu streams each
// routed expert's weights once over a grid large enough to pull full bandwidth:
//   route (permute without its copy: FC1 gathers its rows from `hidden` through
//   permutation_map, or, up to 256 routing entries, through the same layout built from the
//   routing map in each CTA, beside the routing kernel instead of after it) -> FC1 + activation
//   (small kernel) -> [MXFP8: quantize the activation] -> FC2 (small kernel) -> unpermute.
// MXFP8 quantizes the T input rows (not their T * topk copies) beside the routing kernel, and FC1
// gathers them through its own layout where it routes itself (8-token tiles, up to 256 entries,
// kMxRoutedMaxSlotsOverWaves where its grid takes several waves), else permute copies and
// quantizes the rows and FC1 reads them after it.
// The routing uses alignment 1 internally: padding changes no output of the fused op, and groups
// without padding rows never ask the small kernel for more tiles of token rows than they need.
// The choice between decode and prefill is made on the host from T, topk and E alone (static
// under capture); the routing decides nothing that needs a sync.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "core/context.h"
#include "core/moe_call.h"
#include "cuda/backend.h"
#include "cuda/grouped_mm_sm90.h"
#include "cuda/grouped_mm_small.h"

namespace fmoe {

namespace {
// The decode path runs up to kDecodeMaxTokens tokens, and beyond while the routed rows average at
// most kDecodeRowsPerExpert per expert (T * topk <= 16 E): each routed expert's weights are then
// streamed once for its one or two token tiles, where the prefill kernel computes 128-row tiles
// of mostly padding. Measured on an H200 (bench/NOTES.md v5): 8 and 16 both beat the prefill path
// at 4-8 rows per expert (qwen3, gpt-oss, deepseek at T = 128) and 16 also at 16 (gpt-oss,
// deepseek at T = 512); at 32 (qwen3 T = 512) the prefill path is as fast.
constexpr int64_t kDecodeMaxTokens = 32;
constexpr int64_t kDecodeRowsPerExpert = 16;

// MXFP8 FC1 routes itself (the input quantized beside the routing) wherever its grid is one wave
// of CTAs (persistent grids always are), and on grids of a CTA per item over several waves up to
// this many routing entries: each CTA builds its table from the routing map (one warp walks the
// entries), which such a grid pays again in every CTA. Measured on an H100 (bench/NOTES.md v22
// item 85, v23 item 89): routed, T = 1 and 8 ran 2-14% faster, the persistent T = 32 grids
// 0.3-1.4% faster, and deepseek-v3 T = 32 (256 entries, ~20 waves of a CTA per item) 2% slower.
constexpr int64_t kMxRoutedMaxSlotsOverWaves = 64;

// The prefill paths draw FC1's tiles from tile_counters[0] and FC2's from tile_counters[1]
// (dynamic scheduling, grouped_mm_sm90.h), which needs each counter zero when its launch starts.
// One memset node for both, enqueued ahead of FC1, keeps the call graph-capturable: a replay
// zeroes them again, with no host write and no extra kernel.
constexpr int kPrefillTileCounters = 2;
static_assert(kPrefillTileCounters <= kTileCounters, "the workspace holds kTileCounters");
cudaError_t zero_prefill_tile_counters(int32_t* counters, cudaStream_t stream) {
  return cudaMemsetAsync(counters, 0, kPrefillTileCounters * sizeof(int32_t), stream);
}

// A step's grouped GEMM arguments as the decode kernel takes them.
cuda::SmallMmArgs small_mm_args(const fmoe_grouped_mm_args& g, int64_t ldc, int64_t format,
                                int64_t max_rows_per_group) {
  cuda::SmallMmArgs m;
  m.a = g.a;
  m.a_scale = g.a_scale;
  m.a_rows = g.rows;
  m.b = g.b;
  m.b_scale = g.b_scale;
  m.bias = g.bias;
  m.c = g.c;
  m.ldc = ldc;
  m.group_offsets = g.group_offsets;
  m.row_map = g.row_map;
  m.rows = g.rows;
  m.n = g.n;
  m.k = g.k;
  m.groups = g.groups;
  m.max_rows_per_group = max_rows_per_group;
  m.format = format;
  return m;
}

// FMOE_DECODE_SPLITS=F1,F2 forces the decode chain's split-K factors (1, 2 or 4; 0 keeps the
// configuration's pick) for FC1 and FC2 (comparisons).
int forced_decode_splits(int which) {
  static const std::pair<int, int> forced = [] {
    const char* e = std::getenv("FMOE_DECODE_SPLITS");
    int f1 = 0, f2 = 0;
    if (e != nullptr && std::sscanf(e, "%d,%d", &f1, &f2) != 2) f1 = f2 = 0;
    auto valid = [](int v) { return v == 1 || v == 2 || v == 4 ? v : 0; };
    return std::pair<int, int>(valid(f1), valid(f2));
  }();
  return which == 1 ? forced.first : forced.second;
}

cuda::SmallMmConfig with_forced_splits(cuda::SmallMmConfig cfg, int which) {
  if (const int splits = forced_decode_splits(which)) {
    cfg.splits = splits;
    cfg.grid = 0;  // the launch sizes the grid for these splits
  }
  return cfg;
}

// FC1 laying out its rows from the routing map itself (the routing kernel's layout): its T input
// rows, gathered per routing entry.
cuda::SmallMmArgs routed_fc1(cuda::SmallMmArgs fc1, const fmoe_moe_args& a, const MoeCall& call,
                             const fmoe_plan_desc& d) {
  fc1.a_rows = call.tokens;
  fc1.routing_map = a.routing_map;
  fc1.topk = call.topk;
  fc1.expert_start = d.local_expert_start;
  return fc1;
}

cuda::ActEpilogue act_epilogue(const fmoe_plan_desc& d) {
  cuda::ActEpilogue act{};
  act.activation = int(d.activation);
  act.layout = int(d.layout);
  act.alpha = float(d.alpha);
  act.limit = float(d.limit);
  return act;
}
}  // namespace

Status CudaBackend::fused_moe_decode(BackendStream* s, const PlanShape& shape,
                                     const fmoe_moe_args& a, int32_t* invalid_count,
                                     bool* handled) {
  *handled = false;
  const fmoe_plan_desc& d = shape.desc;
  const MoeCall call(shape, a);
  const int64_t rows = call.rows(/*alignment=*/1);
  const int64_t bound = std::max<int64_t>(1, call.tokens);
  // Gathering FC1's rows straight from `hidden` needs the rows unchanged: bf16, and the router
  // weight not applied to the input. Otherwise permute copies (scales, quantizes) them, or, MXFP8
  // where FC1 routes itself, the input rows are quantized once each and FC1 gathers those.
  const bool gather = !call.mx && !call.weight_on_input;

  // The bf16 activation [rows, I]: act_out for bf16; for MXFP8 the fc1_out region (a bf16 region
  // of at least [rows, I]), from where it is quantized into act_out / act_scale.
  void* act_bf16 = call.mx ? call.fc1_out : call.act_out;
  cuda::SmallMmArgs fc1 = small_mm_args(call.fc1_args(rows, act_bf16), d.ffn, d.weight_format, bound);
  fc1.epilogue.activation = d.activation;
  fc1.epilogue.layout = d.layout;
  fc1.epilogue.alpha = d.alpha;
  fc1.epilogue.limit = d.limit;
  if (gather) {
    fc1.a = a.hidden;
    fc1.a_rows = call.tokens;
    // Small batches: FC1 lays the rows out from the routing map itself, so it does not wait for
    // the routing kernel; else it reads its permutation_map.
    const cuda::SmallMmArgs routed = routed_fc1(fc1, a, call, d);
    if (!call.skip_permute && cuda::grouped_mm_small_supported(routed)) fc1 = routed;
    else fc1.a_row_index = call.permutation_map;
  }
  // The chain overlaps each launch with the tail of the kernel ahead (ptx/griddep.cuh): FC1 sets
  // up under the routing and waits for it (routed: streams beside it, waiting only before its
  // stores; MXFP8 routed: its first weight stages load beside the routing and the input's
  // quantization, its tokens after the latter, which completes after the routing); FC2's offsets
  // and weights were ready before FC1 (or the quantize) let it launch (a small-kernel CTA does so
  // only once it has waited for the kernel ahead), so its first weight stages load under FC1's
  // tail and only its token rows wait; unpermute starts under FC2's tail.
  fc1.overlap_previous = true;
  cuda::SmallMmArgs fc2 = small_mm_args(call.fc2_args(rows), d.hidden_size, d.weight_format, bound);
  fc2.overlap_previous = true;
  fc2.weights_before_wait = true;
  // Decided before anything is enqueued: the fallback is taken whole or not at all.
  const bool decode = call.tokens <= kDecodeMaxTokens ||
                      call.tokens * call.topk <= kDecodeRowsPerExpert * d.num_experts;
  if (!decode || !cuda::grouped_mm_small_supported(fc1) || !cuda::grouped_mm_small_supported(fc2))
    return FMOE_OK;
  *handled = true;
  FMOE_TRY(activate());
  // MXFP8 routed: a / a_scale = the quantized input rows, [T, H] at the head of the permuted
  // region (which holds T * topk rows or more whenever FC1 routes), written by the kernel ahead.
  const int sms = props_.multiProcessorCount;
  bool quantized_input = false;
  cuda::SmallMmConfig fc1_cfg;  // FC1's launch, picked once
  if (call.mx && !call.weight_on_input && !call.skip_permute) {
    cuda::SmallMmArgs routed = routed_fc1(fc1, a, call, d);
    routed.weights_before_wait = true;
    if (cuda::grouped_mm_small_supported(routed)) {
      const cuda::SmallMmConfig cfg = cuda::grouped_mm_small_config(routed, sms);
      quantized_input = call.tokens * call.topk <= kMxRoutedMaxSlotsOverWaves ||
                        int64_t(cfg.grid) <= int64_t(cfg.ctas_per_sm) * sms;
      if (quantized_input) {
        fc1 = routed;
        fc1_cfg = cfg;
      }
    }
  }
  if (!quantized_input) fc1_cfg = cuda::grouped_mm_small_config(fc1, sms);
  fc1_cfg = with_forced_splits(fc1_cfg, 1);

  const int32_t* routing = nullptr;
  FMOE_TRY(call.routing(*this, s, &routing));
  FMOE_TRY(permute(s, call.permute_args(routing, invalid_count, 1,
                                        /*copy_rows=*/!gather && !quantized_input)));
  if (quantized_input)  // beside the routing kernel: FC1's weights load under both
    FMOE_TRY(quantize_mxfp8_launch(s, static_cast<const uint16_t*>(a.hidden), call.tokens,
                                   d.hidden_size, static_cast<uint8_t*>(call.permuted),
                                   call.permuted_scale, cuda::kBesideInput));
  FMOE_CHECK_CUDA(cuda::grouped_mm_small_with(fc1, fc1_cfg, sms, stream_of(s)));
  // MXFP8: rows the GEMM skipped hold stale bf16 here; their quantized bytes are never read. The
  // quantization launches under FC1's tail (FC1's CTAs let it once they have waited for the
  // kernel ahead) and waits for FC1 before its first read.
  if (call.mx)
    FMOE_TRY(quantize_mxfp8_launch(s, static_cast<const uint16_t*>(act_bf16), rows, d.ffn,
                                   static_cast<uint8_t*>(call.act_out), call.act_scale,
                                   cuda::kAfterPrevious));
  FMOE_CHECK_CUDA(cuda::grouped_mm_small_with(
      fc2, with_forced_splits(cuda::grouped_mm_small_config(fc2, sms), 2), sms, stream_of(s)));
  return unpermute_launch(s, call.unpermute_args(rows), /*overlap_previous=*/true);
}

Status CudaBackend::fused_moe_mx_regs(BackendStream* s, const MoeCall& call, int64_t rows,
                                      const fmoe_grouped_mm_args& fc1_args,
                                      const cuda::ActEpilogue& act, int32_t* invalid_count,
                                      bool* handled) {
  *handled = false;
  const fmoe_plan_desc& d = call.desc;
  // FMOE_MX_PREFILL=fp8 keeps the fp8-wgmma chain below, for comparisons.
  static const bool off = [] {
    const char* e = std::getenv("FMOE_MX_PREFILL");
    return e != nullptr && std::strcmp(e, "fp8") == 0;
  }();
  fmoe_grouped_mm_args fc1 = fc1_args;  // a = permuted, as bf16 round trips; c = fc1_out
  fc1.a_scale = nullptr;
  fmoe_grouped_mm_args fc2 = call.fc2_args(rows);  // c = permuted, which FC1 has consumed
  fc2.a = call.fc1_out;
  fc2.a_scale = nullptr;
  if (off || !cuda::grouped_mm_sm90_mx_regs_act_supported(fc1, act) ||
      !cuda::grouped_mm_sm90_mx_regs_supported(fc2))
    return FMOE_OK;
  *handled = true;

  const int32_t* routing = nullptr;
  FMOE_TRY(call.routing(*this, s, &routing));
  fmoe_permute_args pa = call.permute_args(routing, invalid_count, d.alignment, true);
  pa.permuted = call.permuted;  // bf16 rows, rounded through MXFP8 by the copy itself
  pa.permuted_q = nullptr;
  pa.permuted_scale = nullptr;
  FMOE_TRY(permute_launch(s, pa, /*mx_round_trip=*/true));
  const int sms = props_.multiProcessorCount;
  int32_t* counters = call.tile_counters;
  FMOE_CHECK_CUDA(zero_prefill_tile_counters(counters, stream_of(s)));
  FMOE_CHECK_CUDA(cuda::grouped_mm_sm90_mx_regs_act(fc1, act, sms, stream_of(s), counters));
  FMOE_CHECK_CUDA(cuda::grouped_mm_sm90_mx_regs(fc2, sms, stream_of(s), counters + 1));
  return unpermute(s, call.unpermute_args(rows));
}

Status CudaBackend::fused_moe(BackendStream* s, const PlanShape& shape, const fmoe_moe_args& a,
                              int32_t* invalid_count) {
  const fmoe_plan_desc& d = shape.desc;
  if (!cuda::sm90_gemm_enabled()) return Backend::fused_moe(s, shape, a, invalid_count);
  bool handled = false;
  FMOE_TRY(fused_moe_decode(s, shape, a, invalid_count, &handled));
  if (handled) return FMOE_OK;

  const MoeCall call(shape, a);
  const int64_t rows = call.rows(d.alignment);  // this call's capacity (core/fused_moe.cpp)
  // MXFP8: the bf16 activation goes to fc1_out (at least [rows, I] bf16), from where it is
  // quantized into act_out / act_scale.
  void* act_bf16 = call.mx ? call.fc1_out : call.act_out;
  const fmoe_grouped_mm_args fc1 = call.fc1_args(rows, act_bf16);  // [rows, I]: act, not h
  const cuda::ActEpilogue act = act_epilogue(d);
  // Decided before anything is enqueued, from static arguments only, so the fallback is taken
  // whole or not at all.
  if (call.mx ? !cuda::grouped_mm_sm90_mxfp8_act_supported(fc1, act)
              : !cuda::grouped_mm_sm90_act_supported(fc1, act))
    return Backend::fused_moe(s, shape, a, invalid_count);

  if (call.mx) {
    bool mx_handled = false;
    FMOE_TRY(fused_moe_mx_regs(s, call, rows, fc1, act, invalid_count, &mx_handled));
    if (mx_handled) return FMOE_OK;
  }

  const int32_t* routing = nullptr;
  FMOE_TRY(call.routing(*this, s, &routing));
  FMOE_TRY(permute(s, call.permute_args(routing, invalid_count, d.alignment, true)));
  // Rows the activation op would skip (padding: row_map -1; rows >= n_used = offsets[E]: in no
  // group) are exactly the rows the GEMM does not write.
  FMOE_TRY(activate());
  const int sms = props_.multiProcessorCount;
  if (call.mx) {
    FMOE_CHECK_CUDA(cuda::grouped_mm_sm90_mxfp8_act(fc1, act, sms, stream_of(s)));
    // fmoe.h: the fused MXFP8 activation output is the quantization of the bf16 activation.
    // Rows the GEMM skipped hold stale bf16 here; their quantized bytes are never stored by FC2.
    FMOE_TRY(quantize_mxfp8(s, static_cast<const uint16_t*>(act_bf16), rows, d.ffn,
                            static_cast<uint8_t*>(call.act_out), call.act_scale));
    FMOE_TRY(grouped_mm_mxfp8(s, call.fc2_args(rows)));
    return unpermute(s, call.unpermute_args(rows));
  }
  int32_t* counters = call.tile_counters;
  FMOE_CHECK_CUDA(zero_prefill_tile_counters(counters, stream_of(s)));
  FMOE_CHECK_CUDA(cuda::grouped_mm_sm90_bf16_act(fc1, act, sms, stream_of(s), counters));
  FMOE_TRY(grouped_mm_bf16_launch(s, call.fc2_args(rows), counters + 1));
  return unpermute(s, call.unpermute_args(rows));
}

}  // namespace fmoe
