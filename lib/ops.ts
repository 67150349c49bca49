/**
 * The ops of fmoe.h, one function each, thin over the ABI.
 *
 * Every function checks shapes and dtypes in TypeScript first (FmoeError INVALID_ARGUMENT naming
 * the argument, before any native call), allocates the outputs that `out` does not provide, and
 * enqueues the op on `stream` (default stream when omitted). Nothing here waits for the device.
 *
 * CUDA graphs: allocation cannot be captured, so inside `ctx.capture()` pass every output through
 * `out`.
 *
 * Rows that an op skips (padding rows, rows at or beyond n_used, rows whose row map is -1) are
 * not written: freshly allocated outputs hold unspecified data there.
 */
import {
  type Activation,
  ACTIVATION_CODE,
  DEFAULT_ALIGNMENT,
  type GatedLayout,
  isActivation,
  isGated,
  isGatedLayout,
  LAYOUT_CODE,
  SWIGLU_OAI_DEFAULT_ALPHA,
  SWIGLU_OAI_DEFAULT_LIMIT,
} from "./config.ts";
import { Context, type Stream } from "./context.ts";
import { type DType, MX_BLOCK } from "./dtype.ts";
import { booleanOption, checkOptions, describeValue, FmoeError, finiteOption, optionNames, shownValue, Status } from "./errors.ts";
import * as ffi from "./ffi.ts";
import { assertLiveTensor, describe, expectTensor, type Tensor } from "./tensor.ts";

// ------------------------------------------------------------------------------------------------
// Validation helpers

function fail(fn: string, message: string): never {
  throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: ${message}`);
}

const I32_MAX = 2 ** 31 - 1;

function expectInt(fn: string, name: string, value: number, min: number): number {
  if (!Number.isSafeInteger(value) || value < min) fail(fn, `${name} must be an integer >= ${min}, got ${shownValue(value)}`);
  return value;
}

/**
 * Output tensors of one op call: returns `given` after checking it, or allocates. When the op
 * fails, release() frees what was allocated here (never what the caller passed).
 */
class Outputs {
  readonly #ctx: Context;
  readonly #fn: string;
  readonly #allocated: Tensor[] = [];

  constructor(ctx: Context, fn: string) {
    this.#ctx = ctx;
    this.#fn = fn;
  }

  get<D extends DType>(name: string, given: Tensor | undefined, dtype: D, dims: readonly number[], spec: string): Tensor<D> {
    if (given !== undefined) return expectTensor(this.#fn, `out.${name}`, given, dtype, dims, spec);
    this.#ctx._refuseWhileCapturing(this.#fn, `out.${name} must be given`);
    const t = this.#ctx.empty(dims, dtype);
    t.name = name;
    this.#allocated.push(t);
    return t;
  }

  release(): void {
    for (const t of this.#allocated) t.dispose();
  }
}

/** Runs `body` with an Outputs; frees the allocated outputs if it throws. */
function withOutputs<R>(ctx: Context, fn: string, body: (out: Outputs) => R): R {
  if (!(ctx instanceof Context)) fail(fn, `ctx must be a Context, got ${describeValue(ctx)}`);
  const outs = new Outputs(ctx, fn);
  try {
    return body(outs);
  } catch (err) {
    outs.release();
    throw err;
  }
}

/** A device i32 scalar given as a tensor (its first element) or a tensor plus element offset. */
export type DeviceScalar = Tensor | { tensor: Tensor; offsetElements: number };

function scalarPtr(fn: string, name: string, s: DeviceScalar | undefined): { ptr: number; tensor: Tensor | undefined } {
  if (s === undefined) return { ptr: 0, tensor: undefined };
  const pair = typeof s === "object" && s !== null && "tensor" in s;
  const tensor = pair ? s.tensor : s;
  const offset = pair ? s.offsetElements : 0;
  assertLiveTensor(tensor, `${fn}: ${name}`);
  if (tensor.dtype !== "i32") fail(fn, `${name} must be an i32 tensor, got ${describe(tensor.shape, tensor.dtype)}`);
  if (!Number.isSafeInteger(offset) || offset < 0 || offset >= tensor.numel) {
    fail(fn, `${name}: element ${offset} lies outside ${describe(tensor.shape, tensor.dtype)}`);
  }
  return { ptr: tensor.ptr + 4 * offset, tensor };
}

// ------------------------------------------------------------------------------------------------
// Static sizes

/**
 * Static row capacity of the permuted buffers for T tokens (fmoe_max_rows):
 * round_up(T*topk + E_local*(alignment-1), alignment).
 */
export function maxRows(numTokens: number, topk: number, numLocalExperts: number, alignment: number = DEFAULT_ALIGNMENT): number {
  return ffi.maxRows(numTokens, topk, numLocalExperts, alignment);
}

/** Bytes of the swizzled (128x4 tiled) layout of `batch` scale matrices [rows, scaleCols]. */
export function swizzledScaleBytes(batch: number, rows: number, scaleCols: number): number {
  return ffi.swizzledScaleBytes(batch, rows, scaleCols);
}

// ------------------------------------------------------------------------------------------------
// permute

export interface PermuteOutputs {
  /** bf16 [maxRows, H]: the token copies grouped by local expert. */
  permuted: Tensor<"bf16">;
  /** e4m3 [maxRows, H]: MXFP8 copy of the rows (quantize). */
  permutedQ: Tensor<"e4m3">;
  /** e8m0 [maxRows, H/32] (quantize). */
  permutedScale: Tensor<"e8m0">;
  /** i32 [E_local + 1]: exclusive prefix of padded group sizes; group e = rows [o[e], o[e+1]). */
  expertOffsets: Tensor<"i32">;
  /** i32 [maxRows]: source token of each row, -1 for padding and rows >= nUsed. */
  permutationMap: Tensor<"i32">;
  /** i32 [T, topk]: row of each slot, -1 when the slot is not local. */
  inverseMap: Tensor<"i32">;
}

export interface PermuteOptions {
  /** bf16 [T, H] tokens. */
  hidden: Tensor;
  /** i32 [T, topk] global expert ids. */
  routingMap: Tensor;
  /** f32 [T, topk]: when given, each copied row is scaled by its slot's prob (router weight on input). */
  probs?: Tensor;
  /** Global expert count (ids outside [0, numExperts) are dropped and counted). */
  numExperts: number;
  /** First local expert. Default 0. */
  localExpertStart?: number;
  /** Local expert count E_local. Default numExperts - localExpertStart. */
  numLocalExperts?: number;
  /** Group sizes padded to a multiple of this. Default DEFAULT_ALIGNMENT (16). */
  alignment?: number;
  /** Also (or only) write the MXFP8 copy: permutedQ + permutedScale (H % 32 == 0). The bf16
   *  `permuted` is then written only when passed in `out`. */
  quantize?: boolean;
  /** i32 scalar (in/out), incremented by the number of slots with an id outside [0, numExperts). */
  invalidCount?: DeviceScalar;
  /** Preallocated outputs (required under graph capture); the others are allocated. An earlier
   *  call's result may be passed as it is: its nUsed and maxRows are not buffers but follow from
   *  expertOffsets and the shapes, and are checked against this call. */
  out?: Partial<PermuteResult>;
  stream?: Stream;
}

export interface PermuteResult extends Partial<PermuteOutputs> {
  expertOffsets: Tensor<"i32">;
  permutationMap: Tensor<"i32">;
  inverseMap: Tensor<"i32">;
  /** i32 [1] view of expertOffsets[E_local]: rows in use (the device-side count). */
  nUsed: Tensor<"i32">;
  /** The static row capacity (rows of permuted, permutationMap). */
  maxRows: number;
}

/**
 * Groups the token copies of local slots by local expert (stable in (token, slot) order) and
 * pads each group to a multiple of `alignment` rows (fmoe_permute).
 */
const PERMUTE_OPTIONS = optionNames<PermuteOptions>({
  hidden: true, routingMap: true, probs: true, numExperts: true, localExpertStart: true, numLocalExperts: true,
  alignment: true, quantize: true, invalidCount: true, out: true, stream: true,
});
const PERMUTE_OUTPUTS = optionNames<PermuteResult>({
  permuted: true, permutedQ: true, permutedScale: true, expertOffsets: true, permutationMap: true, inverseMap: true,
  nUsed: true, maxRows: true,
});

export function permute(ctx: Context, o: PermuteOptions): PermuteResult {
  const fn = "permute";
  checkOptions(fn, "options", o, PERMUTE_OPTIONS);
  if (o.out !== undefined) checkOptions(fn, "out", o.out, PERMUTE_OUTPUTS);
  const hidden = expectTensor(fn, "hidden", o.hidden, "bf16", [null, null], "[T, H]");
  const [T, H] = hidden.shape as [number, number];
  const routing = expectTensor(fn, "routingMap", o.routingMap, "i32", [T, null], "[T, topk]");
  const topk = routing.shape[1]!;
  if (o.probs !== undefined) expectTensor(fn, "probs", o.probs, "f32", [T, topk], "[T, topk]");
  const numExperts = expectInt(fn, "numExperts", o.numExperts, 1);
  // Expert ids and rows are i32 on the device: refused here, before outputs of such sizes are allocated.
  if (numExperts > I32_MAX) fail(fn, `numExperts (${numExperts}) exceeds 2^31-1`);
  const start = expectInt(fn, "localExpertStart", o.localExpertStart ?? 0, 0);
  const eLocal = expectInt(fn, "numLocalExperts", o.numLocalExperts ?? numExperts - start, 1);
  if (start + eLocal > numExperts) fail(fn, `localExpertStart + numLocalExperts (${start} + ${eLocal}) exceeds numExperts (${numExperts})`);
  if (topk < 1 || topk > numExperts) fail(fn, `topk (${topk}) must be in [1, numExperts = ${numExperts}]`);
  const alignment = expectInt(fn, "alignment", o.alignment ?? DEFAULT_ALIGNMENT, 1);
  const quantize = booleanOption(fn, "quantize", o.quantize, false);
  if (quantize && H % MX_BLOCK !== 0) fail(fn, `quantize needs H (${H}) to be a multiple of 32`);
  const invalid = scalarPtr(fn, "invalidCount", o.invalidCount);
  const rows = maxRows(T, topk, eLocal, alignment);
  if (rows > I32_MAX) fail(fn, `max_rows (${rows}) for ${T} tokens, topk ${topk}, ${eLocal} local experts and alignment ${alignment} exceeds 2^31-1 (row indices are i32)`);
  const given = o.out ?? {};
  // An earlier result's derived fields: maxRows must be this call's capacity, and nUsed the view
  // of the expertOffsets passed with it (a lone nUsed would not be where the count is written).
  if (given.maxRows !== undefined && given.maxRows !== rows) {
    fail(fn, `out.maxRows (${given.maxRows}) is not this call's row capacity (${rows}: T ${T}, topk ${topk}, ${eLocal} local experts, alignment ${alignment})`);
  }
  if (given.nUsed !== undefined) assertLiveTensor(given.nUsed, `${fn}: out.nUsed`);
  if (given.expertOffsets !== undefined) assertLiveTensor(given.expertOffsets, `${fn}: out.expertOffsets`);
  if (given.nUsed !== undefined && (given.expertOffsets === undefined || given.nUsed.ptr !== given.expertOffsets.ptr + 4 * eLocal)) {
    fail(fn, "out.nUsed must be the nUsed of the out.expertOffsets passed with it (an earlier result of this call's shape)");
  }

  return withOutputs(ctx, fn, (outs) => {
    const permuted = !quantize || given.permuted !== undefined
      ? outs.get("permuted", given.permuted, "bf16", [rows, H], "[maxRows, H]")
      : undefined;
    const permutedQ = quantize ? outs.get("permutedQ", given.permutedQ, "e4m3", [rows, H], "[maxRows, H]") : undefined;
    const permutedScale = quantize
      ? outs.get("permutedScale", given.permutedScale, "e8m0", [rows, H / MX_BLOCK], "[maxRows, H/32]")
      : undefined;
    const expertOffsets = outs.get("expertOffsets", given.expertOffsets, "i32", [eLocal + 1], "[E_local + 1]");
    const permutationMap = outs.get("permutationMap", given.permutationMap, "i32", [rows], "[maxRows]");
    const inverseMap = outs.get("inverseMap", given.inverseMap, "i32", [T, topk], "[T, topk]");
    const stream = ctx._use(fn, o.stream, [hidden, routing, o.probs, permuted, permutedQ, permutedScale, expertOffsets, permutationMap, inverseMap, invalid.tensor]);
    ffi.permute(ctx._handle, stream, {
      hidden: hidden.ptr,
      routing_map: routing.ptr,
      probs: o.probs?.ptr ?? 0,
      permuted: permuted?.ptr ?? 0,
      permuted_q: permutedQ?.ptr ?? 0,
      permuted_scale: permutedScale?.ptr ?? 0,
      expert_offsets: expertOffsets.ptr,
      permutation_map: permutationMap.ptr,
      inverse_map: inverseMap.ptr,
      invalid_count: invalid.ptr,
      num_tokens: T,
      hidden_size: H,
      topk,
      num_experts: numExperts,
      local_expert_start: start,
      num_local_experts: eLocal,
      alignment,
    });
    const nUsed = expertOffsets.view(eLocal, [1]);
    return { permuted, permutedQ, permutedScale, expertOffsets, permutationMap, inverseMap, nUsed, maxRows: rows };
  });
}

// ------------------------------------------------------------------------------------------------
// activation

/** An MXFP8 tensor pair: e4m3 data [..., K] and e8m0 scales [..., K/32], row-major. */
export interface Mxfp8Tensors {
  data: Tensor<"e4m3">;
  scale: Tensor<"e8m0">;
}

interface ActivationOptionsBase {
  /** bf16 [rows, N1]; N1 = I (squared_relu) or 2I (gated). */
  input: Tensor;
  activation: Activation;
  /** Gated activations only. Default "halves". */
  layout?: GatedLayout;
  /** swiglu_oai alpha. Default 1.702. */
  alpha?: number;
  /** swiglu_oai limit (> 0). Default 7.0. */
  limit?: number;
  /** i32 [rows]: rows with -1 are skipped (e.g. permute's permutationMap). */
  rowMap?: Tensor;
  /** i32 device scalar: rows >= *nUsed are skipped (e.g. permute's nUsed). */
  nUsed?: DeviceScalar;
  stream?: Stream;
}

export interface ActivationBf16Options extends ActivationOptionsBase {
  quantize?: false;
  /** bf16 [rows, I]. */
  out?: Tensor;
}

export interface ActivationMxfp8Options extends ActivationOptionsBase {
  /** Fused MXFP8 output: exactly quantizeMxfp8 of the bf16 result (I % 32 == 0). */
  quantize: true;
  /** e4m3 [rows, I] and e8m0 [rows, I/32]. */
  out?: Partial<Mxfp8Tensors>;
}

const ACTIVATION_OPTIONS = optionNames<ActivationMxfp8Options>({
  input: true, activation: true, layout: true, alpha: true, limit: true, rowMap: true, nUsed: true, stream: true,
  quantize: true, out: true,
});
const MXFP8_TENSORS = optionNames<Mxfp8Tensors>({ data: true, scale: true });

/**
 * out[r] = act(input[r]) for the rows not skipped: widened to f32, activation in f32, rounded
 * once to bf16 (fmoe_activation_quant). Returns bf16 [rows, I], or with `quantize: true` the
 * MXFP8 pair of that result.
 */
export function activation(ctx: Context, o: ActivationBf16Options): Tensor<"bf16">;
export function activation(ctx: Context, o: ActivationMxfp8Options): Mxfp8Tensors;
export function activation(ctx: Context, o: ActivationBf16Options | ActivationMxfp8Options): Tensor | Mxfp8Tensors {
  const fn = "activation";
  checkOptions(fn, "options", o, ACTIVATION_OPTIONS);
  const quantize = booleanOption(fn, "quantize", o.quantize, false);
  if (quantize && o.out !== undefined) checkOptions(fn, "out", o.out, MXFP8_TENSORS);
  if (!isActivation(o.activation)) fail(fn, `activation must be squared_relu, silu, gelu or swiglu_oai, got ${String(o.activation)}`);
  const layout = o.layout ?? "halves";
  if (!isGatedLayout(layout)) fail(fn, `layout must be halves or interleaved, got ${String(layout)}`);
  const input = expectTensor(fn, "input", o.input, "bf16", [null, null], "[rows, N1]");
  const [rows, n1] = input.shape as [number, number];
  const gated = isGated(o.activation);
  if (gated && n1 % 2 !== 0) fail(fn, `a gated activation needs an even N1, got ${n1}`);
  const ffn = gated ? n1 / 2 : n1;
  if (o.rowMap !== undefined) expectTensor(fn, "rowMap", o.rowMap, "i32", [rows], "[rows]");
  const nUsed = scalarPtr(fn, "nUsed", o.nUsed);
  const alpha = finiteOption(fn, "alpha", o.alpha, SWIGLU_OAI_DEFAULT_ALPHA);
  const limit = finiteOption(fn, "limit", o.limit, SWIGLU_OAI_DEFAULT_LIMIT);
  if (!(limit > 0)) fail(fn, `limit must be > 0, got ${limit}`);
  if (quantize && ffn % MX_BLOCK !== 0) fail(fn, `quantize needs I (${ffn}) to be a multiple of 32`);

  return withOutputs(ctx, fn, (outs) => {
    let output: Tensor | undefined;
    let pair: Mxfp8Tensors | undefined;
    if (o.quantize === true) { // the same as quantize (checked a boolean), and narrows o's type
      pair = {
        data: outs.get("data", o.out?.data, "e4m3", [rows, ffn], "[rows, I]"),
        scale: outs.get("scale", o.out?.scale, "e8m0", [rows, ffn / MX_BLOCK], "[rows, I/32]"),
      };
    } else {
      output = outs.get("output", o.out, "bf16", [rows, ffn], "[rows, I]");
    }
    const stream = ctx._use(fn, o.stream, [input, o.rowMap, nUsed.tensor, output, pair?.data, pair?.scale]);
    ffi.activationQuant(ctx._handle, stream, {
      input: input.ptr,
      output: output?.ptr ?? 0,
      output_q: pair?.data.ptr ?? 0,
      output_scale: pair?.scale.ptr ?? 0,
      row_map: o.rowMap?.ptr ?? 0,
      n_used: nUsed.ptr,
      rows,
      ffn,
      activation: ACTIVATION_CODE[o.activation],
      layout: LAYOUT_CODE[layout],
      alpha,
      limit,
    });
    return pair ?? output!;
  });
}

// ------------------------------------------------------------------------------------------------
// MXFP8 quantization and scale layouts

export interface QuantizeOptions {
  out?: Partial<Mxfp8Tensors>;
  stream?: Stream;
}

/**
 * MXFP8 of bf16 `x` [..., K] (K % 32 == 0): data e4m3 [..., K], scale e8m0 [..., K/32]
 * (fmoe_quantize_mxfp8; the rule of fmoe.h, bit for bit on every backend).
 */
const QUANTIZE_OPTIONS = optionNames<QuantizeOptions>({ out: true, stream: true });

export function quantizeMxfp8(ctx: Context, x: Tensor, o: QuantizeOptions = {}): Mxfp8Tensors {
  const fn = "quantizeMxfp8";
  checkOptions(fn, "options", o, QUANTIZE_OPTIONS);
  if (o.out !== undefined) checkOptions(fn, "out", o.out, MXFP8_TENSORS);
  assertLiveTensor(x, `${fn}: x`);
  if (x.dtype !== "bf16" || x.shape.length < 1) fail(fn, `x must be [..., K] bf16, got ${describe(x.shape, x.dtype)}`);
  const k = x.shape[x.shape.length - 1]!;
  if (k % MX_BLOCK !== 0) fail(fn, `x's last dimension K (${k}) must be a multiple of 32`);
  const rows = k === 0 ? 0 : x.numel / k;
  const lead = x.shape.slice(0, -1);
  return withOutputs(ctx, fn, (outs) => {
    const data = outs.get("data", o.out?.data, "e4m3", x.shape, "[..., K]");
    const scale = outs.get("scale", o.out?.scale, "e8m0", [...lead, k / MX_BLOCK], "[..., K/32]");
    const stream = ctx._use(fn, o.stream, [x, data, scale]);
    ffi.quantizeMxfp8(ctx._handle, stream, x.ptr, rows, k, data.ptr, scale.ptr);
    return { data, scale };
  });
}

export interface DequantizeOptions {
  /** f32, same shape as data. */
  out?: Tensor;
  stream?: Stream;
}

/** f32 [..., K] = e4m3 data [..., K] * 2^scale (scale e8m0 [..., K/32]) (fmoe_dequantize_mxfp8). */
const OUT_STREAM_OPTIONS = optionNames<DequantizeOptions>({ out: true, stream: true });

export function dequantizeMxfp8(ctx: Context, data: Tensor, scale: Tensor, o: DequantizeOptions = {}): Tensor<"f32"> {
  const fn = "dequantizeMxfp8";
  checkOptions(fn, "options", o, OUT_STREAM_OPTIONS);
  assertLiveTensor(data, `${fn}: data`);
  if (data.dtype !== "e4m3" || data.shape.length < 1) fail(fn, `data must be [..., K] e4m3, got ${describe(data.shape, data.dtype)}`);
  const k = data.shape[data.shape.length - 1]!;
  if (k % MX_BLOCK !== 0) fail(fn, `data's last dimension K (${k}) must be a multiple of 32`);
  expectTensor(fn, "scale", scale, "e8m0", [...data.shape.slice(0, -1), k / MX_BLOCK], "[..., K/32]");
  const rows = k === 0 ? 0 : data.numel / k;
  return withOutputs(ctx, fn, (outs) => {
    const out = outs.get("out", o.out, "f32", data.shape, "[..., K]");
    const stream = ctx._use(fn, o.stream, [data, scale, out]);
    ffi.dequantizeMxfp8(ctx._handle, stream, data.ptr, scale.ptr, rows, k, out.ptr);
    return out;
  });
}

export interface SwizzleOptions {
  out?: Tensor;
  stream?: Stream;
}

function roundUp(x: number, m: number): number {
  return Math.ceil(x / m) * m;
}

/**
 * Linear scales e8m0 [rows, scaleCols] or [batch, rows, scaleCols] -> the 128x4 swizzled layout
 * (fmoe.h, "Scale layouts"): e8m0 [batch, roundUp(rows, 128), roundUp(scaleCols, 4)] (the batch
 * dimension dropped for 2-D input), padding bytes 0. Keep the logical rows and scaleCols: the
 * swizzled tensor's shape only holds the padded ones.
 */
export function swizzleScales(ctx: Context, linear: Tensor, o: SwizzleOptions = {}): Tensor<"e8m0"> {
  const fn = "swizzleScales";
  checkOptions(fn, "options", o, OUT_STREAM_OPTIONS);
  assertLiveTensor(linear, `${fn}: linear`);
  if (linear.dtype !== "e8m0" || (linear.shape.length !== 2 && linear.shape.length !== 3)) {
    fail(fn, `linear must be [rows, scaleCols] or [batch, rows, scaleCols] e8m0, got ${describe(linear.shape, linear.dtype)}`);
  }
  const [batch, rows, cols] = linear.shape.length === 3 ? (linear.shape as [number, number, number]) : [1, linear.shape[0]!, linear.shape[1]!];
  const padded = [roundUp(rows, 128), roundUp(cols, 4)];
  const shape = linear.shape.length === 3 ? [batch, ...padded] : padded;
  return withOutputs(ctx, fn, (outs) => {
    const out = outs.get("out", o.out, "e8m0", shape, "[batch, roundUp(rows, 128), roundUp(scaleCols, 4)]");
    const stream = ctx._use(fn, o.stream, [linear, out]);
    ffi.swizzleScales(ctx._handle, stream, linear.ptr, batch, rows, cols, out.ptr);
    return out;
  });
}

export interface UnswizzleOptions {
  /** Logical rows of each scale matrix. */
  rows: number;
  /** Logical scale columns (K/32) of each matrix. */
  scaleCols: number;
  /** Matrices in the tensor. Default: the swizzled tensor's first dim when it is 3-D, else 1. */
  batch?: number;
  /** e8m0 [batch, rows, scaleCols] (or [rows, scaleCols] when batch was not given for 2-D input). */
  out?: Tensor;
  stream?: Stream;
}

/** The inverse of swizzleScales: swizzled e8m0 (any shape of the right byte count) -> linear. */
const UNSWIZZLE_OPTIONS = optionNames<UnswizzleOptions>({ rows: true, scaleCols: true, batch: true, out: true, stream: true });

export function unswizzleScales(ctx: Context, swizzled: Tensor, o: UnswizzleOptions): Tensor<"e8m0"> {
  const fn = "unswizzleScales";
  checkOptions(fn, "options", o, UNSWIZZLE_OPTIONS);
  assertLiveTensor(swizzled, `${fn}: swizzled`);
  if (swizzled.dtype !== "e8m0") fail(fn, `swizzled must be e8m0, got ${describe(swizzled.shape, swizzled.dtype)}`);
  const rows = expectInt(fn, "rows", o.rows, 0);
  const cols = expectInt(fn, "scaleCols", o.scaleCols, 0);
  const batched = o.batch !== undefined || swizzled.shape.length === 3;
  const batch = expectInt(fn, "batch", o.batch ?? (swizzled.shape.length === 3 ? swizzled.shape[0]! : 1), 0);
  const need = swizzledScaleBytes(batch, rows, cols);
  if (swizzled.numel !== need) {
    fail(fn, `swizzled holds ${swizzled.numel} bytes, ${need} expected for batch ${batch} of [${rows}, ${cols}] scales`);
  }
  const shape = batched ? [batch, rows, cols] : [rows, cols];
  return withOutputs(ctx, fn, (outs) => {
    const out = outs.get("out", o.out, "e8m0", shape, batched ? "[batch, rows, scaleCols]" : "[rows, scaleCols]");
    const stream = ctx._use(fn, o.stream, [swizzled, out]);
    ffi.unswizzleScales(ctx._handle, stream, swizzled.ptr, batch, rows, cols, out.ptr);
    return out;
  });
}

// ------------------------------------------------------------------------------------------------
// grouped GEMM

interface GroupedMmCommon {
  /** f32 [groups, n]. */
  bias?: Tensor;
  /** i32 [groups + 1], non-decreasing, offsets[0] = 0, offsets[groups] <= rows (device-side). */
  groupOffsets: Tensor;
  /** i32 [rows]: rows with -1 are skipped. */
  rowMap?: Tensor;
  /** bf16 [rows, n]. */
  out?: Tensor;
  stream?: Stream;
}

export interface GroupedMmBf16Options extends GroupedMmCommon {
  /** bf16 [rows, k]. */
  a: Tensor;
  /** bf16 [groups, n, k] (nn.Linear layout per group). */
  b: Tensor;
}

export interface GroupedMmMxfp8Options extends GroupedMmCommon {
  /** e4m3 [rows, k]. */
  a: Tensor;
  /** e8m0 [rows, k/32]. */
  aScale: Tensor;
  /** e4m3 [groups, n, k]. */
  b: Tensor;
  /** e8m0 [groups, n, k/32]. */
  bScale: Tensor;
}

const GROUPED_MM_BF16_OPTIONS = optionNames<GroupedMmBf16Options>({
  a: true, b: true, bias: true, groupOffsets: true, rowMap: true, out: true, stream: true,
});
const GROUPED_MM_MXFP8_OPTIONS = optionNames<GroupedMmMxfp8Options>({
  a: true, aScale: true, b: true, bScale: true, bias: true, groupOffsets: true, rowMap: true, out: true, stream: true,
});

function groupedMm(ctx: Context, fn: string, o: GroupedMmBf16Options | GroupedMmMxfp8Options, mx: boolean): Tensor<"bf16"> {
  checkOptions(fn, "options", o, mx ? GROUPED_MM_MXFP8_OPTIONS : GROUPED_MM_BF16_OPTIONS);
  const dt: DType = mx ? "e4m3" : "bf16";
  const a = expectTensor(fn, "a", o.a, dt, [null, null], "[rows, k]");
  const [rows, k] = a.shape as [number, number];
  const b = expectTensor(fn, "b", o.b, dt, [null, null, k], "[groups, n, k]");
  const [groups, n] = b.shape as [number, number];
  if (groups < 1 || n < 1 || k < 1) fail(fn, `groups, n and k must be >= 1, got b ${describe(b.shape, b.dtype)}`);
  let aScale: Tensor | undefined;
  let bScale: Tensor | undefined;
  if (mx) {
    if (k % MX_BLOCK !== 0) fail(fn, `k (${k}) must be a multiple of 32`);
    const m = o as GroupedMmMxfp8Options;
    aScale = expectTensor(fn, "aScale", m.aScale, "e8m0", [rows, k / MX_BLOCK], "[rows, k/32]");
    bScale = expectTensor(fn, "bScale", m.bScale, "e8m0", [groups, n, k / MX_BLOCK], "[groups, n, k/32]");
  }
  if (o.bias !== undefined) expectTensor(fn, "bias", o.bias, "f32", [groups, n], "[groups, n]");
  const offsets = expectTensor(fn, "groupOffsets", o.groupOffsets, "i32", [groups + 1], "[groups + 1]");
  if (o.rowMap !== undefined) expectTensor(fn, "rowMap", o.rowMap, "i32", [rows], "[rows]");
  return withOutputs(ctx, fn, (outs) => {
    const c = outs.get("out", o.out, "bf16", [rows, n], "[rows, n]");
    const stream = ctx._use(fn, o.stream, [a, aScale, b, bScale, o.bias, offsets, o.rowMap, c]);
    const fields: ffi.GroupedMmFields = {
      a: a.ptr,
      a_scale: aScale?.ptr ?? 0,
      b: b.ptr,
      b_scale: bScale?.ptr ?? 0,
      bias: o.bias?.ptr ?? 0,
      c: c.ptr,
      group_offsets: offsets.ptr,
      row_map: o.rowMap?.ptr ?? 0,
      rows,
      n,
      k,
      groups,
    };
    if (mx) ffi.groupedMmMxfp8(ctx._handle, stream, fields);
    else ffi.groupedMmBf16(ctx._handle, stream, fields);
    return c;
  });
}

/**
 * For each group g and row r in [groupOffsets[g], groupOffsets[g+1]) not skipped:
 * out[r, :] = bf16(sum_k a[r, k] * b[g, :, k] + bias[g, :]) with f32 accumulation
 * (fmoe_grouped_mm_bf16). Returns bf16 [rows, n].
 */
export function groupedMmBf16(ctx: Context, o: GroupedMmBf16Options): Tensor<"bf16"> {
  return groupedMm(ctx, "groupedMmBf16", o, false);
}

/**
 * The MXFP8 grouped GEMM: out = bf16(sum_k dequant(a) * dequant(b) + bias), f32 accumulation
 * (fmoe_grouped_mm_mxfp8). Returns bf16 [rows, n].
 */
export function groupedMmMxfp8(ctx: Context, o: GroupedMmMxfp8Options): Tensor<"bf16"> {
  return groupedMm(ctx, "groupedMmMxfp8", o, true);
}

// ------------------------------------------------------------------------------------------------
// route

export type RouteScoring = "softmax" | "sigmoid";

export interface RouteOutputs {
  /** i32 [T, topk]: global expert ids, best first. */
  routingMap: Tensor<"i32">;
  /** f32 [T, topk]: their weights. */
  probs: Tensor<"f32">;
}

export interface RouteOptions {
  /** f32 [T, E]: the router's logits. */
  logits: Tensor;
  /** Experts per token (1..32). */
  topk: number;
  /** Scores: softmax over the experts (default) or a sigmoid per expert. */
  scoring?: RouteScoring;
  /** f32 [E]: added to the scores to choose the experts, not to their weights (DeepSeek-V3's
   *  e_score_correction_bias). */
  selectionBias?: Tensor;
  /** The experts split into this many equal groups, of which topkGroups are chosen from (the
   *  two best choices of each group summed); default 1: no groups. */
  numGroups?: number;
  topkGroups?: number;
  /** Divide the topk weights by their sum. Default true. */
  renormalize?: boolean;
  /** Multiplies the weights (routed_scaling_factor). Default 1. */
  scale?: number;
  /** Preallocated outputs (required under graph capture). */
  out?: Partial<RouteOutputs>;
  stream?: Stream;
}

const ROUTE_OPTIONS = optionNames<RouteOptions>({
  logits: true, topk: true, scoring: true, selectionBias: true, numGroups: true, topkGroups: true, renormalize: true,
  scale: true, out: true, stream: true,
});
const ROUTE_OUTPUTS = optionNames<RouteOutputs>({ routingMap: true, probs: true });
const ROUTE_SCORING: Record<RouteScoring, number> = { softmax: 0, sigmoid: 1 };

/**
 * Each token's topk experts and weights from its router logits (fmoe_route): the experts of
 * largest choice (score + selectionBias), best first, weighted by their scores, renormalized and
 * scaled. Qwen-MoE, Mixtral, gpt-oss: `{ topk }` (softmax, renormalized). DeepSeek-V3:
 * `{ topk: 8, scoring: "sigmoid", selectionBias, numGroups: 8, topkGroups: 4, scale: 2.5 }`.
 */
export function route(ctx: Context, o: RouteOptions): RouteOutputs {
  const fn = "route";
  checkOptions(fn, "options", o, ROUTE_OPTIONS);
  if (o.out !== undefined) checkOptions(fn, "out", o.out, ROUTE_OUTPUTS);
  const logits = expectTensor(fn, "logits", o.logits, "f32", [null, null], "[T, E]");
  const [T, E] = logits.shape as [number, number];
  const topk = expectInt(fn, "topk", o.topk, 1);
  if (topk > E) fail(fn, `topk (${topk}) exceeds the ${E} experts of logits [T, E]`);
  const scoring = o.scoring ?? "softmax";
  if (ROUTE_SCORING[scoring] === undefined) fail(fn, `scoring must be "softmax" or "sigmoid", got ${shownValue(scoring)}`);
  if (o.selectionBias !== undefined) expectTensor(fn, "selectionBias", o.selectionBias, "f32", [E], "[E]");
  const numGroups = expectInt(fn, "numGroups", o.numGroups ?? 1, 1);
  const topkGroups = expectInt(fn, "topkGroups", o.topkGroups ?? 1, 1);
  const renormalize = booleanOption(fn, "renormalize", o.renormalize, true);
  const scale = finiteOption(fn, "scale", o.scale, 1);
  return withOutputs(ctx, fn, (outs) => {
    const routingMap = outs.get("routingMap", o.out?.routingMap, "i32", [T, topk], "[T, topk]");
    const probs = outs.get("probs", o.out?.probs, "f32", [T, topk], "[T, topk]");
    const stream = ctx._use(fn, o.stream, [logits, o.selectionBias, routingMap, probs]);
    ffi.route(ctx._handle, stream, {
      logits: logits.ptr,
      selection_bias: o.selectionBias?.ptr ?? 0,
      routing_map: routingMap.ptr,
      probs: probs.ptr,
      num_tokens: T,
      num_experts: E,
      topk,
      scoring: ROUTE_SCORING[scoring],
      num_groups: numGroups,
      topk_groups: topkGroups,
      renormalize: renormalize ? 1 : 0,
      scale,
    });
    return { routingMap, probs };
  });
}

// ------------------------------------------------------------------------------------------------
// unpermute

export interface UnpermuteOptions {
  /** bf16 [rows, H]: the FC2 output in permuted order. */
  input: Tensor;
  /** i32 [T, topk]: permute's inverseMap (-1 = slot not local). */
  inverseMap: Tensor;
  /** f32 [T, topk]. Omitted = weight 1. */
  probs?: Tensor;
  /** bf16 [T, H]. */
  out?: Tensor;
  stream?: Stream;
}

/**
 * out[t] = bf16(sum over k = 0..topk-1 with inverseMap[t,k] >= 0 of probs[t,k] * input[row]),
 * summed in f32 in slot order (fmoe_unpermute). A token with no local slot gets zeros.
 * Returns bf16 [T, H].
 */
const UNPERMUTE_OPTIONS = optionNames<UnpermuteOptions>({ input: true, inverseMap: true, probs: true, out: true, stream: true });

export function unpermute(ctx: Context, o: UnpermuteOptions): Tensor<"bf16"> {
  const fn = "unpermute";
  checkOptions(fn, "options", o, UNPERMUTE_OPTIONS);
  const input = expectTensor(fn, "input", o.input, "bf16", [null, null], "[rows, H]");
  const [rows, H] = input.shape as [number, number];
  const inv = expectTensor(fn, "inverseMap", o.inverseMap, "i32", [null, null], "[T, topk]");
  const [T, topk] = inv.shape as [number, number];
  if (o.probs !== undefined) expectTensor(fn, "probs", o.probs, "f32", [T, topk], "[T, topk]");
  return withOutputs(ctx, fn, (outs) => {
    const out = outs.get("out", o.out, "bf16", [T, H], "[T, H]");
    const stream = ctx._use(fn, o.stream, [input, inv, o.probs, out]);
    ffi.unpermute(ctx._handle, stream, {
      input: input.ptr,
      inverse_map: inv.ptr,
      probs: o.probs?.ptr ?? 0,
      output: out.ptr,
      rows,
      num_tokens: T,
      hidden_size: H,
      topk,
    });
    return out;
  });
}
