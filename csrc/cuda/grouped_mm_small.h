// Decode-sized grouped GEMM for Hopper (sm_90a): every group has at most 32 rows, so the work is
// bound by reading each used group's weights once. "Swap-AB": the weights are the wgmma M side
// (64 weight rows per tile), the group's few token rows the N side (8, 16 or 32, padded).
// Semantics are those of fmoe.h ("Op: grouped GEMM", MXFP8 rule, activation formulas), plus an
// optional row gather of A and an optional fused activation epilogue for FC1. Design notes at the
// top of grouped_mm_small.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fmoe.h"

namespace fmoe::cuda {

// The activation epilogue: none, or FC1's activation applied to the GEMM output (bf16-rounded
// accumulator + bias, widened, activation in f32, rounded to bf16: the same numbers as
// grouped_mm followed by fmoe_activation_quant).
struct SmallMmEpilogue {
  int64_t activation = -1;  // -1 = none, else fmoe_activation
  int64_t layout = FMOE_LAYOUT_HALVES;  // fmoe_gated_layout (gated activations)
  double alpha = FMOE_SWIGLU_OAI_DEFAULT_ALPHA;
  double limit = FMOE_SWIGLU_OAI_DEFAULT_LIMIT;
};

struct SmallMmArgs {
  const void* a = nullptr;           // required: [a_rows, k] bf16, or e4m3 (mxfp8)
  const uint8_t* a_scale = nullptr;  // mxfp8: e8m0 [a_rows, k/32], 4-byte aligned
  // Optional i32 [rows]: token row r reads a[a_row_index[r]] instead of a[r] (FC1 straight from
  // hidden through permute's permutation_map). A row whose index is outside [0, a_rows) (-1:
  // padding) is skipped: not written.
  const int32_t* a_row_index = nullptr;
  int64_t a_rows = 0;                // rows of a (== rows without a_row_index)
  const void* b = nullptr;           // required: [groups, n, k] bf16, or e4m3 (mxfp8)
  const uint8_t* b_scale = nullptr;  // mxfp8: e8m0 [groups, n, k/32], 4-byte aligned
  const float* bias = nullptr;       // optional f32 [groups, n]
  // Required out: bf16 [rows, ldc]. Columns [0, out_cols) are written, out_cols = n without an
  // epilogue or with squared_relu, n / 2 with a gated activation.
  void* c = nullptr;
  int64_t ldc = 0;                   // row stride of c in elements (>= out_cols, multiple of 8)
  const int32_t* group_offsets = nullptr;  // required: device i32 [groups + 1] (checked on the
                                           // device as in fmoe.h: a bad group is skipped)
  const int32_t* row_map = nullptr;  // optional i32 [rows]: rows with -1 are not written
  // Optional, instead of group_offsets, a_row_index and row_map (all three ignored): the routing
  // itself, i32 [a_rows, topk] expert ids, in the layout permute gives it at alignment 1: local
  // group g = id - expert_start when in [0, groups) (other ids have no row), groups in order, a
  // group's rows in (token, slot) order, row r reading a[token of r]. For a_rows * topk <= 256
  // and <= rows. Each CTA builds its group table from it, so with overlap_previous the kernel
  // reads nothing from the kernel ahead (the routing kernel that writes the offsets the next
  // steps read): its weights and tokens load from its start; it waits for the kernel ahead before
  // its first store only, so that it still completes after it. With weights_before_wait as well,
  // a / a_scale come from the kernel ahead (MXFP8: the tokens quantized beside the routing): the
  // first weight stages load before the wait, the tokens after it.
  const int32_t* routing_map = nullptr;
  int64_t topk = 0;
  int64_t expert_start = 0;
  int64_t rows = 0;                  // static capacity of c (and of a without a_row_index)
  int64_t n = 0;                     // weight rows per group (N1 for FC1, H for FC2)
  int64_t k = 0;                     // reduction size
  int64_t groups = 0;
  // Host-known bound of every group's row count (>= 1). Picks the padded token tile (up to 32)
  // and sizes the grid; a group over the token tile is computed in several tiles.
  int64_t max_rows_per_group = 0;
  int64_t format = FMOE_WEIGHTS_BF16;  // fmoe_weight_format: bf16, or mxfp8 (a and b both)
  SmallMmEpilogue epilogue;
  // Launch as a programmatic dependent of the kernel ahead on the stream (ptx/griddep.cuh): the
  // CTAs start while it finishes and wait for it before reading anything it may have written.
  // This kernel lets the next one launch only after waiting for the kernel ahead itself.
  bool overlap_previous = false;
  // With overlap_previous: group_offsets, row_map, a_row_index, b, b_scale and bias were complete
  // before the kernel ahead let this one launch (only a / a_scale come from it; this kernel's
  // rule above makes that hold of a chain of them), so each CTA's first weight stages are loaded
  // before the wait, under the previous kernel's tail.
  bool weights_before_wait = false;
};

// The launch shape, picked from the problem shape by grouped_mm_small_config (the one place where
// tile choices are made) or forced by tests.
struct SmallMmConfig {
  int token_tile = 8;   // padded token rows per tile: 8, 16 or 32 (the wgmma N)
  int splits = 1;       // split-K factor: 1, 2 or 4 (a thread-block cluster reduces the parts)
  int grid = 0;         // CTAs launched (a multiple of splits); filled by grouped_mm_small_config
  int ctas_per_sm = 0;  // resident CTAs per SM at this shared-memory size (informational)
  int smem_bytes = 0;   // dynamic shared memory per CTA (informational)
};

// Whether the kernel handles these arguments: n % 8 == 0 (n % 16 with a gated activation), k % 8
// == 0 (k % 32 for mxfp8), ldc % 8 == 0 and >= out_cols, 1 <= groups <= 512,
// max_rows_per_group >= 1, a / b / c 16-byte aligned, bias 4-byte aligned, scales 4-byte aligned
// (mxfp8), sizes within int32 indexing; with routing_map: topk >= 1, expert_start >= 0,
// a_rows * topk <= min(256, rows), and for mxfp8 a token tile of 8 (the configuration's pick).
// False means the caller falls back; nothing is enqueued.
bool grouped_mm_small_supported(const SmallMmArgs& a);

// The configuration grouped_mm_small would launch on a device with `num_sms` SMs.
SmallMmConfig grouped_mm_small_config(const SmallMmArgs& a, int num_sms);

// Enqueues the GEMM on `stream`. Reads the group offsets on the device only (graph-capturable, no
// host sync). Returns cudaSuccess when launched (or when there is nothing to do), else the error;
// call only when supported() holds.
cudaError_t grouped_mm_small(const SmallMmArgs& a, int num_sms, cudaStream_t stream);

// The same with a forced token_tile / splits (tests and benchmarks); cfg.grid <= 0 picks the grid.
cudaError_t grouped_mm_small_with(const SmallMmArgs& a, SmallMmConfig cfg, int num_sms,
                                  cudaStream_t stream);

}  // namespace fmoe::cuda
