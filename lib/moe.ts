/**
 * FusedMoE: one Mixture-of-Experts layer = a plan (the static shape) + its weights + the
 * workspace of the fused op. forward() runs permute -> FC1 -> activation -> FC2 -> unpermute in
 * one native call; capture() records it into a Graph for replay with new routing. With a `router`
 * config, forward() also takes the router's logits and routes them on the device (route()).
 */
import {
  ACTIVATION_CODE,
  DEFAULT_ALIGNMENT,
  fc1Outputs,
  isActivation,
  isGatedLayout,
  LAYOUT_CODE,
  type LayerShape,
  maxRowsFor,
  SWIGLU_OAI_DEFAULT_ALPHA,
  SWIGLU_OAI_DEFAULT_LIMIT,
  WEIGHT_FORMAT_CODE,
} from "./config.ts";
import { Context, type Event, type Stream, type WaitOptions } from "./context.ts";
import { type DType, MX_BLOCK } from "./dtype.ts";
import { booleanOption, checkOptions, describeValue, FmoeError, finiteOption, optionNames, shownValue, Status } from "./errors.ts";
import * as ffi from "./ffi.ts";
import type { Graph, LaunchGuard } from "./graph.ts";
import { registerFinalizer, unregisterFinalizer } from "./lifetime.ts";
import { quantizeMxfp8, route, type RouteScoring, unswizzleScales } from "./ops.ts";
import { expectTensor, type Tensor } from "./tensor.ts";

/** The static description of a layer (fmoe_plan_desc). */
export interface FusedMoEConfig extends LayerShape {
  /** Rows per expert group padded to a multiple of this. Default 16. */
  alignment?: number;
  /** Largest T forward() accepts (forwardGrouped: rows <= maxTokens * topk). */
  maxTokens: number;
  /** How forward({ routerLogits }) routes (route()); without it forward() takes routingMap and
   *  probs only. `{}`: softmax, renormalized (Qwen-MoE, Mixtral, gpt-oss). */
  router?: RouterConfig;
}

/** route()'s options for a layer's router (see RouteOptions). */
export interface RouterConfig {
  /** Default "softmax". */
  scoring?: RouteScoring;
  /** Default 1 (no groups). */
  numGroups?: number;
  /** Default 1. */
  topkGroups?: number;
  /** Default true. */
  renormalize?: boolean;
  /** Default 1. */
  scale?: number;
}

/** The config with every default filled in (router: null when the layer takes routing only). */
export type ResolvedFusedMoEConfig = Required<Omit<FusedMoEConfig, "router">> & { router: Required<RouterConfig> | null };

/**
 * Expert weights, stacked over the local experts, nn.Linear layout ([out, in]).
 * - bf16: fc1 bf16 [E_local, N1, H], fc2 bf16 [E_local, H, I] (N1 = I or 2I for gated).
 * - mxfp8: the same bf16 tensors (quantized on the device; FusedMoE owns the copies), or e4m3
 *   fc1/fc2 with e8m0 fc1Scale [E_local, N1, H/32] and fc2Scale [E_local, H, I/32] in the linear
 *   layout, or in the swizzled layout with `scaleLayout: "swizzled"` (unswizzled on the device
 *   into copies FusedMoE owns).
 * Tensors used as given are borrowed: keep them alive (undisposed) as long as the FusedMoE.
 */
export interface FusedMoEWeights {
  fc1: Tensor;
  fc2: Tensor;
  fc1Scale?: Tensor;
  fc2Scale?: Tensor;
  /** Layout of fc1Scale/fc2Scale. Default "linear". */
  scaleLayout?: "linear" | "swizzled";
  /** f32 [E_local, N1]. */
  fc1Bias?: Tensor;
  /** f32 [E_local, H]. */
  fc2Bias?: Tensor;
  /** f32 [numExperts]: the router's selection bias (config.router; DeepSeek-V3's
   *  e_score_correction_bias). */
  selectionBias?: Tensor;
}

export interface ForwardArgs {
  /** bf16 [T, H], T <= maxTokens. */
  hidden: Tensor;
  /** i32 [T, topk] global expert ids (or routerLogits). */
  routingMap?: Tensor;
  /** f32 [T, topk] router weights (or routerLogits). */
  probs?: Tensor;
  /** f32 [T, numExperts]: the router's logits, routed by config.router into buffers of the layer
   *  (instead of routingMap and probs). */
  routerLogits?: Tensor;
  /** bf16 [T, H]; allocated when omitted. */
  out?: Tensor;
  stream?: Stream;
}

export interface ForwardGroupedArgs {
  /** bf16 [rows, H]: rows already grouped by local expert, rows <= maxTokens * topk. */
  hidden: Tensor;
  /** i32 [E_local] on the device: rows of each local expert, in order (sum <= rows). */
  tokensPerExpert: Tensor;
  /** f32 [rows]: the router weight of each row. */
  probs: Tensor;
  /** bf16 [rows, H], same grouped order; rows beyond the sum are zeros. */
  out?: Tensor;
  stream?: Stream;
}

const CONFIG_OPTIONS = optionNames<FusedMoEConfig>({
  hidden: true, ffn: true, numExperts: true, numLocalExperts: true, localExpertStart: true, topk: true, activation: true,
  layout: true, alpha: true, limit: true, weightFormat: true, alignment: true, maxTokens: true, applyRouterWeightOnInput: true,
  router: true,
});
const ROUTER_OPTIONS = optionNames<RouterConfig>({ scoring: true, numGroups: true, topkGroups: true, renormalize: true, scale: true });
const WEIGHT_OPTIONS = optionNames<FusedMoEWeights>({
  fc1: true, fc2: true, fc1Scale: true, fc2Scale: true, scaleLayout: true, fc1Bias: true, fc2Bias: true, selectionBias: true,
});
const FORWARD_OPTIONS = optionNames<ForwardArgs>({ hidden: true, routingMap: true, probs: true, routerLogits: true, out: true, stream: true });
const FORWARD_GROUPED_OPTIONS = optionNames<ForwardGroupedArgs>({ hidden: true, tokensPerExpert: true, probs: true, out: true, stream: true });
// capture() takes either call's arguments; forward / forwardGrouped then check their own.
const CAPTURE_OPTIONS = [...new Set([...FORWARD_OPTIONS, ...FORWARD_GROUPED_OPTIONS])];

function fail(message: string): never {
  throw new FmoeError(Status.INVALID_ARGUMENT, `FusedMoE: ${message}`);
}

function checkInt(name: string, value: number, min: number): number {
  if (!Number.isSafeInteger(value) || value < min) fail(`config.${name} must be an integer >= ${min}, got ${shownValue(value)}`);
  return value;
}

/** Fills defaults and checks the ranges TypeScript can check (the library checks the rest). */
export function resolveConfig(config: FusedMoEConfig): ResolvedFusedMoEConfig {
  checkOptions("FusedMoE", "config", config, CONFIG_OPTIONS);
  const numExperts = checkInt("numExperts", config.numExperts, 1);
  const start = checkInt("localExpertStart", config.localExpertStart ?? 0, 0);
  const resolved: ResolvedFusedMoEConfig = {
    hidden: checkInt("hidden", config.hidden, 1),
    ffn: checkInt("ffn", config.ffn, 1),
    numExperts,
    numLocalExperts: checkInt("numLocalExperts", config.numLocalExperts ?? numExperts - start, 1),
    localExpertStart: start,
    topk: checkInt("topk", config.topk, 1),
    activation: config.activation,
    layout: config.layout ?? "halves",
    alpha: finiteOption("FusedMoE", "config.alpha", config.alpha, SWIGLU_OAI_DEFAULT_ALPHA),
    limit: finiteOption("FusedMoE", "config.limit", config.limit, SWIGLU_OAI_DEFAULT_LIMIT),
    weightFormat: config.weightFormat ?? "bf16",
    alignment: checkInt("alignment", config.alignment ?? DEFAULT_ALIGNMENT, 1),
    maxTokens: checkInt("maxTokens", config.maxTokens, 1),
    applyRouterWeightOnInput: booleanOption("FusedMoE", "config.applyRouterWeightOnInput", config.applyRouterWeightOnInput, false),
    router: null,
  };
  if (config.router !== undefined) {
    checkOptions("FusedMoE", "config.router", config.router, ROUTER_OPTIONS);
    const r = config.router;
    resolved.router = {
      scoring: r.scoring ?? "softmax",
      numGroups: r.numGroups ?? 1,
      topkGroups: r.topkGroups ?? 1,
      renormalize: booleanOption("FusedMoE", "config.router.renormalize", r.renormalize, true),
      scale: finiteOption("FusedMoE", "config.router.scale", r.scale, 1),
    };
  }
  if (!isActivation(resolved.activation)) fail(`config.activation must be squared_relu, silu, gelu or swiglu_oai, got ${String(resolved.activation)}`);
  if (!isGatedLayout(resolved.layout)) fail(`config.layout must be halves or interleaved, got ${String(resolved.layout)}`);
  if (resolved.weightFormat !== "bf16" && resolved.weightFormat !== "mxfp8") fail(`config.weightFormat must be bf16 or mxfp8, got ${String(resolved.weightFormat)}`);
  if (resolved.localExpertStart + resolved.numLocalExperts > resolved.numExperts) {
    fail(`localExpertStart + numLocalExperts (${resolved.localExpertStart} + ${resolved.numLocalExperts}) exceeds numExperts (${resolved.numExperts})`);
  }
  if (resolved.topk > resolved.numExperts) fail(`config.topk (${resolved.topk}) exceeds numExperts (${resolved.numExperts})`);
  if (resolved.applyRouterWeightOnInput && resolved.topk !== 1) fail("applyRouterWeightOnInput requires topk == 1");
  if (resolved.weightFormat === "mxfp8" && (resolved.hidden % MX_BLOCK !== 0 || resolved.ffn % MX_BLOCK !== 0)) {
    fail(`mxfp8 needs hidden (${resolved.hidden}) and ffn (${resolved.ffn}) to be multiples of 32`);
  }
  return resolved;
}

// A layer's last call (FusedMoE.#lastCall): its stream (undefined: the default stream), an event,
// and whether the event was recorded after that call.
type LastCall = { stream: Stream | undefined; done: Event; recorded: boolean };

/**
 * A fused MoE layer on a context.
 *
 * @example
 *   using moe = new FusedMoE(ctx, { hidden: 2048, ffn: 768, numExperts: 128, topk: 8,
 *                                   activation: "silu", maxTokens: 32 }, { fc1, fc2 });
 *   using out = moe.forward({ hidden, routingMap, probs });   // bf16 [T, 2048]
 */
export class FusedMoE {
  readonly ctx: Context;
  readonly config: ResolvedFusedMoEConfig;
  /** FC1 outputs N1: ffn or 2*ffn (gated). */
  readonly fc1Outputs: number;
  /** Static row capacity of the permuted buffers for maxTokens. */
  readonly maxRows: number;
  /** Bytes of the workspace this layer allocated (fmoe_plan_workspace_bytes). */
  readonly workspaceBytes: number;
  /** The weights the native op reads (owned copies for quantized/unswizzled ones). */
  readonly weights: Readonly<Required<Pick<FusedMoEWeights, "fc1" | "fc2">> & Omit<FusedMoEWeights, "fc1" | "fc2" | "scaleLayout">>;

  #plan: number;
  #disposed = false;
  readonly #workspace: Tensor;
  readonly #owned: Tensor[] = [];
  #routed: { routingMap: Tensor<"i32">; probs: Tensor<"f32"> } | undefined;
  // The layer's last call, run eagerly or replayed by a graph: its stream, and an event recorded
  // after it (the layer has one workspace, so a call on another stream must not start while that
  // one may still run). An eager call records the event at once; a replay leaves it to the next
  // call on another stream (#probeReplay): a record after every replay costs about a microsecond
  // of device time per replay at decode (bench/NOTES.md item 112).
  #lastCall: LastCall | undefined;
  // Run around each launch of a graph that a call of this layer was captured into.
  readonly #launchGuard: LaunchGuard = {
    claim: (stream, fn) => this.#claim(stream, fn),
    ran: (stream) => this.#ran(stream, true),
  };

  /** Creates the plan, prepares the weights (quantize / unswizzle as needed) and the workspace. */
  constructor(ctx: Context, config: FusedMoEConfig, weights: FusedMoEWeights) {
    if (!(ctx instanceof Context)) fail(`ctx must be a Context, got ${describeValue(ctx)}`);
    ctx._refuseWhileCapturing("FusedMoE", "a layer cannot be built");
    this.ctx = ctx;
    const c = resolveConfig(config);
    this.config = c;
    const E = c.numLocalExperts;
    const H = c.hidden;
    const I = c.ffn;
    const N1 = fc1Outputs(c.activation, I);
    this.fc1Outputs = N1;
    this.maxRows = maxRowsFor(c.maxTokens, c.topk, E, c.alignment);

    checkOptions("FusedMoE", "weights", weights, WEIGHT_OPTIONS);
    try {
      this.weights = this.#prepareWeights(weights, E, N1, H, I);
      // The layer may run on any stream: weights it prepared on the default stream (quantized,
      // unswizzled) must be ready first.
      if (this.#owned.length > 0) ffi.streamSynchronize(ctx._handle, 0);
      if (weights.fc1Bias !== undefined) this.#checkTensor("fc1Bias", weights.fc1Bias, "f32", [E, N1], "[E_local, N1]");
      if (weights.fc2Bias !== undefined) this.#checkTensor("fc2Bias", weights.fc2Bias, "f32", [E, H], "[E_local, H]");
      if (weights.selectionBias !== undefined) {
        if (c.router === null) fail("selectionBias is for a layer with config.router");
        this.#checkTensor("selectionBias", weights.selectionBias, "f32", [c.numExperts], "[numExperts]");
      }
      this.#plan = ffi.planCreate(ctx._handle, {
        hidden_size: H,
        ffn: I,
        num_experts: c.numExperts,
        num_local_experts: E,
        local_expert_start: c.localExpertStart,
        topk: c.topk,
        activation: ACTIVATION_CODE[c.activation],
        layout: LAYOUT_CODE[c.layout],
        alpha: c.alpha,
        limit: c.limit,
        weight_format: WEIGHT_FORMAT_CODE[c.weightFormat],
        alignment: c.alignment,
        max_tokens: c.maxTokens,
        apply_router_weight_on_input: c.applyRouterWeightOnInput ? 1 : 0,
      });
    } catch (err) {
      for (const t of this.#owned) t.dispose();
      throw err;
    }
    const plan = this.#plan;
    const state = ctx._state;
    registerFinalizer(this, () => {
      if (state.alive) ffi.planDestroy(state.handle, plan);
    });
    this.workspaceBytes = ffi.planWorkspaceBytes(plan);
    // A byte buffer: the dtype only sets the element size (1).
    this.#workspace = ctx.empty([this.workspaceBytes], "e4m3");
    this.#workspace.name = "workspace";
    this.#owned.push(this.#workspace);
    if (c.router !== null) {
      // Where forward({ routerLogits }) routes to: allocated now, as nothing may be under capture.
      this.#routed = { routingMap: ctx.empty([c.maxTokens, c.topk], "i32"), probs: ctx.empty([c.maxTokens, c.topk], "f32") };
      this.#owned.push(this.#routed.routingMap, this.#routed.probs);
      try {
        // The router's options checked now (routing no tokens), not at the first forward.
        using none = ctx.empty([0, c.numExperts], "f32");
        const out = { routingMap: this.#routed.routingMap.view(0, [0, c.topk]), probs: this.#routed.probs.view(0, [0, c.topk]) };
        route(ctx, { logits: none, topk: c.topk, ...c.router, selectionBias: this.weights.selectionBias, out });
      } catch (err) {
        this.dispose();
        throw err;
      }
    }
  }

  /** Same as `new FusedMoE(ctx, config, weights)`. */
  static create(ctx: Context, config: FusedMoEConfig, weights: FusedMoEWeights): FusedMoE {
    return new FusedMoE(ctx, config, weights);
  }

  // A tensor argument of this layer (expectTensor, of this layer's context).
  #checkTensor<D extends DType>(name: string, t: Tensor | undefined, dtype: D, dims: readonly (number | null)[], spec: string): Tensor<D> {
    return expectTensor("FusedMoE", name, t, dtype, dims, spec, this.ctx);
  }

  #prepareWeights(w: FusedMoEWeights, E: number, N1: number, H: number, I: number): FusedMoE["weights"] {
    const base = { fc1Bias: w.fc1Bias, fc2Bias: w.fc2Bias, selectionBias: w.selectionBias };
    if (this.config.weightFormat === "bf16") {
      if (w.fc1Scale !== undefined || w.fc2Scale !== undefined) fail("fc1Scale/fc2Scale are only for weightFormat mxfp8");
      if (w.fc1?.dtype === "e4m3" || w.fc2?.dtype === "e4m3") {
        fail('fc1/fc2 are e4m3, but weightFormat is "bf16" (the default): e4m3 weights with their scales need weightFormat "mxfp8"');
      }
      const fc1 = this.#checkTensor("fc1", w.fc1, "bf16", [E, N1, H], "[E_local, N1, H]");
      const fc2 = this.#checkTensor("fc2", w.fc2, "bf16", [E, H, I], "[E_local, H, I]");
      return { ...base, fc1, fc2 };
    }
    if (w.fc1?.dtype === "bf16") {
      // BF16 weights for an MXFP8 layer: quantize once on the device, with the same rule as
      // the activations.
      const fc1 = this.#checkTensor("fc1", w.fc1, "bf16", [E, N1, H], "[E_local, N1, H]");
      const fc2 = this.#checkTensor("fc2", w.fc2, "bf16", [E, H, I], "[E_local, H, I]");
      if (w.fc1Scale !== undefined || w.fc2Scale !== undefined) fail("bf16 weights take no scales (they are quantized here)");
      const q1 = quantizeMxfp8(this.ctx, fc1);
      this.#owned.push(q1.data, q1.scale);
      const q2 = quantizeMxfp8(this.ctx, fc2);
      this.#owned.push(q2.data, q2.scale);
      return { ...base, fc1: q1.data, fc1Scale: q1.scale, fc2: q2.data, fc2Scale: q2.scale };
    }
    const fc1 = this.#checkTensor("fc1", w.fc1, "e4m3", [E, N1, H], "[E_local, N1, H]");
    const fc2 = this.#checkTensor("fc2", w.fc2, "e4m3", [E, H, I], "[E_local, H, I]");
    if (w.fc1Scale === undefined || w.fc2Scale === undefined) fail("e4m3 weights need fc1Scale and fc2Scale");
    if ((w.scaleLayout ?? "linear") === "swizzled") {
      const s1 = unswizzleScales(this.ctx, w.fc1Scale, { batch: E, rows: N1, scaleCols: H / MX_BLOCK });
      this.#owned.push(s1);
      const s2 = unswizzleScales(this.ctx, w.fc2Scale, { batch: E, rows: H, scaleCols: I / MX_BLOCK });
      this.#owned.push(s2);
      return { ...base, fc1, fc2, fc1Scale: s1, fc2Scale: s2 };
    }
    const fc1Scale = this.#checkTensor("fc1Scale", w.fc1Scale, "e8m0", [E, N1, H / MX_BLOCK], "[E_local, N1, H/32]");
    const fc2Scale = this.#checkTensor("fc2Scale", w.fc2Scale, "e8m0", [E, H, I / MX_BLOCK], "[E_local, H, I/32]");
    return { ...base, fc1, fc2, fc1Scale, fc2Scale };
  }

  get disposed(): boolean {
    return this.#disposed || this.ctx.disposed;
  }

  #handle(): number {
    if (this.disposed) throw new FmoeError(Status.INVALID_STATE, "FusedMoE is disposed");
    return this.#plan;
  }

  #weightTensors(): (Tensor | undefined)[] {
    const w = this.weights;
    return [w.fc1, w.fc2, w.fc1Scale, w.fc2Scale, w.fc1Bias, w.fc2Bias, this.#workspace];
  }

  // Refuses a call (`fn`: the caller's name; Graph.launch for a replay) on another stream than
  // the last one while that one may still be running: both would use the one workspace (and the
  // routed buffers) at once, and return garbage.
  #claim(stream: Stream | undefined, fn: string): void {
    this.ctx._streamHandle(fn, stream);
    const last = this.#lastCall;
    // The Stream itself, not its handle: a disposed stream's handle may be reused by a new one.
    if (this.ctx._capturing(stream) || last === undefined || last.stream === stream) return;
    if ((last.recorded || this.#probeReplay(last)) && last.done.query()) return;
    const whose = fn === "Graph.launch" ? "a FusedMoE captured in this graph: the layer's" : "the layer's";
    throw new FmoeError(
      Status.INVALID_STATE,
      `${fn}: ${whose} previous call, on another stream, may still be running (an eager call, or a graph's replay and ` +
        "what was queued after it); a layer has one workspace, so its calls must not overlap on the device. Run its calls " +
        "and launch its graphs on one stream (they queue in order), wait for the previous one (e.g. await " +
        "out.downloadAsync(stream)), or give each stream a FusedMoE of its own (weights can be shared)",
    );
  }

  // The last call was a replay: records the event on its stream now (it then also covers what was
  // queued there after the replay) and gives a stream that has finished up to 20 ms to reach the
  // record. False when it cannot be recorded: the stream captures (the replay may still run).
  // A disposed stream cannot take a record: the context's whole work is waited for instead.
  #probeReplay(last: LastCall): boolean {
    if (last.stream?.disposed) {
      this.ctx.synchronize();
    } else {
      if (this.ctx._capturing(last.stream)) return false;
      last.done.record(last.stream);
      const until = performance.now() + 20;
      while (!last.done.query() && performance.now() < until);
    }
    last.recorded = true;
    return true;
  }

  // After a call on `stream`, eager or a graph's replay: remembers it for #claim. A call on a
  // capturing stream runs nothing now, only in the graph's replays.
  #ran(stream: Stream | undefined, replay: boolean): void {
    if (this.ctx._capturing(stream)) return;
    this.#lastCall ??= { stream: undefined, done: this.ctx.createEvent(), recorded: false };
    const last = this.#lastCall;
    if (!replay) last.done.record(stream);
    last.stream = stream;
    last.recorded = !replay;
  }

  #run(fields: ffi.MoeFields, tensors: (Tensor | undefined)[], stream: Stream | undefined): void {
    const plan = this.#handle();
    // The layer borrows the caller's weight tensors: name the one disposed under it.
    for (const [name, t] of Object.entries(this.weights) as [string, Tensor | undefined][]) {
      if (t?.disposed) t.assertAlive(`FusedMoE: weights.${name} (the layer borrows it: dispose weights after the layer)`);
    }
    const handle = this.ctx._use("FusedMoE", stream, [...tensors, ...this.#weightTensors()]);
    this.ctx._guardLaunches(stream, this.#launchGuard);
    const w = this.weights;
    ffi.fusedMoe(plan, handle, {
      ...fields,
      fc1: w.fc1.ptr,
      fc1_scale: w.fc1Scale?.ptr ?? 0,
      fc2: w.fc2.ptr,
      fc2_scale: w.fc2Scale?.ptr ?? 0,
      fc1_bias: w.fc1Bias?.ptr ?? 0,
      fc2_bias: w.fc2Bias?.ptr ?? 0,
      workspace: this.#workspace.ptr,
      workspace_bytes: this.workspaceBytes,
    });
    this.#ran(stream, false);
  }

  #output(given: Tensor | undefined, rows: number): { out: Tensor<"bf16">; allocated: boolean } {
    const H = this.config.hidden;
    if (given !== undefined) return { out: this.#checkTensor("out", given, "bf16", [rows, H], "[T, H]"), allocated: false };
    this.ctx._refuseWhileCapturing("FusedMoE", "out must be given");
    const out = this.ctx.empty([rows, H], "bf16");
    out.name = "out";
    return { out, allocated: true };
  }

  /**
   * The layer: out[t] = sum over local slots k of probs[t,k] * FC2(act(FC1(hidden[t]))), bf16
   * [T, H] (tokens with no local slot get zeros). Asynchronous on `stream`. With routerLogits,
   * the routing and weights are route()'s (config.router), kept in the layer's own buffers.
   * The layer's calls share its workspace: on another stream than the last call's, while that
   * one may still run, the call is refused (INVALID_STATE); one FusedMoE per stream runs them at
   * once (the weight tensors can be shared).
   */
  forward(args: ForwardArgs): Tensor<"bf16"> {
    checkOptions("FusedMoE.forward", "args", args, FORWARD_OPTIONS);
    const c = this.config;
    const hidden = this.#checkTensor("hidden", args.hidden, "bf16", [null, c.hidden], "[T, H]");
    const T = hidden.shape[0]!;
    if (T > c.maxTokens) fail(`hidden has ${T} tokens, more than maxTokens (${c.maxTokens})`);
    this.#claim(args.stream, "FusedMoE.forward");
    let routing: Tensor;
    let probs: Tensor;
    let routeFrom: { logits: Tensor; router: NonNullable<typeof c.router> } | undefined;
    if (args.routerLogits !== undefined) {
      if (c.router === null || this.#routed === undefined) fail("routerLogits needs config.router (how to route them)");
      if (args.routingMap !== undefined || args.probs !== undefined) fail("give routerLogits or routingMap and probs, not both");
      const logits = this.#checkTensor("routerLogits", args.routerLogits, "f32", [T, c.numExperts], "[T, numExperts]");
      routing = this.#routed.routingMap.view(0, [T, c.topk]);
      probs = this.#routed.probs.view(0, [T, c.topk]);
      routeFrom = { logits, router: c.router };
      this.#handle();
    } else {
      routing = this.#checkTensor("routingMap", args.routingMap, "i32", [T, c.topk], "[T, topk]");
      probs = this.#checkTensor("probs", args.probs, "f32", [T, c.topk], "[T, topk]");
    }
    // Before the routing is enqueued: a refused output (no `out` inside a capture) leaves no
    // routing recorded in the graph.
    const { out, allocated } = this.#output(args.out, T);
    try {
      if (routeFrom !== undefined) {
        route(this.ctx, { logits: routeFrom.logits, topk: c.topk, ...routeFrom.router, selectionBias: this.weights.selectionBias, out: { routingMap: routing as Tensor<"i32">, probs: probs as Tensor<"f32"> }, stream: args.stream });
      }
      this.#run({ hidden: hidden.ptr, routing_map: routing.ptr, probs: probs.ptr, output: out.ptr, num_tokens: T }, [hidden, routing, probs, out], args.stream);
    } catch (err) {
      if (allocated) out.dispose();
      throw err;
    }
    return out;
  }

  /**
   * Skip-permute mode: rows arrive grouped by local expert (`tokensPerExpert` rows each, in
   * order); returns bf16 [rows, H] in the same order, each row scaled by its prob. Rows beyond
   * the sum of tokensPerExpert are zeros.
   */
  forwardGrouped(args: ForwardGroupedArgs): Tensor<"bf16"> {
    checkOptions("FusedMoE.forwardGrouped", "args", args, FORWARD_GROUPED_OPTIONS);
    const c = this.config;
    const hidden = this.#checkTensor("hidden", args.hidden, "bf16", [null, c.hidden], "[rows, H]");
    const rows = hidden.shape[0]!;
    if (rows > c.maxTokens * c.topk) fail(`hidden has ${rows} rows, more than maxTokens * topk (${c.maxTokens * c.topk})`);
    const tpe = this.#checkTensor("tokensPerExpert", args.tokensPerExpert, "i32", [c.numLocalExperts], "[E_local]");
    const probs = this.#checkTensor("probs", args.probs, "f32", [rows], "[rows]");
    this.#claim(args.stream, "FusedMoE.forwardGrouped");
    const { out, allocated } = this.#output(args.out, rows);
    try {
      this.#run({ hidden: hidden.ptr, tokens_per_expert: tpe.ptr, probs: probs.ptr, output: out.ptr, num_tokens: rows }, [hidden, tpe, probs, out], args.stream);
    } catch (err) {
      if (allocated) out.dispose();
      throw err;
    }
    return out;
  }

  /**
   * Records forward (or forwardGrouped, when `tokensPerExpert` is given) on `stream` into a
   * Graph. `out` is required (no allocation under capture). Replays read the tensors' current
   * contents: write new tokens / routing / probs into the same tensors and launch again. A
   * replay counts as a call of the layer: Graph.launch is refused on another stream than the
   * layer's last call while that one may still run, as forward is.
   */
  capture(args: (ForwardArgs | ForwardGroupedArgs) & { out: Tensor; stream?: Stream }): Graph {
    checkOptions("FusedMoE.capture", "args", args, CAPTURE_OPTIONS);
    if (args.out === undefined) fail("capture needs a preallocated `out`");
    return this.ctx.capture(args.stream, () => {
      if ("tokensPerExpert" in args) this.forwardGrouped(args);
      else this.forward(args);
    });
  }

  /**
   * Routing ids outside [0, numExperts) seen by every forward since creation or the last reset.
   * Waits for all work of the context.
   */
  invalidCount(): number {
    this.#handle();
    this.ctx.synchronize();
    return this.#readInvalidCount(0);
  }

  /** invalidCount() without blocking the event loop (see Context.synchronizeAsync). */
  async invalidCountAsync(options?: WaitOptions): Promise<number> {
    this.#handle();
    await this.ctx.synchronizeAsync(options);
    return this.#readInvalidCount(this.ctx._transferStream().handle);
  }

  // The counter's value, copied on `stream` once the work that adds to it has finished.
  #readInvalidCount(stream: number): number {
    const counter = ffi.planInvalidCount(this.#handle()); // throws if disposed meanwhile
    const host = new Int32Array(1);
    ffi.memcpy(this.ctx._handle, host, counter, 4, ffi.MemcpyKind.DeviceToHost, stream);
    return host[0]!;
  }

  /** Sets the invalid-id counter to 0 (on `stream`). */
  resetInvalidCount(stream?: Stream): void {
    const counter = ffi.planInvalidCount(this.#handle());
    ffi.memset(this.ctx._handle, counter, 0, 4, this.ctx._streamHandle("resetInvalidCount", stream));
  }

  /** Destroys the plan and the buffers this layer owns (not borrowed weights). Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    unregisterFinalizer(this);
    for (const t of this.#owned) t.dispose();
    this.#lastCall?.done.dispose();
    if (!this.ctx.disposed) ffi.planDestroy(this.ctx._handle, this.#plan);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
