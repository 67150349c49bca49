#!/usr/bin/env bun
/**
 * fused-moe CLI: one MoE layer on tensors from safetensors files.
 *
 *   bun run fused-moe run --input in.safetensors --output out.safetensors [layer options]
 *   bun run fused-moe serve --layer layer.safetensors --topk K [--port P] [layer options]
 *   bun run fused-moe import --checkpoint DIR --layer-index L --output layer.safetensors
 *
 * Exit codes: 0 ok, 1 the library failed (FmoeError), 2 bad usage or bad input file.
 */
import { parseArgs } from "node:util";
import {
  bf16ToF32,
  CheckpointError,
  Context,
  type DType,
  FmoeError,
  fc1Outputs,
  FusedMoE,
  type HostTensor,
  isActivation,
  isGatedLayout,
  parseSafetensors,
  readSafetensors,
  route,
  SafetensorsError,
  type Stream,
  type Tensor,
  serializeSafetensors,
  writeExpertLayer,
  writeSafetensors,
} from "../lib/index.ts";

const USAGE = `usage: bun run fused-moe run --input IN.safetensors --output OUT.safetensors [layer options]
       bun run fused-moe serve --layer LAYER.safetensors [--topk K] [serve options] [layer options]
       bun run fused-moe import --checkpoint CKPT --layer-index L --output LAYER.safetensors [import options]

run: computes out = MoE(hidden) with one fused layer and writes it to OUT as tensor "out" [T, H]
BF16.

serve: an HTTP server over one layer whose weights are loaded once from LAYER (fc1, fc2 and the
optional biases, as below). Its device buffers of --max-tokens rows are allocated at start;
requests that arrive while the layer runs go into its next forward together (up to --max-tokens
tokens), and each awaits its output without blocking the server.
  GET  /health    the layer and the backend, as JSON
  POST /forward   body: safetensors with hidden, and routing_map and probs or router_logits
                  -> safetensors with out
  Errors answer JSON {"error": "..."}: 400 a bad body, 413 more tokens than --max-tokens, 500 the
  library failed.

import: reads MoE layer L's experts from a Hugging Face safetensors checkpoint (a directory with
model.safetensors.index.json or model.safetensors, and config.json; or one file), one expert at a
time, and writes them as LAYER for serve: fc1, fc2 (and biases) in the layout below, with metadata
(activation, layout, num_experts, local_expert_start, topk) that serve and run take as defaults.
Per-expert gate_proj/up_proj/down_proj (Qwen-MoE, DeepSeek), w1/w3/w2 (Mixtral), up_proj/down_proj
(Nemotron-H), stacked gate_up_proj/down_proj (gpt-oss); BF16, F16, F32, or FP8 with a
weight_scale_inv per block (DeepSeek-V3), written as BF16.

Tensors (safetensors):
  hidden      [T, H]            BF16   tokens
  routing_map [T, topk]         I32    global expert ids
  probs       [T, topk]         F32    router weights
  router_logits [T, E]          F32    instead of routing_map and probs: routed by the layer's
                                       router (the file's metadata router_*, as import writes
                                       them, else softmax, renormalized; selection_bias [E] F32)
  fc1         [E_local, N1, H]  BF16   N1 = ffn (squared_relu) or 2*ffn (gated)
  fc2         [E_local, H, ffn] BF16
  fc1_bias    [E_local, N1]     F32 or BF16 (optional)
  fc2_bias    [E_local, H]      F32 or BF16 (optional)

Layer options:
  --backend auto|host|cuda           default auto (cuda when a GPU is present)
  --activation squared_relu|silu|gelu|swiglu_oai   default silu (or the layer file's metadata)
  --layout halves|interleaved        gated layout of fc1's outputs, default halves (or metadata)
  --num-experts N                    global expert count, default the metadata's, else
                                     E_local + local-expert-start
  --local-expert-start S             global id of fc1[0], default 0 (or metadata)
  --weights bf16|mxfp8               compute format, default bf16 (mxfp8 quantizes on the device)
  --alignment A                      rows per expert group padded to a multiple of A, default 16
  --alpha X, --limit X               swiglu_oai parameters (defaults 1.702, 7.0)
  --topk K                           experts per token: serve's (and run's with router_logits),
                                     unless the layer's metadata says

Serve options:
  --layer LAYER.safetensors          the weights (required)
  --max-tokens N                     most tokens in one request, default 4096
  --port P                           default 8000 (0: any free port)
  --hostname NAME                    default 127.0.0.1

Import options:
  --checkpoint CKPT                  checkpoint directory or safetensors file (required)
  --layer-index L                    the L of the tensor names' "layers.L." (required)
  --output LAYER.safetensors         the layer file to write (required)
  --local-expert-start S             first expert written, default 0
  --num-local-experts C              experts written, default all from S on
  --activation A                     overrides config.json's activation

  -h, --help                         this text`;

/** A usage or input-file problem: one line on stderr, exit 2. */
class UsageError extends Error {}

/** A bad request body: answered 400 (or `status`), the server keeps running. */
class RequestError extends Error {
  constructor(
    message: string,
    readonly status = 400,
  ) {
    super(message);
  }
}

function intFlag(label: string, value: string | undefined, fallback: number, min: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < min) throw new UsageError(`${label} must be an integer >= ${min}, got ${value}`);
  return n;
}

function numFlag(label: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isFinite(n)) throw new UsageError(`${label} must be a number, got ${value}`);
  return n;
}

const OPTIONS = {
  input: { type: "string", short: "i" },
  output: { type: "string", short: "o" },
  weights: { type: "string", default: "bf16" },
  backend: { type: "string", default: "auto" },
  activation: { type: "string" },
  layout: { type: "string" },
  "num-experts": { type: "string" },
  "local-expert-start": { type: "string" },
  alignment: { type: "string" },
  alpha: { type: "string" },
  limit: { type: "string" },
  layer: { type: "string" },
  topk: { type: "string" },
  "max-tokens": { type: "string" },
  port: { type: "string" },
  hostname: { type: "string" },
  checkpoint: { type: "string" },
  "layer-index": { type: "string" },
  "num-local-experts": { type: "string" },
  help: { type: "boolean", short: "h" },
} as const;

function parseFlags(argv: string[]) {
  return parseArgs({ args: argv, allowPositionals: true, options: OPTIONS });
}
type Flags = ReturnType<typeof parseFlags>["values"];

/** The tensors of one safetensors image, read with checks that name the file and the tensor. */
class TensorSet {
  constructor(
    readonly tensors: Map<string, HostTensor>,
    readonly what: string,
    readonly fail: (message: string) => Error,
    readonly metadata: Record<string, string> = {},
  ) {}

  get(name: string, dtypes: readonly DType[], rank: number): HostTensor {
    const t = this.optional(name, dtypes, rank);
    if (t === undefined) throw this.fail(`${this.what}: missing tensor "${name}"`);
    return t;
  }

  optional(name: string, dtypes: readonly DType[], rank: number): HostTensor | undefined {
    const t = this.tensors.get(name);
    if (t === undefined) return undefined;
    if (!dtypes.includes(t.dtype)) throw this.fail(`${this.what}: tensor "${name}" is ${t.dtype}, expected ${dtypes.join(" or ")}`);
    if (t.shape.length !== rank) throw this.fail(`${this.what}: tensor "${name}" has shape [${t.shape.join(", ")}], expected rank ${rank}`);
    return t;
  }

  expectShape(name: string, t: HostTensor, shape: number[]): void {
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw this.fail(`${this.what}: tensor "${name}" has shape [${t.shape.join(", ")}], expected [${shape.join(", ")}]`);
    }
  }
}

function readTensorFile(path: string): TensorSet {
  try {
    const { tensors, metadata } = readSafetensors(path);
    return new TensorSet(tensors, path, (m) => new UsageError(m), metadata);
  } catch (err) {
    if (err instanceof SafetensorsError) throw new UsageError(err.message);
    throw err;
  }
}

/**
 * The tokens of one call: hidden [T, H], and routing_map [T, topk] with probs [T, topk], or
 * router_logits [T, numExperts] (routed by the layer's router, top-k from `topk`).
 */
function readTokens(
  set: TensorSet,
  H: number,
  topk: number | undefined,
  numExperts: number,
): { T: number; topk: number; hidden: HostTensor; routing?: HostTensor; probs?: HostTensor; logits?: HostTensor } {
  const hidden = set.get("hidden", ["bf16"], 2);
  const T = hidden.shape[0]!;
  set.expectShape("hidden", hidden, [T, H]);
  const logits = set.optional("router_logits", ["f32"], 2);
  if (logits !== undefined) {
    if (set.tensors.has("routing_map") || set.tensors.has("probs")) throw set.fail(`${set.what}: give router_logits or routing_map and probs, not both`);
    if (topk === undefined) throw set.fail(`${set.what}: router_logits needs a top-k (--topk, or topk in the layer's metadata)`);
    set.expectShape("router_logits", logits, [T, numExperts]);
    return { T, topk, hidden, logits };
  }
  const routing = set.get("routing_map", ["i32"], 2);
  const k = topk ?? routing.shape[1]!;
  set.expectShape("routing_map", routing, [T, k]);
  const probs = set.get("probs", ["f32"], 2);
  set.expectShape("probs", probs, [T, k]);
  return { T, topk: k, hidden, routing, probs };
}

/**
 * The layer's flags. Those not given come from `metadata` (a layer file's, as `import` writes
 * it), else their defaults; a bad metadata value is reported with `what` (the file).
 */
function layerFlags(flags: Flags, metadata: Record<string, string> = {}, what = "") {
  const backend = flags.backend;
  if (backend !== "auto" && backend !== "host" && backend !== "cuda") throw new UsageError(`--backend must be auto, host or cuda, got ${backend}`);
  // A flag, else the metadata's value (named as the file's), else undefined.
  const pick = (flag: keyof Flags, key: string): [string | undefined, string] => {
    const given = flags[flag];
    if (typeof given === "string") return [given, `--${flag}`];
    return [metadata[key], `${what}: metadata ${key}`];
  };
  const [activation = "silu", activationFrom] = pick("activation", "activation");
  if (!isActivation(activation)) throw new UsageError(`${activationFrom} must be squared_relu, silu, gelu or swiglu_oai, got ${activation}`);
  const [layout = "halves", layoutFrom] = pick("layout", "layout");
  if (!isGatedLayout(layout)) throw new UsageError(`${layoutFrom} must be halves or interleaved, got ${layout}`);
  const weightFormat = flags.weights;
  if (weightFormat !== "bf16" && weightFormat !== "mxfp8") throw new UsageError(`--weights must be bf16 or mxfp8, got ${weightFormat}`);
  const int = (flag: keyof Flags, key: string, fallback: number, min: number): number => {
    const [value, from] = pick(flag, key);
    return intFlag(from, value, fallback, min);
  };
  const num = (flag: keyof Flags, key: string): number | undefined => {
    const [value, from] = pick(flag, key);
    return numFlag(from, value);
  };
  const topk = pick("topk", "topk")[0] === undefined ? undefined : int("topk", "topk", 0, 1);
  // How router_logits are routed: the layer file's metadata (as import writes it), else softmax,
  // renormalized.
  const meta = (key: string) => metadata[key];
  const scoring = meta("router_scoring") ?? "softmax";
  if (scoring !== "softmax" && scoring !== "sigmoid") throw new UsageError(`${what}: metadata router_scoring must be softmax or sigmoid, got ${scoring}`);
  const renormalize = meta("router_renormalize") ?? "true";
  if (renormalize !== "true" && renormalize !== "false") throw new UsageError(`${what}: metadata router_renormalize must be true or false, got ${renormalize}`);
  const router = {
    scoring,
    numGroups: intFlag(`${what}: metadata router_num_groups`, meta("router_num_groups"), 1, 1),
    topkGroups: intFlag(`${what}: metadata router_topk_groups`, meta("router_topk_groups"), 1, 1),
    renormalize: renormalize === "true",
    scale: numFlag(`${what}: metadata router_scale`, meta("router_scale")) ?? 1,
  } as const;
  return {
    backend,
    activation,
    layout,
    weightFormat,
    start: int("local-expert-start", "local_expert_start", 0, 0),
    numExperts: pick("num-experts", "num_experts")[0] === undefined ? undefined : int("num-experts", "num_experts", 0, 1),
    topk,
    alignment: intFlag("--alignment", flags.alignment, 16, 1),
    alpha: num("alpha", "alpha"),
    limit: num("limit", "limit"),
    router,
  } as const;
}
type LayerFlags = ReturnType<typeof layerFlags>;

/** The layer from the flags and the weight tensors of `set`, its weights uploaded to `ctx`. */
function buildLayer(ctx: Context, flags: LayerFlags, set: TensorSet, topk: number, maxTokens: number) {
  const { activation, layout, weightFormat, start } = flags;
  const fc1 = set.get("fc1", ["bf16"], 3);
  const [E, N1, H] = fc1.shape as [number, number, number];
  const gated = activation !== "squared_relu";
  if (gated && N1 % 2 !== 0) throw new UsageError(`${set.what}: fc1 has ${N1} outputs: a gated activation needs an even count`);
  const ffn = gated ? N1 / 2 : N1;
  const fc2 = set.get("fc2", ["bf16"], 3);
  set.expectShape("fc2", fc2, [E, H, ffn]);
  if (fc1Outputs(activation, ffn) !== N1) throw new UsageError("internal: fc1 outputs mismatch");
  // Biases: f32 in the ABI; BF16 files are widened (exact).
  const bias = (name: string, shape: number[]): Float32Array | undefined => {
    const t = set.optional(name, ["f32", "bf16"], 2);
    if (t === undefined) return undefined;
    set.expectShape(name, t, shape);
    return t.dtype === "bf16" ? bf16ToF32(t.data as Uint16Array) : (t.data as Float32Array);
  };
  const fc1Bias = bias("fc1_bias", [E, N1]);
  const fc2Bias = bias("fc2_bias", [E, H]);

  const numExperts = flags.numExperts ?? start + E;
  if (start + E > numExperts) throw new UsageError(`--local-expert-start ${start} + ${E} local experts exceeds --num-experts ${numExperts}`);
  const config = {
    hidden: H,
    ffn,
    numExperts,
    numLocalExperts: E,
    localExpertStart: start,
    topk,
    activation,
    layout,
    alpha: flags.alpha,
    limit: flags.limit,
    weightFormat,
    alignment: flags.alignment,
    maxTokens,
  } as const;
  // The layer borrows these tensors (they live as long as `ctx`), except that an mxfp8 layer
  // quantizes fc1 and fc2 into copies of its own: their bf16 uploads are freed at once.
  const fc1T = ctx.upload(fc1.data, fc1.shape, "bf16");
  const fc2T = ctx.upload(fc2.data, fc2.shape, "bf16");
  const fc1BiasT = fc1Bias && ctx.upload(fc1Bias, [E, N1], "f32");
  const fc2BiasT = fc2Bias && ctx.upload(fc2Bias, [E, H], "f32");
  const moe = new FusedMoE(ctx, config, { fc1: fc1T, fc2: fc2T, fc1Bias: fc1BiasT, fc2Bias: fc2BiasT });
  if (weightFormat === "mxfp8") for (const t of [fc1T, fc2T]) t.dispose();
  // The router's selection bias (import writes DeepSeek-V3's), for router_logits.
  const selection = set.optional("selection_bias", ["f32"], 1);
  if (selection !== undefined) set.expectShape("selection_bias", selection, [numExperts]);
  const selectionBias = selection && ctx.upload(selection.data as Float32Array, [numExperts], "f32");
  // Routes router_logits [T, numExperts] into routing_map / probs views, on `stream`.
  const routeLogits = (logits: Tensor, out: { routingMap: Tensor<"i32">; probs: Tensor<"f32"> }, stream?: Stream) =>
    route(ctx, { logits, topk, ...flags.router, selectionBias, out, stream });
  // The router's options checked now (routing no tokens), not at the first router_logits.
  try {
    using none = ctx.empty([0, numExperts], "f32");
    const checked = routeLogits(none, { routingMap: ctx.empty([0, topk], "i32"), probs: ctx.empty([0, topk], "f32") });
    checked.routingMap.dispose();
    checked.probs.dispose();
  } catch (err) {
    if (err instanceof FmoeError) throw new UsageError(`${set.what}: its router (metadata router_*, top-k ${topk}) is not one route() runs: ${err.message}`);
    throw err;
  }
  return { moe, H, ffn, E, numExperts, routeLogits };
}

/** Refuses the flags of the other command (parseArgs knows them all). */
function refuseFlags(flags: Flags, command: string, names: readonly (keyof Flags)[]): void {
  for (const name of names) if (flags[name] !== undefined) throw new UsageError(`--${name} is not an option of ${command} (see --help)`);
}

const SERVE_FLAGS = ["layer", "max-tokens", "port", "hostname"] as const;
const IMPORT_FLAGS = ["checkpoint", "layer-index", "num-local-experts"] as const;

function run(flags: Flags): number {
  refuseFlags(flags, "run", [...SERVE_FLAGS, ...IMPORT_FLAGS]);
  if (flags.input === undefined) throw new UsageError("--input is required");
  if (flags.output === undefined) throw new UsageError("--output is required");
  layerFlags(flags); // the flags' own mistakes before a file is read
  const set = readTensorFile(flags.input);
  const layerOptions = layerFlags(flags, set.metadata, flags.input);
  const fc1 = set.get("fc1", ["bf16"], 3);
  const [E, , H] = fc1.shape as [number, number, number];
  const tokens = readTokens(set, H, layerOptions.topk, layerOptions.numExperts ?? layerOptions.start + E);
  const { T, topk } = tokens;

  using ctx = Context.create({ backend: layerOptions.backend });
  const layer = buildLayer(ctx, layerOptions, set, topk, Math.max(1, T));
  using moe = layer.moe;
  using hidden = ctx.upload(tokens.hidden.data, [T, H], "bf16");
  using routingMap = tokens.routing ? ctx.upload(tokens.routing.data as Int32Array, [T, topk], "i32") : ctx.empty([T, topk], "i32");
  using probs = tokens.probs ? ctx.upload(tokens.probs.data as Float32Array, [T, topk], "f32") : ctx.empty([T, topk], "f32");
  if (tokens.logits !== undefined) {
    using logits = ctx.upload(tokens.logits.data as Float32Array, [T, layer.numExperts], "f32");
    layer.routeLogits(logits, { routingMap, probs });
  }
  using out = moe.forward({ hidden, routingMap, probs });
  const result = out.download();
  const invalid = moe.invalidCount();
  writeSafetensors(flags.output, { out: { dtype: "bf16", shape: [T, H], data: result } }, {
    backend: ctx.backend,
    device: ctx.deviceName,
    activation: layerOptions.activation,
    weights: flags.weights,
  });
  const note = invalid > 0 ? `; ${invalid} routing ids outside [0, ${layer.numExperts}) were dropped` : "";
  console.error(`fused-moe: wrote out [${T}, ${H}] bf16 to ${flags.output} (${ctx.backend}: ${ctx.deviceName}${note})`);
  return 0;
}

function jsonResponse(body: unknown, status = 200): Response {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });
}

async function serve(flags: Flags): Promise<number> {
  refuseFlags(flags, "serve", ["input", "output", ...IMPORT_FLAGS]);
  if (flags.layer === undefined) throw new UsageError("--layer is required");
  layerFlags(flags);
  const maxTokens = intFlag("--max-tokens", flags["max-tokens"], 4096, 1);
  const port = intFlag("--port", flags.port, 8000, 0);
  if (port > 65535) throw new UsageError(`--port must be at most 65535, got ${port}`);
  const set = readTensorFile(flags.layer);
  const layerOptions = layerFlags(flags, set.metadata, flags.layer);
  const topk = layerOptions.topk;
  if (topk === undefined) throw new UsageError(`--topk is required (${flags.layer} has no topk in its metadata)`);

  using ctx = Context.create({ backend: layerOptions.backend });
  const layer = buildLayer(ctx, layerOptions, set, topk, maxTokens);
  using moe = layer.moe;
  const { H, numExperts } = layer;
  // Allocated once, at start: a first allocation of a size may wait for the whole device (cudaMalloc).
  using stream = ctx.createStream();
  using hiddenBuffer = ctx.empty([maxTokens, H], "bf16");
  using routingBuffer = ctx.empty([maxTokens, topk], "i32");
  using probsBuffer = ctx.empty([maxTokens, topk], "f32");
  using logitsBuffer = ctx.empty([maxTokens, numExperts], "f32");
  using outBuffer = ctx.empty([maxTokens, H], "bf16");
  type Tokens = ReturnType<typeof readTokens>;
  interface Waiting {
    tokens: Tokens;
    done: (out: Uint16Array) => void;
    failed: (err: unknown) => void;
  }
  // Requests that arrive while the layer runs wait here and go into the next forward together, up
  // to --max-tokens tokens: a decode step reads the routed experts' weights once for all its
  // tokens, so a batch costs little more than one request.
  const waiting: Waiting[] = [];
  const stats = { requests: 0, forwards: 0 };
  let running = false;

  const forwardBatch = async (batch: Waiting[]): Promise<Uint16Array> => {
    let T = 0;
    for (const { tokens } of batch) {
      const n = tokens.T;
      hiddenBuffer.view(T * H, [n, H]).copyFrom(tokens.hidden.data as Uint16Array, stream);
      const routingMap = routingBuffer.view(T * topk, [n, topk]);
      const probs = probsBuffer.view(T * topk, [n, topk]);
      if (tokens.logits !== undefined) {
        const logits = logitsBuffer.view(T * numExperts, [n, numExperts]).copyFrom(tokens.logits.data as Float32Array, stream);
        layer.routeLogits(logits, { routingMap, probs }, stream);
      } else {
        routingMap.copyFrom(tokens.routing!.data as Int32Array, stream);
        probs.copyFrom(tokens.probs!.data as Float32Array, stream);
      }
      T += n;
    }
    const out = outBuffer.view(0, [T, H]);
    moe.forward({ hidden: hiddenBuffer.view(0, [T, H]), routingMap: routingBuffer.view(0, [T, topk]), probs: probsBuffer.view(0, [T, topk]), out, stream });
    ++stats.forwards;
    return await out.downloadAsync(stream);
  };
  // One batch at a time owns the buffers; each starts once the previous one's output is copied.
  const drain = async (): Promise<void> => {
    running = true;
    while (waiting.length > 0) {
      const batch: Waiting[] = [];
      let T = 0;
      while (waiting.length > 0 && T + waiting[0]!.tokens.T <= maxTokens) {
        T += waiting[0]!.tokens.T;
        batch.push(waiting.shift()!);
      }
      try {
        const out = await forwardBatch(batch);
        let row = 0;
        for (const w of batch) {
          w.done(out.slice(row * H, (row + w.tokens.T) * H));
          row += w.tokens.T;
        }
      } catch (err) {
        for (const w of batch) w.failed(err);
      }
    }
    running = false;
  };
  const forward = (tokens: Tokens): Promise<Uint16Array> =>
    new Promise((done, failed) => {
      ++stats.requests;
      waiting.push({ tokens, done, failed });
      if (!running) void drain();
    });

  const health = {
    backend: ctx.backend,
    device: ctx.deviceName,
    hidden: H,
    ffn: layer.ffn,
    numExperts,
    numLocalExperts: layer.E,
    localExpertStart: layerOptions.start,
    topk,
    activation: layerOptions.activation,
    weights: flags.weights,
    maxTokens,
    stats,
  };
  const answer = async (req: Request): Promise<Response> => {
    const path = new URL(req.url).pathname;
    if (path === "/health" && req.method === "GET") return jsonResponse(health);
    if (path !== "/forward") return jsonResponse({ error: `no route ${req.method} ${path} (GET /health, POST /forward)` }, 404);
    if (req.method !== "POST") return jsonResponse({ error: `/forward takes POST, got ${req.method}` }, 405);
    try {
      let tensors;
      try {
        tensors = parseSafetensors(new Uint8Array(await req.arrayBuffer()), "request body").tensors;
      } catch (err) {
        if (err instanceof SafetensorsError) throw new RequestError(err.message);
        throw err;
      }
      const tokens = readTokens(new TensorSet(tensors, "request body", (m) => new RequestError(m)), H, topk, numExperts);
      if (tokens.T > maxTokens) throw new RequestError(`request body: ${tokens.T} tokens exceed --max-tokens ${maxTokens}`, 413);
      // The library drops routing ids outside [0, num-experts); the answer says how many it dropped.
      let invalid = 0;
      for (const id of (tokens.routing?.data ?? []) as Int32Array) if (id < 0 || id >= numExperts) ++invalid;
      const out = await forward(tokens);
      const body = serializeSafetensors({ out: { dtype: "bf16", shape: [tokens.T, H], data: out } }, { invalid_ids: String(invalid) });
      return new Response(body, { headers: { "content-type": "application/octet-stream" } });
    } catch (err) {
      if (err instanceof RequestError) return jsonResponse({ error: err.message }, err.status);
      if (err instanceof FmoeError) return jsonResponse({ error: err.message }, 500);
      throw err;
    }
  };
  const server = Bun.serve({
    port,
    hostname: flags.hostname ?? "127.0.0.1",
    // A full request of --max-tokens rows, and room for the safetensors header.
    maxRequestBodySize: maxTokens * (2 * H + 8 * topk) + (1 << 20),
    fetch: answer,
  });
  console.log(`fused-moe: serving a ${layer.E}-expert layer (H ${H}, ffn ${layer.ffn}, top-${topk}) on ${server.url.href} (${ctx.backend}: ${ctx.deviceName})`);
  await new Promise<void>((resolve) => {
    process.once("SIGINT", resolve);
    process.once("SIGTERM", resolve);
  });
  await server.stop();
  console.error("fused-moe: stopped");
  return 0;
}

function importLayer(flags: Flags): number {
  refuseFlags(flags, "import", ["input", "layer", "topk", "max-tokens", "port", "hostname", "layout", "num-experts", "alignment", "alpha", "limit"]);
  if (flags.weights !== "bf16" || flags.backend !== "auto") throw new UsageError("--weights and --backend are not options of import (see --help)");
  if (flags.checkpoint === undefined) throw new UsageError("--checkpoint is required");
  if (flags["layer-index"] === undefined) throw new UsageError("--layer-index is required");
  if (flags.output === undefined) throw new UsageError("--output is required");
  const activation = flags.activation;
  if (activation !== undefined && !isActivation(activation)) throw new UsageError(`--activation must be squared_relu, silu, gelu or swiglu_oai, got ${activation}`);
  const layer = intFlag("--layer-index", flags["layer-index"], 0, 0);
  const localExpertStart = intFlag("--local-expert-start", flags["local-expert-start"], 0, 0);
  const numLocalExperts = flags["num-local-experts"] === undefined ? undefined : intFlag("--num-local-experts", flags["num-local-experts"], 0, 1);
  const started = performance.now();
  let reported = started;
  try {
    const { info, start, count, bytes } = writeExpertLayer(flags.checkpoint, flags.output, {
      layer,
      activation,
      localExpertStart,
      numLocalExperts,
      // A line a second on long imports (a DeepSeek-V3 layer is 22 GB of bf16).
      onProgress: (done, total) => {
        const now = performance.now();
        if (now - reported < 1000 || done === total) return;
        reported = now;
        console.error(`fused-moe: import: ${done} of ${total} experts (${((now - started) / 1000).toFixed(0)} s)`);
      },
    });
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    console.error(
      `fused-moe: wrote experts [${start}, ${start + count}) of ${info.numExperts} (H ${info.hidden}, ffn ${info.ffn}, ${info.activation}, ${info.layout}` +
        `${info.topk === undefined ? "" : `, top-${info.topk}`}) from ${info.source} to ${flags.output}: ${(bytes / 2 ** 20).toFixed(1)} MiB in ${seconds} s`,
    );
  } catch (err) {
    if (err instanceof CheckpointError || err instanceof SafetensorsError) throw new UsageError(err.message);
    throw err;
  }
  return 0;
}

async function main(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseFlags(argv);
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  if (positionals.length === 1 && positionals[0] === "run") return run(values);
  if (positionals.length === 1 && positionals[0] === "serve") return await serve(values);
  if (positionals.length === 1 && positionals[0] === "import") return importLayer(values);
  throw new UsageError(`expected the command "run", "serve" or "import" (see --help)`);
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (err) {
  if (err instanceof UsageError) {
    console.error(`fused-moe: ${err.message}`);
    process.exitCode = 2;
  } else if (err instanceof FmoeError) {
    console.error(`fused-moe: ${err.message}`);
    process.exitCode = 1;
  } else {
    throw err;
  }
}
