/**
 * fused-moe: a fused Mixture-of-Experts layer for inference (CUDA on Hopper, host fallback),
 * loaded through bun:ffi.
 *
 *   import { Context, FusedMoE } from "fused-moe";
 *   using ctx = Context.create();                       // cuda when present, else host
 *   using moe = new FusedMoE(ctx, config, { fc1, fc2 });
 *   using out = moe.forward({ hidden, routingMap, probs });
 */
export { Context, Event, Stream, type BackendChoice, type BackendKind, type ContextOptions, type DeviceProps, type WaitOptions } from "./context.ts";
export { Tensor, shapeNumel, type HostData } from "./tensor.ts";
export { Graph } from "./graph.ts";
export {
  FusedMoE,
  resolveConfig,
  type FusedMoEConfig,
  type FusedMoEWeights,
  type RouterConfig,
  type ForwardArgs,
  type ForwardGroupedArgs,
  type ResolvedFusedMoEConfig,
} from "./moe.ts";
export { FmoeError, Status, statusName } from "./errors.ts";
export {
  activation,
  dequantizeMxfp8,
  groupedMmBf16,
  groupedMmMxfp8,
  maxRows,
  permute,
  quantizeMxfp8,
  route,
  swizzledScaleBytes,
  swizzleScales,
  unpermute,
  unswizzleScales,
  type ActivationBf16Options,
  type ActivationMxfp8Options,
  type DequantizeOptions,
  type DeviceScalar,
  type GroupedMmBf16Options,
  type GroupedMmMxfp8Options,
  type Mxfp8Tensors,
  type PermuteOptions,
  type PermuteOutputs,
  type PermuteResult,
  type QuantizeOptions,
  type RouteOptions,
  type RouteOutputs,
  type RouteScoring,
  type SwizzleOptions,
  type UnpermuteOptions,
  type UnswizzleOptions,
} from "./ops.ts";
export * from "./config.ts";
export * from "./dtype.ts";
export * as reference from "./reference.ts";
export { relFrobenius, TOLERANCE } from "./reference.ts";
export * from "./safetensors.ts";
export { BENCH_CASES, BENCH_TOKENS, findCase, type BenchCase } from "./cases.ts";
export { Rng, randomRouting } from "./random.ts";
export { ABI_VERSION, libraryAvailable, libraryPath } from "./ffi.ts";
export {
  Checkpoint,
  CheckpointError,
  loadExpertLayer,
  openExpertLayer,
  writeExpertLayer,
  type CheckpointTensor,
  type ExpertLayerInfo,
  type ExpertLayerOptions,
  type ExpertLayerReader,
  type ExpertWeights,
  type LoadedExpertLayer,
  type LoadExpertLayerOptions,
} from "./checkpoint.ts";
