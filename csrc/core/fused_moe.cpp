// The fused op: fmoe_fused_moe validates a call against its plan, and Backend::fused_moe (the
// default every backend inherits) composes the single ops through the workspace:
//   permute -> FC1 (grouped GEMM) -> activation (+ MXFP8) -> FC2 (grouped GEMM) -> unpermute.
// Every intermediate lives at a fixed offset of the workspace and every size is static, so the
// sequence captures into a graph and replays with new routing.
#include <cinttypes>

#include "core/context.h"

namespace fmoe {

Status Backend::fused_moe(BackendStream* s, const PlanShape& shape, const fmoe_moe_args& a,
                          int32_t* invalid_count) {
  const fmoe_plan_desc& d = shape.desc;
  const WorkspaceLayout L = plan_workspace_layout(shape);
  char* ws = static_cast<char*>(a.workspace);
  auto at = [ws](size_t offset) { return static_cast<void*>(ws + offset); };

  const bool mx = d.weight_format == FMOE_WEIGHTS_MXFP8;
  const bool skip_permute = a.tokens_per_expert != nullptr;
  const bool weight_on_input = d.apply_router_weight_on_input != 0;
  const int64_t T = a.num_tokens;
  const int64_t E = d.num_local_experts;
  // Skip-permute: rows arrive grouped; each row is one "token" routed to its group's expert, so
  // the same pipeline runs with topk = 1 on a synthetic routing map.
  const int64_t topk = skip_permute ? 1 : d.topk;
  // This call's capacity, not the plan's: the GEMMs and unpermute only span rows this T can fill.
  int64_t rows = 0;
  compute_max_rows(T, topk, E, d.alignment, &rows);

  auto* expert_offsets = static_cast<int32_t*>(at(L.expert_offsets));
  auto* permutation_map = static_cast<int32_t*>(at(L.permutation_map));
  auto* inverse_map = static_cast<int32_t*>(at(L.inverse_map));
  void* permuted = at(L.permuted);
  auto* permuted_scale = static_cast<uint8_t*>(at(L.permuted_scale));
  void* fc1_out = at(L.fc1_out);
  void* act_out = at(L.act_out);
  auto* act_scale = static_cast<uint8_t*>(at(L.act_scale));

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

  fmoe_grouped_mm_args fc1{};
  fc1.size = sizeof fc1;
  fc1.a = permuted;
  fc1.a_scale = mx ? permuted_scale : nullptr;
  fc1.b = a.fc1;
  fc1.b_scale = mx ? a.fc1_scale : nullptr;
  fc1.bias = a.fc1_bias;
  fc1.c = fc1_out;
  fc1.group_offsets = expert_offsets;
  fc1.row_map = permutation_map;
  fc1.rows = rows;
  fc1.n = shape.n1;
  fc1.k = d.hidden_size;
  fc1.groups = E;
  FMOE_TRY(mx ? grouped_mm_mxfp8(s, fc1) : grouped_mm_bf16(s, fc1));

  fmoe_activation_args act{};
  act.size = sizeof act;
  act.input = fc1_out;
  act.output = mx ? nullptr : act_out;
  act.output_q = mx ? static_cast<uint8_t*>(act_out) : nullptr;
  act.output_scale = mx ? act_scale : nullptr;
  act.row_map = permutation_map;
  act.n_used = expert_offsets + E;
  act.rows = rows;
  act.ffn = d.ffn;
  act.activation = d.activation;
  act.layout = d.layout;
  act.alpha = d.alpha;
  act.limit = d.limit;
  FMOE_TRY(activation_quant(s, act));

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

using namespace fmoe;

extern "C" FMOE_API int fmoe_fused_moe(fmoe_plan_t plan, void* stream, const fmoe_moe_args* args) {
  return abi_call("fmoe_fused_moe", [&]() -> Status {
    FMOE_CHECK_ARG(plan_is_live(plan), "fmoe_fused_moe", "plan %p is not a live plan",
                   static_cast<void*>(plan));
    fmoe_context_s* ctx = plan->ctx;
    std::lock_guard<std::mutex> lock(ctx->mu);
    Check c(ctx, "fmoe_fused_moe");
    BackendStream* s = nullptr;
    c.stream(stream, &s).not_null(args, "args");
    if (c.ok()) c.struct_size(args->size, sizeof(fmoe_moe_args), "fmoe_moe_args");
    FMOE_TRY(c.status());

    const fmoe_moe_args& a = *args;
    const PlanShape& shape = plan->shape;
    const fmoe_plan_desc& d = shape.desc;
    const bool mx = d.weight_format == FMOE_WEIGHTS_MXFP8;
    const bool skip_permute = a.tokens_per_expert != nullptr;
    const int64_t T = a.num_tokens, H = d.hidden_size, I = d.ffn, E = d.num_local_experts,
                  N1 = shape.n1, topk = d.topk;
    const int64_t needed = plan->workspace_bytes;

    c.not_null(a.hidden, "hidden");
    if (!skip_permute) c.not_null(a.routing_map, "routing_map");
    c.not_null(a.probs, "probs").not_null(a.fc1, "fc1");
    if (mx) c.not_null(a.fc1_scale, "fc1_scale (weight_format is mxfp8)");
    c.not_null(a.fc2, "fc2");
    if (mx) c.not_null(a.fc2_scale, "fc2_scale (weight_format is mxfp8)");
    c.not_null(a.output, "output");
    if (needed > 0) c.not_null(a.workspace, "workspace");
    c.that(a.workspace_bytes >= needed,
           "workspace_bytes (%" PRId64 ") is less than the plan's workspace (%" PRId64 " bytes)",
           a.workspace_bytes, needed)
        .at_least(T, 0, "num_tokens");
    if (skip_permute)
      c.that(T <= d.max_tokens * topk,
             "num_tokens (%" PRId64 ") exceeds the plan's max_tokens * topk (%" PRId64
             ") (skip-permute mode)",
             T, d.max_tokens * topk);
    else
      c.that(T <= d.max_tokens, "num_tokens (%" PRId64 ") exceeds the plan's max_tokens (%" PRId64
             ")", T, d.max_tokens);
    FMOE_TRY(c.status());

    const int64_t wb = mx ? 1 : 2;
    c.buffer(a.hidden, "hidden", {T, H}, 2)
        .buffer(a.routing_map, "routing_map", {T, skip_permute ? 1 : topk}, 4)
        .buffer(a.probs, "probs", {T, skip_permute ? 1 : topk}, 4)
        .buffer(a.tokens_per_expert, "tokens_per_expert", {E}, 4)
        .buffer(a.fc1, "fc1", {E, N1, H}, wb)
        .buffer(a.fc2, "fc2", {E, H, I}, wb)
        .buffer(a.fc1_bias, "fc1_bias", {E, N1}, 4)
        .buffer(a.fc2_bias, "fc2_bias", {E, H}, 4)
        .buffer(a.output, "output", {T, H}, 2)
        .buffer_bytes(a.workspace, "workspace", needed);
    if (mx) {
      c.buffer(a.fc1_scale, "fc1_scale", {E, N1, H / 32}, 1)
          .buffer(a.fc2_scale, "fc2_scale", {E, H, I / 32}, 1);
    }
    FMOE_TRY(c.status());
    return ctx->backend->fused_moe(s, shape, a, plan->invalid_counter);
  });
}
