/*
 * fmoe.h: the C ABI of fused-moe, a fused Mixture-of-Experts layer for inference.
 *
 * Everything the library offers is declared here, and this header is its reference documentation.
 *
 * Conventions
 * - Every function returns an int status (FMOE_OK = 0) and writes results through out-pointers.
 *   On failure fmoe_last_error() returns a thread-local message naming the function and the
 *   argument (or the CUDA call) at fault. No function aborts the process on bad input.
 * - Handles (context, stream, graph, plan) are opaque pointers.
 * - "Device" buffers are memory of the context's backend: CUDA global memory on the cuda backend,
 *   host memory on the host backend. fmoe_alloc returns such buffers; ops take them.
 * - Argument structs cross the ABI by pointer. Their first field `size` must be set to
 *   sizeof(struct) (the ABI can grow by appending fields). Every field is 8 bytes wide (pointers,
 *   int64_t, double), so the layout is the same on every 64-bit platform and has no padding.
 * - Optional pointers may be NULL; required ones are named as such.
 * - Element types: bf16 = bfloat16 stored as uint16; e4m3 = OCP FP8 E4M3 (bias 7, max 448,
 *   0x7F/0xFF = NaN, no infinity) stored as uint8; e8m0 = OCP E8M0 scale (2^(byte-127),
 *   0xFF = NaN) stored as uint8; f32; i32.
 * - Matrices are row-major. Weights use the nn.Linear [out, in] layout, reduction dimension
 *   contiguous, stacked over the local experts.
 * - Threads: any function may be called from any thread. Calls on one context take its lock one
 *   at a time (the work they enqueue still runs concurrently, stream by stream); contexts are
 *   independent. A plan may serve calls on several streams at once, each with a workspace of its
 *   own (its invalid-id counter adds atomically). Handles must stay alive until no thread uses
 *   them: destroying a context, stream, graph or plan while another thread calls with it is the
 *   caller's race.
 *
 * Asynchrony and CUDA graphs
 * - Ops are enqueued on a stream (NULL = the context's default stream) and return without waiting.
 *   No op synchronizes with the host, allocates memory or reads a device-side count on the host,
 *   so any sequence of ops can be captured into a graph and replayed with new data in the same
 *   buffers. Sizes that the host must know (max_rows, workspace bytes) depend only on static
 *   arguments; what routing decides lives in device buffers (expert_offsets, permutation_map,
 *   inverse_map).
 * - On the host backend each stream runs its work in order on a thread of its own, so ops return
 *   at once there too; graph capture records the op sequence, which fmoe_graph_launch replays.
 *
 * Routing and the permuted layout
 * - routing_map [T, topk] i32 holds global expert ids. The context's layer owns the local experts
 *   [local_expert_start, local_expert_start + num_local_experts). A slot whose expert is outside
 *   that range contributes nothing here. A slot whose id is outside [0, num_experts) is dropped the
 *   same way and counted in `invalid_count`.
 * - permute groups the token copies of local slots by local expert, stable in (token, slot) order,
 *   and pads each group to a multiple of `alignment` rows. Group e owns rows
 *   [expert_offsets[e], expert_offsets[e+1]); n_used = expert_offsets[E_local]. The first
 *   count[e] rows of a group are real rows, the rest are padding rows (permutation_map = -1).
 * - max_rows = fmoe_max_rows(T, topk, E_local, alignment)
 *            = round_up(T*topk + E_local*(alignment-1), alignment): the static capacity.
 * - Rows at or beyond n_used and padding rows hold unspecified data in every permuted buffer;
 *   ops given row_map / n_used skip them and never read them.
 *
 * Precision (the numbers every backend computes)
 * - bf16 GEMM: bf16 operands, f32 accumulation, + f32 bias, rounded once to bf16.
 * - Activation: bf16 input widened to f32, activation in f32, rounded once to bf16.
 *   The fused MXFP8 output is exactly fmoe_quantize_mxfp8 of that bf16 result.
 * - Unpermute: f32 sum over slots k = 0..topk-1 in order of prob * row, rounded once to bf16.
 * - MXFP8 (OCP Microscaling): one e8m0 scale per 32 consecutive elements along the row (the
 *   reduction dimension). Data [rows, K] e4m3, scale [rows, K/32] e8m0, row-major. The scale of a
 *   block with max |x| = amax is the smallest power of two 2^s with amax / 2^s <= 448, computed
 *   exactly from the bits of amax (amax = m * 2^E, 1 <= m < 2: s = E - 8 if m <= 1.75, else
 *   E - 7), clamped to s in [-127, 127]. An all-zero block has s = 0 (byte 127). A block holding a
 *   NaN or an infinity gets scale byte 0xFF (NaN) and every element 0x7F. Elements are x / 2^s
 *   rounded to nearest, ties to even, to e4m3 (saturating at +-448, which the scale rule makes
 *   unreachable but for rounding). Dequantized value = e4m3 * 2^s. Host and CUDA backends use one
 *   implementation of this rule and agree bit for bit.
 * - MXFP8 GEMM: C = sum_k dequant(A) * dequant(B) accumulated in f32, + bias, rounded to bf16.
 *   The CUDA backend's fp8 tensor cores add the 32 products of one scale block in their own
 *   precision (a few 1e-4 relative, not f32) before the blocks are scaled and summed in f32.
 *   Its fused layer at prefill sizes (H and I multiples of 64) dequantizes the weights to bf16
 *   instead, whose products with the (exactly dequantized) activations are exact in f32.
 */
#ifndef FMOE_H
#define FMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FMOE_API __declspec(dllexport)
#else
#define FMOE_API __attribute__((visibility("default")))
#endif

/* ABI version: bumped when a struct or signature changes incompatibly. */
#define FMOE_ABI_VERSION 1

/* ---------------------------------------------------------------------------------------------
 * Status codes
 * ------------------------------------------------------------------------------------------- */
typedef enum fmoe_status {
  FMOE_OK = 0,
  FMOE_ERR_INVALID_ARGUMENT = 1, /* a null, out-of-range or inconsistent argument */
  FMOE_ERR_UNSUPPORTED = 2,      /* backend not built in, no device, or feature not available */
  FMOE_ERR_OUT_OF_MEMORY = 3,    /* an allocation failed */
  FMOE_ERR_CUDA = 4,             /* a CUDA runtime call failed; the message names it */
  FMOE_ERR_INVALID_STATE = 5,    /* e.g. ending a capture that was never begun */
  FMOE_ERR_INTERNAL = 6          /* a bug in the library: please report the message */
} fmoe_status;

/* The message of the last failure on this thread ("" when none). Valid until the next call on
 * this thread. */
FMOE_API const char* fmoe_last_error(void);

/* The library's ABI version (FMOE_ABI_VERSION). */
FMOE_API int fmoe_abi_version(int64_t* out_version);

/* A one-line description of the build: version, backends compiled in, CUDA version. Static. */
FMOE_API const char* fmoe_build_info(void);

/* Number of usable CUDA devices; 0 when the library was built host-only or no driver/device is
 * present (not an error). */
FMOE_API int fmoe_cuda_device_count(int64_t* out_count);

/* ---------------------------------------------------------------------------------------------
 * Contexts
 * ------------------------------------------------------------------------------------------- */
typedef enum fmoe_backend {
  FMOE_BACKEND_AUTO = 0, /* cuda when a CUDA device is present, host otherwise */
  FMOE_BACKEND_HOST = 1, /* plain C++ on the CPU: the reference semantics */
  FMOE_BACKEND_CUDA = 2  /* NVIDIA Hopper (sm_90a) */
} fmoe_backend;

typedef struct fmoe_context_s* fmoe_context_t;

/* Creates a context on `backend` (fmoe_backend) and CUDA `device` ordinal (ignored by host).
 * FMOE_ERR_UNSUPPORTED when backend is cuda and the library has no CUDA or no such device. */
FMOE_API int fmoe_context_create(int64_t backend, int64_t device, fmoe_context_t* out_ctx);

/* Destroys the context; frees every buffer, stream, graph and plan it still owns. NULL is a
 * no-op. Waits for outstanding work first. */
FMOE_API int fmoe_context_destroy(fmoe_context_t ctx);

/* The backend actually in use (FMOE_BACKEND_HOST or FMOE_BACKEND_CUDA). */
FMOE_API int fmoe_context_backend(fmoe_context_t ctx, int64_t* out_backend);

/* Device description, NUL-terminated, truncated to `capacity` bytes ("host (N threads)" or the
 * CUDA device name). */
FMOE_API int fmoe_context_device_name(fmoe_context_t ctx, char* out_name, int64_t capacity);

typedef struct fmoe_device_props {
  uint64_t size;             /* set by the caller to sizeof(fmoe_device_props) */
  int64_t backend;           /* fmoe_backend in use */
  int64_t device;            /* CUDA ordinal, -1 for host */
  int64_t compute_capability;/* major*10 + minor (90 for Hopper), 0 for host */
  int64_t multiprocessors;   /* SM count, or host worker threads */
  int64_t global_memory_bytes;
  int64_t l2_cache_bytes;    /* 0 for host */
  int64_t shared_memory_per_block_bytes; /* opt-in maximum, 0 for host */
} fmoe_device_props;
FMOE_API int fmoe_context_device_props(fmoe_context_t ctx, fmoe_device_props* out_props);

/* Bytes and count of buffers currently allocated through fmoe_alloc on this context (leak
 * checks). */
FMOE_API int fmoe_context_live_allocations(fmoe_context_t ctx, int64_t* out_count,
                                           int64_t* out_bytes);

/* Waits for all work of the context (every stream). Refused (FMOE_ERR_INVALID_STATE) while a
 * stream of the context captures, on any thread: a capturing stream cannot be waited for. */
FMOE_API int fmoe_context_synchronize(fmoe_context_t ctx);

/* ---------------------------------------------------------------------------------------------
 * Memory
 * ------------------------------------------------------------------------------------------- */
/* Allocates `bytes` (>= 0; 0 gives a valid unique pointer) of device memory, 256-byte aligned.
 * Contents are unspecified: the buffer may be one this context freed before (see fmoe_free).
 * Refused on a capturing thread (see Graphs): allocate a graph's buffers before its capture. */
FMOE_API int fmoe_alloc(fmoe_context_t ctx, int64_t bytes, void** out_ptr);
/* Frees a buffer from fmoe_alloc on this context. NULL is a no-op; any other pointer that is not
 * a live allocation of this context is FMOE_ERR_INVALID_ARGUMENT. Work queued before the free
 * (on any stream) may still use the buffer: a buffer of up to 256 MiB goes to the context's cache
 * (at most 2 GiB, and a sixteenth of the device's memory) without waiting, and fmoe_alloc hands
 * it out again, for a request of the same size class (a quarter of a power of two), only once
 * that work has finished. A larger buffer is released at once, which waits for the device's work
 * (cudaFree). A buffer freed while a stream of the context captures is held until the first
 * fmoe_alloc, fmoe_free or fmoe_plan_destroy after the last capture ends, then treated as above. The cache is
 * released with the context, or when an allocation runs out of memory. */
FMOE_API int fmoe_free(fmoe_context_t ctx, void* ptr);

typedef enum fmoe_memcpy_kind {
  FMOE_MEMCPY_HOST_TO_DEVICE = 0,
  FMOE_MEMCPY_DEVICE_TO_HOST = 1,
  FMOE_MEMCPY_DEVICE_TO_DEVICE = 2
} fmoe_memcpy_kind;

/* Copies `bytes` on `stream` (NULL = default). Host memory may be pageable; a host-to-device or
 * device-to-host copy from pageable memory returns after the host buffer is no longer needed
 * (host buffer reusable on return), device-to-device copies are asynchronous. When either pointer
 * lies in a live allocation of this context, the copy must fit inside it. */
FMOE_API int fmoe_memcpy(fmoe_context_t ctx, void* dst, const void* src, int64_t bytes,
                         int64_t kind, void* stream);

/* Sets `bytes` bytes of device memory to `value` (0..255) on `stream`. */
FMOE_API int fmoe_memset(fmoe_context_t ctx, void* ptr, int64_t value, int64_t bytes,
                         void* stream);

/* ---------------------------------------------------------------------------------------------
 * Streams (opaque; passed to ops as void*, NULL = the context's default stream)
 * ------------------------------------------------------------------------------------------- */
typedef struct fmoe_stream_s* fmoe_stream_t;
FMOE_API int fmoe_stream_create(fmoe_context_t ctx, fmoe_stream_t* out_stream);
/* Refused (FMOE_ERR_INVALID_STATE) while the stream captures. */
FMOE_API int fmoe_stream_destroy(fmoe_context_t ctx, fmoe_stream_t stream);
/* Refused (FMOE_ERR_INVALID_STATE) while the stream captures: its work is recorded, not run. */
FMOE_API int fmoe_stream_synchronize(fmoe_context_t ctx, fmoe_stream_t stream);

/* ---------------------------------------------------------------------------------------------
 * Graphs: capture a sequence of ops on a stream once, replay it many times.
 * Between begin and end, ops and memcpy/memset on `stream` are recorded, not run (device-to-host
 * and host-to-device copies may not be captured: FMOE_ERR_INVALID_STATE). A replay reads the
 * buffers' contents at replay time, so new routing written to the same buffers takes effect.
 * Only the thread that began a capture may end it, and until it does it may not allocate
 * (fmoe_alloc) or create a plan; no thread may wait for the whole context
 * (fmoe_context_synchronize), or wait for or destroy the capturing stream. Each is
 * FMOE_ERR_INVALID_STATE on every backend (CUDA captures in thread-local mode, which forbids those
 * calls; other threads may allocate).
 * ------------------------------------------------------------------------------------------- */
typedef struct fmoe_graph_s* fmoe_graph_t;
FMOE_API int fmoe_graph_capture_begin(fmoe_context_t ctx, fmoe_stream_t stream);
FMOE_API int fmoe_graph_capture_end(fmoe_context_t ctx, fmoe_stream_t stream,
                                    fmoe_graph_t* out_graph);
FMOE_API int fmoe_graph_launch(fmoe_context_t ctx, fmoe_graph_t graph, fmoe_stream_t stream);
FMOE_API int fmoe_graph_destroy(fmoe_context_t ctx, fmoe_graph_t graph);

/* ---------------------------------------------------------------------------------------------
 * Events: markers on a stream, for timing and for waiting without blocking (CUDA events on cuda;
 * a host clock read when the host stream reaches the record).
 * ------------------------------------------------------------------------------------------- */
typedef struct fmoe_event_s* fmoe_event_t;
FMOE_API int fmoe_event_create(fmoe_context_t ctx, fmoe_event_t* out_event);
/* Does not wait: records still queued on a stream complete without the event. */
FMOE_API int fmoe_event_destroy(fmoe_context_t ctx, fmoe_event_t event);
FMOE_API int fmoe_event_record(fmoe_context_t ctx, fmoe_event_t event, fmoe_stream_t stream);
/* Milliseconds from `start` to `end`; waits for `end` to complete. Both must have been recorded. */
FMOE_API int fmoe_event_elapsed_ms(fmoe_context_t ctx, fmoe_event_t start, fmoe_event_t end,
                                   double* out_ms);
/* Never blocks: *out_complete = 1 when the work queued on the stream before the event's most
 * recent record has completed (also when the event was never recorded), 0 while it runs. A caller
 * with an event loop polls this instead of blocking its thread in a synchronize. An event whose
 * last record was inside a capture is refused here and by fmoe_event_elapsed_ms
 * (FMOE_ERR_INVALID_STATE on every backend, as CUDA refuses it) until it is recorded outside one. */
FMOE_API int fmoe_event_query(fmoe_context_t ctx, fmoe_event_t event, int64_t* out_complete);

/* ---------------------------------------------------------------------------------------------
 * Enumerations shared by ops and plans
 * ------------------------------------------------------------------------------------------- */
typedef enum fmoe_activation {
  FMOE_ACT_SQUARED_RELU = 0, /* non-gated: relu(x)^2; N1 = I */
  FMOE_ACT_SILU = 1,         /* gated SwiGLU: silu(gate) * up; N1 = 2I */
  FMOE_ACT_GELU = 2,         /* gated GeGLU, tanh form: gelu_tanh(gate) * up; N1 = 2I */
  FMOE_ACT_SWIGLU_OAI = 3    /* gpt-oss: g = min(gate, limit), u = clamp(up, -limit, limit),
                                (u + 1) * g * sigmoid(alpha * g); N1 = 2I */
} fmoe_activation;

typedef enum fmoe_gated_layout {
  FMOE_LAYOUT_HALVES = 0,     /* gate = columns [0, I), up = columns [I, 2I) */
  FMOE_LAYOUT_INTERLEAVED = 1 /* gate = column 2j, up = column 2j+1 */
} fmoe_gated_layout;

typedef enum fmoe_weight_format {
  FMOE_WEIGHTS_BF16 = 0,
  FMOE_WEIGHTS_MXFP8 = 1 /* e4m3 data + e8m0 scales per 32 along the reduction dimension */
} fmoe_weight_format;

#define FMOE_SWIGLU_OAI_DEFAULT_ALPHA 1.702
#define FMOE_SWIGLU_OAI_DEFAULT_LIMIT 7.0

/* Static capacity of the permuted buffers (see the top of this file). Pure arithmetic. */
FMOE_API int fmoe_max_rows(int64_t num_tokens, int64_t topk, int64_t num_local_experts,
                           int64_t alignment, int64_t* out_rows);

/* ---------------------------------------------------------------------------------------------
 * Op: permute
 * ------------------------------------------------------------------------------------------- */
typedef struct fmoe_permute_args {
  uint64_t size;
  const void* hidden;          /* required: bf16 [num_tokens, hidden_size] */
  const int32_t* routing_map;  /* required: i32 [num_tokens, topk], global expert ids */
  const float* probs;          /* optional: f32 [num_tokens, topk]. When given, each copied row is
                                  multiplied by its slot's prob in f32 and rounded to bf16 (router
                                  weight applied on the input). */
  void* permuted;              /* bf16 [max_rows, hidden_size]; may be NULL when permuted_q is set */
  uint8_t* permuted_q;         /* optional e4m3 [max_rows, hidden_size]: MXFP8 copy of the rows */
  uint8_t* permuted_scale;     /* e8m0 [max_rows, hidden_size/32]; required with permuted_q */
  int32_t* expert_offsets;     /* required out: i32 [num_local_experts + 1] */
  int32_t* permutation_map;    /* required out: i32 [max_rows], source token or -1 (padding and
                                  rows >= n_used) */
  int32_t* inverse_map;        /* required out: i32 [num_tokens, topk], row of the slot or -1 */
  int32_t* invalid_count;      /* optional in/out: i32 scalar, incremented by the number of slots
                                  whose id is outside [0, num_experts) */
  int64_t num_tokens;          /* T >= 0 */
  int64_t hidden_size;         /* H >= 1 (multiple of 32 with permuted_q) */
  int64_t topk;                /* 1 <= topk <= num_experts */
  int64_t num_experts;         /* >= 1 */
  int64_t local_expert_start;  /* 0 <= start, start + num_local_experts <= num_experts */
  int64_t num_local_experts;   /* >= 1 */
  int64_t alignment;           /* >= 1: group sizes padded to a multiple of this */
} fmoe_permute_args;
FMOE_API int fmoe_permute(fmoe_context_t ctx, void* stream, const fmoe_permute_args* args);

/* ---------------------------------------------------------------------------------------------
 * Op: activation (+ optional fused MXFP8 quantization)
 * out[r, j] = act(in[r, :]) for rows r < n_rows that are not skipped.
 * ------------------------------------------------------------------------------------------- */
typedef struct fmoe_activation_args {
  uint64_t size;
  const void* input;           /* required: bf16 [rows, N1], N1 = I (squared_relu) or 2I (gated) */
  void* output;                /* bf16 [rows, I]; required unless output_q is set */
  uint8_t* output_q;           /* optional e4m3 [rows, I]: fused MXFP8 output */
  uint8_t* output_scale;       /* e8m0 [rows, I/32]; required with output_q */
  const int32_t* row_map;      /* optional i32 [rows]: rows with a negative entry (permute writes -1)
                                  are skipped (not written) */
  const int32_t* n_used;       /* optional device i32 scalar: rows >= *n_used are skipped */
  int64_t rows;                /* static row count >= 0 */
  int64_t ffn;                 /* I >= 1 (multiple of 32 with output_q) */
  int64_t activation;          /* fmoe_activation */
  int64_t layout;              /* fmoe_gated_layout (gated activations only) */
  double alpha;                /* swiglu_oai alpha (FMOE_SWIGLU_OAI_DEFAULT_ALPHA) */
  double limit;                /* swiglu_oai limit (> 0; FMOE_SWIGLU_OAI_DEFAULT_LIMIT) */
} fmoe_activation_args;
FMOE_API int fmoe_activation_quant(fmoe_context_t ctx, void* stream,
                                   const fmoe_activation_args* args);

/* ---------------------------------------------------------------------------------------------
 * Op: MXFP8 quantization and its layouts
 * ------------------------------------------------------------------------------------------- */
/* data[r, k] / scale[r, k/32] = MXFP8 of bf16 input [rows, cols]; cols % 32 == 0. Rows may be
 * batched ([E, N, K] is rows = E*N). */
FMOE_API int fmoe_quantize_mxfp8(fmoe_context_t ctx, void* stream, const void* input,
                                 int64_t rows, int64_t cols, uint8_t* out_data,
                                 uint8_t* out_scale);
/* f32 [rows, cols] = dequant(data, scale). */
FMOE_API int fmoe_dequantize_mxfp8(fmoe_context_t ctx, void* stream, const uint8_t* data,
                                   const uint8_t* scale, int64_t rows, int64_t cols,
                                   float* out);

/* Scale layouts. The swizzled layout (Blackwell block-scaled tensor cores, Megatron, cuBLAS):
 * for each of `batch` matrices of scales [rows, scale_cols], pad rows to a multiple of 128 and
 * scale_cols to a multiple of 4 (padding bytes are 0), cut into 128x4 tiles stored one after the
 * other in row-major tile order, 512 bytes each; inside a tile, scale (r, c) lives at byte
 * (r % 32) * 16 + (r / 32) * 4 + c. Batch b starts at b * fmoe_swizzled_scale_bytes(1, ...). */
FMOE_API int fmoe_swizzled_scale_bytes(int64_t batch, int64_t rows, int64_t scale_cols,
                                       int64_t* out_bytes);
FMOE_API int fmoe_swizzle_scales(fmoe_context_t ctx, void* stream, const uint8_t* linear,
                                 int64_t batch, int64_t rows, int64_t scale_cols,
                                 uint8_t* out_swizzled);
FMOE_API int fmoe_unswizzle_scales(fmoe_context_t ctx, void* stream, const uint8_t* swizzled,
                                   int64_t batch, int64_t rows, int64_t scale_cols,
                                   uint8_t* out_linear);

/* ---------------------------------------------------------------------------------------------
 * Op: grouped GEMM.  For each group g and row r in [offsets[g], offsets[g+1]) that is not
 * skipped:  c[r, n] = sum_k a[r, k] * b[g, n, k] + bias[g, n].
 * Rows >= offsets[groups] are not written.
 * ------------------------------------------------------------------------------------------- */
typedef struct fmoe_grouped_mm_args {
  uint64_t size;
  const void* a;               /* required: [rows, k]: bf16, or e4m3 for the MXFP8 op */
  const uint8_t* a_scale;      /* MXFP8 op only, required: e8m0 [rows, k/32] */
  const void* b;               /* required: [groups, n, k]: bf16, or e4m3 for the MXFP8 op */
  const uint8_t* b_scale;      /* MXFP8 op only, required: e8m0 [groups, n, k/32] */
  const float* bias;           /* optional: f32 [groups, n] */
  void* c;                     /* required out: bf16 [rows, n] */
  const int32_t* group_offsets;/* required: device i32 [groups + 1], non-decreasing, offsets[0]
                                  = 0, offsets[groups] <= rows (checked on the device: a bad
                                  offset skips its group instead of faulting) */
  const int32_t* row_map;      /* optional i32 [rows]: rows with a negative entry (permute writes -1)
                                  are skipped (not written) */
  int64_t rows;                /* static capacity >= 0 */
  int64_t n;                   /* >= 1 */
  int64_t k;                   /* >= 1 (multiple of 32 for MXFP8) */
  int64_t groups;              /* >= 1 */
} fmoe_grouped_mm_args;
FMOE_API int fmoe_grouped_mm_bf16(fmoe_context_t ctx, void* stream,
                                  const fmoe_grouped_mm_args* args);
FMOE_API int fmoe_grouped_mm_mxfp8(fmoe_context_t ctx, void* stream,
                                   const fmoe_grouped_mm_args* args);

/* ---------------------------------------------------------------------------------------------
 * Op: unpermute.  out[t, :] = bf16( sum_{k = 0..topk-1, inverse_map[t,k] >= 0}
 *                                     probs[t,k] * input[inverse_map[t,k], :] )   (f32 sum)
 * A token with no local slot gets zeros.
 * ------------------------------------------------------------------------------------------- */
typedef struct fmoe_unpermute_args {
  uint64_t size;
  const void* input;           /* required: bf16 [rows, hidden_size] */
  const int32_t* inverse_map;  /* required: i32 [num_tokens, topk]; entries < -1 or >= rows are
                                  treated as -1 */
  const float* probs;          /* optional: f32 [num_tokens, topk]; NULL = weight 1 */
  void* output;                /* required out: bf16 [num_tokens, hidden_size] */
  int64_t rows;                /* static capacity of input */
  int64_t num_tokens;          /* >= 0 */
  int64_t hidden_size;         /* >= 1 */
  int64_t topk;                /* >= 1 */
} fmoe_unpermute_args;
FMOE_API int fmoe_unpermute(fmoe_context_t ctx, void* stream, const fmoe_unpermute_args* args);

/* ---------------------------------------------------------------------------------------------
 * Op: route.  Each token's experts and weights from its router logits, in f32:
 *   score[e]  = softmax(logits[t, :])[e] (max subtracted, sum over e in order), or
 *               sigmoid(logits[t, e]) = 1 / (1 + exp(-logits[t, e]))
 *   choice[e] = score[e] + selection_bias[e]   (the bias steers the choice, not the weights);
 *               softmax without a bias or groups chooses by logits[t, e] itself (the same order,
 *               without the rounding of the scores)
 *   groups (num_groups > 1): the experts split into num_groups equal runs; a group's value is the
 *               sum of its two largest choices (its one choice for groups of one expert), and only
 *               the topk_groups groups of largest value (ties: lower group) are chosen from
 *   routing_map[t, 0..topk-1] = the topk experts of largest choice, largest first; equal choices
 *               go to the lower expert id, and a NaN choice ranks below every number
 *   probs[t, k] = score[routing_map[t, k]], divided by the topk scores' sum (in slot order) when
 *               renormalize and that sum is positive, then times scale
 * Qwen-MoE, Mixtral and gpt-oss (a softmax over the chosen logits): softmax, renormalize.
 * DeepSeek-V3: sigmoid, its e_score_correction_bias, 8 groups, topk_groups 4, renormalize,
 * scale 2.5. The ids are global, in [0, num_experts), ready for fmoe_permute / fmoe_fused_moe.
 * ------------------------------------------------------------------------------------------- */
typedef enum fmoe_route_scoring {
  FMOE_ROUTE_SOFTMAX = 0,
  FMOE_ROUTE_SIGMOID = 1
} fmoe_route_scoring;

typedef struct fmoe_route_args {
  uint64_t size;
  const float* logits;          /* required: f32 [num_tokens, num_experts] */
  const float* selection_bias;  /* optional: f32 [num_experts]; NULL = none */
  int32_t* routing_map;         /* required out: i32 [num_tokens, topk] */
  float* probs;                 /* required out: f32 [num_tokens, topk] */
  int64_t num_tokens;           /* >= 0 */
  int64_t num_experts;          /* >= 1 */
  int64_t topk;                 /* 1 <= topk <= 32, and at most the experts of topk_groups groups */
  int64_t scoring;              /* fmoe_route_scoring */
  int64_t num_groups;           /* 1 (no groups) to 64, dividing num_experts */
  int64_t topk_groups;          /* 1 <= topk_groups <= num_groups (1 when num_groups is 1) */
  int64_t renormalize;          /* 0 or 1 */
  double scale;                 /* finite; 1 = none */
} fmoe_route_args;
FMOE_API int fmoe_route(fmoe_context_t ctx, void* stream, const fmoe_route_args* args);

/* ---------------------------------------------------------------------------------------------
 * Plans: the static description of one MoE layer, and the fused op.
 * ------------------------------------------------------------------------------------------- */
typedef struct fmoe_plan_s* fmoe_plan_t;

typedef struct fmoe_plan_desc {
  uint64_t size;
  int64_t hidden_size;         /* H >= 1 (multiple of 32 for mxfp8) */
  int64_t ffn;                 /* I >= 1 (multiple of 32 for mxfp8) */
  int64_t num_experts;         /* global expert count >= 1 */
  int64_t num_local_experts;   /* E_local >= 1 */
  int64_t local_expert_start;  /* first local expert's global id */
  int64_t topk;                /* 1 <= topk <= num_experts */
  int64_t activation;          /* fmoe_activation */
  int64_t layout;              /* fmoe_gated_layout */
  double alpha;                /* swiglu_oai */
  double limit;                /* swiglu_oai */
  int64_t weight_format;       /* fmoe_weight_format */
  int64_t alignment;           /* >= 1: rows per expert group padded to a multiple of this */
  int64_t max_tokens;          /* >= 1: the largest T (or rows / topk in skip-permute mode) */
  int64_t apply_router_weight_on_input; /* 0/1; 1 requires topk == 1 */
} fmoe_plan_desc;

/* Creates a plan. Allocates the plan's small device state (the invalid-id counter), so it may not
 * run on a capturing thread (see Graphs). fmoe_plan_destroy does not wait for the device (its
 * counter is released as fmoe_free releases a buffer); a graph captured with the plan must not be
 * launched after it. */
FMOE_API int fmoe_plan_create(fmoe_context_t ctx, const fmoe_plan_desc* desc,
                              fmoe_plan_t* out_plan);
FMOE_API int fmoe_plan_destroy(fmoe_context_t ctx, fmoe_plan_t plan);
/* Bytes of workspace fmoe_fused_moe needs (depends on the desc alone). */
FMOE_API int fmoe_plan_workspace_bytes(fmoe_plan_t plan, int64_t* out_bytes);
/* Device pointer of the plan's i32 counter of routing ids outside [0, num_experts), summed over
 * every fmoe_fused_moe call since creation or the last reset (fmoe_memset it to reset). */
FMOE_API int fmoe_plan_invalid_count(fmoe_plan_t plan, int32_t** out_device_counter);

typedef struct fmoe_moe_args {
  uint64_t size;
  const void* hidden;          /* required: bf16 [num_tokens, H]; in skip-permute mode
                                  [num_tokens, H] rows already grouped by local expert */
  const int32_t* routing_map;  /* i32 [num_tokens, topk]; required unless skip-permute */
  const float* probs;          /* required: f32 [num_tokens, topk]; in skip-permute mode
                                  f32 [num_tokens] (one per row) */
  const int32_t* tokens_per_expert; /* set = skip-permute mode: device i32 [E_local], rows of
                                  each local expert in `hidden`, in order; their sum must be
                                  <= num_tokens (excess is ignored); rows beyond the sum
                                  produce zeros */
  const void* fc1;             /* required: bf16 or e4m3 [E_local, N1, H] */
  const uint8_t* fc1_scale;    /* mxfp8: e8m0 [E_local, N1, H/32] (linear layout) */
  const void* fc2;             /* required: bf16 or e4m3 [E_local, H, I] */
  const uint8_t* fc2_scale;    /* mxfp8: e8m0 [E_local, H, I/32] */
  const float* fc1_bias;       /* optional: f32 [E_local, N1] */
  const float* fc2_bias;       /* optional: f32 [E_local, H] */
  void* output;                /* required out: bf16 [num_tokens, H] */
  void* workspace;             /* required: fmoe_plan_workspace_bytes bytes (may be NULL when
                                  that is 0) */
  int64_t workspace_bytes;     /* size of `workspace`, checked */
  int64_t num_tokens;          /* 0 <= T <= max_tokens (skip-permute: rows <= max_tokens*topk) */
} fmoe_moe_args;

/* The whole layer: permute -> FC1 -> activation -> FC2 -> unpermute (see DESIGN), on `stream`. */
FMOE_API int fmoe_fused_moe(fmoe_plan_t plan, void* stream, const fmoe_moe_args* args);

#ifdef __cplusplus
}
#endif
#endif /* FMOE_H */
