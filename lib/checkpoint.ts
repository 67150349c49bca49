/**
 * Expert weights from a model checkpoint in the Hugging Face safetensors layout: one file, or a
 * directory of shards named by `model.safetensors.index.json`, with `config.json` beside them.
 *
 * A checkpoint stores each MoE layer's experts one of two ways, both found by name:
 * - one tensor per expert and projection, `<prefix>.layers.<L>.<...>.experts.<e>.<proj>.weight`
 *   in the nn.Linear layout [out, in]: `gate_proj`/`up_proj`/`down_proj` (Qwen-MoE, DeepSeek,
 *   OLMoE), `w1`/`w3`/`w2` (Mixtral: gate, up, down), or `up_proj`/`down_proj` without a gate
 *   (Nemotron-H, squared ReLU). FP8 weights with a `weight_scale_inv` of one f32 per block
 *   (DeepSeek-V3's release: 128 x 128, or config.json's `weight_block_size`) are dequantized;
 * - stacked over the experts, `<...>.experts.gate_up_proj` [E, H, 2I] and `.down_proj` [E, I, H]
 *   in the [in, out] layout (gpt-oss, with `_bias` tensors), or the same in the [out, in] layout.
 *
 * Only the byte ranges of the requested experts are read: a layer of a 100 GB checkpoint costs
 * its own size. Weights are converted to bf16 (BF16 copied, F16 and F32 rounded to nearest even).
 */
import { closeSync, existsSync, fstatSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import { join } from "node:path";
import { type Activation, type GatedLayout, isGated, SWIGLU_OAI_DEFAULT_ALPHA, SWIGLU_OAI_DEFAULT_LIMIT } from "./config.ts";
import type { Context } from "./context.ts";
import { e4m3ToF32, f32ToBf16 } from "./dtype.ts";
import { describeValue } from "./errors.ts";
import type { FusedMoEConfig, FusedMoEWeights, RouterConfig } from "./moe.ts";
import { parseSafetensorsHeader, SafetensorsError, type SafetensorsEntry, safetensorsHeader } from "./safetensors.ts";
import type { Tensor } from "./tensor.ts";

/** A checkpoint that cannot be read as asked: names the file, the tensor or the layer. */
export class CheckpointError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CheckpointError";
  }
}

/** One tensor of a checkpoint: its file and its absolute byte range there. */
export interface CheckpointTensor {
  name: string;
  /** The file's dtype name: BF16, F16, F32, F8_E4M3, ... */
  dtype: string;
  shape: number[];
  file: string;
  /** Absolute offsets in `file`. */
  begin: number;
  end: number;
}

const INDEX_FILE = "model.safetensors.index.json";
// Reads above this size are split (one read call moves at most 2 GiB).
const READ_CHUNK = 1 << 30;
const MAX_HEADER_BYTES = 100_000_000;

/** The tensors of a checkpoint, read on demand. Holds open files until disposed. */
export class Checkpoint implements Disposable {
  readonly #tensors = new Map<string, CheckpointTensor>();
  readonly #files = new Map<string, number>();
  #closed = false;

  private constructor(
    /** The file or directory opened. */
    readonly path: string,
    /** `config.json` of the checkpoint's directory, or {} without one. */
    readonly config: Record<string, unknown>,
    shards: string[],
  ) {
    try {
      for (const file of shards) this.#readHeader(file);
    } catch (err) {
      this.close();
      throw err;
    }
  }

  /**
   * Opens a safetensors file, or a directory holding `model.safetensors.index.json` (its shards),
   * `model.safetensors`, or any `*.safetensors` files. Reads only the headers and `config.json`.
   */
  static open(path: string): Checkpoint {
    let stat;
    try {
      stat = statSync(path);
    } catch (err) {
      throw new CheckpointError(`${path}: cannot read (${err instanceof Error ? err.message : String(err)})`);
    }
    if (!stat.isDirectory()) return new Checkpoint(path, {}, [path]);
    const config = readJson(join(path, "config.json"), false) ?? {};
    const index = readJson(join(path, INDEX_FILE), false);
    let shards: string[];
    if (index !== undefined) {
      const map = index.weight_map;
      if (typeof map !== "object" || map === null || Array.isArray(map)) throw new CheckpointError(`${join(path, INDEX_FILE)}: no "weight_map" object`);
      shards = [...new Set(Object.values(map as Record<string, unknown>).map(String))].sort().map((f) => join(path, f));
    } else if (existsSync(join(path, "model.safetensors"))) {
      shards = [join(path, "model.safetensors")];
    } else {
      shards = readdirSync(path).filter((f) => f.endsWith(".safetensors")).sort().map((f) => join(path, f));
    }
    if (shards.length === 0) throw new CheckpointError(`${path}: no safetensors files (nor ${INDEX_FILE})`);
    return new Checkpoint(path, config, shards);
  }

  #readHeader(file: string): void {
    let fd: number;
    try {
      fd = openSync(file, "r");
    } catch (err) {
      throw new CheckpointError(`${file}: cannot open (${err instanceof Error ? err.message : String(err)})`);
    }
    this.#files.set(file, fd);
    const fileLen = fstatSync(fd).size;
    const lengthBytes = readAt(fd, 0, Math.min(8, fileLen));
    const headerLen = lengthBytes.length === 8 ? Number(new DataView(lengthBytes.buffer).getBigUint64(0, true)) : 0;
    // The format caps headers at 100 MB; a larger length is a damaged file, not one to allocate for.
    if (headerLen > MAX_HEADER_BYTES && headerLen <= fileLen) throw new CheckpointError(`${file}: header length ${headerLen} exceeds the format's ${MAX_HEADER_BYTES} bytes`);
    const head = readAt(fd, 0, Math.min(fileLen, 8 + Math.min(headerLen, MAX_HEADER_BYTES)));
    let parsed;
    try {
      parsed = parseSafetensorsHeader(head, fileLen, file);
    } catch (err) {
      if (err instanceof SafetensorsError) throw new CheckpointError(err.message);
      throw err;
    }
    for (const e of parsed.entries) {
      const previous = this.#tensors.get(e.name);
      if (previous !== undefined) throw new CheckpointError(`${this.path}: tensor ${e.name} is in both ${previous.file} and ${file}`);
      this.#tensors.set(e.name, located(e, file, parsed.dataStart));
    }
  }

  /** Every tensor name, in no particular order. */
  names(): IterableIterator<string> {
    return this.#tensors.keys();
  }

  has(name: string): boolean {
    return this.#tensors.has(name);
  }

  /** Where `name` lies. Throws CheckpointError when the checkpoint has no such tensor. */
  tensor(name: string): CheckpointTensor {
    const t = this.#tensors.get(name);
    if (t === undefined) throw new CheckpointError(`${this.path}: no tensor ${name}`);
    return t;
  }

  /** The raw bytes of rows [first, first + count) of `name`'s first dimension (all by default). */
  readBytes(name: string, first = 0, count?: number): Uint8Array {
    if (this.#closed) throw new CheckpointError(`${this.path}: checkpoint is closed`);
    const t = this.tensor(name);
    const rows = t.shape[0] ?? 1;
    const n = count ?? rows - first;
    if (!Number.isSafeInteger(first) || !Number.isSafeInteger(n) || first < 0 || n < 0 || first + n > rows) {
      throw new CheckpointError(`${this.path}: rows [${first}, ${first + n}) of ${name} [${t.shape.join(", ")}] do not exist`);
    }
    const rowBytes = rows === 0 ? 0 : (t.end - t.begin) / rows;
    return readAt(this.#files.get(t.file)!, t.begin + first * rowBytes, n * rowBytes);
  }

  /** Rows of `name` as bf16 bits: BF16 as stored, F16 and F32 rounded to nearest even. */
  readBf16(name: string, first = 0, count?: number): Uint16Array {
    const dtype = this.tensor(name).dtype;
    if (dtype !== "BF16" && dtype !== "F16" && dtype !== "F32") {
      throw new CheckpointError(`${this.path}: ${name} is ${dtype}; weights must be BF16, F16 or F32 (or F8_E4M3 with a weight_scale_inv)`);
    }
    const bytes = this.readBytes(name, first, count);
    switch (dtype) {
      case "BF16":
        return new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
      case "F16":
        return f16ToBf16(new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2));
      case "F32":
        return f32ToBf16(new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4));
    }
  }

  /** Rows of `name` as f32: BF16, F16 and F32 exactly. */
  readF32(name: string, first = 0, count?: number): Float32Array {
    const dtype = this.tensor(name).dtype;
    if (dtype !== "BF16" && dtype !== "F16" && dtype !== "F32") throw new CheckpointError(`${this.path}: ${name} is ${dtype}; expected BF16, F16 or F32`);
    const bytes = this.readBytes(name, first, count);
    if (dtype === "F32") return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
    const bits = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
    const out = new Float32Array(bits.length);
    if (dtype === "BF16") {
      const outBits = new Uint32Array(out.buffer);
      for (let i = 0; i < bits.length; ++i) outBits[i] = bits[i]! << 16;
    } else {
      const table = f16Values();
      for (let i = 0; i < bits.length; ++i) out[i] = table[bits[i]!]!;
    }
    return out;
  }

  /** Closes the files. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const fd of this.#files.values()) closeSync(fd);
    this.#files.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function located(e: SafetensorsEntry, file: string, dataStart: number): CheckpointTensor {
  return { name: e.name, dtype: e.dtype, shape: e.shape, file, begin: dataStart + e.begin, end: dataStart + e.end };
}

function readJson(path: string, required: boolean): Record<string, unknown> | undefined {
  if (!required && !existsSync(path)) return undefined;
  let value: unknown;
  try {
    value = JSON.parse(readFileSync(path, "utf8"));
  } catch (err) {
    throw new CheckpointError(`${path}: cannot read as JSON (${err instanceof Error ? err.message : String(err)})`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) throw new CheckpointError(`${path}: not a JSON object`);
  return value as Record<string, unknown>;
}

function readAt(fd: number, position: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = readSync(fd, out, done, Math.min(READ_CHUNK, length - done), position + done);
    if (n === 0) throw new CheckpointError(`unexpected end of file at byte ${position + done}`);
    done += n;
  }
  return out;
}

// The value of every f16 bit pattern (exact in f32), and its bf16 rounding (nearest even).
let f16Table: Float32Array | undefined;
let f16Bf16Table: Uint16Array | undefined;
function f16Values(): Float32Array {
  if (f16Table === undefined) {
    f16Table = new Float32Array(65536);
    for (let h = 0; h < 65536; ++h) {
      const e = (h >> 10) & 0x1f;
      const m = h & 0x3ff;
      const mag = e === 0 ? m * 2 ** -24 : e === 31 ? (m === 0 ? Infinity : NaN) : (1 + m / 1024) * 2 ** (e - 15);
      f16Table[h] = h & 0x8000 ? -mag : mag;
    }
  }
  return f16Table;
}
function f16ToBf16(bits: Uint16Array): Uint16Array {
  if (f16Bf16Table === undefined) {
    f16Bf16Table = f32ToBf16(f16Values());
    // NaNs: the quiet NaN of their sign (a NaN's bits through a JS number are the engine's choice).
    for (let h = 0x7c01; h < 0x8000; ++h) [f16Bf16Table[h], f16Bf16Table[h | 0x8000]] = [0x7fc0, 0xffc0];
  }
  const table = f16Bf16Table;
  const out = new Uint16Array(bits.length);
  for (let i = 0; i < bits.length; ++i) out[i] = table[bits[i]!]!;
  return out;
}

// ------------------------------------------------------------------------------------------------
// One MoE layer's experts

/** What `openExpertLayer` found: the layer's shapes, its activation, and where it came from. */
export interface ExpertLayerInfo {
  /** Model width H. */
  hidden: number;
  /** Per-expert intermediate size I. */
  ffn: number;
  /** Experts the checkpoint holds for this layer (the global expert count). */
  numExperts: number;
  activation: Activation;
  /** Gated activations: where gate and up lie in the stacked fc1 (see FusedMoEConfig.layout). */
  layout: GatedLayout;
  /** swiglu_oai parameters (from config.json, else the defaults). */
  alpha?: number;
  limit?: number;
  /** Experts per token, from config.json (`num_experts_per_tok`), when it says. */
  topk?: number;
  /** Whether the experts carry biases (then fc1Bias and fc2Bias are given). */
  bias: boolean;
  /** The tensor names read, with `{e}` for the expert. */
  source: string;
  /** How the model routes (route()'s options), from config.json: scoring_func, n_group,
   *  topk_group, norm_topk_prob and routed_scaling_factor where it gives them; softmax,
   *  renormalized otherwise (Mixtral and gpt-oss renormalize too), sigmoid where the router has a
   *  selection bias (DeepSeek-V3's e_score_correction_bias). */
  router: Required<RouterConfig>;
  /** The name of the router's selection bias [numExperts], when it has one. */
  selectionBias?: string;
}

/** One expert's weights in the library's layout: fc1 [N1, H], fc2 [H, I] bf16, biases f32. */
export interface ExpertWeights {
  fc1: Uint16Array;
  fc2: Uint16Array;
  fc1Bias?: Float32Array;
  fc2Bias?: Float32Array;
}

export interface ExpertLayerOptions {
  /** The index L in the tensor names' `layers.L.`. */
  layer: number;
  /** Overrides the activation config.json gives (or its absence implies). */
  activation?: Activation;
}

/** One layer's experts in a checkpoint: its shapes, and each expert's weights on request. */
export interface ExpertLayerReader {
  readonly info: ExpertLayerInfo;
  /** Expert `e` (0 <= e < numExperts) converted to the library's layout. */
  read(e: number): ExpertWeights;
  /** The router's selection bias, f32 [numExperts], when it has one. */
  readSelectionBias(): Float32Array | undefined;
}

const DEFAULT_ROUTER: Required<RouterConfig> = { scoring: "softmax", numGroups: 1, topkGroups: 1, renormalize: true, scale: 1 };

// Per-expert projections, by the names they go by: [gate, up, down] (gate absent: non-gated).
const PER_EXPERT_NAMES: readonly (readonly [string | undefined, string, string])[] = [
  ["gate_proj", "up_proj", "down_proj"],
  ["w1", "w3", "w2"],
  [undefined, "up_proj", "down_proj"],
];

/** Finds layer `options.layer`'s experts in `ckpt`. Throws CheckpointError naming what is missing. */
export function openExpertLayer(ckpt: Checkpoint, options: ExpertLayerOptions): ExpertLayerReader {
  const L = options.layer;
  if (!Number.isSafeInteger(L) || L < 0) throw new CheckpointError(`layer must be a non-negative integer, got ${L}`);
  const perExpert = new RegExp(`^((?:.*\\.)?layers\\.${L}\\.(?:.*\\.)?experts)\\.(\\d+)\\.(\\w+)\\.(\\w+)$`);
  const stacked = new RegExp(`^((?:.*\\.)?layers\\.${L}\\.(?:.*\\.)?experts)\\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$`);
  const prefixes = new Set<string>();
  const experts = new Map<string, Set<number>>(); // projection -> expert ids with a weight
  let stackedPrefix: string | undefined;
  for (const name of ckpt.names()) {
    const m = perExpert.exec(name);
    if (m !== null) {
      prefixes.add(m[1]!);
      if (m[4] === "weight") {
        const ids = experts.get(m[3]!) ?? new Set<number>();
        ids.add(Number(m[2]));
        experts.set(m[3]!, ids);
      }
      continue;
    }
    const s = stacked.exec(name);
    if (s !== null) {
      if (s[3] === "_blocks" || s[3] === "_scales") {
        throw new CheckpointError(`${ckpt.path}: ${name}: MXFP4 expert weights are not read; use the checkpoint's bf16 release (or dequantize it)`);
      }
      stackedPrefix = s[1]!;
    }
  }
  if (prefixes.size > 1) throw new CheckpointError(`${ckpt.path}: layer ${L} has experts under more than one prefix: ${[...prefixes].join(", ")}`);
  const found = prefixes.size === 1 ? perExpertLayer(ckpt, [...prefixes][0]!, experts, options) : stackedPrefix !== undefined ? stackedLayer(ckpt, stackedPrefix, options) : undefined;
  if (found !== undefined) withRouter(ckpt, L, found);
  if (found === undefined) {
    const layers = new Set<number>();
    for (const name of ckpt.names()) {
      const m = /(?:^|\.)layers\.(\d+)\.(?:.*\.)?experts\./.exec(name);
      if (m !== null) layers.add(Number(m[1]));
    }
    const have = layers.size === 0 ? "no layer has experts" : `layers with experts: ${[...layers].sort((a, b) => a - b).join(", ")}`;
    throw new CheckpointError(`${ckpt.path}: no experts for layer ${L} (${have})`);
  }
  return found;
}

// The router's selection bias and options (ExpertLayerInfo.router), read into `reader`.
function withRouter(ckpt: Checkpoint, L: number, reader: ExpertLayerReader): void {
  const { info } = reader;
  const biasName = [...ckpt.names()].find((n) => new RegExp(`^(?:.*\\.)?layers\\.${L}\\.(?:.*\\.)?e_score_correction_bias$`).test(n));
  if (biasName !== undefined) {
    expectShape(ckpt, biasName, [info.numExperts]);
    info.selectionBias = biasName;
  }
  const c = ckpt.config;
  const scoring = c.scoring_func ?? (biasName !== undefined ? "sigmoid" : "softmax");
  if (scoring !== "softmax" && scoring !== "sigmoid") throw new CheckpointError(`${ckpt.path}: config.json's scoring_func ${String(scoring)} is not softmax or sigmoid`);
  // DeepSeek-V2's groups rank by their best choice; route's (DeepSeek-V3's) by their best two.
  if (c.topk_method === "group_limited_greedy" && (configNumber(ckpt, ["n_group"], true) ?? 1) > 1) {
    throw new CheckpointError(`${ckpt.path}: config.json's topk_method group_limited_greedy (groups ranked by their best expert) is not a router route() runs (it ranks groups by their best two)`);
  }
  const numGroups = configNumber(ckpt, ["n_group"], true) ?? 1;
  const topkGroups = configNumber(ckpt, ["topk_group"], true) ?? numGroups;
  const norm = c.norm_topk_prob ?? true;
  if (typeof norm !== "boolean") throw new CheckpointError(`${ckpt.path}: config.json's norm_topk_prob must be true or false, got ${describeValue(norm)}`);
  info.router = { scoring, numGroups, topkGroups, renormalize: norm, scale: configNumber(ckpt, ["routed_scaling_factor"]) ?? 1 };
  reader.readSelectionBias = () => (biasName === undefined ? undefined : ckpt.readF32(biasName));
}

// The first of `keys` config.json gives (null counts as absent). A value of another kind is an
// error naming the key: read as absent, it would load the layer with a default the model does not
// use (a routed_scaling_factor of "2.5" as 1).
function configNumber(ckpt: Checkpoint, keys: readonly string[], integer = false): number | undefined {
  for (const key of keys) {
    const v = ckpt.config[key];
    if (v === undefined || v === null) continue;
    const ok = typeof v === "number" && (integer ? Number.isSafeInteger(v) && v >= 1 : Number.isFinite(v));
    if (!ok) throw new CheckpointError(`${ckpt.path}: config.json's ${key} must be ${integer ? "an integer >= 1" : "a finite number"}, got ${describeValue(v)}`);
    return v as number;
  }
  return undefined;
}

// The activation config.json names (hidden_act, or mlp_hidden_act for Nemotron-H).
function configActivation(ckpt: Checkpoint, gated: boolean, override: Activation | undefined): Activation {
  if (override !== undefined) {
    if (isGated(override) !== gated) throw new CheckpointError(`${ckpt.path}: activation ${override} is ${isGated(override) ? "gated" : "not gated"}, the experts are ${gated ? "gated (gate and up projections)" : "not gated (no gate projection)"}`);
    return override;
  }
  const name = ckpt.config.mlp_hidden_act ?? ckpt.config.hidden_act;
  if (name === undefined) return gated ? "silu" : "squared_relu";
  const act = String(name);
  if (gated && (act === "silu" || act === "swish")) return "silu";
  // The library's gelu is the tanh form; the erf form differs from it by at most 4.8e-4.
  if (gated && (act === "gelu" || act === "gelu_new" || act === "gelu_pytorch_tanh" || act === "gelu_fast")) return "gelu";
  if (!gated && (act === "relu2" || act === "squared_relu")) return "squared_relu";
  throw new CheckpointError(`${ckpt.path}: config.json's activation ${act} is not one the library computes for ${gated ? "gated" : "non-gated"} experts (give an activation to override)`);
}

function configTopk(ckpt: Checkpoint): number | undefined {
  return configNumber(ckpt, ["num_experts_per_tok", "experts_per_token", "moe_topk"], true);
}

function checkExpertCount(ckpt: Checkpoint, count: number): void {
  const configured = configNumber(ckpt, ["num_experts", "num_local_experts", "n_routed_experts"], true);
  if (configured !== undefined && configured !== count) {
    throw new CheckpointError(`${ckpt.path}: the layer has ${count} experts, config.json says ${configured}`);
  }
}

function expectShape(ckpt: Checkpoint, name: string, shape: readonly number[]): void {
  const t = ckpt.tensor(name);
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
    throw new CheckpointError(`${ckpt.path}: ${name} has shape [${t.shape.join(", ")}], expected [${shape.join(", ")}]`);
  }
}

function perExpertLayer(ckpt: Checkpoint, prefix: string, experts: Map<string, Set<number>>, options: ExpertLayerOptions): ExpertLayerReader {
  const names = PER_EXPERT_NAMES.find(([gate, up, down]) => experts.has(up) && experts.has(down) && (gate === undefined || experts.has(gate)));
  if (experts.size === 0) throw new CheckpointError(`${ckpt.path}: ${prefix}.<e> holds no .weight tensors (quantized formats other than FP8 blocks are not read)`);
  if (names === undefined) {
    throw new CheckpointError(`${ckpt.path}: ${prefix}.<e> holds projections ${[...experts.keys()].sort().join(", ")}; expected gate_proj/up_proj/down_proj, w1/w3/w2 or up_proj/down_proj`);
  }
  const [gate, up, down] = names;
  const count = Math.max(...experts.get(down)!) + 1;
  for (const proj of names) {
    if (proj === undefined) continue;
    for (let e = 0; e < count; ++e) if (!experts.get(proj)!.has(e)) throw new CheckpointError(`${ckpt.path}: no tensor ${prefix}.${e}.${proj}.weight`);
  }
  checkExpertCount(ckpt, count);
  const weight = (e: number, proj: string) => `${prefix}.${e}.${proj}.weight`;
  const [ffn, hidden] = ckpt.tensor(weight(0, up)).shape as [number, number];
  if (ckpt.tensor(weight(0, up)).shape.length !== 2) throw new CheckpointError(`${ckpt.path}: ${weight(0, up)} is not a matrix`);
  const hasBias = ckpt.has(`${prefix}.0.${down}.bias`);
  for (let e = 0; e < count; ++e) {
    for (const proj of [gate, up]) if (proj !== undefined) expectShape(ckpt, weight(e, proj), [ffn, hidden]);
    expectShape(ckpt, weight(e, down), [hidden, ffn]);
    if (hasBias) {
      for (const proj of [gate, up]) if (proj !== undefined) expectShape(ckpt, `${prefix}.${e}.${proj}.bias`, [ffn]);
      expectShape(ckpt, `${prefix}.${e}.${down}.bias`, [hidden]);
    }
  }
  const activation = configActivation(ckpt, gate !== undefined, options.activation);
  const info: ExpertLayerInfo = {
    hidden,
    ffn,
    numExperts: count,
    activation,
    layout: "halves",
    topk: configTopk(ckpt),
    bias: hasBias,
    router: DEFAULT_ROUTER,
    source: `${prefix}.{e}.{${names.filter((n) => n !== undefined).join(",")}}`,
  };
  const blockSize = fp8BlockSize(ckpt);
  const readWeight = (e: number, proj: string): Uint16Array => {
    const name = weight(e, proj);
    if (ckpt.tensor(name).dtype !== "F8_E4M3") return ckpt.readBf16(name);
    const scaleName = `${prefix}.${e}.${proj}.weight_scale_inv`;
    if (!ckpt.has(scaleName)) throw new CheckpointError(`${ckpt.path}: ${name} is F8_E4M3 without ${scaleName}`);
    return dequantizeBlockFp8(ckpt, name, scaleName, blockSize);
  };
  return {
    info,
    readSelectionBias: () => undefined,
    read(e: number): ExpertWeights {
      checkExpert(e, count);
      const fc1 = new Uint16Array((gate === undefined ? 1 : 2) * ffn * hidden);
      if (gate !== undefined) fc1.set(readWeight(e, gate));
      fc1.set(readWeight(e, up), gate === undefined ? 0 : ffn * hidden);
      const result: ExpertWeights = { fc1, fc2: readWeight(e, down) };
      if (hasBias) {
        const parts = [gate, up].filter((p) => p !== undefined).map((p) => ckpt.readF32(`${prefix}.${e}.${p}.bias`));
        result.fc1Bias = new Float32Array(parts.length * ffn);
        parts.forEach((p, i) => result.fc1Bias!.set(p, i * ffn));
        result.fc2Bias = ckpt.readF32(`${prefix}.${e}.${down}.bias`);
      }
      return result;
    },
  };
}

function stackedLayer(ckpt: Checkpoint, prefix: string, options: ExpertLayerOptions): ExpertLayerReader {
  const gateUp = `${prefix}.gate_up_proj`;
  const down = `${prefix}.down_proj`;
  const a = ckpt.tensor(gateUp).shape;
  const b = ckpt.tensor(down).shape;
  if (a.length !== 3 || b.length !== 3 || a[0] !== b[0]) {
    throw new CheckpointError(`${ckpt.path}: ${gateUp} [${a.join(", ")}] and ${down} [${b.join(", ")}] are not stacks of the same experts`);
  }
  const count = a[0]!;
  // [in, out] (gpt-oss: x @ w): gate_up [E, H, 2I], down [E, I, H]. [out, in]: [E, 2I, H], [E, H, I].
  let hidden: number;
  let ffn: number;
  let transposed: boolean;
  if (a[2]! % 2 === 0 && b[1] === a[2]! / 2 && b[2] === a[1]) {
    [hidden, ffn, transposed] = [a[1]!, a[2]! / 2, true];
  } else if (a[1]! % 2 === 0 && b[2] === a[1]! / 2 && b[1] === a[2]) {
    [hidden, ffn, transposed] = [a[2]!, a[1]! / 2, false];
  } else {
    throw new CheckpointError(`${ckpt.path}: ${gateUp} [${a.join(", ")}] and ${down} [${b.join(", ")}] do not fit gate_up [E, H, 2I] with down [E, I, H], nor [E, 2I, H] with [E, H, I]`);
  }
  checkExpertCount(ckpt, count);
  const hasBias = ckpt.has(`${gateUp}_bias`);
  if (hasBias) {
    expectShape(ckpt, `${gateUp}_bias`, [count, 2 * ffn]);
    expectShape(ckpt, `${down}_bias`, [count, hidden]);
  }
  const gptOss = ckpt.config.model_type === "gpt_oss";
  const activation = options.activation ?? (gptOss ? "swiglu_oai" : configActivation(ckpt, true, undefined));
  if (!isGated(activation)) throw new CheckpointError(`${ckpt.path}: activation ${activation} is not gated, ${gateUp} holds gate and up`);
  const info: ExpertLayerInfo = {
    hidden,
    ffn,
    numExperts: count,
    activation,
    // gpt-oss alternates gate and up columns; other stacks put the gate half first.
    layout: gptOss ? "interleaved" : "halves",
    topk: configTopk(ckpt),
    bias: hasBias,
    router: DEFAULT_ROUTER,
    source: `${prefix}.{gate_up_proj,down_proj}${hasBias ? " (+ _bias)" : ""}${transposed ? " [in, out]" : ""}`,
  };
  if (activation === "swiglu_oai") {
    info.alpha = configNumber(ckpt, ["swiglu_alpha"]) ?? SWIGLU_OAI_DEFAULT_ALPHA;
    info.limit = configNumber(ckpt, ["swiglu_limit"]) ?? SWIGLU_OAI_DEFAULT_LIMIT;
  }
  return {
    info,
    readSelectionBias: () => undefined,
    read(e: number): ExpertWeights {
      checkExpert(e, count);
      let fc1 = ckpt.readBf16(gateUp, e, 1);
      let fc2 = ckpt.readBf16(down, e, 1);
      if (transposed) {
        fc1 = transpose(fc1, hidden, 2 * ffn);
        fc2 = transpose(fc2, ffn, hidden);
      }
      const result: ExpertWeights = { fc1, fc2 };
      if (hasBias) {
        result.fc1Bias = ckpt.readF32(`${gateUp}_bias`, e, 1);
        result.fc2Bias = ckpt.readF32(`${down}_bias`, e, 1);
      }
      return result;
    },
  };
}

function checkExpert(e: number, count: number): void {
  if (!Number.isSafeInteger(e) || e < 0 || e >= count) throw new CheckpointError(`expert ${e} is not in [0, ${count})`);
}

/** [rows, cols] -> [cols, rows]. */
function transpose(m: Uint16Array, rows: number, cols: number): Uint16Array {
  const out = new Uint16Array(m.length);
  for (let r = 0; r < rows; ++r) for (let c = 0; c < cols; ++c) out[c * rows + r] = m[r * cols + c]!;
  return out;
}

function fp8BlockSize(ckpt: Checkpoint): [number, number] {
  const q = ckpt.config.quantization_config;
  const size = typeof q === "object" && q !== null ? (q as Record<string, unknown>).weight_block_size : undefined;
  if (size === undefined || size === null) return [128, 128];
  if (Array.isArray(size) && size.length === 2 && size.every((d) => Number.isSafeInteger(d) && d > 0)) return size as [number, number];
  // Read as absent, another block size would dequantize every block with the wrong scale.
  throw new CheckpointError(`${ckpt.path}: config.json's quantization_config.weight_block_size must be two integers >= 1, got ${JSON.stringify(size)}`);
}

// e4m3 weight [out, in] times one f32 scale per block of [bo, bi] (the last blocks partial), in f32
// then rounded to bf16: (w.float() * scale).to(bfloat16). Within a block every element is one of
// 256 products, so each block converts through a table of them.
let e4m3Values: Float32Array | undefined;
function dequantizeBlockFp8(ckpt: Checkpoint, name: string, scaleName: string, [bo, bi]: [number, number]): Uint16Array {
  const [rows, cols] = ckpt.tensor(name).shape as [number, number];
  const scaleCols = Math.ceil(cols / bi);
  expectShape(ckpt, scaleName, [Math.ceil(rows / bo), scaleCols]);
  e4m3Values ??= Float32Array.from({ length: 256 }, (_, b) => e4m3ToF32(b));
  const data = ckpt.readBytes(name);
  const scale = ckpt.readF32(scaleName);
  const out = new Uint16Array(rows * cols);
  const products = new Float32Array(256);
  for (let r0 = 0; r0 < rows; r0 += bo) {
    for (let c0 = 0; c0 < cols; c0 += bi) {
      const s = scale[(r0 / bo) * scaleCols + c0 / bi]!;
      for (let b = 0; b < 256; ++b) products[b] = e4m3Values[b]! * s;
      const table = f32ToBf16(products);
      const cEnd = Math.min(c0 + bi, cols);
      for (let r = r0; r < Math.min(r0 + bo, rows); ++r) {
        for (let i = r * cols + c0, end = r * cols + cEnd; i < end; ++i) out[i] = table[data[i]!]!;
      }
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Loading onto a device

/** A layer's experts uploaded by `loadExpertLayer`; disposing it frees the weight tensors. */
export interface LoadedExpertLayer extends Disposable {
  /** The FusedMoE config it fits, less `topk` and `maxTokens`. */
  readonly config: Omit<FusedMoEConfig, "topk" | "maxTokens">;
  /** Experts per token, from config.json when it says. */
  readonly topk?: number;
  /** fc1 [E_local, N1, H] and fc2 [E_local, H, I] bf16, f32 biases when the checkpoint has them. */
  readonly weights: FusedMoEWeights;
  readonly info: ExpertLayerInfo;
  dispose(): void;
}

export interface LoadExpertLayerOptions extends ExpertLayerOptions {
  /** Experts held (expert parallelism): [localExpertStart, +numLocalExperts). Default all. */
  localExpertStart?: number;
  numLocalExperts?: number;
  /** Called after each expert is read and copied. */
  onProgress?: (done: number, total: number) => void;
}

/** The local expert range of `options` over a layer of `numExperts` experts. */
function localExperts(options: { localExpertStart?: number; numLocalExperts?: number }, numExperts: number): { start: number; count: number } {
  const start = options.localExpertStart ?? 0;
  const count = options.numLocalExperts ?? numExperts - start;
  if (!Number.isSafeInteger(start) || start < 0 || !Number.isSafeInteger(count) || count < 1 || start + count > numExperts) {
    throw new CheckpointError(`local experts [${start}, ${start + count}) do not fit the layer's ${numExperts} experts`);
  }
  return { start, count };
}

/**
 * Reads layer `options.layer`'s experts from the checkpoint at `path` (or an open Checkpoint) into
 * bf16 tensors on `ctx`, one expert at a time (host memory holds one expert, not the layer):
 *
 *   using layer = loadExpertLayer(ctx, "Qwen3-30B-A3B", { layer: 0 });
 *   using moe = new FusedMoE(ctx, { ...layer.config, topk: layer.topk ?? 8, maxTokens: 256 }, layer.weights);
 */
export function loadExpertLayer(ctx: Context, source: string | Checkpoint, options: LoadExpertLayerOptions): LoadedExpertLayer {
  const ckpt = typeof source === "string" ? Checkpoint.open(source) : source;
  const tensors: Tensor[] = [];
  try {
    const reader = openExpertLayer(ckpt, options);
    const { info } = reader;
    const { start, count } = localExperts(options, info.numExperts);
    const n1 = (isGated(info.activation) ? 2 : 1) * info.ffn;
    const alloc = <T extends Tensor>(t: T): T => (tensors.push(t), t);
    const fc1 = alloc(ctx.empty([count, n1, info.hidden], "bf16"));
    const fc2 = alloc(ctx.empty([count, info.hidden, info.ffn], "bf16"));
    const fc1Bias = info.bias ? alloc(ctx.empty([count, n1], "f32")) : undefined;
    const fc2Bias = info.bias ? alloc(ctx.empty([count, info.hidden], "f32")) : undefined;
    const transfer = ctx._transferStream();
    for (let i = 0; i < count; ++i) {
      const w = reader.read(start + i);
      fc1.view(i * n1 * info.hidden, [n1, info.hidden]).copyFrom(w.fc1, transfer);
      fc2.view(i * info.hidden * info.ffn, [info.hidden, info.ffn]).copyFrom(w.fc2, transfer);
      fc1Bias?.view(i * n1, [n1]).copyFrom(w.fc1Bias!, transfer);
      fc2Bias?.view(i * info.hidden, [info.hidden]).copyFrom(w.fc2Bias!, transfer);
      // One expert's host copies in flight at a time.
      transfer.synchronize();
      options.onProgress?.(i + 1, count);
    }
    const config: LoadedExpertLayer["config"] = {
      hidden: info.hidden,
      ffn: info.ffn,
      numExperts: info.numExperts,
      numLocalExperts: count,
      localExpertStart: start,
      activation: info.activation,
      layout: info.layout,
      ...(info.alpha === undefined ? {} : { alpha: info.alpha }),
      ...(info.limit === undefined ? {} : { limit: info.limit }),
      router: info.router,
    };
    const bias = reader.readSelectionBias();
    const selectionBias = bias === undefined ? undefined : alloc(ctx.upload(bias, [info.numExperts], "f32"));
    const dispose = () => {
      for (const t of tensors) t.dispose();
    };
    return { config, topk: info.topk, weights: { fc1, fc2, fc1Bias, fc2Bias, selectionBias }, info, dispose, [Symbol.dispose]: dispose };
  } catch (err) {
    for (const t of tensors) t.dispose();
    throw err;
  } finally {
    if (typeof source === "string") ckpt.close();
  }
}


// ------------------------------------------------------------------------------------------------
// A layer file

/**
 * Writes layer `options.layer`'s experts (the local range of the options) to `output` as a
 * layer file for `fused-moe serve --layer` and `FusedMoE`: fc1 [E_local, N1, H] and fc2
 * [E_local, H, I] BF16, fc1_bias and fc2_bias F32 when the experts have biases, and metadata that
 * names the activation, the layout, the expert range, top-k and the router (and its selection
 * bias as `selection_bias` F32 [numExperts] when it has one). Streams one expert at a time,
 * into `output.partial`, renamed to `output` once complete.
 */
export function writeExpertLayer(source: string | Checkpoint, output: string, options: LoadExpertLayerOptions): { info: ExpertLayerInfo; start: number; count: number; bytes: number } {
  const ckpt = typeof source === "string" ? Checkpoint.open(source) : source;
  const partial = `${output}.partial`;
  let fd: number | undefined;
  try {
    const reader = openExpertLayer(ckpt, options);
    const { info } = reader;
    const { start, count } = localExperts(options, info.numExperts);
    const n1 = (isGated(info.activation) ? 2 : 1) * info.ffn;
    const H = info.hidden;
    const parts = [
      { name: "fc1", dtype: "BF16", shape: [count, n1, H], bytes: count * n1 * H * 2 },
      { name: "fc2", dtype: "BF16", shape: [count, H, info.ffn], bytes: count * H * info.ffn * 2 },
      ...(info.bias
        ? [
            { name: "fc1_bias", dtype: "F32", shape: [count, n1], bytes: count * n1 * 4 },
            { name: "fc2_bias", dtype: "F32", shape: [count, H], bytes: count * H * 4 },
          ]
        : []),
    ];
    const selectionBias = reader.readSelectionBias();
    if (selectionBias !== undefined) parts.push({ name: "selection_bias", dtype: "F32", shape: [info.numExperts], bytes: selectionBias.byteLength });
    const header = safetensorsHeader(parts, layerMetadata(info, start, `${ckpt.path} layer ${options.layer}`));
    const partStart: number[] = [];
    let at = header.length;
    for (const p of parts) {
      partStart.push(at);
      at += p.bytes;
    }
    fd = openSync(partial, "w");
    writeAll(fd, header, 0);
    for (let i = 0; i < count; ++i) {
      const w = reader.read(start + i);
      [w.fc1, w.fc2, w.fc1Bias, w.fc2Bias].forEach((data, p) => {
        if (data === undefined) return;
        writeAll(fd!, new Uint8Array(data.buffer, data.byteOffset, data.byteLength), partStart[p]! + i * data.byteLength);
      });
      options.onProgress?.(i + 1, count);
    }
    if (selectionBias !== undefined) writeAll(fd, new Uint8Array(selectionBias.buffer, selectionBias.byteOffset, selectionBias.byteLength), partStart[parts.length - 1]!);
    closeSync(fd);
    fd = undefined;
    renameSync(partial, output);
    return { info, start, count, bytes: at };
  } catch (err) {
    if (fd !== undefined) closeSync(fd);
    rmSync(partial, { force: true });
    throw err;
  } finally {
    if (typeof source === "string") ckpt.close();
  }
}

/** The metadata of a layer file: what `fused-moe serve` needs besides the weights. */
function layerMetadata(info: ExpertLayerInfo, localExpertStart: number, source: string): Record<string, string> {
  const m: Record<string, string> = {
    activation: info.activation,
    layout: info.layout,
    num_experts: String(info.numExperts),
    local_expert_start: String(localExpertStart),
    source,
  };
  if (info.topk !== undefined) m.topk = String(info.topk);
  if (info.alpha !== undefined) m.alpha = String(info.alpha);
  if (info.limit !== undefined) m.limit = String(info.limit);
  const r = info.router;
  Object.assign(m, {
    router_scoring: r.scoring,
    router_num_groups: String(r.numGroups),
    router_topk_groups: String(r.topkGroups),
    router_renormalize: String(r.renormalize),
    router_scale: String(r.scale),
  });
  return m;
}

function writeAll(fd: number, bytes: Uint8Array, position: number): void {
  let done = 0;
  while (done < bytes.length) done += writeSync(fd, bytes, done, Math.min(READ_CHUNK, bytes.length - done), position + done);
}
