// Invalid calls: every one gives FmoeError with the right status and a message naming the
// argument at fault, never a crash. Checked at both levels: the typed API (which validates shapes
// in TypeScript first) and the raw C ABI through lib/ffi.ts (NULL pointers, buffers too small,
// bad counts), where the library's own checks answer.
import { describe, expect } from "bun:test";
import {
  activation,
  Context,
  dequantizeMxfp8,
  FmoeError,
  FusedMoE,
  groupedMmBf16,
  groupedMmMxfp8,
  maxRows,
  permute,
  quantizeMxfp8,
  route,
  Status,
  statusName,
  swizzleScales,
  unpermute,
  unswizzleScales,
} from "../lib/index.ts";
import * as ffi from "../lib/ffi.ts";
import { CUDA_DEVICES, expectFmoe, makeRouting, randBf16, randWeights, seededTest, suiteContext } from "./helpers.ts";

const INVALID = Status.INVALID_ARGUMENT;

describe("errors: contexts, tensors, the FmoeError class", () => {
  const ctx = suiteContext("host");

  seededTest("bad backend name is INVALID_ARGUMENT naming the backend", () => {
    expectFmoe(() => Context.create({ backend: "tpu" as never }), INVALID, "backend", "tpu");
  });

  seededTest(CUDA_DEVICES === 0 ? "backend cuda without a device is UNSUPPORTED" : "backend cuda with a bad device ordinal fails cleanly", () => {
    if (CUDA_DEVICES === 0) expectFmoe(() => Context.create({ backend: "cuda" }), Status.UNSUPPORTED);
    else expect(() => Context.create({ backend: "cuda", device: 1000 })).toThrow(FmoeError);
    // auto falls back to host without a device.
    using auto = Context.create({ backend: "auto" });
    expect(auto.backend).toBe(CUDA_DEVICES === 0 ? "host" : "cuda");
  });

  seededTest("FmoeError carries the status code and its name", () => {
    const err = expectFmoe(() => ctx().empty([2, -1], "f32"), INVALID, "dimension -1");
    expect(err).toBeInstanceOf(Error);
    expect(err.name).toBe("FmoeError");
    expect(err.statusName).toBe("INVALID_ARGUMENT");
    expect(statusName(4)).toBe("CUDA");
    expect(statusName(99)).toBe("UNKNOWN(99)");
  });

  seededTest("tensor misuse: element count, dtype, fill byte, view range, copy size", () => {
    const x = ctx();
    expectFmoe(() => x.upload(new Float32Array(5), [2, 3]), INVALID, "5 elements", "[2, 3]");
    expectFmoe(() => x.upload(new Uint8Array(4)), INVALID, "Uint8Array");
    expectFmoe(() => x.upload(new Int32Array(4), [4], "f32"), INVALID, "Int32Array", "f32");
    using t = x.zeros([4, 4], "f32");
    expectFmoe(() => t.fill(256), INVALID, "256");
    expectFmoe(() => t.view(10, [7]), INVALID, "[10, 17)");
    expectFmoe(() => t.view([7] as unknown as number, 0 as unknown as number[]), INVALID, "the offset comes first");
    expectFmoe(() => t.reshape([3, 5]), INVALID, "reshape");
    using u = x.zeros([3], "f32");
    expectFmoe(() => t.copyFrom(u), INVALID, "bytes");
    expectFmoe(() => t.copyFrom(new Float32Array(3)), INVALID, "3 elements");
  });

  seededTest("a tensor of another context is refused", (rng) => {
    const x = ctx();
    using other = Context.create({ backend: "host" });
    using h = other.upload(randBf16(rng, 4 * 32), [4, 32], "bf16");
    using r = x.upload(new Int32Array(8), [4, 2]);
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: 4 }), INVALID, "permute", "another context");
    using mine = x.zeros([4, 32], "bf16");
    expectFmoe(() => mine.copyFrom(h), INVALID, "another context");
    using fc1 = x.upload(randWeights(rng, 4, 64, 32), [4, 64, 32], "bf16");
    using fc2 = x.upload(randWeights(rng, 4, 32, 32), [4, 32, 32], "bf16");
    using moe = new FusedMoE(x, { hidden: 32, ffn: 32, numExperts: 4, topk: 2, activation: "silu", maxTokens: 4 }, { fc1, fc2 });
    using p = x.zeros([4, 2], "f32");
    expectFmoe(() => moe.forward({ hidden: h, routingMap: r, probs: p }), INVALID, "FusedMoE: hidden", "another context");
  });

  seededTest("a weight disposed under its layer, and e4m3 weights for a bf16 layer, are refused by name", (rng) => {
    const x = ctx();
    const config = { hidden: 32, ffn: 32, numExperts: 4, topk: 2, activation: "silu", maxTokens: 4 } as const;
    const fc1 = x.upload(randWeights(rng, 4, 64, 32), [4, 64, 32], "bf16");
    using fc2 = x.upload(randWeights(rng, 4, 32, 32), [4, 32, 32], "bf16");
    using moe = new FusedMoE(x, config, { fc1, fc2 });
    using h = x.upload(randBf16(rng, 4 * 32), [4, 32], "bf16");
    using r = x.upload(new Int32Array(8), [4, 2]);
    using p = x.zeros([4, 2], "f32");
    fc1.dispose();
    expectFmoe(() => moe.forward({ hidden: h, routingMap: r, probs: p }), Status.INVALID_STATE, "weights.fc1", "borrows", "was disposed");
    using q1 = x.empty([4, 64, 32], "e4m3");
    using q2 = x.empty([4, 32, 32], "e4m3");
    expectFmoe(() => new FusedMoE(x, config, { fc1: q1, fc2: q2 }), INVALID, "e4m3", 'weightFormat "mxfp8"');
  });

  seededTest("a stream of another context is refused, naming the call", (rng) => {
    // (The library refuses it too: the raw-ABI tests below pass it a stream it does not know.)
    const x = ctx();
    using other = Context.create({ backend: "host" });
    using foreign = other.createStream();
    using h = x.upload(randBf16(rng, 4 * 32), [4, 32], "bf16");
    using r = x.upload(new Int32Array(8), [4, 2]);
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: 4, stream: foreign }), INVALID, "permute: stream belongs to another context");
    expectFmoe(() => quantizeMxfp8(x, h, { stream: foreign }), INVALID, "quantizeMxfp8: stream belongs to another context");
    expectFmoe(() => h.fill(0, foreign), INVALID, "fill: stream");
    expectFmoe(() => h.download(foreign), INVALID, "download: stream");
    expectFmoe(() => x.capture(foreign, () => {}), INVALID, "capture: stream");
  });

  seededTest("a value of the wrong kind where a Tensor, Stream, Context, dtype or shape belongs: FmoeError naming it, not a TypeError", (rng) => {
    // Bun runs TypeScript unchecked: these arrive as they are.
    const x = ctx();
    const any = (v: unknown) => v as never;
    using h = x.upload(randBf16(rng, 4 * 32), [4, 32], "bf16");
    using r = x.upload(new Int32Array(8), [4, 2]);
    const before = x.liveAllocations().count;
    expectFmoe(() => permute(x, { hidden: any(5), routingMap: r, numExperts: 4 }), INVALID, "permute: hidden must be a Tensor, got number 5");
    expectFmoe(() => permute(x, { hidden: any({ shape: [4, 32] }), routingMap: r, numExperts: 4 }), INVALID, "hidden must be a Tensor, got an Object");
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: 4, stream: any(3) }), INVALID, "permute: stream must be a Stream, got number 3");
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: 4, invalidCount: any(7) }), INVALID, "permute: invalidCount must be a Tensor");
    expectFmoe(() => permute(any({}), { hidden: h, routingMap: r, numExperts: 4 }), INVALID, "permute: ctx must be a Context");
    expectFmoe(() => activation(x, { input: any(null), activation: "silu" }), INVALID, "activation: input must be a Tensor, got null");
    expectFmoe(() => groupedMmBf16(x, { a: h, b: any("w"), groupOffsets: r }), INVALID, "groupedMmBf16: b must be a Tensor, got string \"w\"");
    expectFmoe(() => route(x, { logits: any([1, 2]), topk: 1 }), INVALID, "route: logits must be a Tensor, got an array");
    expectFmoe(() => quantizeMxfp8(x, any(undefined)), INVALID, "quantizeMxfp8: x must be a Tensor, got undefined");
    expectFmoe(() => unpermute(x, { input: h, inverseMap: any({}) }), INVALID, "unpermute: inverseMap must be a Tensor");
    expectFmoe(() => x.upload(new Float32Array(3), [3], any("f16")), INVALID, "upload: dtype must be one of bf16, f32, i32, e4m3, e8m0, got string \"f16\"");
    expectFmoe(() => x.empty(any(3), "f32"), INVALID, "empty: the shape must be an array");
    expectFmoe(() => h.fill(0, any({ handle: 0 })), INVALID, "fill: stream must be a Stream");
    expectFmoe(() => h.download(any(1)), INVALID, "download: stream must be a Stream");
    const cfg = { hidden: 32, ffn: 32, numExperts: 4, topk: 2, activation: "silu" as const, maxTokens: 4 };
    expectFmoe(() => new FusedMoE(x, cfg, { fc1: any(1), fc2: any(2) }), INVALID, "FusedMoE: fc1 must be a Tensor, got number 1");
    expectFmoe(() => new FusedMoE(any({}), cfg, { fc1: h, fc2: h }), INVALID, "FusedMoE: ctx must be a Context");
    expect(x.liveAllocations().count).toBe(before);
  });

  seededTest("a disposed tensor passed to an op is INVALID_STATE naming it", (rng) => {
    const x = ctx();
    const h = x.upload(randBf16(rng, 4 * 32), [4, 32], "bf16");
    h.name = "hiddenTokens";
    using r = x.upload(new Int32Array(8), [4, 2]);
    h.dispose();
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: 4 }), Status.INVALID_STATE, "hidden", "disposed");
    expectFmoe(() => quantizeMxfp8(x, h), Status.INVALID_STATE, "hiddenTokens", "disposed");
    expectFmoe(() => h.download(), Status.INVALID_STATE, "disposed");
    const v = x.zeros([8], "f32");
    const view = v.view(2, [2]);
    v.dispose();
    expectFmoe(() => view.download(), Status.INVALID_STATE, "base tensor was disposed");
  });
});

describe("errors: option names (Bun runs TypeScript unchecked, so a misspelt key must not be dropped)", () => {
  const ctx = suiteContext("host");

  seededTest("Context.create: a backend name alone, an unknown option, a bad device, options that are not an object", () => {
    using host = Context.create("host");
    expect(host.backend).toBe("host");
    expectFmoe(() => Context.create("tpu" as never), INVALID, "backend", "tpu");
    expectFmoe(() => Context.create({ backnd: "host" } as never), INVALID, "Context.create", "\"backnd\"", "backend, device");
    expectFmoe(() => Context.create({ backend: "host", device: -1 }), INVALID, "device", "-1");
    expectFmoe(() => Context.create({ backend: "host", device: 0.5 }), INVALID, "device", "0.5");
    expectFmoe(() => Context.create(null as never), INVALID, "options", "null");
    expectFmoe(() => Context.create({ backend: "toString" as never }), INVALID, "backend", "toString");
  });

  seededTest("FusedMoE: misspelt config, weight and forward keys name the key and the options", (rng) => {
    const x = ctx();
    const E = 4, H = 64, I = 32, T = 4;
    using fc1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
    using fc2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
    const base = { hidden: H, ffn: I, numExperts: E, topk: 2, activation: "silu" as const, maxTokens: T };
    const before = x.liveAllocations().count;
    // Without the check, weightsFormat would build a bf16 layer and fc1_bias would drop the bias.
    expectFmoe(() => new FusedMoE(x, { ...base, weightsFormat: "mxfp8" } as never, { fc1, fc2 }), INVALID, "config", "\"weightsFormat\"", "weightFormat");
    expectFmoe(() => new FusedMoE(x, base, { fc1, fc2, fc1_bias: fc1 } as never), INVALID, "weights", "\"fc1_bias\"", "fc1Bias");
    expectFmoe(() => new FusedMoE(x, "silu" as never, { fc1, fc2 }), INVALID, "config", "string");
    expect(x.liveAllocations().count).toBe(before);
    using moe = new FusedMoE(x, base, { fc1, fc2 });
    using h = x.upload(randBf16(rng, T * H), [T, H], "bf16");
    using r = x.upload(makeRouting(rng, T, E, 2).routingMap, [T, 2]);
    using p = x.zeros([T, 2], "f32");
    using tpe = x.zeros([E], "i32");
    using out = x.empty([T, H], "bf16");
    expectFmoe(() => moe.forward({ hidden: h, routing: r, probs: p } as never), INVALID, "forward", "\"routing\"", "routingMap");
    expectFmoe(() => moe.forwardGrouped({ hidden: h, tokensPerExpert: tpe, probs: p, routingMap: r } as never), INVALID, "forwardGrouped", "\"routingMap\"");
    expectFmoe(() => moe.capture({ hidden: h, routingMap: r, probs: p, out, strem: undefined } as never), INVALID, "capture", "\"strem\"");
    expect(x.liveAllocations().count).toBe(before + 6);
  });

  seededTest("ops: misspelt option and output keys name the key", (rng) => {
    const x = ctx();
    const T = 4, H = 64, E = 4;
    using h = x.upload(randBf16(rng, T * H), [T, H], "bf16");
    using r = x.upload(makeRouting(rng, T, E, 2).routingMap, [T, 2]);
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: E, alignement: 8 } as never), INVALID, "permute", "\"alignement\"", "alignment");
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: E, out: { inverse: r } } as never), INVALID, "permute", "out", "\"inverse\"", "inverseMap");
    using map = x.zeros([T], "i32");
    expectFmoe(() => activation(x, { input: h, activation: "silu", rowmap: map } as never), INVALID, "activation", "\"rowmap\"", "rowMap");
    using b = x.upload(randBf16(rng, 2 * 16 * H), [2, 16, H], "bf16");
    using off = x.zeros([3], "i32");
    expectFmoe(() => groupedMmBf16(x, { a: h, b, groupOffsets: off, aScale: map } as never), INVALID, "groupedMmBf16", "\"aScale\"");
    expectFmoe(() => unpermute(x, { input: h, inverseMap: r, prob: map } as never), INVALID, "unpermute", "\"prob\"", "probs");
    expectFmoe(() => quantizeMxfp8(x, h, { out: { date: h } } as never), INVALID, "quantizeMxfp8", "out", "\"date\"");
    using sc = x.zeros([T, 2], "e8m0");
    expectFmoe(() => swizzleScales(x, sc, { steam: undefined } as never), INVALID, "swizzleScales", "\"steam\"");
    expectFmoe(() => unswizzleScales(x, sc, { rows: 1, scalecols: 2 } as never), INVALID, "unswizzleScales", "\"scalecols\"", "scaleCols");
    using q = x.zeros([T, H], "e4m3");
    expectFmoe(() => dequantizeMxfp8(x, q, sc, [] as never), INVALID, "dequantizeMxfp8", "array");
    expect(x.liveAllocations().count).toBe(7); // nothing allocated by the refused calls
  });

  seededTest("option values of the wrong type: a truthy stand-in for a boolean, a string for a number", (rng) => {
    const x = ctx();
    const E = 4, H = 64, I = 32, T = 4;
    using fc1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
    using fc2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
    const base = { hidden: H, ffn: I, numExperts: E, topk: 1, activation: "silu" as const, maxTokens: T };
    const before = x.liveAllocations().count;
    // "false" is truthy: without the check it would scale the input by the router weight.
    expectFmoe(() => new FusedMoE(x, { ...base, applyRouterWeightOnInput: "false" } as never, { fc1, fc2 }), INVALID, "config.applyRouterWeightOnInput", "true or false", "\"false\"");
    expectFmoe(() => new FusedMoE(x, { ...base, alpha: "1.702" } as never, { fc1, fc2 }), INVALID, "config.alpha", "finite number");
    expectFmoe(() => new FusedMoE(x, { ...base, limit: Number.NaN }, { fc1, fc2 }), INVALID, "config.limit", "finite number");
    expectFmoe(() => new FusedMoE(x, { ...base, router: { renormalize: 0 } } as never, { fc1, fc2 }), INVALID, "config.router.renormalize");
    expectFmoe(() => new FusedMoE(x, { ...base, router: { scale: "2.5" } } as never, { fc1, fc2 }), INVALID, "config.router.scale");
    // The bad value is named, not the count derived from it.
    expectFmoe(() => new FusedMoE(x, { ...base, localExpertStart: 0.5 }, { fc1, fc2 }), INVALID, "config.localExpertStart", "0.5");
    expect(x.liveAllocations().count).toBe(before);
    using logits = x.upload(rng.f32Normal(T * E), [T, E], "f32");
    expectFmoe(() => route(x, { logits, topk: 2, renormalize: 1 } as never), INVALID, "route", "renormalize", "true or false");
    expectFmoe(() => route(x, { logits, topk: 2, scale: "2.5" } as never), INVALID, "route", "scale", "finite number");
    using h = x.upload(randBf16(rng, T * H), [T, H], "bf16");
    using r = x.upload(makeRouting(rng, T, E, 2).routingMap, [T, 2]);
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: E, quantize: "yes" } as never), INVALID, "permute", "quantize", "\"yes\"");
    // "yes" is not true: without the check the op would quietly return bf16 instead of MXFP8.
    expectFmoe(() => activation(x, { input: h, activation: "silu", quantize: "yes" } as never), INVALID, "activation", "quantize");
    expectFmoe(() => activation(x, { input: h, activation: "swiglu_oai", alpha: "1" } as never), INVALID, "activation", "alpha", "finite number");
    expect(x.liveAllocations().count).toBe(before + 3);
  });
});

describe("errors: op arguments (typed API)", () => {
  const ctx = suiteContext("host");

  seededTest("permute: wrong shapes and dtypes, topk > numExperts, alignment 0, EP range, output too small", (rng) => {
    const x = ctx();
    const T = 6, H = 64;
    using h = x.upload(randBf16(rng, T * H), [T, H], "bf16");
    using r = x.upload(makeRouting(rng, T, 4, 2).routingMap, [T, 2]);
    using rf = x.zeros([T, 2], "f32");
    using rShort = x.zeros([T - 1, 2], "i32");
    expectFmoe(() => permute(x, { hidden: h, routingMap: rShort, numExperts: 4 }), INVALID, "routingMap", "[6, *]");
    expectFmoe(() => permute(x, { hidden: h, routingMap: rf, numExperts: 4 }), INVALID, "routingMap", "f32");
    expectFmoe(() => permute(x, { hidden: rf, routingMap: r, numExperts: 4 }), INVALID, "hidden", "bf16");
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, probs: r, numExperts: 4 }), INVALID, "probs");
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: 1 }), INVALID, "topk (2)", "numExperts = 1");
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: 4, alignment: 0 }), INVALID, "alignment", "0");
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: 4, localExpertStart: 3, numLocalExperts: 2 }), INVALID, "localExpertStart + numLocalExperts");
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: 0 }), INVALID, "numExperts");
    const rows = maxRows(T, 2, 4, 16);
    using small = x.empty([rows - 1, H], "bf16");
    expectFmoe(() => permute(x, { hidden: h, routingMap: r, numExperts: 4, out: { permuted: small } }), INVALID, "out.permuted", `[${rows}, ${H}]`);
    using h48 = x.upload(randBf16(rng, T * 48), [T, 48], "bf16");
    expectFmoe(() => permute(x, { hidden: h48, routingMap: r, numExperts: 4, quantize: true }), INVALID, "H (48)", "multiple of 32");
    expectFmoe(() => maxRows(4, 2, 4, 0), INVALID, "alignment");
    expect(x.liveAllocations().count).toBe(6); // failed calls freed what they allocated
  });

  seededTest("activation: odd gated N1, I not a multiple of 32 with quantize, bad names, limit <= 0, output too small", (rng) => {
    const x = ctx();
    using in33 = x.upload(randBf16(rng, 4 * 33), [4, 33], "bf16");
    expectFmoe(() => activation(x, { input: in33, activation: "silu" }), INVALID, "even N1", "33");
    using in96 = x.upload(randBf16(rng, 4 * 96), [4, 96], "bf16");
    expectFmoe(() => activation(x, { input: in96, activation: "silu", quantize: true }), INVALID, "I (48)", "multiple of 32");
    expectFmoe(() => activation(x, { input: in96, activation: "relu" as never }), INVALID, "activation", "relu");
    expectFmoe(() => activation(x, { input: in96, activation: "silu", layout: "rows" as never }), INVALID, "layout", "rows");
    expectFmoe(() => activation(x, { input: in96, activation: "swiglu_oai", limit: 0 }), INVALID, "limit");
    expectFmoe(() => activation(x, { input: in96, activation: "swiglu_oai", alpha: NaN }), INVALID, "alpha");
    using small = x.empty([3, 48], "bf16");
    expectFmoe(() => activation(x, { input: in96, activation: "silu", out: small }), INVALID, "out.output", "[4, 48]");
    using map = x.zeros([5], "i32");
    expectFmoe(() => activation(x, { input: in96, activation: "silu", rowMap: map }), INVALID, "rowMap", "[4]");
    using nf = x.zeros([1], "f32");
    expectFmoe(() => activation(x, { input: in96, activation: "silu", nUsed: nf }), INVALID, "nUsed", "i32");
  });

  seededTest("MXFP8 ops: K not a multiple of 32, scale shapes, swizzled byte count", (rng) => {
    const x = ctx();
    using in48 = x.upload(randBf16(rng, 2 * 48), [2, 48], "bf16");
    expectFmoe(() => quantizeMxfp8(x, in48), INVALID, "K (48)", "multiple of 32");
    using in64 = x.upload(randBf16(rng, 2 * 64), [2, 64], "bf16");
    const q = quantizeMxfp8(x, in64);
    try {
      using badScale = x.zeros([2, 3], "e8m0");
      expectFmoe(() => dequantizeMxfp8(x, q.data, badScale), INVALID, "scale", "[2, 2]");
      using smallOut = x.zeros([2, 32], "e4m3");
      expectFmoe(() => quantizeMxfp8(x, in64, { out: { data: smallOut } }), INVALID, "out.data");
      expectFmoe(() => swizzleScales(x, q.data as never), INVALID, "linear", "e8m0");
      using sw = swizzleScales(x, q.scale);
      expectFmoe(() => unswizzleScales(x, sw, { rows: 200, scaleCols: 2 }), INVALID, "swizzled holds 512 bytes");
      expectFmoe(() => unswizzleScales(x, sw, { rows: -1, scaleCols: 2 }), INVALID, "rows");
    } finally {
      q.data.dispose();
      q.scale.dispose();
    }
  });

  seededTest("grouped GEMM: k mismatch, k % 32 for MXFP8, offsets shape, bias shape, output too small", (rng) => {
    const x = ctx();
    using a = x.upload(randBf16(rng, 8 * 64), [8, 64], "bf16");
    using b = x.upload(randWeights(rng, 2, 16, 64), [2, 16, 64], "bf16");
    using b48 = x.upload(randWeights(rng, 2, 16, 48), [2, 16, 48], "bf16");
    using off = x.upload(Int32Array.of(0, 4, 8));
    using off2 = x.upload(Int32Array.of(0, 8));
    expectFmoe(() => groupedMmBf16(x, { a, b: b48, groupOffsets: off }), INVALID, "b", "[*, *, 64]");
    expectFmoe(() => groupedMmBf16(x, { a, b, groupOffsets: off2 }), INVALID, "groupOffsets", "[3]");
    using bias = x.zeros([2, 15], "f32");
    expectFmoe(() => groupedMmBf16(x, { a, b, groupOffsets: off, bias }), INVALID, "bias", "[2, 16]");
    using c = x.empty([7, 16], "bf16");
    expectFmoe(() => groupedMmBf16(x, { a, b, groupOffsets: off, out: c }), INVALID, "out", "[8, 16]");
    using a48 = x.zeros([8, 48], "e4m3");
    using s48 = x.zeros([8, 1], "e8m0");
    using bq48 = x.zeros([2, 16, 48], "e4m3");
    using bs48 = x.zeros([2, 16, 1], "e8m0");
    expectFmoe(() => groupedMmMxfp8(x, { a: a48, aScale: s48, b: bq48, bScale: bs48, groupOffsets: off }), INVALID, "k (48)", "multiple of 32");
    expectFmoe(() => groupedMmMxfp8(x, { a, aScale: s48, b, bScale: bs48, groupOffsets: off }), INVALID, "a", "e4m3");
  });

  seededTest("unpermute: probs shape, output too small", (rng) => {
    const x = ctx();
    using input = x.upload(randBf16(rng, 16 * 32), [16, 32], "bf16");
    using inv = x.zeros([4, 2], "i32");
    using probs = x.zeros([4, 3], "f32");
    expectFmoe(() => unpermute(x, { input, inverseMap: inv, probs }), INVALID, "probs", "[4, 2]");
    using out = x.empty([3, 32], "bf16");
    expectFmoe(() => unpermute(x, { input, inverseMap: inv, out }), INVALID, "out", "[4, 32]");
  });

  seededTest("FusedMoE: config errors, weight shapes, T > maxTokens, applyRouterWeightOnInput with topk > 1", (rng) => {
    const x = ctx();
    const E = 4, H = 64, I = 32;
    using fc1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
    using fc2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
    const base = { hidden: H, ffn: I, numExperts: E, topk: 2, activation: "silu" as const, maxTokens: 4 };
    const before = x.liveAllocations().count;
    expectFmoe(() => new FusedMoE(x, { ...base, topk: 5 }, { fc1, fc2 }), INVALID, "topk (5)", "numExperts (4)");
    expectFmoe(() => new FusedMoE(x, { ...base, alignment: 0 }, { fc1, fc2 }), INVALID, "alignment");
    expectFmoe(() => new FusedMoE(x, { ...base, maxTokens: 0 }, { fc1, fc2 }), INVALID, "maxTokens");
    expectFmoe(() => new FusedMoE(x, { ...base, applyRouterWeightOnInput: true }, { fc1, fc2 }), INVALID, "applyRouterWeightOnInput", "topk == 1");
    expectFmoe(() => new FusedMoE(x, { ...base, activation: "tanh" as never }, { fc1, fc2 }), INVALID, "activation", "tanh");
    expectFmoe(() => new FusedMoE(x, { ...base, weightFormat: "fp4" as never }, { fc1, fc2 }), INVALID, "weightFormat", "fp4");
    expectFmoe(() => new FusedMoE(x, { ...base, localExpertStart: 2 }, { fc1, fc2 }), INVALID, "fc1", "[2, 64, 64]");
    expectFmoe(() => new FusedMoE(x, { ...base, activation: "squared_relu" }, { fc1, fc2 }), INVALID, "fc1", "[4, 32, 64]");
    expectFmoe(() => new FusedMoE(x, { ...base, hidden: 48 }, { fc1, fc2 }), INVALID, "fc1");
    expectFmoe(() => new FusedMoE(x, { ...base, hidden: 48, weightFormat: "mxfp8" }, { fc1, fc2 }), INVALID, "hidden (48)", "multiples of 32");
    expectFmoe(() => new FusedMoE(x, { ...base, weightFormat: "mxfp8" }, { fc1: x.zeros([E, 2 * I, H], "e4m3"), fc2: x.zeros([E, H, I], "e4m3") }), INVALID, "fc1Scale");
    expectFmoe(() => new FusedMoE(x, base, { fc1, fc2, fc1Scale: x.zeros([1], "e8m0") }), INVALID, "fc1Scale", "mxfp8");
    using b1 = x.zeros([E, I], "f32");
    expectFmoe(() => new FusedMoE(x, base, { fc1, fc2, fc1Bias: b1 }), INVALID, "fc1Bias", "[4, 64]");
    // Failed constructions leave nothing behind (the e4m3/e8m0 tensors above are the caller's).
    expect(x.liveAllocations().count).toBe(before + 4);

    using moe = new FusedMoE(x, base, { fc1, fc2 });
    using h5 = x.upload(randBf16(rng, 5 * H), [5, H], "bf16");
    using r5 = x.zeros([5, 2], "i32");
    using p5 = x.zeros([5, 2], "f32");
    expectFmoe(() => moe.forward({ hidden: h5, routingMap: r5, probs: p5 }), INVALID, "5 tokens", "maxTokens (4)");
    using h4 = x.upload(randBf16(rng, 4 * H), [4, H], "bf16");
    using r4 = x.zeros([4, 2], "i32");
    using p41 = x.zeros([4, 1], "f32");
    expectFmoe(() => moe.forward({ hidden: h4, routingMap: r4, probs: p41 }), INVALID, "probs", "[4, 2]");
    using o3 = x.empty([3, H], "bf16");
    using p4 = x.zeros([4, 2], "f32");
    expectFmoe(() => moe.forward({ hidden: h4, routingMap: r4, probs: p4, out: o3 }), INVALID, "out", "[4, 64]");
    using h9 = x.upload(randBf16(rng, 9 * H), [9, H], "bf16");
    using t9 = x.zeros([E], "i32");
    using pr9 = x.zeros([9], "f32");
    expectFmoe(() => moe.forwardGrouped({ hidden: h9, tokensPerExpert: t9, probs: pr9 }), INVALID, "9 rows", "maxTokens * topk (8)");
    using t3 = x.zeros([3], "i32");
    using pr4 = x.zeros([4], "f32");
    expectFmoe(() => moe.forwardGrouped({ hidden: h4, tokensPerExpert: t3, probs: pr4 }), INVALID, "tokensPerExpert", "[4]");
    expectFmoe(() => moe.capture({ hidden: h4, routingMap: r4, probs: p4 } as never), INVALID, "out");
  });
});

describe("errors: the raw C ABI (lib/ffi.ts)", () => {
  const ctx = suiteContext("host");

  /** Allocates `bytes` on the context; returns the address (freed with the context). */
  function buf(bytes: number): number {
    return ffi.alloc(ctx()._handle, bytes);
  }

  seededTest("permute: each required pointer NULL, ctx NULL, topk > num_experts, alignment 0, buffers too small", () => {
    const h = ctx()._handle;
    const T = 4, H = 32, topk = 2, E = 4;
    const rows = maxRows(T, topk, E, 16);
    const valid: ffi.PermuteFields = {
      hidden: buf(T * H * 2), routing_map: buf(T * topk * 4), permuted: buf(rows * H * 2), expert_offsets: buf((E + 1) * 4),
      permutation_map: buf(rows * 4), inverse_map: buf(T * topk * 4), num_tokens: T, hidden_size: H, topk,
      num_experts: E, local_expert_start: 0, num_local_experts: E, alignment: 16,
    };
    ffi.memset(h, valid.routing_map!, 0, T * topk * 4, 0);
    ffi.permute(h, 0, valid); // sanity: the valid call works
    for (const name of ["hidden", "routing_map", "expert_offsets", "permutation_map", "inverse_map"] as const) {
      expectFmoe(() => ffi.permute(h, 0, { ...valid, [name]: 0 }), INVALID, "fmoe_permute", `${name} is NULL`);
    }
    expectFmoe(() => ffi.permute(h, 0, { ...valid, permuted: 0 }), INVALID, "permuted and permuted_q are both NULL");
    expectFmoe(() => ffi.permute(h, 0, { ...valid, permuted_q: buf(rows * H) }), INVALID, "permuted_scale is NULL");
    expectFmoe(() => ffi.permute(0, 0, valid), INVALID, "ctx is NULL");
    expectFmoe(() => ffi.permute(h, 0, { ...valid, topk: 5 }), INVALID, "topk (5) exceeds num_experts (4)");
    expectFmoe(() => ffi.permute(h, 0, { ...valid, alignment: 0 }), INVALID, "alignment (0) must be >= 1");
    expectFmoe(() => ffi.permute(h, 0, { ...valid, num_tokens: -1 }), INVALID, "num_tokens");
    expectFmoe(() => ffi.permute(h, 0, { ...valid, permuted: buf(rows * H * 2 - 2) }), INVALID, "permuted needs", "holds");
    expectFmoe(() => ffi.permute(h, 0, { ...valid, inverse_map: buf(T * topk * 4 - 4) }), INVALID, "inverse_map needs");
    expectFmoe(() => ffi.permute(h, 0, { ...valid, hidden_size: 48, permuted_q: buf(rows * 48), permuted_scale: buf(rows * 2) }), INVALID, "hidden_size (48) must be a multiple of 32");
    expectFmoe(() => ffi.permute(h, 12345, valid), INVALID, "stream", "not a live stream");
  });

  seededTest("activation, quantize, dequantize, swizzle: NULL pointers, K % 32, bad enum values, sizes", () => {
    const h = ctx()._handle;
    const rows = 4, I = 32;
    const act: ffi.ActivationFields = { input: buf(rows * 2 * I * 2), output: buf(rows * I * 2), rows, ffn: I, activation: 1, layout: 0, alpha: 1.702, limit: 7 };
    ffi.activationQuant(h, 0, act);
    expectFmoe(() => ffi.activationQuant(h, 0, { ...act, input: 0 }), INVALID, "fmoe_activation_quant", "input is NULL");
    expectFmoe(() => ffi.activationQuant(h, 0, { ...act, output: 0 }), INVALID, "output and output_q are both NULL");
    expectFmoe(() => ffi.activationQuant(h, 0, { ...act, activation: 9 }), INVALID, "activation (9)");
    expectFmoe(() => ffi.activationQuant(h, 0, { ...act, layout: -1 }), INVALID, "layout (-1)");
    expectFmoe(() => ffi.activationQuant(h, 0, { ...act, activation: 3, limit: -1 }), INVALID, "limit");
    expectFmoe(() => ffi.activationQuant(h, 0, { ...act, output: buf(rows * I * 2 - 1) }), INVALID, "output needs");
    expectFmoe(() => ffi.activationQuant(h, 0, { ...act, ffn: 48, output: 0, output_q: buf(rows * 48), output_scale: buf(rows * 2) }), INVALID, "ffn (48) must be a multiple of 32");

    const inp = buf(rows * 64 * 2), data = buf(rows * 64), scale = buf(rows * 2), f32 = buf(rows * 64 * 4);
    ffi.quantizeMxfp8(h, 0, inp, rows, 64, data, scale);
    expectFmoe(() => ffi.quantizeMxfp8(h, 0, 0, rows, 64, data, scale), INVALID, "fmoe_quantize_mxfp8", "input is NULL");
    expectFmoe(() => ffi.quantizeMxfp8(h, 0, inp, rows, 64, data, 0), INVALID, "out_scale is NULL");
    expectFmoe(() => ffi.quantizeMxfp8(h, 0, inp, rows, 48, data, scale), INVALID, "cols (48) must be a multiple of 32");
    expectFmoe(() => ffi.quantizeMxfp8(h, 0, inp, rows + 1, 64, data, scale), INVALID, "needs");
    expectFmoe(() => ffi.dequantizeMxfp8(h, 0, data, 0, rows, 64, f32), INVALID, "fmoe_dequantize_mxfp8", "scale is NULL");
    expectFmoe(() => ffi.dequantizeMxfp8(h, 0, data, scale, rows, 64, buf(16)), INVALID, "out needs");
    const sw = buf(512);
    ffi.swizzleScales(h, 0, scale, 1, rows, 2, sw);
    expectFmoe(() => ffi.swizzleScales(h, 0, 0, 1, rows, 2, sw), INVALID, "fmoe_swizzle_scales", "linear is NULL");
    expectFmoe(() => ffi.swizzleScales(h, 0, scale, 1, rows, 2, buf(511)), INVALID, "out_swizzled needs");
    expectFmoe(() => ffi.unswizzleScales(h, 0, sw, 1, rows, 2, 0), INVALID, "fmoe_unswizzle_scales", "out_linear is NULL");
    expectFmoe(() => ffi.unswizzleScales(h, 0, buf(100), 1, rows, 2, scale), INVALID, "swizzled needs");
  });

  seededTest("counts at the int64 extremes are refused by name, before any arithmetic on them overflows", () => {
    // Each of these once reached a signed overflow (undefined behaviour, caught by the sanitizer
    // build) or, for the swizzle, a loop over 2^52 empty matrices.
    const h = ctx()._handle;
    const act: ffi.ActivationFields = { input: buf(64), output: buf(64), rows: 0, ffn: 2 ** 62, activation: 1, layout: 0, alpha: 1.702, limit: 7 };
    expectFmoe(() => ffi.activationQuant(h, 0, act), INVALID, "fmoe_activation_quant", "ffn (4611686018427387904) is too large");
    const desc: ffi.PlanDescFields = {
      hidden_size: 64, ffn: 2 ** 62, num_experts: 4, num_local_experts: 4, local_expert_start: 0, topk: 2, activation: 1,
      layout: 0, alpha: 1.702, limit: 7, weight_format: 0, alignment: 16, max_tokens: 4, apply_router_weight_on_input: 0,
    };
    expectFmoe(() => ffi.planCreate(h, desc), INVALID, "fmoe_plan_create", "ffn (4611686018427387904) is too large");
    const far = { ...desc, ffn: 32, num_experts: 2 ** 63 - 2 ** 10, num_local_experts: -(2 ** 62) };
    expectFmoe(() => ffi.planCreate(h, far), INVALID, "fmoe_plan_create", "num_experts");
    expectFmoe(() => ffi.planCreate(h, { ...far, num_experts: 4, local_expert_start: 2 ** 63 - 2 ** 10, num_local_experts: 2 ** 62 }), INVALID, "local_expert_start");
    const T = 2, rows = maxRows(T, 1, 2, 1);
    const perm: ffi.PermuteFields = {
      hidden: buf(T * 32 * 2), routing_map: buf(T * 4), permuted: buf(rows * 64), expert_offsets: buf(12), permutation_map: buf(rows * 4),
      inverse_map: buf(T * 4), num_tokens: T, hidden_size: 32, topk: 1, num_experts: 2, local_expert_start: 2 ** 62, num_local_experts: 2 ** 62, alignment: 1,
    };
    expectFmoe(() => ffi.permute(h, 0, perm), INVALID, "fmoe_permute", "local_expert_start (4611686018427387904) + num_local_experts");
    // An empty matrix is empty however large the batch; one matrix too large to address is refused.
    ffi.swizzleScales(h, 0, buf(16), 2 ** 52, 0, 2, buf(16));
    ffi.unswizzleScales(h, 0, buf(16), 2 ** 52, 3, 0, buf(16));
    expectFmoe(() => ffi.swizzleScales(h, 0, buf(16), 0, 2 ** 31 - 1, 2 ** 63 - 2 ** 10, buf(16)), INVALID, "fmoe_swizzle_scales", "overflows int64");
    expectFmoe(() => ffi.unswizzleScales(h, 0, buf(16), 1, 2 ** 63 - 2 ** 10, 1, buf(16)), INVALID, "fmoe_unswizzle_scales", "overflows int64");
  });

  seededTest("quantize call with a fitting but wrong shape is not an error (the rows x cols bytes fit)", () => {
    // Documents the raw ABI: it checks sizes against the allocation, not the caller's intent.
    const h = ctx()._handle;
    const inp = buf(4 * 64 * 2), data = buf(4 * 64), scale = buf(8);
    ffi.quantizeMxfp8(h, 0, inp, 8, 32, data, scale);
  });

  seededTest("grouped GEMM and unpermute: NULL pointers, k % 32, buffers too small", () => {
    const h = ctx()._handle;
    const rows = 8, n = 16, k = 64, groups = 2;
    const off = buf((groups + 1) * 4);
    ffi.memcpy(h, off, Int32Array.of(0, 4, 8), 12, ffi.MemcpyKind.HostToDevice, 0);
    const mm: ffi.GroupedMmFields = { a: buf(rows * k * 2), b: buf(groups * n * k * 2), c: buf(rows * n * 2), group_offsets: off, rows, n, k, groups };
    ffi.groupedMmBf16(h, 0, mm);
    for (const name of ["a", "b", "c", "group_offsets"] as const) {
      expectFmoe(() => ffi.groupedMmBf16(h, 0, { ...mm, [name]: 0 }), INVALID, "fmoe_grouped_mm_bf16", `${name} is NULL`);
    }
    expectFmoe(() => ffi.groupedMmMxfp8(h, 0, mm), INVALID, "fmoe_grouped_mm_mxfp8", "a_scale is NULL");
    expectFmoe(() => ffi.groupedMmMxfp8(h, 0, { ...mm, a_scale: buf(rows * 2), b_scale: 0 }), INVALID, "b_scale is NULL");
    expectFmoe(() => ffi.groupedMmMxfp8(h, 0, { ...mm, k: 48, a_scale: buf(64), b_scale: buf(64) }), INVALID, "k (48) must be a multiple of 32");
    expectFmoe(() => ffi.groupedMmBf16(h, 0, { ...mm, c: buf(rows * n * 2 - 2) }), INVALID, "c needs");
    expectFmoe(() => ffi.groupedMmBf16(h, 0, { ...mm, groups: 0 }), INVALID, "groups (0)");
    expectFmoe(() => ffi.groupedMmBf16(h, 0, { ...mm, bias: buf(groups * n * 4 - 4) }), INVALID, "bias needs");

    const T = 4, topk = 2, H = 32;
    const un: ffi.UnpermuteFields = { input: buf(16 * H * 2), inverse_map: buf(T * topk * 4), output: buf(T * H * 2), rows: 16, num_tokens: T, hidden_size: H, topk };
    ffi.memset(h, un.inverse_map!, 0xff, T * topk * 4, 0);
    ffi.unpermute(h, 0, un);
    for (const name of ["input", "inverse_map", "output"] as const) {
      expectFmoe(() => ffi.unpermute(h, 0, { ...un, [name]: 0 }), INVALID, "fmoe_unpermute", `${name} is NULL`);
    }
    expectFmoe(() => ffi.unpermute(h, 0, { ...un, output: buf(T * H * 2 - 2) }), INVALID, "output needs");
    expectFmoe(() => ffi.unpermute(h, 0, { ...un, topk: 0 }), INVALID, "topk (0)");
  });

  seededTest("plans and fused_moe: invalid desc, NULL weights, small workspace, T > max_tokens", () => {
    const h = ctx()._handle;
    const desc: ffi.PlanDescFields = {
      hidden_size: 64, ffn: 32, num_experts: 4, num_local_experts: 4, local_expert_start: 0, topk: 2, activation: 1,
      layout: 0, alpha: 1.702, limit: 7, weight_format: 0, alignment: 16, max_tokens: 4, apply_router_weight_on_input: 0,
    };
    expectFmoe(() => ffi.planCreate(h, { ...desc, topk: 5 }), INVALID, "fmoe_plan_create", "topk (5) exceeds num_experts (4)");
    expectFmoe(() => ffi.planCreate(h, { ...desc, alignment: 0 }), INVALID, "alignment (0)");
    expectFmoe(() => ffi.planCreate(h, { ...desc, max_tokens: 0 }), INVALID, "max_tokens (0)");
    expectFmoe(() => ffi.planCreate(h, { ...desc, apply_router_weight_on_input: 1 }), INVALID, "topk");
    expectFmoe(() => ffi.planCreate(h, { ...desc, weight_format: 1, hidden_size: 48 }), INVALID, "48");
    expectFmoe(() => ffi.planCreate(h, { ...desc, local_expert_start: 1 }), INVALID, "local_expert_start (1)");
    const plan = ffi.planCreate(h, desc);
    try {
      const ws = ffi.planWorkspaceBytes(plan);
      const T = 4, H = 64, I = 32, E = 4;
      const args: ffi.MoeFields = {
        hidden: buf(T * H * 2), routing_map: buf(T * 2 * 4), probs: buf(T * 2 * 4), fc1: buf(E * 2 * I * H * 2), fc2: buf(E * H * I * 2),
        output: buf(T * H * 2), workspace: buf(ws), workspace_bytes: ws, num_tokens: T,
      };
      ffi.memset(h, args.routing_map!, 0, T * 2 * 4, 0);
      ffi.fusedMoe(plan, 0, args);
      for (const name of ["hidden", "routing_map", "probs", "fc1", "fc2", "output"] as const) {
        expectFmoe(() => ffi.fusedMoe(plan, 0, { ...args, [name]: 0 }), INVALID, "fmoe_fused_moe", `${name} is NULL`);
      }
      if (ws > 0) {
        expectFmoe(() => ffi.fusedMoe(plan, 0, { ...args, workspace: 0 }), INVALID, "workspace is NULL");
        expectFmoe(() => ffi.fusedMoe(plan, 0, { ...args, workspace_bytes: ws - 1 }), INVALID, "workspace_bytes");
        expectFmoe(() => ffi.fusedMoe(plan, 0, { ...args, workspace: buf(ws - 1) }), INVALID, "workspace needs");
      }
      expectFmoe(() => ffi.fusedMoe(plan, 0, { ...args, num_tokens: 5 }), INVALID, "num_tokens (5) exceeds the plan's max_tokens (4)");
      expectFmoe(() => ffi.fusedMoe(plan, 0, { ...args, fc1: buf(100) }), INVALID, "fc1 needs");
      expectFmoe(() => ffi.fusedMoe(0, 0, args), INVALID, "not a live plan");
    } finally {
      ffi.planDestroy(h, plan);
    }
    expectFmoe(() => ffi.fusedMoe(plan, 0, { num_tokens: 0 }), INVALID, "not a live plan");
  });

  seededTest("memory, streams, graphs, events: foreign pointers and wrong states", () => {
    const h = ctx()._handle;
    expectFmoe(() => ffi.free(h, 0x1234), INVALID, "fmoe_free");
    const p = buf(64);
    ffi.free(h, p);
    expectFmoe(() => ffi.free(h, p), INVALID, "fmoe_free"); // double free through the raw ABI
    ffi.free(h, 0); // NULL is a no-op
    expectFmoe(() => ffi.alloc(h, -1), INVALID, "fmoe_alloc");
    const q = buf(16);
    expectFmoe(() => ffi.memcpy(h, q, new Uint8Array(32), 32, ffi.MemcpyKind.HostToDevice, 0), INVALID, "fmoe_memcpy");
    expectFmoe(() => ffi.memset(h, q, 0, 17, 0), INVALID, "fmoe_memset");
    expectFmoe(() => ffi.memcpy(h, q, new Uint8Array(4), 4, 7, 0), INVALID, "kind");
    const s = ffi.streamCreate(h);
    expectFmoe(() => ffi.graphCaptureEnd(h, s), Status.INVALID_STATE, "not capturing");
    ffi.streamDestroy(h, s);
    expectFmoe(() => ffi.streamSynchronize(h, s), INVALID, "stream");
    expectFmoe(() => ffi.graphLaunch(h, 0x999, 0), INVALID, "graph");
    const e1 = ffi.eventCreate(h);
    const e2 = ffi.eventCreate(h);
    try {
      expect(() => ffi.eventElapsedMs(h, e1, e2)).toThrow(FmoeError); // never recorded
    } finally {
      ffi.eventDestroy(h, e1);
      ffi.eventDestroy(h, e2);
    }
    expectFmoe(() => ffi.contextSynchronize(0), INVALID, "ctx is NULL");
  });
});

describe("errors: bad data is not an error (no fault, defined results)", () => {
  const ctx = suiteContext("host");

  seededTest("NaN probs propagate to their token only", (rng) => {
    const x = ctx();
    const T = 6, H = 64, I = 32, E = 4;
    using fc1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
    using fc2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
    using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk: 2, activation: "silu", maxTokens: T }, { fc1, fc2 });
    const { routingMap, probs } = makeRouting(rng, T, E, 2);
    probs[2 * 2 + 1] = NaN;
    using hT = x.upload(randBf16(rng, T * H), [T, H], "bf16");
    using rT = x.upload(routingMap, [T, 2]);
    using pT = x.upload(probs, [T, 2]);
    using out = moe.forward({ hidden: hT, routingMap: rT, probs: pT });
    const o = out.download();
    const isNaN = (v: number): boolean => (v & 0x7fff) > 0x7f80;
    for (let t = 0; t < T; ++t) {
      const row = o.subarray(t * H, (t + 1) * H);
      if (t === 2) expect(row.every(isNaN)).toBe(true);
      else expect(row.some(isNaN)).toBe(false);
    }
  });

  seededTest("routing ids at the int32 extremes are dropped and counted, not read", (rng) => {
    const x = ctx();
    const T = 5, H = 32, E = 3;
    using fc1 = x.upload(randWeights(rng, E, 32, H), [E, 32, H], "bf16");
    using fc2 = x.upload(randWeights(rng, E, H, 32), [E, H, 32], "bf16");
    using moe = new FusedMoE(x, { hidden: H, ffn: 32, numExperts: E, topk: 1, activation: "squared_relu", maxTokens: T }, { fc1, fc2 });
    using hT = x.upload(randBf16(rng, T * H), [T, H], "bf16");
    using rT = x.upload(Int32Array.of(2147483647, -2147483648, 3, -1, 1), [T, 1]);
    using pT = x.upload(Float32Array.of(1, 1, 1, 1, 1), [T, 1]);
    using out = moe.forward({ hidden: hT, routingMap: rT, probs: pT });
    expect(moe.invalidCount()).toBe(4);
    const o = out.download();
    expect(o.subarray(0, 4 * H).every((v) => (v & 0x7fff) === 0)).toBe(true);
    expect(o.subarray(4 * H).some((v) => v !== 0)).toBe(true);
  });
});
