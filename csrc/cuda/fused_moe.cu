// fused_moe on the CUDA backend: the default composition (core/fused_moe.cpp) with FC1 and the
// activation fused into one kernel,
//   permute -> FC1 + activation (grouped_mm_sm90_bf16_act) -> FC2 -> unpermute,
// for bf16 weights wherever the Hopper GEMM handles the FC1 shape. The FC1 output [rows, N1]
// never reaches memory: the GEMM's epilogue writes act_out [rows, I] directly, which saves the
// activation pass (a write of [rows, N1] and its read back: ~0.22 ms of 1.56 ms for qwen3 at
// T = 8192). The numbers are those of the op-by-op path (fmoe.h "Precision": h rounded to bf16,
// activation in f32, rounded once).
//
// Same workspace layout as the default (plan_workspace_layout; the fc1_out region stays unused),
// same static sizes, no host synchronisation or allocation: graph-capturable like the default.
// MXFP8 weights take the same path with the Hopper kernel that dequantizes in its producer
// (grouped_mm_sm90_mxfp8_act), then quantize the bf16 activation (written to the fc1_out region)
// into act_out / act_scale for FC2: the numbers of the op-by-op path, whose fused MXFP8
// activation output is exactly that quantization (fmoe.h "Precision").
// FMOE_CUDA_GEMM=mma and shapes the fused kernel refuses take the default path.
//
// Decode (T <= kDecodeMaxTokens, both formats): a group holds at most T real rows (more only if
// a token names one expert in several of its slots, which stays correct, in several tiles), so
// the weights-as-M "swap-AB" kernel of grouped_mm_small.cu streams each routed expert's weights
// once over a grid large enough to pull full bandwidth:
//   route (permute without its copy: FC1 gathers its rows from `hidden` through
//   permutation_map) -> FC1 + activation (small kernel) -> [MXFP8: quantize the activation]
//   -> FC2 (small kernel) -> unpermute.
// The routing uses alignment 1 internally: padding changes no output of the fused op, and groups
// without padding rows never ask the small kernel for more than one tile of token rows. The
// choice between decode and prefill is made on the host from T alone (static under capture); the
// routing decides nothing that needs a sync.
#include <algorithm>

#include "core/context.h"
#include "cuda/backend.h"
#include "cuda/grouped_mm_sm90.h"
#include "cuda/grouped_mm_small.h"

namespace fmoe {

namespace {
// Up to this many tokens the decode path runs: the small kernel's token tile is at most 32 rows.
constexpr int64_t kDecodeMaxTokens = 32;
}  // namespace

Status CudaBackend::fused_moe_decode(BackendStream* s, const PlanShape& shape,
                                     const fmoe_moe_args& a, int32_t* invalid_count,
                                     bool* handled) {
  *handled = false;
  const fmoe_plan_desc& d = shape.desc;
  const WorkspaceLayout L = plan_workspace_layout(shape);
  char* ws = static_cast<char*>(a.workspace);
  auto at = [ws](size_t offset) { return static_cast<void*>(ws + offset); };
  const bool mx = d.weight_format == FMOE_WEIGHTS_MXFP8;
  const bool skip_permute = a.tokens_per_expert != nullptr;
  const bool weight_on_input = d.apply_router_weight_on_input != 0;
  const int64_t T = a.num_tokens;
  const int64_t E = d.num_local_experts;
  const int64_t topk = skip_permute ? 1 : d.topk;
  int64_t rows = 0;
  compute_max_rows(T, topk, E, /*alignment=*/1, &rows);

  auto* expert_offsets = static_cast<int32_t*>(at(L.expert_offsets));
  auto* permutation_map = static_cast<int32_t*>(at(L.permutation_map));
  auto* inverse_map = static_cast<int32_t*>(at(L.inverse_map));
  void* permuted = at(L.permuted);
  // Gathering FC1's rows straight from `hidden` needs the rows unchanged: bf16, and the router
  // weight not applied to the input. Otherwise permute copies (scales, quantizes) them.
  const bool gather = !mx && !weight_on_input;

  cuda::SmallMmArgs fc1;
  fc1.a = gather ? a.hidden : permuted;
  fc1.a_scale = mx ? static_cast<const uint8_t*>(at(L.permuted_scale)) : nullptr;
  fc1.a_row_index = gather ? permutation_map : nullptr;
  fc1.a_rows = gather ? T : rows;
  fc1.b = a.fc1;
  fc1.b_scale = mx ? a.fc1_scale : nullptr;
  fc1.bias = a.fc1_bias;
  // bf16 activation [rows, I]: in act_out for bf16; for MXFP8 in fc1_out (a bf16 region at least
  // [rows, I]), from where it is quantized into act_out / act_scale.
  fc1.c = mx ? at(L.fc1_out) : at(L.act_out);
  fc1.ldc = d.ffn;
  fc1.group_offsets = expert_offsets;
  fc1.row_map = permutation_map;
  fc1.rows = rows;
  fc1.n = shape.n1;
  fc1.k = d.hidden_size;
  fc1.groups = E;
  fc1.max_rows_per_group = std::max<int64_t>(1, T);
  fc1.format = d.weight_format;
  fc1.epilogue.activation = d.activation;
  fc1.epilogue.layout = d.layout;
  fc1.epilogue.alpha = d.alpha;
  fc1.epilogue.limit = d.limit;

  cuda::SmallMmArgs fc2;
  fc2.a = at(L.act_out);
  fc2.a_scale = mx ? static_cast<const uint8_t*>(at(L.act_scale)) : nullptr;
  fc2.a_rows = rows;
  fc2.b = a.fc2;
  fc2.b_scale = mx ? a.fc2_scale : nullptr;
  fc2.bias = a.fc2_bias;
  fc2.c = permuted;  // bf16 [rows, H] over the permuted input, which FC1 has consumed
  fc2.ldc = d.hidden_size;
  fc2.group_offsets = expert_offsets;
  fc2.row_map = permutation_map;
  fc2.rows = rows;
  fc2.n = d.hidden_size;
  fc2.k = d.ffn;
  fc2.groups = E;
  fc2.max_rows_per_group = std::max<int64_t>(1, T);
  fc2.format = d.weight_format;
  // Decided before anything is enqueued: the fallback is taken whole or not at all.
  if (T > kDecodeMaxTokens || !cuda::grouped_mm_small_supported(fc1) ||
      !cuda::grouped_mm_small_supported(fc2))
    return FMOE_OK;
  *handled = true;

  const int32_t* routing = a.routing_map;
  if (skip_permute) {
    auto* routing_rows = static_cast<int32_t*>(at(L.routing_rows));
    FMOE_TRY(expand_group_ids(s, a.tokens_per_expert, E, d.local_expert_start, T, routing_rows));
    routing = routing_rows;
  }
  fmoe_permute_args p{};
  p.size = sizeof p;
  p.hidden = a.hidden;
  p.routing_map = routing;
  p.probs = weight_on_input ? a.probs : nullptr;
  // Both outputs NULL: the routing alone (CudaBackend::permute skips its copy).
  p.permuted = gather || mx ? nullptr : permuted;
  p.permuted_q = mx ? static_cast<uint8_t*>(permuted) : nullptr;
  p.permuted_scale = mx ? static_cast<uint8_t*>(at(L.permuted_scale)) : nullptr;
  p.expert_offsets = expert_offsets;
  p.permutation_map = permutation_map;
  p.inverse_map = inverse_map;
  p.invalid_count = skip_permute ? nullptr : invalid_count;
  p.num_tokens = T;
  p.hidden_size = d.hidden_size;
  p.topk = topk;
  p.num_experts = d.num_experts;
  p.local_expert_start = d.local_expert_start;
  p.num_local_experts = E;
  p.alignment = 1;
  FMOE_TRY(permute(s, p));

  FMOE_TRY(activate());
  const int sms = props_.multiProcessorCount;
  FMOE_CHECK_CUDA(cuda::grouped_mm_small(fc1, sms, stream_of(s)));
  if (mx)  // rows the GEMM skipped hold stale bf16 here; their quantized bytes are never read
    FMOE_TRY(quantize_mxfp8(s, static_cast<const uint16_t*>(at(L.fc1_out)), rows, d.ffn,
                            static_cast<uint8_t*>(at(L.act_out)),
                            static_cast<uint8_t*>(at(L.act_scale))));
  FMOE_CHECK_CUDA(cuda::grouped_mm_small(fc2, sms, stream_of(s)));

  fmoe_unpermute_args u{};
  u.size = sizeof u;
  u.input = permuted;
  u.inverse_map = inverse_map;
  u.probs = weight_on_input ? nullptr : a.probs;
  u.output = a.output;
  u.rows = rows;
  u.num_tokens = T;
  u.hidden_size = d.hidden_size;
  u.topk = topk;
  return unpermute(s, u);
}

Status CudaBackend::fused_moe(BackendStream* s, const PlanShape& shape, const fmoe_moe_args& a,
                              int32_t* invalid_count) {
  const fmoe_plan_desc& d = shape.desc;
  if (!cuda::sm90_gemm_enabled()) return Backend::fused_moe(s, shape, a, invalid_count);
  bool handled = false;
  FMOE_TRY(fused_moe_decode(s, shape, a, invalid_count, &handled));
  if (handled) return FMOE_OK;
  // MXFP8 prefill: the same sequence with the quantized operands (see the top of this file).
  const bool mx = d.weight_format == FMOE_WEIGHTS_MXFP8;
  if (!mx && d.weight_format != FMOE_WEIGHTS_BF16)
    return Backend::fused_moe(s, shape, a, invalid_count);

  const WorkspaceLayout L = plan_workspace_layout(shape);
  char* ws = static_cast<char*>(a.workspace);
  auto at = [ws](size_t offset) { return static_cast<void*>(ws + offset); };
  const bool skip_permute = a.tokens_per_expert != nullptr;
  const bool weight_on_input = d.apply_router_weight_on_input != 0;
  const int64_t T = a.num_tokens;
  const int64_t E = d.num_local_experts;
  // Skip-permute: each grouped row is a token routed to its group's expert (topk = 1).
  const int64_t topk = skip_permute ? 1 : d.topk;
  int64_t rows = 0;  // this call's capacity (core/fused_moe.cpp)
  compute_max_rows(T, topk, E, d.alignment, &rows);

  auto* expert_offsets = static_cast<int32_t*>(at(L.expert_offsets));
  auto* permutation_map = static_cast<int32_t*>(at(L.permutation_map));
  auto* inverse_map = static_cast<int32_t*>(at(L.inverse_map));
  void* permuted = at(L.permuted);
  void* act_out = at(L.act_out);  // bf16 [rows, I], or e4m3 for MXFP8
  auto* permuted_scale = static_cast<uint8_t*>(at(L.permuted_scale));
  auto* act_scale = static_cast<uint8_t*>(at(L.act_scale));
  // MXFP8: the bf16 activation goes to fc1_out (at least [rows, I] bf16), from where it is
  // quantized into act_out / act_scale.
  void* act_bf16 = mx ? at(L.fc1_out) : act_out;

  fmoe_grouped_mm_args fc1{};
  fc1.size = sizeof fc1;
  fc1.a = permuted;  // bf16, or e4m3 rows + permuted_scale
  fc1.a_scale = mx ? permuted_scale : nullptr;
  fc1.b = a.fc1;
  fc1.b_scale = mx ? a.fc1_scale : nullptr;
  fc1.bias = a.fc1_bias;
  fc1.c = act_bf16;  // [rows, I]: the activation, not h
  fc1.group_offsets = expert_offsets;
  fc1.row_map = permutation_map;
  fc1.rows = rows;
  fc1.n = shape.n1;
  fc1.k = d.hidden_size;
  fc1.groups = E;
  cuda::ActEpilogue act{};
  act.activation = int(d.activation);
  act.layout = int(d.layout);
  act.alpha = float(d.alpha);
  act.limit = float(d.limit);
  // Decided before anything is enqueued, from static arguments only, so the fallback is taken
  // whole or not at all.
  if (mx ? !cuda::grouped_mm_sm90_mxfp8_act_supported(fc1, act)
         : !cuda::grouped_mm_sm90_act_supported(fc1, act))
    return Backend::fused_moe(s, shape, a, invalid_count);

  const int32_t* routing = a.routing_map;
  if (skip_permute) {
    auto* routing_rows = static_cast<int32_t*>(at(L.routing_rows));
    FMOE_TRY(expand_group_ids(s, a.tokens_per_expert, E, d.local_expert_start, T, routing_rows));
    routing = routing_rows;
  }

  fmoe_permute_args p{};
  p.size = sizeof p;
  p.hidden = a.hidden;
  p.routing_map = routing;
  p.probs = weight_on_input ? a.probs : nullptr;
  p.permuted = mx ? nullptr : permuted;
  p.permuted_q = mx ? static_cast<uint8_t*>(permuted) : nullptr;
  p.permuted_scale = mx ? permuted_scale : nullptr;
  p.expert_offsets = expert_offsets;
  p.permutation_map = permutation_map;
  p.inverse_map = inverse_map;
  // Rows beyond the sum of tokens_per_expert get id -1 by design: not routing errors.
  p.invalid_count = skip_permute ? nullptr : invalid_count;
  p.num_tokens = T;
  p.hidden_size = d.hidden_size;
  p.topk = topk;
  p.num_experts = d.num_experts;
  p.local_expert_start = d.local_expert_start;
  p.num_local_experts = E;
  p.alignment = d.alignment;
  FMOE_TRY(permute(s, p));

  // Rows the activation op would skip (padding: row_map -1; rows >= n_used = offsets[E]: in no
  // group) are exactly the rows the GEMM does not write.
  FMOE_TRY(activate());
  const int sms = props_.multiProcessorCount;
  if (mx) {
    FMOE_CHECK_CUDA(cuda::grouped_mm_sm90_mxfp8_act(fc1, act, sms, stream_of(s)));
    // fmoe.h: the fused MXFP8 activation output is the quantization of the bf16 activation.
    // Rows the GEMM skipped hold stale bf16 here; their quantized bytes are never stored by FC2.
    FMOE_TRY(quantize_mxfp8(s, static_cast<const uint16_t*>(act_bf16), rows, d.ffn,
                            static_cast<uint8_t*>(act_out), act_scale));
  } else {
    FMOE_CHECK_CUDA(cuda::grouped_mm_sm90_bf16_act(fc1, act, sms, stream_of(s)));
  }

  // FC2 writes bf16 [rows, H] over the permuted input, which FC1 has consumed.
  fmoe_grouped_mm_args fc2{};
  fc2.size = sizeof fc2;
  fc2.a = act_out;
  fc2.a_scale = mx ? act_scale : nullptr;
  fc2.b = a.fc2;
  fc2.b_scale = mx ? a.fc2_scale : nullptr;
  fc2.bias = a.fc2_bias;
  fc2.c = permuted;
  fc2.group_offsets = expert_offsets;
  fc2.row_map = permutation_map;
  fc2.rows = rows;
  fc2.n = d.hidden_size;
  fc2.k = d.ffn;
  fc2.groups = E;
  FMOE_TRY(mx ? grouped_mm_mxfp8(s, fc2) : grouped_mm_bf16(s, fc2));

  fmoe_unpermute_args u{};
  u.size = sizeof u;
  u.input = permuted;
  u.inverse_map = inverse_map;
  u.probs = weight_on_input ? nullptr : a.probs;
  u.output = a.output;
  u.rows = rows;
  u.num_tokens = T;
  u.hidden_size = d.hidden_size;
  u.topk = topk;
  return unpermute(s, u);
}

}  // namespace fmoe
