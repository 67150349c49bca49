// FusedMoE (fmoe_fused_moe) on the host backend against lib/reference.ts's whole-layer reference.
//
// Tolerances (relative Frobenius over the whole output):
// - bf16 weights: TOLERANCE.bf16 (1e-2) against the bf16 reference;
// - mxfp8 weights: TOLERANCE.mxfp8 (2e-2) against the MXFP8 reference (same quantization rule; a
//   flipped bf16 rounding before a quantization moves an e4m3 code), and TOLERANCE.mxfp8VsBf16
//   against the bf16 reference (the quantization error itself). That error is statistical: few
//   output rows and a short FC2 k (one or two scale blocks, where a few activations dominate) give
//   it a long tail over seeds, so the cases with only 1-3 tokens take H and I large enough to
//   keep it well under the tolerance;
// - the three ways to give MXFP8 weights (bf16 quantized on the device, pre-quantized with linear
//   or swizzled scales) hold the same bytes, so their outputs are compared bit for bit.
// Outputs are poisoned with 0xFF first: every row of the output is written (zeros for tokens
// without a local slot, and for skip-permute rows beyond sum(tokens_per_expert)).
import { describe, expect } from "bun:test";
import {
  type Activation,
  ACTIVATIONS,
  type Context,
  fc1Outputs,
  FusedMoE,
  type FusedMoEConfig,
  type GatedLayout,
  reference as R,
  type Rng,
  TOLERANCE,
  type WeightFormat,
} from "../lib/index.ts";
import {
  expectBitExact,
  expectClose,
  expectNoNaNBf16,
  expectNonZero,
  injectInvalidIds,
  makeRouting,
  randBf16,
  randWeights,
  type RoutingPattern,
  seededTest,
  suiteContext,
} from "./helpers.ts";

interface Case {
  name: string;
  T: number;
  H: number;
  I: number;
  E: number;
  topk: number;
  activation: Activation;
  layout?: GatedLayout;
  alpha?: number;
  limit?: number;
  start?: number;
  local?: number;
  alignment?: number;
  maxTokens?: number;
  bias?: boolean;
  pattern?: RoutingPattern;
  hot?: number;
  invalid?: number;
  onInput?: boolean;
  formats?: WeightFormat[];
}

const CASES: Case[] = [];
for (const act of ACTIVATIONS) {
  CASES.push({ name: `${act}, halves, biases`, T: 19, H: 64, I: 32, E: 8, topk: 2, activation: act, bias: true });
  if (act !== "squared_relu") CASES.push({ name: `${act}, interleaved`, T: 11, H: 64, I: 64, E: 4, topk: 2, activation: act, layout: "interleaved" });
}
CASES.push(
  { name: "swiglu_oai alpha 1.3, limit 2, interleaved, biases", T: 12, H: 64, I: 32, E: 6, topk: 3, activation: "swiglu_oai", layout: "interleaved", alpha: 1.3, limit: 2, bias: true },
  { name: "T = 0", T: 0, H: 64, I: 32, E: 4, topk: 2, activation: "silu" },
  { name: "T = 1, topk = 8 of 16 experts", T: 1, H: 128, I: 128, E: 16, topk: 8, activation: "silu" },
  { name: "topk = 8, T = 6, alignment 1", T: 6, H: 32, I: 32, E: 12, topk: 8, activation: "gelu", alignment: 1 },
  { name: "topk = 1, alignment 128", T: 25, H: 64, I: 32, E: 4, topk: 1, activation: "squared_relu", alignment: 128 },
  { name: "odd H = 33, I = 17 (bf16)", T: 7, H: 33, I: 17, E: 3, topk: 2, activation: "silu", bias: true, formats: ["bf16"] },
  { name: "H = 2880, T = 2, 2 experts, topk = 1", T: 2, H: 2880, I: 64, E: 2, topk: 1, activation: "swiglu_oai", bias: true },
  { name: "experts with no tokens (3 tokens over 32 experts)", T: 3, H: 128, I: 64, E: 32, topk: 2, activation: "silu" },
  { name: "all tokens on one expert", T: 24, H: 64, I: 32, E: 6, topk: 1, activation: "silu", pattern: "one-expert", hot: 4 },
  { name: "skewed routing with repeated ids per token", T: 20, H: 32, I: 32, E: 5, topk: 3, activation: "squared_relu", pattern: "skewed" },
  {
    name: "expert-parallel slice [2, 5) of 8: slots routed to other ranks give nothing, out-of-range ids counted",
    T: 21, H: 64, I: 32, E: 8, topk: 2, activation: "silu", start: 2, local: 3, invalid: 5, bias: true,
  },
  { name: "out-of-range ids (negative and >= numExperts) dropped and counted", T: 10, H: 64, I: 32, E: 6, topk: 3, activation: "gelu", invalid: 9 },
  { name: "apply_router_weight_on_input (topk = 1)", T: 15, H: 64, I: 32, E: 5, topk: 1, activation: "silu", onInput: true, bias: true },
  { name: "T < maxTokens", T: 5, H: 64, I: 32, E: 4, topk: 2, activation: "silu", maxTokens: 40 },
  { name: "medium: T = 64, H = 128, I = 64, 16 experts, topk = 4", T: 64, H: 128, I: 64, E: 16, topk: 4, activation: "silu", bias: true },
);

interface Layer {
  fc1: Uint16Array;
  fc2: Uint16Array;
  fc1Bias?: Float32Array;
  fc2Bias?: Float32Array;
}

function makeLayer(rng: Rng, c: { H: number; I: number; activation: Activation; bias?: boolean }, E: number): Layer {
  const N1 = fc1Outputs(c.activation, c.I);
  return {
    fc1: randWeights(rng, E, N1, c.H),
    fc2: randWeights(rng, E, c.H, c.I),
    fc1Bias: c.bias ? Float32Array.from({ length: E * N1 }, () => rng.normal() * 0.2) : undefined,
    fc2Bias: c.bias ? Float32Array.from({ length: E * c.H }, () => rng.normal() * 0.2) : undefined,
  };
}

function configOf(c: Case, format: WeightFormat): FusedMoEConfig {
  return {
    hidden: c.H, ffn: c.I, numExperts: c.E, numLocalExperts: c.local, localExpertStart: c.start, topk: c.topk,
    activation: c.activation, layout: c.layout, alpha: c.alpha, limit: c.limit, weightFormat: format,
    alignment: c.alignment, maxTokens: c.maxTokens ?? Math.max(1, c.T), applyRouterWeightOnInput: c.onInput,
  };
}

/** Uploads the layer's weights (bf16) and biases; returns tensors to dispose. */
function uploadLayer(x: Context, layer: Layer, E: number, N1: number, H: number, I: number) {
  return {
    fc1: x.upload(layer.fc1, [E, N1, H], "bf16"),
    fc2: x.upload(layer.fc2, [E, H, I], "bf16"),
    fc1Bias: layer.fc1Bias && x.upload(layer.fc1Bias, [E, N1]),
    fc2Bias: layer.fc2Bias && x.upload(layer.fc2Bias, [E, H]),
    [Symbol.dispose]() {
      for (const t of [this.fc1, this.fc2, this.fc1Bias, this.fc2Bias]) t?.dispose();
    },
  };
}

describe("FusedMoE forward (host backend vs reference)", () => {
  const ctx = suiteContext("host");

  for (const c of CASES) {
    for (const format of c.formats ?? (["bf16", "mxfp8"] as const)) {
      seededTest(`${format}: ${c.name}`, (rng) => runCase(c, format, rng));
    }
  }

  async function runCase(c: Case, format: WeightFormat, rng: Rng): Promise<void> {
    const x = ctx();
    const E = c.local ?? c.E - (c.start ?? 0);
    const N1 = fc1Outputs(c.activation, c.I);
    const layer = makeLayer(rng, c, E);
    const hidden = randBf16(rng, c.T * c.H);
    const { routingMap, probs } = makeRouting(rng, c.T, c.E, c.topk, c.pattern, c.hot);
    const injected = c.invalid !== undefined ? injectInvalidIds(rng, routingMap, c.E, c.invalid).length : 0;
    const cfg = configOf(c, format);
    using w = uploadLayer(x, layer, E, N1, c.H, c.I);
    using moe = new FusedMoE(x, cfg, w);
    using hT = x.upload(hidden, [c.T, c.H], "bf16");
    using rT = x.upload(routingMap, [c.T, c.topk]);
    using pT = x.upload(probs, [c.T, c.topk]);
    using out = x.empty([c.T, c.H], "bf16").fill(0xff);
    moe.forward({ hidden: hT, routingMap: rT, probs: pT, out });
    const got = out.download();
    const refCfg = { ...cfg, numLocalExperts: E };
    const ref = R.fusedMoe(refCfg, layer, { hidden, numTokens: c.T, routingMap, probs });
    expect(ref.invalidCount).toBe(injected);
    expect(moe.invalidCount()).toBe(injected);
    expectNoNaNBf16(got, "output");
    expectNonZero(ref.out, "reference");
    expectClose(got, ref.out, format === "bf16" ? TOLERANCE.bf16 : TOLERANCE.mxfp8, `${format} layer vs reference`);
    if (format === "mxfp8" && c.T > 0) {
      const bf = R.fusedMoe({ ...refCfg, weightFormat: "bf16" }, layer, { hidden, numTokens: c.T, routingMap, probs });
      expectClose(got, bf.out, TOLERANCE.mxfp8VsBf16, "mxfp8 layer vs bf16 reference");
    }
    // Tokens without a local slot: exactly zero.
    const start = c.start ?? 0;
    for (let t = 0; t < c.T; ++t) {
      let local = false;
      for (let k = 0; k < c.topk; ++k) {
        const id = routingMap[t * c.topk + k]!;
        if (id >= start && id < start + E) local = true;
      }
      if (!local) expect(got.subarray(t * c.H, (t + 1) * c.H).every((v) => (v & 0x7fff) === 0)).toBe(true);
    }
    // The counter accumulates over calls until reset.
    if (injected > 0) {
      moe.forward({ hidden: hT, routingMap: rT, probs: pT, out });
      expect(moe.invalidCount()).toBe(2 * injected);
      expect(await moe.invalidCountAsync()).toBe(2 * injected);
      moe.resetInvalidCount();
      expect(await moe.invalidCountAsync({ spinMs: 0 })).toBe(0);
      expect(moe.invalidCount()).toBe(0);
    }
  }

  for (const act of ["silu", "squared_relu"] as const) {
    seededTest(`mxfp8 weights: bf16 quantized on the device == pre-quantized linear scales == swizzled scales (${act})`, (rng) => {
      const x = ctx();
      const c = { T: 13, H: 96, I: 64, E: 5, topk: 2, activation: act, bias: true };
      const N1 = fc1Outputs(act, c.I);
      const layer = makeLayer(rng, c, c.E);
      const hidden = randBf16(rng, c.T * c.H);
      const { routingMap, probs } = makeRouting(rng, c.T, c.E, c.topk);
      const cfg: FusedMoEConfig = { hidden: c.H, ffn: c.I, numExperts: c.E, topk: c.topk, activation: act, weightFormat: "mxfp8", maxTokens: c.T };
      using w = uploadLayer(x, layer, c.E, N1, c.H, c.I);
      using hT = x.upload(hidden, [c.T, c.H], "bf16");
      using rT = x.upload(routingMap, [c.T, c.topk]);
      using pT = x.upload(probs, [c.T, c.topk]);
      const q1 = R.quantizeMxfp8(layer.fc1, c.E * N1, c.H);
      const q2 = R.quantizeMxfp8(layer.fc2, c.E * c.H, c.I);
      using d1 = x.upload(q1.data, [c.E, N1, c.H], "e4m3");
      using d2 = x.upload(q2.data, [c.E, c.H, c.I], "e4m3");
      using s1 = x.upload(q1.scale, [c.E, N1, c.H / 32], "e8m0");
      using s2 = x.upload(q2.scale, [c.E, c.H, c.I / 32], "e8m0");
      const sw1 = R.swizzleScales(q1.scale, c.E, N1, c.H / 32);
      const sw2 = R.swizzleScales(q2.scale, c.E, c.H, c.I / 32);
      using z1 = x.upload(sw1, [sw1.length], "e8m0");
      using z2 = x.upload(sw2, [sw2.length], "e8m0");
      const bias = { fc1Bias: w.fc1Bias, fc2Bias: w.fc2Bias };
      const outs: Uint16Array[] = [];
      for (const weights of [
        { fc1: w.fc1, fc2: w.fc2, ...bias },
        { fc1: d1, fc2: d2, fc1Scale: s1, fc2Scale: s2, ...bias },
        { fc1: d1, fc2: d2, fc1Scale: z1, fc2Scale: z2, scaleLayout: "swizzled" as const, ...bias },
      ]) {
        using moe = new FusedMoE(x, cfg, weights);
        using out = moe.forward({ hidden: hT, routingMap: rT, probs: pT });
        outs.push(out.download());
      }
      expectBitExact(outs[1]!, outs[0]!, "pre-quantized linear vs device-quantized");
      expectBitExact(outs[2]!, outs[0]!, "pre-quantized swizzled vs device-quantized");
      const ref = R.fusedMoe({ ...cfg }, { fc1: q1.data, fc1Scale: q1.scale, fc2: q2.data, fc2Scale: q2.scale, fc1Bias: layer.fc1Bias, fc2Bias: layer.fc2Bias }, { hidden, numTokens: c.T, routingMap, probs });
      expectNonZero(ref.out, "reference");
      expectClose(outs[0]!, ref.out, TOLERANCE.mxfp8, "vs reference with pre-quantized weights");
    });
  }

  seededTest("apply_router_weight_on_input differs from scaling the output (the activation is not linear)", (rng) => {
    const x = ctx();
    const c = { T: 8, H: 64, I: 32, E: 4, topk: 1, activation: "silu" as const };
    const layer = makeLayer(rng, c, c.E);
    const { routingMap } = makeRouting(rng, c.T, c.E, 1);
    const probs = Float32Array.from({ length: c.T }, () => 0.1 + 0.3 * rng.uniform());
    using w = uploadLayer(x, layer, c.E, 2 * c.I, c.H, c.I);
    using hT = x.upload(randBf16(rng, c.T * c.H), [c.T, c.H], "bf16");
    using rT = x.upload(routingMap, [c.T, 1]);
    using pT = x.upload(probs, [c.T, 1]);
    const base = { hidden: c.H, ffn: c.I, numExperts: c.E, topk: 1, activation: c.activation, maxTokens: c.T };
    using a = new FusedMoE(x, base, w);
    using b = new FusedMoE(x, { ...base, applyRouterWeightOnInput: true }, w);
    using oa = a.forward({ hidden: hT, routingMap: rT, probs: pT });
    using ob = b.forward({ hidden: hT, routingMap: rT, probs: pT });
    expect(R.relFrobenius(ob.download(), oa.download())).toBeGreaterThan(0.05);
  });
});

describe("FusedMoE forwardGrouped: skip-permute mode (host backend vs reference)", () => {
  const ctx = suiteContext("host");

  interface GCase {
    name: string;
    rows: number;
    tpe: number[];
    H: number;
    I: number;
    topk: number;
    activation: Activation;
    maxTokens: number;
    start?: number;
    numExperts?: number;
    onInput?: boolean;
    bias?: boolean;
  }
  const GCASES: GCase[] = [
    { name: "sum(tokens_per_expert) = rows, an empty expert", rows: 12, tpe: [3, 0, 5, 4], H: 64, I: 32, topk: 2, activation: "squared_relu", maxTokens: 6 },
    { name: "rows beyond sum(tokens_per_expert) give zeros", rows: 20, tpe: [2, 6, 0, 3], H: 64, I: 32, topk: 2, activation: "silu", maxTokens: 10, bias: true },
    { name: "sum(tokens_per_expert) beyond rows: the excess is ignored", rows: 9, tpe: [4, 7, 5], H: 32, I: 32, topk: 3, activation: "gelu", maxTokens: 3 },
    { name: "every row on the last expert, local slice [3, 6) of 8", rows: 10, tpe: [0, 0, 10], H: 64, I: 32, topk: 2, activation: "swiglu_oai", maxTokens: 5, start: 3, numExperts: 8 },
    { name: "rows = 0", rows: 0, tpe: [0, 0], H: 64, I: 32, topk: 2, activation: "silu", maxTokens: 4 },
    { name: "apply_router_weight_on_input (topk = 1)", rows: 7, tpe: [2, 5], H: 64, I: 32, topk: 1, activation: "silu", maxTokens: 8, onInput: true },
    { name: "negative tokens_per_expert entries count as 0", rows: 8, tpe: [-3, 4, 2], H: 32, I: 32, topk: 2, activation: "silu", maxTokens: 4 },
  ];

  for (const g of GCASES) {
    for (const format of ["bf16", "mxfp8"] as const) {
      seededTest(`${format}: ${g.name}`, (rng) => {
        const x = ctx();
        const E = g.tpe.length;
        const N1 = fc1Outputs(g.activation, g.I);
        const layer = makeLayer(rng, g, E);
        const hidden = randBf16(rng, g.rows * g.H);
        const probs = Float32Array.from({ length: g.rows }, () => 0.05 + rng.uniform());
        const tpe = Int32Array.from(g.tpe);
        const numExperts = g.numExperts ?? E;
        const cfg: FusedMoEConfig = {
          hidden: g.H, ffn: g.I, numExperts, numLocalExperts: E, localExpertStart: g.start, topk: g.topk,
          activation: g.activation, weightFormat: format, maxTokens: g.maxTokens, applyRouterWeightOnInput: g.onInput,
        };
        using w = uploadLayer(x, layer, E, N1, g.H, g.I);
        using moe = new FusedMoE(x, cfg, w);
        using hT = x.upload(hidden, [g.rows, g.H], "bf16");
        using tT = x.upload(tpe);
        using pT = x.upload(probs);
        using out = x.empty([g.rows, g.H], "bf16").fill(0xff);
        moe.forwardGrouped({ hidden: hT, tokensPerExpert: tT, probs: pT, out });
        const got = out.download();
        const ref = R.fusedMoe({ ...cfg, numLocalExperts: E }, layer, { hidden, numTokens: g.rows, probs, tokensPerExpert: tpe });
        expectNoNaNBf16(got, "output");
        expectNonZero(ref.out, "reference");
        expectClose(got, ref.out, format === "bf16" ? TOLERANCE.bf16 : TOLERANCE.mxfp8, "grouped layer vs reference");
        const used = Math.min(g.rows, g.tpe.reduce((a, b) => a + Math.max(0, b), 0));
        expect(got.subarray(used * g.H).every((v) => (v & 0x7fff) === 0)).toBe(true);
        expect(moe.invalidCount()).toBe(0); // rows beyond the sum are not routing errors
      });
    }
  }
});
