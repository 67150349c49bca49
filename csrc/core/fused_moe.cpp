// The fused op: fmoe_fused_moe validates a call against its plan, and Backend::fused_moe (the
// default every backend inherits) composes the single ops through the workspace:
//   permute -> FC1 (grouped GEMM) -> activation (+ MXFP8) -> FC2 (grouped GEMM) -> unpermute.
// Every intermediate lives at a fixed offset of the workspace and every size is static, so the
// sequence captures into a graph and replays with new routing.
#include <cinttypes>

#include "core/context.h"
#include "core/moe_call.h"

namespace fmoe {

MoeCall::MoeCall(const PlanShape& shape_, const fmoe_moe_args& args_)
    : shape(shape_),
      desc(shape_.desc),
      args(args_),
      mx(desc.weight_format == FMOE_WEIGHTS_MXFP8),
      skip_permute(args_.tokens_per_expert != nullptr),
      weight_on_input(desc.apply_router_weight_on_input != 0),
      tokens(args_.num_tokens),
      topk(skip_permute ? 1 : desc.topk) {
  const WorkspaceLayout L = plan_workspace_layout(shape);
  char* ws = static_cast<char*>(args.workspace);
  expert_offsets = reinterpret_cast<int32_t*>(ws + L.expert_offsets);
  permutation_map = reinterpret_cast<int32_t*>(ws + L.permutation_map);
  inverse_map = reinterpret_cast<int32_t*>(ws + L.inverse_map);
  routing_rows = reinterpret_cast<int32_t*>(ws + L.routing_rows);
  permuted = ws + L.permuted;
  permuted_scale = reinterpret_cast<uint8_t*>(ws + L.permuted_scale);
  fc1_out = ws + L.fc1_out;
  act_out = ws + L.act_out;
  act_scale = reinterpret_cast<uint8_t*>(ws + L.act_scale);
  tile_counters = reinterpret_cast<int32_t*>(ws + L.tile_counters);
}

int64_t MoeCall::rows(int64_t alignment) const {
  int64_t r = 0;
  compute_max_rows(tokens, topk, desc.num_local_experts, alignment, &r);
  return r;
}

Status MoeCall::routing(Backend& backend, BackendStream* s, const int32_t** routing) const {
  *routing = args.routing_map;
  if (!skip_permute) return FMOE_OK;
  *routing = routing_rows;
  return backend.expand_group_ids(s, args.tokens_per_expert, desc.num_local_experts,
                                  desc.local_expert_start, tokens, routing_rows);
}

fmoe_permute_args MoeCall::permute_args(const int32_t* routing, int32_t* invalid_count,
                                        int64_t alignment, bool copy_rows) const {
  fmoe_permute_args p{};
  p.size = sizeof p;
  p.hidden = args.hidden;
  p.routing_map = routing;
  p.probs = weight_on_input ? args.probs : nullptr;
  if (copy_rows && mx) {
    p.permuted_q = static_cast<uint8_t*>(permuted);
    p.permuted_scale = permuted_scale;
  } else if (copy_rows) {
    p.permuted = permuted;
  }
  p.expert_offsets = expert_offsets;
  p.permutation_map = permutation_map;
  p.inverse_map = inverse_map;
  p.invalid_count = skip_permute ? nullptr : invalid_count;
  p.num_tokens = tokens;
  p.hidden_size = desc.hidden_size;
  p.topk = topk;
  p.num_experts = desc.num_experts;
  p.local_expert_start = desc.local_expert_start;
  p.num_local_experts = desc.num_local_experts;
  p.alignment = alignment;
  return p;
}

fmoe_grouped_mm_args MoeCall::fc1_args(int64_t rows, void* c) const {
  fmoe_grouped_mm_args g{};
  g.size = sizeof g;
  g.a = permuted;
  g.a_scale = mx ? permuted_scale : nullptr;
  g.b = args.fc1;
  g.b_scale = mx ? args.fc1_scale : nullptr;
  g.bias = args.fc1_bias;
  g.c = c;
  g.group_offsets = expert_offsets;
  g.row_map = permutation_map;
  g.rows = rows;
  g.n = shape.n1;
  g.k = desc.hidden_size;
  g.groups = desc.num_local_experts;
  return g;
}

fmoe_grouped_mm_args MoeCall::fc2_args(int64_t rows) const {
  fmoe_grouped_mm_args g{};
  g.size = sizeof g;
  g.a = act_out;
  g.a_scale = mx ? act_scale : nullptr;
  g.b = args.fc2;
  g.b_scale = mx ? args.fc2_scale : nullptr;
  g.bias = args.fc2_bias;
  g.c = permuted;  // bf16 [rows, H] over the permuted input, which FC1 has consumed
  g.group_offsets = expert_offsets;
  g.row_map = permutation_map;
  g.rows = rows;
  g.n = desc.hidden_size;
  g.k = desc.ffn;
  g.groups = desc.num_local_experts;
  return g;
}

fmoe_activation_args MoeCall::activation_args(int64_t rows) const {
  fmoe_activation_args act{};
  act.size = sizeof act;
  act.input = fc1_out;
  act.output = mx ? nullptr : act_out;
  act.output_q = mx ? static_cast<uint8_t*>(act_out) : nullptr;
  act.output_scale = mx ? act_scale : nullptr;
  act.row_map = permutation_map;
  act.n_used = expert_offsets + desc.num_local_experts;
  act.rows = rows;
  act.ffn = desc.ffn;
  act.activation = desc.activation;
  act.layout = desc.layout;
  act.alpha = desc.alpha;
  act.limit = desc.limit;
  return act;
}

fmoe_unpermute_args MoeCall::unpermute_args(int64_t rows) const {
  fmoe_unpermute_args u{};
  u.size = sizeof u;
  u.input = permuted;
  u.inverse_map = inverse_map;
  u.probs = weight_on_input ? nullptr : args.probs;
  u.output = args.output;
  u.rows = rows;
  u.num_tokens = tokens;
  u.hidden_size = desc.hidden_size;
  u.topk = topk;
  return u;
}

Status Backend::fused_moe(BackendStream* s, const PlanShape& shape, const fmoe_moe_args& a,
                          int32_t* invalid_count) {
  const MoeCall call(shape, a);
  // This call's capacity, not the plan's: the GEMMs and unpermute only span rows this T can fill.
  const int64_t rows = call.rows(shape.desc.alignment);
  const int32_t* routing = nullptr;
  FMOE_TRY(call.routing(*this, s, &routing));
  FMOE_TRY(permute(s, call.permute_args(routing, invalid_count, shape.desc.alignment, true)));
  const fmoe_grouped_mm_args fc1 = call.fc1_args(rows, call.fc1_out);
  FMOE_TRY(call.mx ? grouped_mm_mxfp8(s, fc1) : grouped_mm_bf16(s, fc1));
  FMOE_TRY(activation_quant(s, call.activation_args(rows)));
  const fmoe_grouped_mm_args fc2 = call.fc2_args(rows);
  FMOE_TRY(call.mx ? grouped_mm_mxfp8(s, fc2) : grouped_mm_bf16(s, fc2));
  return unpermute(s, call.unpermute_args(rows));
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
