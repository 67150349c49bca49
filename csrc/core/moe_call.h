// One fused_moe call seen through its plan: the typed regions of its workspace and the argument
// structs of its steps. The default composition (core/fused_moe.cpp) and a backend's own fused
// paths build their steps from here, so the steps agree on every buffer and size.
#pragma once

#include <cstdint>

#include "core/backend.h"

namespace fmoe {

struct MoeCall {
  MoeCall(const PlanShape& shape, const fmoe_moe_args& args);

  const PlanShape& shape;
  const fmoe_plan_desc& desc;
  const fmoe_moe_args& args;
  bool mx;               // MXFP8 weights (and activations)
  bool skip_permute;     // rows arrive grouped (tokens_per_expert set)
  bool weight_on_input;  // apply_router_weight_on_input
  int64_t tokens;        // T (rows in skip-permute mode)
  int64_t topk;          // 1 in skip-permute mode: each grouped row is one routed token

  // Workspace regions (plan_workspace_layout).
  int32_t* expert_offsets;
  int32_t* permutation_map;
  int32_t* inverse_map;
  int32_t* routing_rows;    // skip-permute: the synthetic routing map
  void* permuted;           // bf16 or e4m3 rows; later the FC2 output, bf16 [rows, H]
  uint8_t* permuted_scale;  // MXFP8 scales of `permuted`
  void* fc1_out;            // bf16 [rows, N1]
  void* act_out;            // bf16 or e4m3 [rows, I]
  uint8_t* act_scale;       // MXFP8 scales of `act_out`
  int32_t* tile_counters;   // [kTileCounters], for a backend's GEMM schedulers; zeroed by it

  // This call's row capacity at `alignment`: only rows this T can fill are computed.
  int64_t rows(int64_t alignment) const;

  // Skip-permute mode: enqueues the expansion of tokens_per_expert into routing_rows. Returns the
  // routing map permute reads, in either mode, in *routing.
  Status routing(Backend& backend, BackendStream* s, const int32_t** routing) const;

  // The permute step: copies the rows (quantized for MXFP8) unless `copy_rows` is false (the
  // routing alone, for a GEMM that gathers its rows itself). The plan's invalid-id counter is
  // passed only in the normal mode: skip-permute's rows beyond the sum get id -1 by design.
  fmoe_permute_args permute_args(const int32_t* routing, int32_t* invalid_count,
                                 int64_t alignment, bool copy_rows) const;
  // FC1 over `rows` rows of `permuted`, writing `c` (h [rows, N1], or the activation when the
  // caller fuses it) and FC2 from act_out into `permuted`.
  fmoe_grouped_mm_args fc1_args(int64_t rows, void* c) const;
  fmoe_grouped_mm_args fc2_args(int64_t rows) const;
  fmoe_activation_args activation_args(int64_t rows) const;
  fmoe_unpermute_args unpermute_args(int64_t rows) const;
};

}  // namespace fmoe
