/**
 * The enumerations and static size rules shared by the ops, FusedMoE and the reference
 * (fmoe.h: fmoe_activation, fmoe_gated_layout, fmoe_weight_format, fmoe_max_rows).
 * Pure TypeScript: importing it never loads the native library.
 */

/** fmoe_activation. N1 (FC1 outputs) = ffn for squared_relu, 2*ffn for the gated ones. */
export type Activation = "squared_relu" | "silu" | "gelu" | "swiglu_oai";
/** fmoe_gated_layout: gate = first half / up = second half, or gate/up alternating by column. */
export type GatedLayout = "halves" | "interleaved";
/** fmoe_weight_format. */
export type WeightFormat = "bf16" | "mxfp8";

export const ACTIVATIONS: readonly Activation[] = ["squared_relu", "silu", "gelu", "swiglu_oai"];
export const GATED_LAYOUTS: readonly GatedLayout[] = ["halves", "interleaved"];
export const WEIGHT_FORMATS: readonly WeightFormat[] = ["bf16", "mxfp8"];

/** The fmoe.h codes of each enumeration. */
export const ACTIVATION_CODE: Record<Activation, number> = { squared_relu: 0, silu: 1, gelu: 2, swiglu_oai: 3 };
export const LAYOUT_CODE: Record<GatedLayout, number> = { halves: 0, interleaved: 1 };
export const WEIGHT_FORMAT_CODE: Record<WeightFormat, number> = { bf16: 0, mxfp8: 1 };

/** FMOE_SWIGLU_OAI_DEFAULT_ALPHA / _LIMIT (gpt-oss). */
export const SWIGLU_OAI_DEFAULT_ALPHA = 1.702;
export const SWIGLU_OAI_DEFAULT_LIMIT = 7.0;

/**
 * What fixes a layer's arithmetic: the part of fmoe_plan_desc that FusedMoE and the reference's
 * fusedMoe share (FusedMoEConfig adds the buffers' sizes and the router).
 */
export interface LayerShape {
  /** Model width H (multiple of 32 for mxfp8). */
  hidden: number;
  /** Per-expert intermediate size I (multiple of 32 for mxfp8). */
  ffn: number;
  /** Global routed expert count. */
  numExperts: number;
  /** Experts held by this layer (expert parallelism). Default numExperts - localExpertStart. */
  numLocalExperts?: number;
  /** Global id of the first local expert. Default 0. */
  localExpertStart?: number;
  /** Experts per token. */
  topk: number;
  activation: Activation;
  /** Gated activations: layout of gate and up in FC1's output. Default "halves". */
  layout?: GatedLayout;
  /** swiglu_oai alpha. Default 1.702. */
  alpha?: number;
  /** swiglu_oai limit. Default 7.0. */
  limit?: number;
  /** Default "bf16". "mxfp8" quantizes activations too (MXFP8 GEMMs). */
  weightFormat?: WeightFormat;
  /** Scale the input rows by probs instead of the output (topk must be 1). Default false. */
  applyRouterWeightOnInput?: boolean;
}

/**
 * Rows per expert group are padded to a multiple of this unless told otherwise (ops and
 * FusedMoE alike): 16 keeps every group a whole number of GEMM row tiles on the CUDA backend.
 */
export const DEFAULT_ALIGNMENT = 16;

export function isActivation(value: unknown): value is Activation {
  return typeof value === "string" && (ACTIVATIONS as readonly string[]).includes(value);
}

export function isGatedLayout(value: unknown): value is GatedLayout {
  return typeof value === "string" && (GATED_LAYOUTS as readonly string[]).includes(value);
}

/** True for the gated activations (silu, gelu, swiglu_oai). */
export function isGated(activation: Activation): boolean {
  return activation !== "squared_relu";
}

/** FC1 output count N1 for an FFN size I: I (squared_relu) or 2I (gated). */
export function fc1Outputs(activation: Activation, ffn: number): number {
  return isGated(activation) ? 2 * ffn : ffn;
}

/**
 * Static capacity of the permuted buffers: round_up(T*topk + E_local*(alignment-1), alignment)
 * (fmoe_max_rows, computed here in TypeScript; ops.maxRows asks the library).
 */
export function maxRowsFor(numTokens: number, topk: number, numLocalExperts: number, alignment: number): number {
  const raw = numTokens * topk + numLocalExperts * (alignment - 1);
  return Math.ceil(raw / alignment) * alignment;
}
