/**
 * The reference: slow, obviously correct TypeScript of every op of fmoe.h, on host TypedArrays.
 * The tests trust it: the host backend is checked against it, the CUDA backend against the host.
 *
 * Conventions: bf16 arrays are Uint16Array bits, e4m3/e8m0 are Uint8Array bytes, matrices are
 * flat row-major. Arithmetic is done in f64 and rounded exactly where fmoe.h says the backends
 * round: the FC1 output, the activation output and the FC2 output to bf16, the unpermute sum to
 * bf16; the MXFP8 rule is lib/dtype.ts's port of csrc/core/numerics.h, bit for bit. Rows that an
 * op does not write are 0 here (the backends leave them unspecified: compare written rows only).
 */
import {
  type Activation,
  DEFAULT_ALIGNMENT,
  fc1Outputs,
  type GatedLayout,
  isGated,
  type LayerShape,
  maxRowsFor,
  SWIGLU_OAI_DEFAULT_ALPHA,
  SWIGLU_OAI_DEFAULT_LIMIT,
  type WeightFormat,
} from "./config.ts";
import {
  bf16ToF32,
  e4m3ToF32,
  e8m0ToF32,
  f32ToBf16,
  MX_BLOCK,
  quantizeMxfp8Array,
  dequantizeMxfp8Array,
} from "./dtype.ts";
import { ensureArg } from "./errors.ts";

// Lookup tables: widening is the inner loop of every reference GEMM.
const BF16_VALUE = new Float64Array(65536);
for (let i = 0; i < 65536; ++i) BF16_VALUE[i] = bf16ToF32(i);
const E4M3_VALUE = new Float64Array(256);
for (let i = 0; i < 256; ++i) E4M3_VALUE[i] = e4m3ToF32(i);

function bf16(x: number): number {
  return f32ToBf16(x);
}

// ------------------------------------------------------------------------------------------------
// Error metric and tolerances

/**
 * Relative Frobenius error ||a - b|| / ||b|| (b is the reference). Uint16Array inputs are read
 * as bf16 bits. Any NaN/Inf, or a length mismatch, gives Infinity; ||b|| = 0 gives 0 when a == b
 * else Infinity.
 */
export function relFrobenius(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  const av = a instanceof Uint16Array ? (i: number) => BF16_VALUE[a[i]!]! : (i: number) => a[i]!;
  const bv = b instanceof Uint16Array ? (i: number) => BF16_VALUE[b[i]!]! : (i: number) => b[i]!;
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; ++i) {
    const x = av(i);
    const y = bv(i);
    const d = x - y;
    num += d * d;
    den += y * y;
  }
  if (!Number.isFinite(num) || !Number.isFinite(den)) return Infinity;
  if (den === 0) return num === 0 ? 0 : Infinity;
  return Math.sqrt(num / den);
}

/**
 * Tolerances of relFrobenius, per compared precision. Exact ops (permute maps, MXFP8
 * quantization, scale swizzling, bf16 permuted copies) are compared bit for bit, not here.
 */
export const TOLERANCE = {
  /** f32 results (dequantization): only f32 vs f64 rounding. */
  f32: 1e-6,
  /** bf16 results (GEMM, activation, unpermute, whole layer): a bf16 ulp is 2^-8 relative;
   *  different accumulation orders flip a few roundings, which then propagate. */
  bf16: 1e-2,
  /** MXFP8 path vs the MXFP8 reference: a flipped bf16 rounding before a quantization moves an
   *  e4m3 code by one (2^-3 relative) now and then. */
  mxfp8: 2e-2,
  /** MXFP8 path vs the bf16 reference: the quantization error itself (e4m3 keeps 3 bits;
   *  about 0.06 measured on random layers). */
  mxfp8VsBf16: 1.5e-1,
} as const;

// ------------------------------------------------------------------------------------------------
// permute

export interface PermuteArgs {
  /** bf16 [T, H]. */
  hidden: Uint16Array;
  numTokens: number;
  hiddenSize: number;
  /** i32 [T, topk] global expert ids. */
  routingMap: Int32Array;
  topk: number;
  /** f32 [T, topk]: scales each copied row (f32 product, rounded to bf16). */
  probs?: Float32Array;
  numExperts: number;
  localExpertStart?: number;
  numLocalExperts?: number;
  alignment?: number;
  /** Also produce the MXFP8 copy of the rows. */
  quantize?: boolean;
}

export interface PermuteResult {
  /** bf16 [maxRows, H]; padding rows and rows >= nUsed are 0. */
  permuted: Uint16Array;
  /** e4m3 [maxRows, H] and e8m0 [maxRows, H/32] (quantize); unused rows 0. */
  permutedQ?: Uint8Array;
  permutedScale?: Uint8Array;
  /** i32 [E_local + 1]. */
  expertOffsets: Int32Array;
  /** i32 [maxRows]: source token or -1. */
  permutationMap: Int32Array;
  /** i32 [T, topk]: row of each slot or -1. */
  inverseMap: Int32Array;
  /** Slots whose id is outside [0, numExperts). */
  invalidCount: number;
  nUsed: number;
  maxRows: number;
}

/** fmoe_permute: group local slots by expert, stable in (token, slot) order, pad groups. */
export function permute(a: PermuteArgs): PermuteResult {
  const { numTokens: T, hiddenSize: H, topk, numExperts } = a;
  const start = a.localExpertStart ?? 0;
  const eLocal = a.numLocalExperts ?? numExperts - start;
  const alignment = a.alignment ?? DEFAULT_ALIGNMENT;
  const maxRows = maxRowsFor(T, topk, eLocal, alignment);
  let invalidCount = 0;
  // Slots of each local expert, in (token, slot) order.
  const slots: number[][] = Array.from({ length: eLocal }, () => []);
  for (let t = 0; t < T; ++t) {
    for (let k = 0; k < topk; ++k) {
      const id = a.routingMap[t * topk + k]!;
      if (id < 0 || id >= numExperts) {
        ++invalidCount;
        continue;
      }
      const e = id - start;
      if (e >= 0 && e < eLocal) slots[e]!.push(t * topk + k);
    }
  }
  const expertOffsets = new Int32Array(eLocal + 1);
  for (let e = 0; e < eLocal; ++e) {
    expertOffsets[e + 1] = expertOffsets[e]! + Math.ceil(slots[e]!.length / alignment) * alignment;
  }
  const permutationMap = new Int32Array(maxRows).fill(-1);
  const inverseMap = new Int32Array(T * topk).fill(-1);
  const permuted = new Uint16Array(maxRows * H);
  for (let e = 0; e < eLocal; ++e) {
    slots[e]!.forEach((slot, i) => {
      const row = expertOffsets[e]! + i;
      const t = Math.floor(slot / topk);
      permutationMap[row] = t;
      inverseMap[slot] = row;
      for (let h = 0; h < H; ++h) {
        const x = a.hidden[t * H + h]!;
        permuted[row * H + h] = a.probs === undefined ? x : bf16(Math.fround(a.probs[slot]! * BF16_VALUE[x]!));
      }
    });
  }
  const result: PermuteResult = {
    permuted, expertOffsets, permutationMap, inverseMap, invalidCount, nUsed: expertOffsets[eLocal]!, maxRows,
  };
  if (a.quantize) {
    const q = quantizeMxfp8Array(permuted, maxRows, H);
    // Only real rows are defined; clear the rest so comparisons see one convention.
    for (let r = 0; r < maxRows; ++r) {
      if (permutationMap[r] !== -1) continue;
      q.data.fill(0, r * H, (r + 1) * H);
      q.scale.fill(0, (r * H) / MX_BLOCK, ((r + 1) * H) / MX_BLOCK);
    }
    result.permutedQ = q.data;
    result.permutedScale = q.scale;
  }
  return result;
}

// ------------------------------------------------------------------------------------------------
// activation

export interface ActivationParams {
  activation: Activation;
  layout?: GatedLayout;
  alpha?: number;
  limit?: number;
}

function sigmoid(x: number): number {
  return 1 / (1 + Math.exp(-x));
}

/** act(gate, up) for the gated activations, act(x) for squared_relu (up ignored), in f64. */
export function activationValue(p: ActivationParams, gate: number, up: number): number {
  switch (p.activation) {
    case "squared_relu": {
      const r = Math.max(gate, 0);
      return r * r;
    }
    case "silu":
      return gate * sigmoid(gate) * up;
    case "gelu": {
      const inner = Math.sqrt(2 / Math.PI) * (gate + 0.044715 * gate * gate * gate);
      return 0.5 * gate * (1 + Math.tanh(inner)) * up;
    }
    case "swiglu_oai": {
      const alpha = p.alpha ?? SWIGLU_OAI_DEFAULT_ALPHA;
      const limit = p.limit ?? SWIGLU_OAI_DEFAULT_LIMIT;
      const g = Math.min(gate, limit);
      const u = Math.min(Math.max(up, -limit), limit);
      return (u + 1) * g * sigmoid(alpha * g);
    }
  }
}

/** Activation of one bf16 row of N1 values starting at `offset`: I bf16 outputs into `out`. */
function activationRow(p: ActivationParams, input: Uint16Array, offset: number, ffn: number, out: Uint16Array, outOffset: number): void {
  const gated = isGated(p.activation);
  const interleaved = (p.layout ?? "halves") === "interleaved";
  for (let j = 0; j < ffn; ++j) {
    let gate: number;
    let up = 0;
    if (!gated) gate = BF16_VALUE[input[offset + j]!]!;
    else if (interleaved) {
      gate = BF16_VALUE[input[offset + 2 * j]!]!;
      up = BF16_VALUE[input[offset + 2 * j + 1]!]!;
    } else {
      gate = BF16_VALUE[input[offset + j]!]!;
      up = BF16_VALUE[input[offset + ffn + j]!]!;
    }
    out[outOffset + j] = bf16(activationValue(p, gate, up));
  }
}

export interface ActivationArgs extends ActivationParams {
  /** bf16 [rows, N1]. */
  input: Uint16Array;
  rows: number;
  /** I: N1 = I (squared_relu) or 2I. */
  ffn: number;
  /** i32 [rows]: rows with -1 are skipped. */
  rowMap?: Int32Array;
  /** Rows >= nUsed are skipped. */
  nUsed?: number;
}

/** fmoe_activation_quant (bf16 out): bf16 [rows, I]; skipped rows 0. */
export function activation(a: ActivationArgs): Uint16Array {
  const n1 = fc1Outputs(a.activation, a.ffn);
  ensureArg(a.input.length >= a.rows * n1, "reference.activation", `input holds ${a.input.length} values, needs ${a.rows * n1}`);
  const out = new Uint16Array(a.rows * a.ffn);
  for (let r = 0; r < a.rows; ++r) {
    if (a.nUsed !== undefined && r >= a.nUsed) continue;
    if (a.rowMap !== undefined && a.rowMap[r]! < 0) continue;
    activationRow(a, a.input, r * n1, a.ffn, out, r * a.ffn);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// MXFP8 and scale layouts

/** fmoe_quantize_mxfp8: data e4m3 [rows, cols], scale e8m0 [rows, cols/32]. */
export function quantizeMxfp8(input: Uint16Array, rows: number, cols: number): { data: Uint8Array; scale: Uint8Array } {
  return quantizeMxfp8Array(input, rows, cols);
}

/** fmoe_dequantize_mxfp8: f32 [rows, cols]. */
export function dequantizeMxfp8(data: Uint8Array, scale: Uint8Array, rows: number, cols: number): Float32Array {
  return dequantizeMxfp8Array(data, scale, rows, cols);
}

function roundUp(x: number, m: number): number {
  return Math.ceil(x / m) * m;
}

/** Byte offset of scale (r, c) in one swizzled matrix whose columns are padded to `paddedCols`. */
function swizzledOffset(r: number, c: number, paddedCols: number): number {
  const tile = Math.floor(r / 128) * (paddedCols / 4) + Math.floor(c / 4);
  const rr = r % 128;
  return tile * 512 + (rr % 32) * 16 + Math.floor(rr / 32) * 4 + (c % 4);
}

/** Bytes of `batch` swizzled scale matrices of [rows, scaleCols]. */
export function swizzledScaleBytes(batch: number, rows: number, scaleCols: number): number {
  return batch * roundUp(rows, 128) * roundUp(scaleCols, 4);
}

/** Linear e8m0 [batch, rows, scaleCols] -> the 128x4 swizzled layout (padding bytes 0). */
export function swizzleScales(linear: Uint8Array, batch: number, rows: number, scaleCols: number): Uint8Array {
  const per = swizzledScaleBytes(1, rows, scaleCols);
  const pc = roundUp(scaleCols, 4);
  const out = new Uint8Array(batch * per);
  for (let b = 0; b < batch; ++b) {
    for (let r = 0; r < rows; ++r) {
      for (let c = 0; c < scaleCols; ++c) out[b * per + swizzledOffset(r, c, pc)] = linear[(b * rows + r) * scaleCols + c]!;
    }
  }
  return out;
}

/** The inverse of swizzleScales: linear e8m0 [batch, rows, scaleCols]. */
export function unswizzleScales(swizzled: Uint8Array, batch: number, rows: number, scaleCols: number): Uint8Array {
  const per = swizzledScaleBytes(1, rows, scaleCols);
  const pc = roundUp(scaleCols, 4);
  const out = new Uint8Array(batch * rows * scaleCols);
  for (let b = 0; b < batch; ++b) {
    for (let r = 0; r < rows; ++r) {
      for (let c = 0; c < scaleCols; ++c) out[(b * rows + r) * scaleCols + c] = swizzled[b * per + swizzledOffset(r, c, pc)]!;
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// grouped GEMM

/** An operand of a reference GEMM: bf16 bits, or MXFP8 data + scales. */
export type Operand = { bf16: Uint16Array } | { data: Uint8Array; scale: Uint8Array };

/** Widens row `row` (of `k` values) of an operand to f64 into `dst`. */
function loadRow(op: Operand, row: number, k: number, dst: Float64Array): void {
  const base = row * k;
  if ("bf16" in op) {
    for (let i = 0; i < k; ++i) dst[i] = BF16_VALUE[op.bf16[base + i]!]!;
    return;
  }
  for (let b = 0; b < k / MX_BLOCK; ++b) {
    const s = e8m0ToF32(op.scale[base / MX_BLOCK + b]!);
    for (let i = b * MX_BLOCK; i < (b + 1) * MX_BLOCK; ++i) dst[i] = E4M3_VALUE[op.data[base + i]!]! * s;
  }
}

/** bf16(w[row] . x + bias) for each of `n` rows of weight matrix `matrix` ([n, k]) of `w`. */
function linear(w: Operand, matrix: number, n: number, k: number, x: Float64Array, bias: Float32Array | undefined, out: Uint16Array, outOffset: number, scratch: Float64Array): void {
  for (let j = 0; j < n; ++j) {
    loadRow(w, matrix * n + j, k, scratch);
    let acc = 0;
    for (let i = 0; i < k; ++i) acc += scratch[i]! * x[i]!;
    if (bias !== undefined) acc += bias[matrix * n + j]!;
    out[outOffset + j] = bf16(acc);
  }
}

export interface GroupedMmArgs {
  /** [rows, k]: bf16, or MXFP8 (data [rows, k], scale [rows, k/32]). */
  a: Operand;
  /** [groups, n, k]. */
  b: Operand;
  /** f32 [groups, n]. */
  bias?: Float32Array;
  /** i32 [groups + 1]. */
  groupOffsets: Int32Array;
  /** i32 [rows]: -1 rows skipped. */
  rowMap?: Int32Array;
  rows: number;
  n: number;
  k: number;
  groups: number;
}

/**
 * fmoe_grouped_mm_bf16 / _mxfp8: c[r] = bf16(b[g] @ a[r] + bias[g]) for rows r of group g.
 * Returns bf16 [rows, n]; rows not written are 0. Bad offsets skip their group like the
 * backends do.
 */
export function groupedMm(a: GroupedMmArgs): Uint16Array {
  const out = new Uint16Array(a.rows * a.n);
  const x = new Float64Array(a.k);
  const scratch = new Float64Array(a.k);
  for (let g = 0; g < a.groups; ++g) {
    const lo = a.groupOffsets[g]!;
    const hi = a.groupOffsets[g + 1]!;
    if (lo < 0 || hi < lo || hi > a.rows) continue;
    for (let r = lo; r < hi; ++r) {
      if (a.rowMap !== undefined && a.rowMap[r]! < 0) continue;
      loadRow(a.a, r, a.k, x);
      linear(a.b, g, a.n, a.k, x, a.bias, out, r * a.n, scratch);
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// unpermute

export interface UnpermuteArgs {
  /** bf16 [rows, H]. */
  input: Uint16Array;
  rows: number;
  /** i32 [T, topk]; entries < 0 or >= rows count as -1. */
  inverseMap: Int32Array;
  /** f32 [T, topk]; omitted = 1. */
  probs?: Float32Array;
  numTokens: number;
  hiddenSize: number;
  topk: number;
}

/** fmoe_unpermute: bf16 [T, H] = bf16(sum_k probs[t,k] * input[inverseMap[t,k]]). */
export function unpermute(a: UnpermuteArgs): Uint16Array {
  const { numTokens: T, hiddenSize: H, topk } = a;
  const out = new Uint16Array(T * H);
  const acc = new Float64Array(H);
  for (let t = 0; t < T; ++t) {
    acc.fill(0);
    for (let k = 0; k < topk; ++k) {
      const row = a.inverseMap[t * topk + k]!;
      if (row < 0 || row >= a.rows) continue;
      const p = a.probs === undefined ? 1 : a.probs[t * topk + k]!;
      for (let h = 0; h < H; ++h) acc[h] += p * BF16_VALUE[a.input[row * H + h]!]!;
    }
    for (let h = 0; h < H; ++h) out[t * H + h] = bf16(acc[h]!);
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// route

export interface RouteArgs {
  /** f32 [T, E]. */
  logits: Float32Array;
  numTokens: number;
  numExperts: number;
  topk: number;
  scoring: "softmax" | "sigmoid";
  /** f32 [E]: added to the scores for the choice only. */
  selectionBias?: Float32Array;
  numGroups?: number;
  topkGroups?: number;
  renormalize: boolean;
  scale: number;
}

/**
 * fmoe_route in f64. Also returns each token's margin: the smallest gap between two choices the
 * routing decided between (consecutive picks, the last pick and the best expert left out, the
 * last group kept and the best group left out), over the magnitude of the terms that make them.
 * Where it is tiny, f32 arithmetic may decide the other way; tests compare ids only where it is
 * not.
 */
export function route(a: RouteArgs): { routingMap: Int32Array; probs: Float32Array; margin: Float64Array } {
  const { numTokens: T, numExperts: E, topk } = a;
  const G = a.numGroups ?? 1;
  const keepGroups = a.topkGroups ?? 1;
  const size = E / G;
  const routingMap = new Int32Array(T * topk);
  const probs = new Float32Array(T * topk);
  const margin = new Float64Array(T).fill(Infinity);
  // Larger first; NaN after every number; equal by lower index.
  const before = (x: number, i: number, y: number, j: number) =>
    Number.isNaN(x) !== Number.isNaN(y) ? Number.isNaN(y) : !Number.isNaN(x) && x !== y ? x > y : i < j;
  const order = (values: number[], ids: number[]) => ids.sort((i, j) => (before(values[i]!, i, values[j]!, j) ? -1 : 1));
  // A gap relative to the magnitude of the terms its two sides are made of: an f32 softmax score
  // is within ~1e-6 of the exact one relatively (exp of a rounded logit difference), and scores
  // fall to 1e-5 where many experts are picked; a score plus a bias may be near 0 while its
  // rounding error is that of the score.
  const gap = (x: number, mx: number, y: number, my: number) => {
    if (Number.isNaN(x) || Number.isNaN(y)) return Infinity;
    const m = Math.max(mx, my);
    return m === 0 ? 0 : Math.abs(x - y) / m;
  };
  for (let t = 0; t < T; ++t) {
    const logits = Array.from(a.logits.subarray(t * E, (t + 1) * E));
    let score: number[];
    if (a.scoring === "softmax") {
      const m = Math.max(...logits);
      const ex = logits.map((l) => Math.exp(l - m));
      const sum = ex.reduce((x, y) => x + y, 0);
      score = ex.map((x) => x / sum);
    } else {
      score = logits.map((l) => 1 / (1 + Math.exp(-l)));
    }
    const byLogit = a.scoring === "softmax" && a.selectionBias === undefined && G === 1;
    const choice = byLogit ? logits : score.map((x, e) => x + (a.selectionBias?.[e] ?? 0));
    const magnitude = byLogit ? logits.map(Math.abs) : choice.map((c, e) => Math.max(score[e]!, Math.abs(c)));
    let eligible = Array.from({ length: E }, (_, e) => e);
    if (G > 1) {
      const value: number[] = [];
      const valueMagnitude: number[] = [];
      for (let g = 0; g < G; ++g) {
        const best = order(choice, eligible.slice(g * size, (g + 1) * size)).slice(0, 2);
        value.push(best.reduce((v, e) => v + choice[e]!, 0));
        valueMagnitude.push(best.reduce((v, e) => v + magnitude[e]!, 0));
      }
      const groups = order(value, Array.from({ length: G }, (_, g) => g));
      if (keepGroups < G) {
        const [last, next] = [groups[keepGroups - 1]!, groups[keepGroups]!];
        margin[t] = Math.min(margin[t]!, gap(value[last]!, valueMagnitude[last]!, value[next]!, valueMagnitude[next]!));
      }
      const kept = new Set(groups.slice(0, keepGroups));
      eligible = eligible.filter((e) => kept.has(Math.floor(e / size)));
    }
    const ranked = order(choice, eligible);
    for (let k = 0; k < topk; ++k) {
      if (k + 1 < ranked.length) {
        const [e, f] = [ranked[k]!, ranked[k + 1]!];
        margin[t] = Math.min(margin[t]!, gap(choice[e]!, magnitude[e]!, choice[f]!, magnitude[f]!));
      }
    }
    const picked = ranked.slice(0, topk);
    const weights = picked.map((e) => score[e]!);
    const total = weights.reduce((x, y) => x + y, 0);
    picked.forEach((e, k) => {
      routingMap[t * topk + k] = e;
      probs[t * topk + k] = (a.renormalize && total > 0 ? weights[k]! / total : weights[k]!) * a.scale;
    });
  }
  return { routingMap, probs, margin };
}

// ------------------------------------------------------------------------------------------------
// The whole layer

export interface FusedMoeWeights {
  /** bf16 [E_local, N1, H], or e4m3 with fc1Scale e8m0 [E_local, N1, H/32]. With weightFormat
   *  mxfp8, bf16 weights are quantized here with the MXFP8 rule. */
  fc1: Uint16Array | Uint8Array;
  fc2: Uint16Array | Uint8Array;
  fc1Scale?: Uint8Array;
  fc2Scale?: Uint8Array;
  /** f32 [E_local, N1]. */
  fc1Bias?: Float32Array;
  /** f32 [E_local, H]. */
  fc2Bias?: Float32Array;
}

export interface FusedMoeInputs {
  /** bf16 [T, H] (skip-permute: [rows, H] grouped by local expert). */
  hidden: Uint16Array;
  numTokens: number;
  /** i32 [T, topk] (routed mode). */
  routingMap?: Int32Array;
  /** f32 [T, topk] (routed mode) or f32 [rows] (skip-permute). */
  probs: Float32Array;
  /** i32 [E_local]: set = skip-permute mode. */
  tokensPerExpert?: Int32Array;
}

function weightOperand(w: Uint16Array | Uint8Array, scale: Uint8Array | undefined, format: WeightFormat, rows: number, k: number, name: string): Operand {
  if (format === "bf16") {
    ensureArg(w instanceof Uint16Array, "reference.fusedMoe", `${name} must be bf16 (Uint16Array) for weightFormat bf16`);
    return { bf16: w };
  }
  if (w instanceof Uint16Array) return quantizeMxfp8Array(w, rows, k);
  ensureArg(scale !== undefined, "reference.fusedMoe", `${name} is e4m3: its scale is required`);
  return { data: w, scale };
}

/**
 * The whole layer (fmoe_fused_moe), slot by slot:
 *   x = hidden[t] (bf16(p * x) when the router weight goes on the input; MXFP8 of it for mxfp8)
 *   h = bf16(fc1[e] @ x + b1);  a = bf16(act(h)) (MXFP8 of a for mxfp8);  y = bf16(fc2[e] @ a + b2)
 *   out[t] = bf16(sum over local slots, k in order, of p * y)
 * Skip-permute mode: row r of group e gives out[r] = bf16(p[r] * y); rows beyond the sum of
 * tokensPerExpert (capped at numTokens) are zeros. Returns bf16 out and the invalid-id count.
 */
export function fusedMoe(config: LayerShape, weights: FusedMoeWeights, inputs: FusedMoeInputs): { out: Uint16Array; invalidCount: number } {
  const H = config.hidden;
  const I = config.ffn;
  const start = config.localExpertStart ?? 0;
  const eLocal = config.numLocalExperts ?? config.numExperts - start;
  const N1 = fc1Outputs(config.activation, I);
  const format = config.weightFormat ?? "bf16";
  const mx = format === "mxfp8";
  const onInput = config.applyRouterWeightOnInput ?? false;
  const fc1 = weightOperand(weights.fc1, weights.fc1Scale, format, eLocal * N1, H, "fc1");
  const fc2 = weightOperand(weights.fc2, weights.fc2Scale, format, eLocal * H, I, "fc2");
  const T = inputs.numTokens;

  const xBits = new Uint16Array(H);
  const x = new Float64Array(H);
  const h = new Uint16Array(N1);
  const act = new Uint16Array(I);
  const a = new Float64Array(I);
  const y = new Uint16Array(H);
  const scratch = new Float64Array(Math.max(H, I));

  /** y = bf16 expert e's output for the token row `src` of `hidden`, scaled on input by `pIn`. */
  const expert = (e: number, src: number, pIn: number | undefined): Uint16Array => {
    for (let i = 0; i < H; ++i) {
      const v = inputs.hidden[src * H + i]!;
      xBits[i] = pIn === undefined ? v : bf16(Math.fround(pIn * BF16_VALUE[v]!));
    }
    loadRow(mx ? quantizeMxfp8Array(xBits, 1, H) : { bf16: xBits }, 0, H, x);
    linear(fc1, e, N1, H, x, weights.fc1Bias, h, 0, scratch);
    activationRow(config, h, 0, I, act, 0);
    loadRow(mx ? quantizeMxfp8Array(act, 1, I) : { bf16: act }, 0, I, a);
    linear(fc2, e, H, I, a, weights.fc2Bias, y, 0, scratch);
    return y;
  };

  let invalidCount = 0;
  const out = new Uint16Array(T * H);
  const acc = new Float64Array(H);

  if (inputs.tokensPerExpert !== undefined) {
    let row = 0;
    for (let e = 0; e < eLocal; ++e) {
      const count = Math.max(0, inputs.tokensPerExpert[e]!);
      for (let i = 0; i < count && row < T; ++i, ++row) {
        const p = inputs.probs[row]!;
        const yy = expert(e, row, onInput ? p : undefined);
        for (let j = 0; j < H; ++j) out[row * H + j] = bf16((onInput ? 1 : p) * BF16_VALUE[yy[j]!]!);
      }
    }
    return { out, invalidCount };
  }

  const routing = inputs.routingMap;
  ensureArg(routing !== undefined, "reference.fusedMoe", "routingMap is required unless tokensPerExpert is given");
  const topk = config.topk;
  for (let t = 0; t < T; ++t) {
    acc.fill(0);
    for (let k = 0; k < topk; ++k) {
      const id = routing[t * topk + k]!;
      if (id < 0 || id >= config.numExperts) {
        ++invalidCount;
        continue;
      }
      const e = id - start;
      if (e < 0 || e >= eLocal) continue;
      const p = inputs.probs[t * topk + k]!;
      const yy = expert(e, t, onInput ? p : undefined);
      const w = onInput ? 1 : p;
      for (let j = 0; j < H; ++j) acc[j] += w * BF16_VALUE[yy[j]!]!;
    }
    for (let j = 0; j < H; ++j) out[t * H + j] = bf16(acc[j]!);
  }
  return { out, invalidCount };
}
