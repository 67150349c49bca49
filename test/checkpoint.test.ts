// Expert weights from Hugging Face style checkpoints (lib/checkpoint.ts), on checkpoints written
// here with fresh random weights: each naming scheme, each stored dtype, sharded and single-file.
// - The stacked layer must hold each expert's tensors bit for bit (BF16), or their conversion by
//   an independent route (F32 and F16 through the engine's own Float16Array and f32ToBf16; FP8
//   blocks as e4m3 value times the block's scale, in f32, rounded once).
// - A layer loaded this way computes what the model's own formula gives: per token and expert, the
//   expert MLP written out in f64 from the checkpoint's tensors (gate/up halves, gpt-oss's
//   alternating columns, clamps and biases), within TOLERANCE.bf16 (relative Frobenius; the
//   library rounds FC1's output and the activation to bf16 as the model does).
// - A bad checkpoint throws CheckpointError naming the file, the tensor or the layer.
import { describe, expect } from "bun:test";
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  Checkpoint,
  CheckpointError,
  e4m3ToF32,
  f32ToBf16,
  FusedMoE,
  loadExpertLayer,
  openExpertLayer,
  readSafetensors,
  reference as R,
  type Rng,
  TOLERANCE,
  writeExpertLayer,
  writeSafetensors,
} from "../lib/index.ts";
import { bf16ToF32 } from "../lib/dtype.ts";
import {
  expectBitExact,
  expectClose,
  expectNonZero,
  perExpertWeights,
  putGatedExperts,
  randBf16,
  type RawTensor,
  seededTest,
  suiteContext,
  suiteTempDir,
  type Tensors,
  writeCheckpoint,
} from "./helpers.ts";

const ROOT = join(import.meta.dir, "..");

const bf16 = (shape: number[], data: Uint16Array): RawTensor => ({ dtype: "BF16", shape, data });
const f32 = (shape: number[], data: Float32Array): RawTensor => ({ dtype: "F32", shape, data });
const randF32 = (rng: Rng, n: number, std: number) => Float32Array.from({ length: n }, () => rng.normal() * std);

const silu = (x: number) => x / (1 + Math.exp(-x));

/** out[t] = sum_k probs[t,k] * expert(routing[t,k])(x[t]) in f64, for the experts this checks. */
function direct(T: number, H: number, topk: number, hidden: Uint16Array, routing: Int32Array, probs: Float32Array, expert: (e: number, x: Float64Array) => Float64Array | undefined): Float64Array {
  const out = new Float64Array(T * H);
  for (let t = 0; t < T; ++t) {
    const x = Float64Array.from(hidden.subarray(t * H, (t + 1) * H), (b) => bf16ToF32(b));
    for (let k = 0; k < topk; ++k) {
      const y = expert(routing[t * topk + k]!, x);
      if (y !== undefined) for (let i = 0; i < H; ++i) out[t * H + i]! += probs[t * topk + k]! * y[i]!;
    }
  }
  return out;
}

/** W x for W [rows, cols] given as bf16 bits, row-major. */
function matvec(w: Uint16Array, rows: number, cols: number, x: Float64Array): Float64Array {
  const y = new Float64Array(rows);
  for (let r = 0; r < rows; ++r) {
    let s = 0;
    for (let c = 0; c < cols; ++c) s += bf16ToF32(w[r * cols + c]!) * x[c]!;
    y[r] = s;
  }
  return y;
}

/** Random tokens routed over `numExperts` global experts, probs renormalised. */
function tokens(rng: Rng, T: number, H: number, topk: number, numExperts: number) {
  const hidden = randBf16(rng, T * H);
  const routing = new Int32Array(T * topk);
  const probs = new Float32Array(T * topk);
  for (let t = 0; t < T; ++t) {
    const ids = new Set<number>();
    while (ids.size < topk) ids.add(rng.int(numExperts));
    [...ids].forEach((e, k) => (routing[t * topk + k] = e));
    const w = Array.from({ length: topk }, () => Math.exp(rng.normal()));
    const sum = w.reduce((a, b) => a + b, 0);
    w.forEach((v, k) => (probs[t * topk + k] = v / sum));
  }
  return { hidden, routing, probs };
}

describe("checkpoints", () => {
  const dir = suiteTempDir("fused-moe-ckpt-");
  const ctx = suiteContext("host");
  let n = 0;
  const fresh = () => join(dir(), `c${n++}`);

  seededTest("Qwen-style gate_proj/up_proj/down_proj in 3 shards: experts stacked bit for bit, a slice of them computes the model's MLP", (rng) => {
    const [E, H, I, L] = [6, 64, 32, 1];
    const experts = perExpertWeights(rng, E, H, I, true);
    const tensors: Tensors = {};
    for (const layer of [L, 12]) {
      // Layer 12's experts differ (a name match on "layers.1" would read them); shared experts and
      // the router are not routed experts.
      putGatedExperts(tensors, layer, layer === L ? experts : perExpertWeights(rng, E, H, I, true), H, I);
      tensors[`model.layers.${layer}.mlp.shared_experts.gate_proj.weight`] = bf16([I, H], randBf16(rng, I * H));
      tensors[`model.layers.${layer}.mlp.gate.weight`] = bf16([E, H], randBf16(rng, E * H));
    }
    const path = writeCheckpoint(fresh(), tensors, { shards: 3, config: { model_type: "qwen3_moe", hidden_act: "silu", num_experts: E, num_experts_per_tok: 2 } });

    using ckpt = Checkpoint.open(path);
    const reader = openExpertLayer(ckpt, { layer: L });
    expect(reader.info).toMatchObject({ hidden: H, ffn: I, numExperts: E, activation: "silu", layout: "halves", topk: 2, bias: false });
    for (let e = 0; e < E; ++e) {
      const w = reader.read(e);
      expectBitExact(w.fc1.subarray(0, I * H), experts[e]!.gate!, `expert ${e} gate`);
      expectBitExact(w.fc1.subarray(I * H), experts[e]!.up, `expert ${e} up`);
      expectBitExact(w.fc2, experts[e]!.down, `expert ${e} down`);
    }

    const x = ctx();
    const before = x.liveAllocations().count;
    const progress: number[] = [];
    {
      using layer = loadExpertLayer(x, ckpt, { layer: L, localExpertStart: 2, numLocalExperts: 3, onProgress: (done) => progress.push(done) });
      expect(progress).toEqual([1, 2, 3]);
      expect(layer.config).toMatchObject({ hidden: H, ffn: I, numExperts: E, numLocalExperts: 3, localExpertStart: 2, activation: "silu", layout: "halves" });
      expect(layer.topk).toBe(2);
      const fc1 = layer.weights.fc1.download() as Uint16Array;
      for (let i = 0; i < 3; ++i) expectBitExact(fc1.subarray(i * 2 * I * H, (i + 1) * 2 * I * H), Uint16Array.from([...experts[2 + i]!.gate!, ...experts[2 + i]!.up]), `loaded fc1 ${i}`);

      const T = 9;
      const { hidden, routing, probs } = tokens(rng, T, H, 2, E);
      using moe = new FusedMoE(x, { ...layer.config, topk: layer.topk!, maxTokens: T }, layer.weights);
      using h = x.upload(hidden, [T, H], "bf16");
      using r = x.upload(routing, [T, 2]);
      using p = x.upload(probs, [T, 2]);
      using out = moe.forward({ hidden: h, routingMap: r, probs: p });
      const want = direct(T, H, 2, hidden, routing, probs, (e, v) => {
        if (e < 2 || e >= 5) return undefined; // another rank's experts
        const w = experts[e]!;
        const g = matvec(w.gate!, I, H, v);
        const u = matvec(w.up, I, H, v);
        return matvec(w.down, H, I, g.map((gi, i) => silu(gi) * u[i]!));
      });
      expectNonZero(want, "model formula");
      expectClose(out.toFloat32(), want, TOLERANCE.bf16, "slice of the layer against the model's formula");
    }
    expect(x.liveAllocations().count).toBe(before);
  });

  seededTest("Mixtral-style w1/w3/w2 stored as F32, one file without config.json: rounded to bf16, gate first", (rng) => {
    const [E, H, I] = [3, 48, 40];
    const tensors: Tensors = {};
    const raw = Array.from({ length: E }, () => ({ w1: randF32(rng, I * H, 0.2), w3: randF32(rng, I * H, 0.2), w2: randF32(rng, H * I, 0.2) }));
    raw.forEach((w, e) => {
      const p = `model.layers.0.block_sparse_moe.experts.${e}`;
      tensors[`${p}.w1.weight`] = f32([I, H], w.w1);
      tensors[`${p}.w2.weight`] = f32([H, I], w.w2);
      tensors[`${p}.w3.weight`] = f32([I, H], w.w3);
    });
    const file = join(writeCheckpoint(fresh(), tensors), "model.safetensors");
    using ckpt = Checkpoint.open(file);
    const reader = openExpertLayer(ckpt, { layer: 0 });
    expect(reader.info).toMatchObject({ hidden: H, ffn: I, numExperts: E, activation: "silu", layout: "halves", bias: false });
    expect(reader.info.topk).toBeUndefined();
    for (let e = 0; e < E; ++e) {
      const w = reader.read(e);
      expectBitExact(w.fc1, Uint16Array.from([...f32ToBf16(raw[e]!.w1), ...f32ToBf16(raw[e]!.w3)]), `expert ${e} fc1`);
      expectBitExact(w.fc2, f32ToBf16(raw[e]!.w2), `expert ${e} fc2`);
    }
  });

  seededTest("Nemotron-H-style up_proj/down_proj in F16 with relu2: squared_relu, F16 rounded to bf16 (subnormals, infinities, NaN included)", (rng) => {
    const [E, H, I] = [4, 32, 24];
    const tensors: Tensors = {};
    const raw = Array.from({ length: E }, () => ({
      up: Uint16Array.from({ length: I * H }, () => rng.int(65536)),
      down: Uint16Array.from({ length: H * I }, () => rng.int(65536)),
    }));
    raw[0]!.up.set([0x0001, 0x03ff, 0x7c00, 0xfc00, 0x7e00, 0xfe01, 0x7c01, 0x7bff, 0x8000, 0x3c01]);
    raw.forEach((w, e) => {
      const p = `backbone.layers.5.mixer.experts.${e}`;
      tensors[`${p}.up_proj.weight`] = { dtype: "F16", shape: [I, H], data: w.up };
      tensors[`${p}.down_proj.weight`] = { dtype: "F16", shape: [H, I], data: w.down };
    });
    const path = writeCheckpoint(fresh(), tensors, { shards: 2, config: { model_type: "nemotron_h", mlp_hidden_act: "relu2", n_routed_experts: E, num_experts_per_tok: 6 } });
    using ckpt = Checkpoint.open(path);
    const reader = openExpertLayer(ckpt, { layer: 5 });
    expect(reader.info).toMatchObject({ hidden: H, ffn: I, numExperts: E, activation: "squared_relu", topk: 6 });
    // A NaN becomes the quiet NaN of its sign (the engine's route may drop the sign).
    const isNaN16 = (h: number) => (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
    const viaEngine = (bits: Uint16Array) =>
      f32ToBf16(Float32Array.from(new Float16Array(bits.buffer, bits.byteOffset, bits.length))).map((b, i) => (isNaN16(bits[i]!) ? (bits[i]! & 0x8000 ? 0xffc0 : 0x7fc0) : b));
    for (let e = 0; e < E; ++e) {
      const w = reader.read(e);
      expectBitExact(w.fc1, viaEngine(raw[e]!.up), `expert ${e} fc1`);
      expectBitExact(w.fc2, viaEngine(raw[e]!.down), `expert ${e} fc2`);
    }
  });

  seededTest("gpt-oss stacked gate_up_proj [E, H, 2I] with biases: transposed, interleaved swiglu_oai, computes gpt-oss's expert formula", (rng) => {
    const [E, H, I, topk] = [5, 32, 16, 2];
    const gateUp = randBf16(rng, E * H * 2 * I, 1 / Math.sqrt(H));
    const gateUpBias = randBf16(rng, E * 2 * I, 0.5);
    const down = randBf16(rng, E * I * H, 1 / Math.sqrt(I));
    const downBias = randBf16(rng, E * H, 0.5);
    const p = "model.layers.3.mlp.experts";
    const path = writeCheckpoint(
      fresh(),
      {
        [`${p}.gate_up_proj`]: bf16([E, H, 2 * I], gateUp),
        [`${p}.gate_up_proj_bias`]: bf16([E, 2 * I], gateUpBias),
        [`${p}.down_proj`]: bf16([E, I, H], down),
        [`${p}.down_proj_bias`]: bf16([E, H], downBias),
        "model.layers.3.mlp.router.weight": bf16([E, H], randBf16(rng, E * H)),
      },
      { shards: 2, config: { model_type: "gpt_oss", num_local_experts: E, experts_per_token: topk, swiglu_limit: 7.0 } },
    );
    const x = ctx();
    using layer = loadExpertLayer(x, path, { layer: 3 });
    expect(layer.config).toMatchObject({ hidden: H, ffn: I, numExperts: E, activation: "swiglu_oai", layout: "interleaved", alpha: 1.702, limit: 7 });
    expect(layer.topk).toBe(topk);
    expect(layer.info.bias).toBe(true);

    const T = 11;
    const { hidden, routing, probs } = tokens(rng, T, H, topk, E);
    using moe = new FusedMoE(x, { ...layer.config, topk, maxTokens: T }, layer.weights);
    using h = x.upload(hidden, [T, H], "bf16");
    using r = x.upload(routing, [T, topk]);
    using pr = x.upload(probs, [T, topk]);
    using out = moe.forward({ hidden: h, routingMap: r, probs: pr });
    // transformers' GptOssExperts: gate_up = x @ gate_up_proj[e] + bias; gate = gate_up[::2],
    // up = gate_up[1::2]; gate <= limit, -limit <= up <= limit; glu = gate * sigmoid(alpha gate);
    // y = ((up + 1) * glu) @ down_proj[e] + bias.
    const want = direct(T, H, topk, hidden, routing, probs, (e, v) => {
        const gu = new Float64Array(2 * I);
        for (let n = 0; n < 2 * I; ++n) {
          let s = bf16ToF32(gateUpBias[e * 2 * I + n]!);
          for (let k = 0; k < H; ++k) s += v[k]! * bf16ToF32(gateUp[(e * H + k) * 2 * I + n]!);
          gu[n] = s;
        }
        const a = new Float64Array(I);
        for (let i = 0; i < I; ++i) {
          const g = Math.min(gu[2 * i]!, 7);
          const u = Math.max(-7, Math.min(gu[2 * i + 1]!, 7));
          a[i] = (u + 1) * g / (1 + Math.exp(-1.702 * g));
        }
        const y = new Float64Array(H);
        for (let o = 0; o < H; ++o) {
          let s = bf16ToF32(downBias[e * H + o]!);
          for (let i = 0; i < I; ++i) s += a[i]! * bf16ToF32(down[(e * I + i) * H + o]!);
          y[o] = s;
        }
        return y;
      });
    expectNonZero(want, "gpt-oss formula");
    expectClose(out.toFloat32(), want, TOLERANCE.bf16, "layer against gpt-oss's formula");
  });

  seededTest("stacked [out, in] gate_up_proj without model_type: halves, silu, read as stored", (rng) => {
    const [E, H, I] = [3, 16, 8];
    const gateUp = randBf16(rng, E * 2 * I * H);
    const down = randBf16(rng, E * H * I);
    const p = "model.language_model.layers.0.mlp.experts";
    const path = writeCheckpoint(fresh(), { [`${p}.gate_up_proj`]: bf16([E, 2 * I, H], gateUp), [`${p}.down_proj`]: bf16([E, H, I], down) }, { config: { hidden_act: "silu" } });
    using ckpt = Checkpoint.open(path);
    const reader = openExpertLayer(ckpt, { layer: 0 });
    expect(reader.info).toMatchObject({ hidden: H, ffn: I, numExperts: E, activation: "silu", layout: "halves", bias: false });
    for (let e = 0; e < E; ++e) {
      expectBitExact(reader.read(e).fc1, gateUp.subarray(e * 2 * I * H, (e + 1) * 2 * I * H), `expert ${e} fc1`);
      expectBitExact(reader.read(e).fc2, down.subarray(e * H * I, (e + 1) * H * I), `expert ${e} fc2`);
    }
  });

  seededTest("DeepSeek-style FP8 weights with weight_scale_inv blocks (partial edge blocks): e4m3 value times its block's scale, rounded to bf16", (rng) => {
    // Blocks of 8 rows by 16 columns: not square, so rows and columns cannot be confused.
    const [E, H, I, bo, bi] = [2, 40, 24, 8, 16];
    const tensors: Tensors = {};
    const raw: Record<string, { data: Uint8Array; scale: Float32Array; rows: number; cols: number }> = {};
    for (let e = 0; e < E; ++e) {
      for (const [proj, rows, cols] of [["gate_proj", I, H], ["up_proj", I, H], ["down_proj", H, I]] as const) {
        // Every e4m3 code but the two NaNs.
        const data = Uint8Array.from({ length: rows * cols }, () => { const b = rng.int(254); return b >= 0x7f ? b + 1 : b; });
        const scale = Float32Array.from({ length: Math.ceil(rows / bo) * Math.ceil(cols / bi) }, () => 2 ** (rng.int(10) - 12) * (1 + rng.uniform()));
        const name = `model.layers.4.mlp.experts.${e}.${proj}`;
        raw[name] = { data, scale, rows, cols };
        tensors[`${name}.weight`] = { dtype: "F8_E4M3", shape: [rows, cols], data };
        tensors[`${name}.weight_scale_inv`] = f32([Math.ceil(rows / bo), Math.ceil(cols / bi)], scale);
      }
    }
    const path = writeCheckpoint(fresh(), tensors, { shards: 2, config: { model_type: "deepseek_v3", hidden_act: "silu", n_routed_experts: E, quantization_config: { quant_method: "fp8", weight_block_size: [bo, bi] } } });
    using ckpt = Checkpoint.open(path);
    const reader = openExpertLayer(ckpt, { layer: 4 });
    const expected = (name: string) => {
      const { data, scale, rows, cols } = raw[name]!;
      const sc = Math.ceil(cols / bi);
      return Uint16Array.from({ length: rows * cols }, (_, i) => {
        const [r, c] = [Math.floor(i / cols), i % cols];
        return f32ToBf16(Math.fround(e4m3ToF32(data[i]!) * scale[Math.floor(r / bo) * sc + Math.floor(c / bi)]!));
      });
    };
    for (let e = 0; e < E; ++e) {
      const w = reader.read(e);
      const p = `model.layers.4.mlp.experts.${e}`;
      expectBitExact(w.fc1, Uint16Array.from([...expected(`${p}.gate_proj`), ...expected(`${p}.up_proj`)]), `expert ${e} fc1`);
      expectBitExact(w.fc2, expected(`${p}.down_proj`), `expert ${e} fc2`);
    }
  });

  seededTest("a DeepSeek-V3-style router (sigmoid, e_score_correction_bias, groups, scale): read from config.json, loaded, written, and routing the layer's logits", (rng) => {
    const [E, H, I, topk] = [16, 32, 16, 4];
    const experts = perExpertWeights(rng, E, H, I, true);
    const bias = Float32Array.from({ length: E }, () => rng.normal() * 0.1);
    const tensors: Tensors = { "model.layers.3.mlp.gate.e_score_correction_bias": f32([E], bias), "model.layers.3.mlp.gate.weight": bf16([E, H], randBf16(rng, E * H)) };
    putGatedExperts(tensors, 3, experts, H, I);
    const config = { model_type: "deepseek_v3", hidden_act: "silu", n_routed_experts: E, num_experts_per_tok: topk, scoring_func: "sigmoid", n_group: 4, topk_group: 2, norm_topk_prob: true, routed_scaling_factor: 2.5 };
    const path = writeCheckpoint(fresh(), tensors, { shards: 2, config });
    const router = { scoring: "sigmoid", numGroups: 4, topkGroups: 2, renormalize: true, scale: 2.5 } as const;
    const x = ctx();
    using layer = loadExpertLayer(x, path, { layer: 3 });
    expect(layer.config.router).toEqual(router);
    expectBitExact(layer.weights.selectionBias!.download(), bias, "selection bias");
    const output = join(dir(), "router.safetensors");
    writeExpertLayer(path, output, { layer: 3 });
    const file = readSafetensors(output);
    expectBitExact(file.tensors.get("selection_bias")!.data, bias, "selection_bias in the layer file");
    expect(file.metadata).toMatchObject({ router_scoring: "sigmoid", router_num_groups: "4", router_topk_groups: "2", router_renormalize: "true", router_scale: "2.5" });
    // Without the bias or config.json's router keys: softmax, renormalized (Qwen, Mixtral).
    delete tensors["model.layers.3.mlp.gate.e_score_correction_bias"];
    using plain = Checkpoint.open(writeCheckpoint(fresh(), tensors, { config: { hidden_act: "silu", norm_topk_prob: false } }));
    const info = openExpertLayer(plain, { layer: 3 }).info;
    expect(info.router).toEqual({ scoring: "softmax", numGroups: 1, topkGroups: 1, renormalize: false, scale: 1 });
    expect(info.selectionBias).toBeUndefined();

    const T = 13;
    const logits = Float32Array.from({ length: T * E }, () => rng.normal() * 2);
    const hidden = randBf16(rng, T * H);
    using moe = new FusedMoE(x, { ...layer.config, topk, maxTokens: T }, layer.weights);
    using h = x.upload(hidden, [T, H], "bf16");
    using l = x.upload(logits, [T, E], "f32");
    using out = moe.forward({ hidden: h, routerLogits: l });
    const routed = R.route({ logits, numTokens: T, numExperts: E, topk, ...router, selectionBias: bias });
    const want = direct(T, H, topk, hidden, routed.routingMap, routed.probs, (e, v) => {
      const w = experts[e]!;
      const g = matvec(w.gate!, I, H, v);
      const u = matvec(w.up, I, H, v);
      return matvec(w.down, H, I, g.map((gi, i) => silu(gi) * u[i]!));
    });
    expectNonZero(want, "model formula");
    expectClose(out.toFloat32(), want, TOLERANCE.bf16, "layer routed by its checkpoint's router");
  });

  seededTest("writeExpertLayer: the layer file holds what loadExpertLayer uploads, with the metadata serve reads; biases as F32", (rng) => {
    const [E, H, I] = [5, 16, 8];
    const tensors: Tensors = {};
    const experts = perExpertWeights(rng, E, H, I, true);
    const biases = experts.map(() => ({ gate: randBf16(rng, I), up: randBf16(rng, I), down: randBf16(rng, H) }));
    experts.forEach((w, e) => {
      const p = `model.layers.7.mlp.experts.${e}`;
      tensors[`${p}.gate_proj.weight`] = bf16([I, H], w.gate!);
      tensors[`${p}.gate_proj.bias`] = bf16([I], biases[e]!.gate);
      tensors[`${p}.up_proj.weight`] = bf16([I, H], w.up);
      tensors[`${p}.up_proj.bias`] = bf16([I], biases[e]!.up);
      tensors[`${p}.down_proj.weight`] = bf16([H, I], w.down);
      tensors[`${p}.down_proj.bias`] = bf16([H], biases[e]!.down);
    });
    const path = writeCheckpoint(fresh(), tensors, { shards: 4, config: { hidden_act: "gelu_pytorch_tanh", num_experts: E, num_experts_per_tok: 3 } });
    const output = join(dir(), "layer7.safetensors");
    const written = writeExpertLayer(path, output, { layer: 7, localExpertStart: 1, numLocalExperts: 3 });
    expect(written).toMatchObject({ start: 1, count: 3 });
    expect(existsSync(`${output}.partial`)).toBe(false);
    const { tensors: file, metadata } = readSafetensors(output);
    expect(metadata).toMatchObject({ activation: "gelu", layout: "halves", num_experts: String(E), local_expert_start: "1", topk: "3" });
    expect([...file.keys()].sort()).toEqual(["fc1", "fc1_bias", "fc2", "fc2_bias"]);
    const x = ctx();
    using layer = loadExpertLayer(x, path, { layer: 7, localExpertStart: 1, numLocalExperts: 3 });
    expect(file.get("fc1")!.shape).toEqual([3, 2 * I, H]);
    expectBitExact(file.get("fc1")!.data, layer.weights.fc1.download(), "fc1");
    expectBitExact(file.get("fc2")!.data, layer.weights.fc2.download(), "fc2");
    expectBitExact(file.get("fc1_bias")!.data, layer.weights.fc1Bias!.download(), "fc1_bias");
    expectBitExact(file.get("fc2_bias")!.data, layer.weights.fc2Bias!.download(), "fc2_bias");
    expectBitExact(file.get("fc1_bias")!.data, bf16ToF32(Uint16Array.from([1, 2, 3].flatMap((e) => [...biases[e]!.gate, ...biases[e]!.up]))), "fc1_bias values");
    expectBitExact(file.get("fc2_bias")!.data, bf16ToF32(Uint16Array.from([1, 2, 3].flatMap((e) => [...biases[e]!.down]))), "fc2_bias values");
    // The reference on the file's own tensors: biases and the gelu mapping wired through.
    const T = 6;
    const { hidden, routing, probs } = tokens(rng, T, H, 3, E);
    using moe = new FusedMoE(x, { ...layer.config, topk: 3, maxTokens: T }, layer.weights);
    using h = x.upload(hidden, [T, H], "bf16");
    using r = x.upload(routing, [T, 3]);
    using pr = x.upload(probs, [T, 3]);
    using out = moe.forward({ hidden: h, routingMap: r, probs: pr });
    const ref = R.fusedMoe(
      { hidden: H, ffn: I, numExperts: E, numLocalExperts: 3, localExpertStart: 1, topk: 3, activation: "gelu" },
      { fc1: file.get("fc1")!.data as Uint16Array, fc2: file.get("fc2")!.data as Uint16Array, fc1Bias: file.get("fc1_bias")!.data as Float32Array, fc2Bias: file.get("fc2_bias")!.data as Float32Array },
      { hidden, numTokens: T, routingMap: routing, probs },
    );
    expectNonZero(ref.out, "reference");
    expectClose(out.toFloat32(), ref.out, TOLERANCE.bf16, "layer from the file's tensors");
  });

  // A Qwen-style layer 1 of 4 experts (H 8, I 4), then `mutate` breaks it.
  function broken(rng: Rng, mutate: (t: Tensors, config: Record<string, unknown>) => void, shards = 1): string {
    const tensors: Tensors = {};
    const config: Record<string, unknown> = { hidden_act: "silu", num_experts: 4 };
    putGatedExperts(tensors, 1, perExpertWeights(rng, 4, 8, 4, true), 8, 4);
    mutate(tensors, config);
    return writeCheckpoint(fresh(), tensors, { shards, config });
  }
  const P = "model.layers.1.mlp.experts";
  const BAD: [string, (t: Tensors, c: Record<string, unknown>) => void, { layer?: number; activation?: "squared_relu"; localExpertStart?: number; numLocalExperts?: number }, RegExp][] = [
    ["an expert's projection missing", (t) => delete t[`${P}.2.up_proj.weight`], {}, /no tensor model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight/],
    ["an expert of another shape", (t) => (t[`${P}.3.down_proj.weight`] = bf16([4, 8], new Uint16Array(32))), {}, /experts\.3\.down_proj\.weight has shape \[4, 8\], expected \[8, 4\]/],
    ["no such layer", () => {}, { layer: 5 }, /no experts for layer 5 \(layers with experts: 1\)/],
    ["config.json's expert count differs", (_, c) => (c.num_experts = 8), {}, /4 experts, config\.json says 8/],
    ["an activation config.json names that the library lacks", (_, c) => (c.hidden_act = "relu"), {}, /activation relu is not one the library computes/],
    ["DeepSeek-V2's group-limited greedy router", (_, c) => Object.assign(c, { topk_method: "group_limited_greedy", n_group: 2, topk_group: 1 }), {}, /group_limited_greedy/],
    ["a scoring function route() lacks", (_, c) => (c.scoring_func = "sqrtsoftplus"), {}, /scoring_func sqrtsoftplus/],
    ["a non-gated activation for gated experts", () => {}, { activation: "squared_relu" }, /squared_relu is not gated/],
    ["local experts past the layer's", () => {}, { localExpertStart: 2, numLocalExperts: 3 }, /local experts \[2, 5\) do not fit the layer's 4 experts/],
    ["unknown projection names", (t) => { for (const e of [0, 1, 2, 3]) { t[`${P}.${e}.fc_in.weight`] = t[`${P}.${e}.up_proj.weight`]!; delete t[`${P}.${e}.up_proj.weight`]; } }, {}, /holds projections down_proj, fc_in, gate_proj; expected/],
    ["GPTQ-style quantized experts", (t) => { for (const name of Object.keys(t)) { t[name.replace(/weight$/, "qweight")] = t[name]!; delete t[name]; } }, {}, /holds no \.weight tensors/],
    ["FP8 weights without their scales", (t) => (t[`${P}.0.gate_proj.weight`] = { dtype: "F8_E4M3", shape: [4, 8], data: new Uint8Array(32) }), {}, /F8_E4M3 without .*experts\.0\.gate_proj\.weight_scale_inv/],
    ["integer weights", (t) => (t[`${P}.0.down_proj.weight`] = { dtype: "I32", shape: [8, 4], data: new Float32Array(32) }), {}, /experts\.0\.down_proj\.weight is I32; weights must be BF16, F16 or F32/],
    ["MXFP4 stacked experts", (t) => (t[`model.layers.2.mlp.experts.gate_up_proj_blocks`] = { dtype: "U8", shape: [2], data: new Uint8Array(2) }), { layer: 2 }, /MXFP4 expert weights are not read/],
    // A config.json value of the wrong kind: read as absent, it would load the model's layer with a default.
    ["a routed_scaling_factor given as a string", (_, c) => (c.routed_scaling_factor = "2.5"), {}, /routed_scaling_factor must be a finite number, got string "2\.5"/],
    ["a fractional n_group", (_, c) => (c.n_group = 1.5), {}, /n_group must be an integer >= 1, got number 1\.5/],
    ["norm_topk_prob given as a number", (_, c) => (c.norm_topk_prob = 1), {}, /norm_topk_prob must be true or false, got number 1/],
    ["num_experts_per_tok 0", (_, c) => (c.num_experts_per_tok = 0), {}, /num_experts_per_tok must be an integer >= 1, got number 0/],
    ["an expert count given as a string", (_, c) => (c.num_experts = "4"), {}, /num_experts must be an integer >= 1, got string "4"/],
    ["an FP8 block size that is not two integers", (t, c) => {
      t[`${P}.0.gate_proj.weight`] = { dtype: "F8_E4M3", shape: [4, 8], data: new Uint8Array(32) };
      t[`${P}.0.gate_proj.weight_scale_inv`] = { dtype: "F32", shape: [1, 1], data: Float32Array.of(1) };
      c.quantization_config = { quant_method: "fp8", weight_block_size: [128] };
    }, {}, /weight_block_size must be two integers >= 1, got \[128\]/],
  ];
  for (const [name, mutate, options, message] of BAD) {
    seededTest(`a bad checkpoint: ${name} -> CheckpointError`, (rng) => {
      const path = broken(rng, mutate);
      using ckpt = Checkpoint.open(path);
      // Shapes are checked when the layer is opened; dtypes when an expert is read.
      const attempt = () => {
        const reader = openExpertLayer(ckpt, { layer: options.layer ?? 1, activation: options.activation });
        loadExpertLayer(ctx(), ckpt, { layer: options.layer ?? 1, ...options }).dispose();
        for (let e = 0; e < reader.info.numExperts; ++e) reader.read(e);
      };
      expect(attempt).toThrow(CheckpointError);
      expect(attempt).toThrow(message);
    });
  }

  seededTest("bad checkpoint files: a missing path, a shard the index names that is absent, a malformed shard -> CheckpointError naming the file", (rng) => {
    expect(() => Checkpoint.open(join(dir(), "nowhere"))).toThrow(/nowhere: cannot read/);
    const path = broken(rng, () => {}, 2);
    rmSync(join(path, "model-00002-of-00002.safetensors"));
    expect(() => Checkpoint.open(path)).toThrow(/model-00002-of-00002\.safetensors: cannot open/);
    writeFileSync(join(path, "model-00002-of-00002.safetensors"), new Uint8Array(5));
    expect(() => Checkpoint.open(path)).toThrow(CheckpointError);
    expect(() => Checkpoint.open(path)).toThrow(/model-00002-of-00002\.safetensors: file too short/);
    writeFileSync(join(path, "model.safetensors.index.json"), "{}");
    expect(() => Checkpoint.open(path)).toThrow(/index\.json: no "weight_map" object/);
    const empty = fresh();
    mkdirSync(empty);
    expect(() => Checkpoint.open(empty)).toThrow(/no safetensors files/);
  });

  seededTest("fused-moe import writes a layer that fused-moe run computes with, its metadata as the defaults; bad usage exits 2 leaving no file", async (rng) => {
    const [E, H, I, topk] = [4, 32, 16, 2];
    const experts = perExpertWeights(rng, E, H, I, false);
    const tensors: Tensors = {};
    experts.forEach((w, e) => {
      tensors[`backbone.layers.2.mixer.experts.${e}.up_proj.weight`] = bf16([I, H], w.up);
      tensors[`backbone.layers.2.mixer.experts.${e}.down_proj.weight`] = bf16([H, I], w.down);
    });
    const path = writeCheckpoint(fresh(), tensors, { config: { mlp_hidden_act: "relu2", n_routed_experts: E, num_experts_per_tok: topk } });
    const cli = async (...args: string[]) => {
      const proc = Bun.spawn([process.execPath, join(ROOT, "scripts", "fused-moe.ts"), ...args], { stdout: "pipe", stderr: "pipe" });
      return { code: await proc.exited, stderr: await new Response(proc.stderr).text() };
    };
    const layerFile = join(dir(), "imported.safetensors");
    const imported = await cli("import", "--checkpoint", path, "--layer-index", "2", "--local-expert-start", "1", "--num-local-experts", "2", "--output", layerFile);
    expect(imported.stderr).toContain("wrote experts [1, 3) of 4");
    expect(imported.code).toBe(0);
    // run's input: the layer file's tensors and metadata, plus tokens.
    const { tensors: layerTensors, metadata } = readSafetensors(layerFile);
    expect(metadata).toMatchObject({ activation: "squared_relu", num_experts: "4", local_expert_start: "1", topk: "2" });
    const T = 7;
    const { hidden, routing, probs } = tokens(rng, T, H, topk, E);
    const input = join(dir(), "imported-input.safetensors");
    writeSafetensors(input, { ...Object.fromEntries(layerTensors), hidden: { dtype: "bf16", shape: [T, H], data: hidden }, routing_map: { dtype: "i32", shape: [T, topk], data: routing }, probs: { dtype: "f32", shape: [T, topk], data: probs } }, metadata);
    const outFile = join(dir(), "imported-out.safetensors");
    const ran = await cli("run", "--backend", "host", "--input", input, "--output", outFile);
    expect(ran.code).toBe(0);
    const want = direct(T, H, topk, hidden, routing, probs, (e, v) => {
      if (e < 1 || e >= 3) return undefined;
      return matvec(experts[e]!.down, H, I, matvec(experts[e]!.up, I, H, v).map((u) => Math.max(u, 0) ** 2));
    });
    expectNonZero(want, "model formula");
    expectClose(bf16ToF32(readSafetensors(outFile).tensors.get("out")!.data as Uint16Array), want, TOLERANCE.bf16, "run on the imported layer");

    const bad = join(dir(), "never.safetensors");
    for (const [args, message] of [
      [["--checkpoint", path, "--output", bad], /--layer-index is required/],
      [["--checkpoint", path, "--layer-index", "9", "--output", bad], /no experts for layer 9/],
      [["--checkpoint", path, "--layer-index", "2", "--output", bad, "--activation", "silu"], /silu is gated/],
      [["--checkpoint", path, "--layer-index", "2", "--output", bad, "--port", "1"], /--port is not an option of import/],
    ] as const) {
      const r = await cli("import", ...args);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(message);
      expect(r.stderr.trim().split("\n")).toHaveLength(1);
      expect(existsSync(bad) || existsSync(`${bad}.partial`)).toBe(false);
    }
  });
});
