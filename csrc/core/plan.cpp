// Plans: the static description of one MoE layer, its workspace layout and its device counter.
#include <cinttypes>
#include <cmath>

#include "core/context.h"

namespace fmoe {
namespace {

constexpr uint64_t kRegionAlign = 256;

// Plans are reached without their context by fmoe_plan_workspace_bytes, fmoe_plan_invalid_count
// and fmoe_fused_moe, so live plans are also kept in one process-wide registry: a stale or foreign
// handle is refused instead of dereferenced.
std::mutex g_plans_mu;
std::set<fmoe_plan_s*>& plan_registry() {
  static std::set<fmoe_plan_s*> plans;
  return plans;
}

// The layout in 128-bit arithmetic; false when the total does not fit in int64.
bool layout_checked(const PlanShape& shape, WorkspaceLayout* out) {
  using u128 = unsigned __int128;
  const fmoe_plan_desc& d = shape.desc;
  const bool mx = d.weight_format == FMOE_WEIGHTS_MXFP8;
  const u128 R = u128(shape.max_rows), H = u128(d.hidden_size), I = u128(d.ffn),
             N1 = u128(shape.n1), E = u128(d.num_local_experts);
  u128 off = 0;
  auto take = [&](u128 bytes) {
    u128 at = off;
    off = (off + bytes + kRegionAlign - 1) / kRegionAlign * kRegionAlign;
    return size_t(at);
  };
  WorkspaceLayout L;
  L.expert_offsets = take(4 * (E + 1));
  L.permutation_map = take(4 * R);
  L.inverse_map = take(4 * R);
  L.routing_rows = take(4 * R);
  // bf16 in both formats: the region also receives the FC2 output, bf16 [max_rows, H].
  L.permuted = take(R * H * 2);
  L.permuted_scale = take(mx ? R * (H / 32) : 0);
  L.fc1_out = take(R * N1 * 2);
  L.act_out = take(R * I * (mx ? 1 : 2));
  L.act_scale = take(mx ? R * (I / 32) : 0);
  L.tile_counters = take(4 * kTileCounters);
  if (off > u128(INT64_MAX)) return false;
  L.total_bytes = size_t(off);
  *out = L;
  return true;
}

Status validate_desc(const fmoe_plan_desc* desc, PlanShape* out) {
  Check c(nullptr, "fmoe_plan_create");
  c.not_null(desc, "desc");
  if (!c.ok()) return c.status();
  c.struct_size(desc->size, sizeof(fmoe_plan_desc), "fmoe_plan_desc");
  if (!c.ok()) return c.status();
  const fmoe_plan_desc& d = *desc;
  const bool mx = d.weight_format == FMOE_WEIGHTS_MXFP8;
  c.at_least(d.hidden_size, 1, "hidden_size")
      .at_least(d.ffn, 1, "ffn")
      .that(d.ffn <= INT64_MAX / 2, "ffn (%" PRId64 ") is too large (2 * ffn overflows int64)",
            d.ffn)
      .at_least(d.num_experts, 1, "num_experts")
      .that(d.num_experts <= INT32_MAX, "num_experts (%" PRId64 ") exceeds 2^31-1",
            d.num_experts)
      .at_least(d.num_local_experts, 1, "num_local_experts")
      .at_least(d.local_expert_start, 0, "local_expert_start")
      .that(__int128(d.local_expert_start) + d.num_local_experts <= d.num_experts,
            "local_expert_start (%" PRId64 ") + num_local_experts (%" PRId64
            ") exceeds num_experts (%" PRId64 ")",
            d.local_expert_start, d.num_local_experts, d.num_experts)
      .at_least(d.topk, 1, "topk")
      .that(d.topk <= d.num_experts, "topk (%" PRId64 ") exceeds num_experts (%" PRId64 ")",
            d.topk, d.num_experts)
      .in_range(d.activation, FMOE_ACT_SQUARED_RELU, FMOE_ACT_SWIGLU_OAI, "activation")
      .in_range(d.layout, FMOE_LAYOUT_HALVES, FMOE_LAYOUT_INTERLEAVED, "layout")
      .in_range(d.weight_format, FMOE_WEIGHTS_BF16, FMOE_WEIGHTS_MXFP8, "weight_format")
      .at_least(d.alignment, 1, "alignment")
      .at_least(d.max_tokens, 1, "max_tokens")
      .in_range(d.apply_router_weight_on_input, 0, 1, "apply_router_weight_on_input")
      .that(d.apply_router_weight_on_input == 0 || d.topk == 1,
            "apply_router_weight_on_input requires topk == 1 (topk is %" PRId64 ")", d.topk);
  if (mx) {
    c.multiple_of_32(d.hidden_size, "hidden_size", " (weight_format is mxfp8)")
        .multiple_of_32(d.ffn, "ffn", " (weight_format is mxfp8)");
  }
  if (d.activation == FMOE_ACT_SWIGLU_OAI) {
    c.that(d.limit > 0 && std::isfinite(d.limit), "limit (%g) must be finite and > 0", d.limit)
        .that(std::isfinite(d.alpha), "alpha (%g) must be finite", d.alpha);
  }
  if (!c.ok()) return c.status();
  PlanShape shape;
  shape.desc = d;
  shape.n1 = d.activation == FMOE_ACT_SQUARED_RELU ? d.ffn : 2 * d.ffn;
  bool fits =
      compute_max_rows(d.max_tokens, d.topk, d.num_local_experts, d.alignment, &shape.max_rows);
  c.that(fits && shape.max_rows <= INT32_MAX,
         "max_rows for max_tokens %" PRId64 " exceeds 2^31-1 (row indices are i32)",
         d.max_tokens);
  WorkspaceLayout L;
  if (c.ok()) c.that(layout_checked(shape, &L), "the workspace size overflows int64");
  if (!c.ok()) return c.status();
  *out = shape;
  return FMOE_OK;
}

}  // namespace

WorkspaceLayout plan_workspace_layout(const PlanShape& shape) {
  WorkspaceLayout L{};
  layout_checked(shape, &L);  // plans are validated at creation: this cannot overflow
  return L;
}

bool plan_is_live(fmoe_plan_s* plan) {
  std::lock_guard<std::mutex> lock(g_plans_mu);
  return plan != nullptr && plan_registry().count(plan) != 0;
}

void plan_registry_remove(fmoe_plan_s* plan) {
  std::lock_guard<std::mutex> lock(g_plans_mu);
  plan_registry().erase(plan);
}

namespace {
// The invalid-id counter's allocation: a size class of the buffer cache, which takes it back at
// the plan's end.
size_t counter_capacity() { return BufferCache::size_class(sizeof(int32_t)); }
}  // namespace

Status plan_release(fmoe_context_s* ctx, fmoe_plan_s* plan) {
  plan_registry_remove(plan);
  // A captured graph or queued work may still use the counter: the release waits for neither.
  Status st = FMOE_OK;
  if (plan->invalid_counter != nullptr)
    st = release_buffer(ctx, plan->invalid_counter, counter_capacity());
  delete plan;
  return st;
}

}  // namespace fmoe

using namespace fmoe;

extern "C" FMOE_API int fmoe_max_rows(int64_t num_tokens, int64_t topk, int64_t num_local_experts,
                                      int64_t alignment, int64_t* out_rows) {
  return abi_call("fmoe_max_rows", [&]() -> Status {
    Check c(nullptr, "fmoe_max_rows");
    c.not_null(out_rows, "out_rows")
        .at_least(num_tokens, 0, "num_tokens")
        .at_least(topk, 1, "topk")
        .at_least(num_local_experts, 1, "num_local_experts")
        .at_least(alignment, 1, "alignment");
    FMOE_TRY(c.status());
    int64_t rows = 0;
    FMOE_CHECK_ARG(compute_max_rows(num_tokens, topk, num_local_experts, alignment, &rows),
                   "fmoe_max_rows", "the row count overflows int64");
    *out_rows = rows;
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_plan_create(fmoe_context_t ctx, const fmoe_plan_desc* desc,
                                         fmoe_plan_t* out_plan) {
  return abi_call("fmoe_plan_create", [&]() -> Status {
    FMOE_CHECK_ARG(ctx != nullptr, "fmoe_plan_create", "ctx is NULL");
    FMOE_CHECK_ARG(out_plan != nullptr, "fmoe_plan_create", "out_plan is NULL");
    *out_plan = nullptr;
    PlanShape shape;
    FMOE_TRY(validate_desc(desc, &shape));
    std::lock_guard<std::mutex> lock(ctx->mu);
    FMOE_TRY(refuse_on_capturing_thread(
        ctx, "fmoe_plan_create",
        "a plan allocates and waits for the device, which a capture cannot record (create it "
        "before fmoe_graph_capture_begin)"));
    Backend& b = *ctx->backend;
    void* counter = nullptr;
    FMOE_TRY(b.alloc(counter_capacity(), &counter));
    // Zero it on a stream of its own and wait: the default stream may be capturing (the memset
    // would be recorded, not run), and the counter must be ready for every stream.
    BackendStream* tmp = nullptr;
    Status st = b.stream_create(&tmp);
    if (st == FMOE_OK) {
      st = b.memset(counter, 0, sizeof(int32_t), tmp);
      if (st == FMOE_OK) st = b.stream_synchronize(tmp);
      Status destroyed = b.stream_destroy(tmp);
      if (st == FMOE_OK) st = destroyed;
    }
    if (st != FMOE_OK) {
      b.free(counter);
      return st;
    }
    auto* plan = new fmoe_plan_s{ctx, shape, int64_t(plan_workspace_layout(shape).total_bytes),
                                 static_cast<int32_t*>(counter)};
    ctx->plans.insert(plan);
    {
      std::lock_guard<std::mutex> reg(g_plans_mu);
      plan_registry().insert(plan);
    }
    *out_plan = plan;
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_plan_destroy(fmoe_context_t ctx, fmoe_plan_t plan) {
  return abi_call("fmoe_plan_destroy", [&]() -> Status {
    FMOE_CHECK_ARG(ctx != nullptr, "fmoe_plan_destroy", "ctx is NULL");
    if (plan == nullptr) return FMOE_OK;
    std::lock_guard<std::mutex> lock(ctx->mu);
    FMOE_CHECK_ARG(ctx->plans.count(plan) != 0, "fmoe_plan_destroy",
                   "plan %p is not a live plan of this context", static_cast<void*>(plan));
    ctx->plans.erase(plan);
    return plan_release(ctx, plan);
  });
}

extern "C" FMOE_API int fmoe_plan_workspace_bytes(fmoe_plan_t plan, int64_t* out_bytes) {
  return abi_call("fmoe_plan_workspace_bytes", [&]() -> Status {
    FMOE_CHECK_ARG(out_bytes != nullptr, "fmoe_plan_workspace_bytes", "out_bytes is NULL");
    FMOE_CHECK_ARG(plan_is_live(plan), "fmoe_plan_workspace_bytes",
                   "plan %p is not a live plan", static_cast<void*>(plan));
    *out_bytes = plan->workspace_bytes;
    return FMOE_OK;
  });
}

extern "C" FMOE_API int fmoe_plan_invalid_count(fmoe_plan_t plan, int32_t** out_device_counter) {
  return abi_call("fmoe_plan_invalid_count", [&]() -> Status {
    FMOE_CHECK_ARG(out_device_counter != nullptr, "fmoe_plan_invalid_count",
                   "out_device_counter is NULL");
    FMOE_CHECK_ARG(plan_is_live(plan), "fmoe_plan_invalid_count", "plan %p is not a live plan",
                   static_cast<void*>(plan));
    *out_device_counter = plan->invalid_counter;
    return FMOE_OK;
  });
}
