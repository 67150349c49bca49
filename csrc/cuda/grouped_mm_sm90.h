// Hopper (sm_90a) grouped BF16 GEMM: wgmma + TMA, warp-specialised, persistent over device-side
// group offsets. The prefill path of fmoe_grouped_mm_bf16; semantics exactly those of fmoe.h
// ("Op: grouped GEMM"). The design notes are at the top of grouped_mm_sm90.cu.
#pragma once

#include <cuda_runtime.h>

#include "fmoe.h"

namespace fmoe::cuda {

// Whether this kernel handles the shape: n % 8 == 0, k % 8 == 0 (16-byte rows for the copy
// engine), 1 <= groups <= 1024, a / b / c 16-byte aligned, bias 4-byte aligned, rows, groups*n
// and the tile count within int32. False means the caller falls back; nothing is enqueued.
bool grouped_mm_sm90_supported(const fmoe_grouped_mm_args& a);

// Enqueues c = grouped a @ b^T (+ bias) on `stream` over a persistent grid of at most `num_sms`
// CTAs (one per SM). Reads the group offsets on the device only (graph-capturable). A group g is
// computed iff 0 <= offsets[g] <= offsets[g+1] <= rows; any other group is skipped (fmoe.h: a bad
// offset skips its group), rows of no computed group are never written. Returns cudaSuccess when
// launched (or when there is nothing to do), else the error; call only when supported() holds.
// tile_counter (optional, here and below): one int32 in device memory, zero when the launch
// starts, that no other launch uses until this one has finished; with it the CTAs draw tiles in
// order from it (better L2 reuse over long launches, same results). The launch leaves it nonzero.
cudaError_t grouped_mm_sm90_bf16(const fmoe_grouped_mm_args& a, int num_sms, cudaStream_t stream,
                                 int32_t* tile_counter = nullptr);

// The same with the kernel forced: block_n = 256 or 128 (128 x block_n tiles shared by the two
// consumer warpgroups), or kSm90PingPong (128 x 128 tiles, one per consumer warpgroup, so that
// one's epilogue runs under the other's mainloop); for tests and benchmarks that exercise each.
// grouped_mm_sm90_bf16 picks it from the shape.
cudaError_t grouped_mm_sm90_bf16_block_n(const fmoe_grouped_mm_args& a, int num_sms, int block_n,
                                         cudaStream_t stream, int32_t* tile_counter = nullptr);

constexpr int kSm90PingPong = 1;

// The kernel grouped_mm_sm90_bf16 would pick (256, 128 or kSm90PingPong).
int grouped_mm_sm90_pick_block_n(const fmoe_grouped_mm_args& a, int num_sms);

// ---- FC1 with the activation fused into the epilogue ------------------------------------------
// The activation of fmoe.h ("Op: activation") applied by the GEMM's epilogue:
//   out[r, j] = bf16( act( float(bf16(h[r, :] + bias)) ) ),  h = a[r, :] @ b[g]^T in f32,
// i.e. exactly fmoe_grouped_mm_bf16 followed by fmoe_activation_quant (bf16 output): h is rounded
// to bf16 once, widened, and the activation runs in f32 (the formulas of cuda/activation.cuh).
// The FC1 output [rows, N1] never exists in memory.
struct ActEpilogue {
  int activation;  // fmoe_activation
  int layout;      // fmoe_gated_layout (gated activations only)
  float alpha;     // swiglu_oai
  float limit;     // swiglu_oai
};

// `a` describes FC1 as for grouped_mm_sm90_bf16 (n = N1, b [groups, N1, k], bias [groups, N1])
// except that `c` receives the activation output, bf16 [rows, I] with I = N1 / 2 for gated
// activations and I = N1 for squared_relu. Rows written: those of grouped_mm_sm90_bf16 (rows of
// computed groups whose row_map entry is not -1); nothing else, no column >= I.
// Supported: grouped_mm_sm90_supported(a), a known activation (and layout when gated), N1 even
// when gated, I % 8 == 0 (16-byte rows of c).
bool grouped_mm_sm90_act_supported(const fmoe_grouped_mm_args& a, const ActEpilogue& act);

// Enqueues the fused FC1 + activation; tile width picked as grouped_mm_sm90_bf16 would for FC1.
// A gated tile of 128 x BN accumulators yields BN / 2 activation columns: for halves, the B tile
// is gate rows [j0, j0 + BN/2) and up rows [I + j0, I + j0 + BN/2) (four copies per stage, in
// runs of BN/4); for interleaved, B rows [2 j0, 2 j0 + BN). Call only when supported() holds.
cudaError_t grouped_mm_sm90_bf16_act(const fmoe_grouped_mm_args& a, const ActEpilogue& act,
                                     int num_sms, cudaStream_t stream,
                                     int32_t* tile_counter = nullptr);

// The same with the kernel forced (as grouped_mm_sm90_bf16_block_n), for tests and benchmarks.
cudaError_t grouped_mm_sm90_bf16_act_block_n(const fmoe_grouped_mm_args& a, const ActEpilogue& act,
                                             int num_sms, int block_n, cudaStream_t stream,
                                             int32_t* tile_counter = nullptr);

// ---- MXFP8 operands (fmoe_grouped_mm_mxfp8) ---------------------------------------------------
// The same scheduler and epilogues with a and b in e4m3 ([rows, k], [groups, n, k]) plus their
// e8m0 scales (a_scale [rows, k/32], b_scale [groups, n, k/32]), so c = fmoe.h's MXFP8 GEMM up to
// the summation order (and, for fp8 wgmma, the tensor cores' precision inside a 32-block).
// Supported: grouped_mm_sm90_supported(a), both scales present, k % 32 == 0.
// Two designs (notes at "MXFP8 operands" in grouped_mm_sm90.cu): block_n = 128 or 256 selects
// the dequantizing kernel of that tile width, kSm90MxFp8Wgmma the fp8-wgmma kernel (BN = 128)
// that promotes each k32 block's products with the scales in f32. The unforced entry points take
// the fp8-wgmma kernel (FMOE_MX_GEMM=dequant: the dequantizing one, for comparisons).
constexpr int kSm90MxFp8Wgmma = 0;
bool grouped_mm_sm90_mxfp8_supported(const fmoe_grouped_mm_args& a);
cudaError_t grouped_mm_sm90_mxfp8(const fmoe_grouped_mm_args& a, int num_sms, cudaStream_t stream);
cudaError_t grouped_mm_sm90_mxfp8_block_n(const fmoe_grouped_mm_args& a, int num_sms, int block_n,
                                          cudaStream_t stream);
// The block_n value the unforced MXFP8 entry points use.
int grouped_mm_sm90_mxfp8_pick(const fmoe_grouped_mm_args& a, int num_sms);

// FC1 with MXFP8 operands and the activation fused (bf16 output, as grouped_mm_sm90_bf16_act).
// Supported: grouped_mm_sm90_mxfp8_supported(a) and grouped_mm_sm90_act_supported(a, act).
bool grouped_mm_sm90_mxfp8_act_supported(const fmoe_grouped_mm_args& a, const ActEpilogue& act);
cudaError_t grouped_mm_sm90_mxfp8_act(const fmoe_grouped_mm_args& a, const ActEpilogue& act,
                                      int num_sms, cudaStream_t stream);
cudaError_t grouped_mm_sm90_mxfp8_act_block_n(const fmoe_grouped_mm_args& a,
                                              const ActEpilogue& act, int num_sms, int block_n,
                                              cudaStream_t stream);

// ---- MXFP8 weights dequantized in registers (the fused layer's prefill) -------------------------
// c = a @ dequant(b)^T (+ bias) with b e4m3 [groups, n, k] + b_scale, and `a` bf16 [rows, k]
// holding MXFP8 values (quantized and dequantized: exact in bf16) with every 64-wide k block in
// the order of mx_block.cuh's mx_regs_k_source (a.a_scale unused). Summation in f32 of exact
// products: fmoe.h's MXFP8 GEMM up to the order of the sum. Scheduler and row rules as
// grouped_mm_sm90_bf16. Supported: grouped_mm_sm90_supported(a), b_scale set, k % 64 == 0.
bool grouped_mm_sm90_mx_regs_supported(const fmoe_grouped_mm_args& a);
cudaError_t grouped_mm_sm90_mx_regs(const fmoe_grouped_mm_args& a, int num_sms,
                                    cudaStream_t stream, int32_t* tile_counter = nullptr);

// FC1 with the activation fused, as grouped_mm_sm90_bf16_act, except that c receives the MXFP8
// round trip of the bf16 activation (fmoe.h: its fused MXFP8 output, dequantized), in the k order
// above: exactly the `a` that grouped_mm_sm90_mx_regs takes for FC2. Supported:
// grouped_mm_sm90_mx_regs_supported(a), grouped_mm_sm90_act_supported(a, act), I % 64 == 0.
bool grouped_mm_sm90_mx_regs_act_supported(const fmoe_grouped_mm_args& a, const ActEpilogue& act);
cudaError_t grouped_mm_sm90_mx_regs_act(const fmoe_grouped_mm_args& a, const ActEpilogue& act,
                                        int num_sms, cudaStream_t stream,
                                        int32_t* tile_counter = nullptr);

// False when FMOE_CUDA_GEMM=mma forces the portable mma.sync GEMM (defined in
// grouped_mm_bf16.cu); fused paths built on this kernel fall back to the op-by-op pipeline then.
bool sm90_gemm_enabled();

}  // namespace fmoe::cuda
