// The CUDA backend against the host backend: the same inputs are uploaded to both contexts and
// every op is compared. Skipped (with the reason printed) where no CUDA device is visible.
//
// Tolerances (relative Frobenius unless bit-exact):
// - bit-exact: permute (maps, offsets, n_used, invalid count, copied rows and their MXFP8 copy),
//   MXFP8 quantization / dequantization / swizzling, unpermute of identical inputs, the fused
//   MXFP8 activation against the same backend's quantization of its bf16 output, graph replays
//   against eager runs, repeated runs against each other;
// - activation bf16 output: 1e-2 (f32 transcendental functions may differ by an ulp);
// - grouped GEMM (bf16, and MXFP8 on identical quantized operands): 1e-2;
// - FusedMoE: bf16 weights 2e-2, mxfp8 weights 3e-2 (a flipped bf16 rounding before a
//   quantization moves an e4m3 code, which the next GEMM carries).
// Only rows an op writes are compared; skipped rows must keep the 0xFF poison on both backends.
//
// The real model shapes (lib/cases.ts) run at T = 1, 33 and 512 with weights filled on the device
// from a random pool; a token's output depends only on its own routing, so the host backend runs
// only a few tokens, with only the weights of the experts those tokens route to.
import { describe, expect, setDefaultTimeout } from "bun:test";
import {
  activation,
  ACTIVATIONS,
  type Activation,
  BENCH_CASES,
  type BenchCase,
  Context,
  dequantizeMxfp8,
  type DType,
  fc1Outputs,
  FusedMoE,
  type GatedLayout,
  groupedMmBf16,
  groupedMmMxfp8,
  isGated,
  maxRows,
  permute,
  quantizeMxfp8,
  randomRouting,
  reference as R,
  type Rng,
  route,
  Status,
  swizzleScales,
  type Tensor,
  unpermute,
  unswizzleScales,
  type WeightFormat,
} from "../lib/index.ts";
import * as ffi from "../lib/ffi.ts";
import {
  CUDA_DEVICES,
  checkFreedBufferWaitsForItsWork,
  checkCaptureRefusals,
  checkReplay,
  countEventLoopTurns,
  queueLongWork,
  expectBitExact,
  expectClose,
  expectFmoe,
  expectNoNaNBf16,
  expectNonZero,
  HAS_LIBRARY,
  injectInvalidIds,
  layerWithInput,
  makeRouting,
  MXFP8_VECTORS,
  mxfp8VectorData,
  mxfp8VectorInput,
  pickRows,
  randBf16,
  randWeights,
  realRows,
  type RoutingPattern,
  seededTest,
  suiteContext,
} from "./helpers.ts";
import { bf16ToF32, f32ToBf16 } from "../lib/dtype.ts";

// Several tests fill hundreds of MB of inputs on the host first (8192 x 4096 operands, 20-run
// determinism checks): seconds before the device is involved, past bun's 5 s default.
setDefaultTimeout(60_000);

const TOL = {
  activation: 1e-2,
  gemm: 1e-2,
  moeBf16: 2e-2,
  moeMxfp8: 3e-2,
} as const;

const SKIP = CUDA_DEVICES === 0;
if (SKIP) {
  const why = !HAS_LIBRARY
    ? "the native library is not built"
    : `no CUDA device (Context.cudaDeviceCount() = 0; build: ${Context.buildInfo()})`;
  console.log(`test/cuda.test.ts: CUDA suite skipped: ${why}`);
}

type HostArray = Uint16Array | Float32Array | Int32Array | Uint8Array;

describe.skipIf(SKIP)("CUDA backend vs host backend", () => {
  const gpu = suiteContext("cuda");
  const cpu = suiteContext("host");

  /** Runs `body` on both contexts (GPU first); returns [gpu result, host result]. */
  function both<R>(body: (x: Context) => R): [R, R] {
    return [body(gpu()), body(cpu())];
  }

  function up(x: Context, data: HostArray, shape: readonly number[], dtype: DType): Tensor {
    return x.upload(data, shape, dtype);
  }

  seededTest("the CUDA context is a Hopper device", () => {
    const x = gpu();
    expect(x.backend).toBe("cuda");
    expect(x.props.computeCapability).toBeGreaterThanOrEqual(90);
    console.log(`cuda.test.ts: ${x.deviceName}, ${(x.props.globalMemoryBytes / 2 ** 30).toFixed(0)} GiB, ${x.props.multiprocessors} SMs; host: ${cpu().deviceName}`);
  });

  // ----------------------------------------------------------------------------------------------
  // permute

  interface PermCase { name: string; T: number; H: number; E: number; topk: number; alignment: number; start?: number; local?: number; pattern?: RoutingPattern; invalid?: number; probs?: boolean; quantize?: boolean }
  const PERM: PermCase[] = [
    { name: "T = 0", T: 0, H: 64, E: 4, topk: 2, alignment: 16 },
    { name: "T = 1", T: 1, H: 64, E: 8, topk: 2, alignment: 16, quantize: true },
    { name: "odd H = 33, alignment 1, probs", T: 7, H: 33, E: 5, topk: 2, alignment: 1, probs: true },
    { name: "H = 2880, MXFP8 copy", T: 3, H: 2880, E: 4, topk: 2, alignment: 16, quantize: true },
    { name: "topk = 1", T: 17, H: 64, E: 4, topk: 1, alignment: 16 },
    { name: "topk = 8", T: 9, H: 96, E: 16, topk: 8, alignment: 16, quantize: true },
    { name: "experts with no tokens", T: 3, H: 64, E: 32, topk: 2, alignment: 16 },
    { name: "all tokens on one expert", T: 300, H: 64, E: 6, topk: 1, alignment: 16, pattern: "one-expert" },
    { name: "expert-parallel slice [64, 96) of 256, out-of-range ids", T: 700, H: 128, E: 256, topk: 8, alignment: 16, start: 64, local: 32, invalid: 50, quantize: true },
    { name: "out-of-range ids, probs, MXFP8 copy", T: 100, H: 64, E: 6, topk: 3, alignment: 16, invalid: 40, probs: true, quantize: true },
    { name: "alignment 128, skewed", T: 500, H: 64, E: 8, topk: 3, alignment: 128, pattern: "skewed" },
    { name: "large: T = 4096, topk = 8, 128 experts", T: 4096, H: 256, E: 128, topk: 8, alignment: 16, probs: true, quantize: true },
    { name: "large: T = 8192, topk = 8, 256 experts, alignment 128", T: 8192, H: 64, E: 256, topk: 8, alignment: 128 },
  ];
  for (const c of PERM) {
    seededTest(`permute: ${c.name} (bit-exact)`, (rng) => {
      const hidden = randBf16(rng, c.T * c.H);
      const { routingMap, probs } = makeRouting(rng, c.T, c.E, c.topk, c.pattern, 1);
      if (c.invalid) injectInvalidIds(rng, routingMap, c.E, c.invalid);
      const [g, h] = both((x) => {
        using hT = up(x, hidden, [c.T, c.H], "bf16");
        using rT = up(x, routingMap, [c.T, c.topk], "i32");
        using pT = up(x, probs, [c.T, c.topk], "f32");
        using counter = x.upload(Int32Array.of(3));
        // With quantize, the bf16 copy is written too when passed in `out`.
        const local = c.local ?? c.E - (c.start ?? 0);
        const bfCopy = c.quantize ? x.empty([maxRows(c.T, c.topk, local, c.alignment), c.H], "bf16") : undefined;
        const p = permute(x, { hidden: hT, routingMap: rT, probs: c.probs ? pT : undefined, numExperts: c.E, localExpertStart: c.start, numLocalExperts: c.local, alignment: c.alignment, invalidCount: counter, quantize: c.quantize, out: { permuted: bfCopy } });
        try {
          return {
            offsets: p.expertOffsets.download(), map: p.permutationMap.download(), inv: p.inverseMap.download(), nUsed: p.nUsed.download()[0]!,
            counter: counter.download()[0]!, permuted: p.permuted?.download(), q: p.permutedQ?.download(), s: p.permutedScale?.download(),
          };
        } finally {
          for (const t of [p.permuted, p.permutedQ, p.permutedScale, p.expertOffsets, p.permutationMap, p.inverseMap]) t?.dispose();
        }
      });
      expectBitExact(g.offsets, h.offsets, "expertOffsets");
      expectBitExact(g.map, h.map, "permutationMap");
      expectBitExact(g.inv, h.inv, "inverseMap");
      expect(g.nUsed).toBe(h.nUsed);
      expect(g.counter).toBe(h.counter);
      const real = realRows(h.map, h.nUsed);
      if (g.permuted !== undefined) expectBitExact(pickRows(g.permuted, c.H, real), pickRows(h.permuted!, c.H, real), "permuted rows");
      if (c.quantize) {
        expectBitExact(pickRows(g.q!, c.H, real), pickRows(h.q!, c.H, real), "permutedQ rows");
        expectBitExact(pickRows(g.s!, c.H / 32, real), pickRows(h.s!, c.H / 32, real), "permutedScale rows");
      }
    });
  }

  // ----------------------------------------------------------------------------------------------
  // activation

  interface ActCase { rows: number; ffn: number; activation: Activation; layout: GatedLayout; alpha?: number; limit?: number; nUsed?: number; skip?: boolean; std: number }
  const ACTS: ActCase[] = [];
  for (const act of ACTIVATIONS) {
    for (const layout of isGated(act) ? (["halves", "interleaved"] as const) : (["halves"] as const)) {
      ACTS.push({ rows: 300, ffn: 256, activation: act, layout, nUsed: 250, skip: true, std: 2 });
      ACTS.push({ rows: 9, ffn: 33, activation: act, layout, std: 1.5 });
    }
  }
  ACTS.push({ rows: 77, ffn: 96, activation: "swiglu_oai", layout: "interleaved", alpha: 1.25, limit: 2.5, skip: true, std: 4 });
  ACTS.push({ rows: 3, ffn: 2880, activation: "swiglu_oai", layout: "halves", std: 3 });
  ACTS.push({ rows: 4096, ffn: 1024, activation: "silu", layout: "halves", nUsed: 4000, skip: true, std: 2 });
  ACTS.push({ rows: 0, ffn: 64, activation: "gelu", layout: "halves", std: 1 });
  for (const c of ACTS) {
    const name = `activation: ${c.activation} ${isGated(c.activation) ? c.layout : ""} [${c.rows} x ${c.ffn}]${c.alpha !== undefined ? ` alpha ${c.alpha} limit ${c.limit}` : ""}${c.skip ? ", row map" : ""}${c.nUsed !== undefined ? `, n_used ${c.nUsed}` : ""}`;
    seededTest(name, (rng) => {
      const n1 = fc1Outputs(c.activation, c.ffn);
      const input = randBf16(rng, c.rows * n1, c.std);
      const rowMap = Int32Array.from({ length: c.rows }, (_, r) => (c.skip && rng.uniform() < 0.2 ? -1 : r));
      const quant = c.ffn % 32 === 0;
      const [g, h] = both((x) => {
        using inT = up(x, input, [c.rows, n1], "bf16");
        using mapT = up(x, rowMap, [c.rows], "i32");
        using nT = x.upload(Int32Array.of(c.nUsed ?? 0));
        const common = { input: inT, activation: c.activation, layout: c.layout, alpha: c.alpha, limit: c.limit, rowMap: c.skip ? mapT : undefined, nUsed: c.nUsed !== undefined ? nT : undefined };
        using out = x.empty([c.rows, c.ffn], "bf16").fill(0xff);
        activation(x, { ...common, out });
        const bf = out.download();
        if (!quant) return { bf };
        using q = x.empty([c.rows, c.ffn], "e4m3").fill(0xff);
        using s = x.empty([c.rows, c.ffn / 32], "e8m0").fill(0xff);
        activation(x, { ...common, quantize: true, out: { data: q, scale: s } });
        using bfT = x.upload(bf, [c.rows, c.ffn], "bf16");
        const own = quantizeMxfp8(x, bfT);
        try {
          return { bf, q: q.download(), s: s.download(), ownQ: own.data.download(), ownS: own.scale.download() };
        } finally {
          own.data.dispose();
          own.scale.dispose();
        }
      });
      const written: number[] = [];
      for (let r = 0; r < c.rows; ++r) if ((!c.skip || rowMap[r] !== -1) && (c.nUsed === undefined || r < c.nUsed)) written.push(r);
      const skipped = Array.from({ length: c.rows }, (_, r) => r).filter((r) => !written.includes(r));
      for (const [name, arr] of [["gpu", g.bf], ["host", h.bf]] as const) {
        expect(pickRows(arr, c.ffn, skipped).every((v) => v === 0xffff)).toBe(true);
        expectNoNaNBf16(pickRows(arr, c.ffn, written), `${name} written rows`);
      }
      expectNonZero(pickRows(h.bf, c.ffn, written), "host");
      expectClose(pickRows(g.bf, c.ffn, written), pickRows(h.bf, c.ffn, written), TOL.activation, "bf16 output");
      if (quant) {
        expectBitExact(pickRows(g.q!, c.ffn, written), pickRows(g.ownQ!, c.ffn, written), "fused MXFP8 data == quantize(own bf16)");
        expectBitExact(pickRows(g.s!, c.ffn / 32, written), pickRows(g.ownS!, c.ffn / 32, written), "fused MXFP8 scales == quantize(own bf16)");
        expect(pickRows(g.q!, c.ffn, skipped).every((v) => v === 0xff)).toBe(true);
      }
    });
  }

  // ----------------------------------------------------------------------------------------------
  // MXFP8 quantization and layouts

  seededTest("quantize: the hand-computed vectors, bit for bit", () => {
    const n = MXFP8_VECTORS.length;
    const input = new Uint16Array(n * 32);
    const data = new Uint8Array(n * 32);
    MXFP8_VECTORS.forEach((v, i) => {
      input.set(mxfp8VectorInput(v), i * 32);
      data.set(mxfp8VectorData(v), i * 32);
    });
    for (const shape of [[n, 32], [1, n * 32]]) {
      using inT = gpu().upload(input, shape, "bf16");
      const q = quantizeMxfp8(gpu(), inT);
      try {
        expectBitExact(q.data.download(), data, `data [${shape}]`);
        expectBitExact(q.scale.download(), Uint8Array.from(MXFP8_VECTORS.map((v) => v.scale)), `scale [${shape}]`);
      } finally {
        q.data.dispose();
        q.scale.dispose();
      }
    }
  });

  for (const [rows, cols] of [[0, 64], [1, 32], [3, 2880], [1000, 96], [4096, 2048], [7, 7168]] as const) {
    seededTest(`quantize / dequantize [${rows} x ${cols}], magnitudes 2^-130..2^120 with zero, NaN, Inf blocks (bit-exact)`, (rng) => {
      const input = new Uint16Array(rows * cols);
      for (let b = 0; b < (rows * cols) / 32; ++b) {
        const std = 2 ** (rng.int(250) - 130);
        for (let i = 0; i < 32; ++i) input[b * 32 + i] = f32ToBf16(rng.normal() * std);
        const roll = rng.uniform();
        if (roll < 0.02) input[b * 32 + rng.int(32)] = 0x7fc0;
        else if (roll < 0.04) input[b * 32 + rng.int(32)] = rng.uniform() < 0.5 ? 0x7f80 : 0xff80;
        else if (roll < 0.06) input.fill(0, b * 32, b * 32 + 32);
      }
      const [g, h] = both((x) => {
        using inT = up(x, input, [rows, cols], "bf16");
        const q = quantizeMxfp8(x, inT);
        try {
          using deq = dequantizeMxfp8(x, q.data, q.scale);
          using sw = swizzleScales(x, q.scale);
          using back = unswizzleScales(x, sw, { rows, scaleCols: cols / 32 });
          return { d: q.data.download(), s: q.scale.download(), f: deq.download(), sw: sw.download(), back: back.download() };
        } finally {
          q.data.dispose();
          q.scale.dispose();
        }
      });
      expectBitExact(g.d, h.d, "data");
      expectBitExact(g.s, h.s, "scale");
      expectBitExact(g.f, h.f, "dequantized");
      expectBitExact(g.sw, h.sw, "swizzled");
      expectBitExact(g.back, h.s, "unswizzle(swizzle)");
    });
  }

  seededTest("swizzle: batched scales [8, 4096, 224] and [3, 130, 5] (bit-exact)", (rng) => {
    for (const [batch, rows, cols] of [[8, 4096, 224], [3, 130, 5]] as const) {
      const lin = Uint8Array.from({ length: batch * rows * cols }, () => rng.int(256));
      const [g, h] = both((x) => {
        using l = up(x, lin, [batch, rows, cols], "e8m0");
        using sw = swizzleScales(x, l);
        using back = unswizzleScales(x, sw, { rows, scaleCols: cols });
        return { sw: sw.download(), back: back.download() };
      });
      expectBitExact(g.sw, h.sw, "swizzled");
      expectBitExact(g.back, lin, "round trip");
    }
  });

  // ----------------------------------------------------------------------------------------------
  // grouped GEMM

  interface MmCase { name: string; rows: number; n: number; k: number; sizes: number[]; bias?: boolean; skip?: boolean; offsets?: number[]; formats?: readonly ("bf16" | "mxfp8")[] }
  const MM: MmCase[] = [
    { name: "rows = 0", rows: 0, n: 32, k: 64, sizes: [0, 0] },
    { name: "one row", rows: 1, n: 32, k: 64, sizes: [1] },
    { name: "odd n = 17, k = 33 (bf16)", rows: 20, n: 17, k: 33, sizes: [7, 0, 9], bias: true },
    { name: "group sizes around tile edges (1, 63, 65, 127, 129)", rows: 400, n: 96, k: 160, sizes: [1, 63, 65, 0, 127, 129], skip: true, bias: true },
    { name: "rows beyond offsets[groups]", rows: 300, n: 64, k: 64, sizes: [100, 50] },
    { name: "k = 2880, n = 200", rows: 70, n: 200, k: 2880, sizes: [30, 40], bias: true },
    { name: "k = 96 (K tail), n = 2880", rows: 40, n: 2880, k: 96, sizes: [0, 40] },
    { name: "medium: 1024 rows, n 768, k 1024, 8 groups with empty ones", rows: 1024, n: 768, k: 1024, sizes: [200, 0, 312, 128, 0, 256, 100, 28], skip: true, bias: true },
    { name: "bad offsets (decreasing, past rows) skip their group", rows: 64, n: 32, k: 64, sizes: [], offsets: [0, 20, 10, 10, 100] },
    // The wide bf16 kernel runs in CTA pairs only where a group's weight matrix holds >= 12 MiB
    // (here 12.5) and there are wide tiles for every SM: 11 row tiles x 25 column tiles, an odd
    // count, so the last pair's second CTA computes a stand-in tile that it must not store.
    { name: "CTA pairs: 12.5 MiB of weights per group, 275 tiles, 1200 rows, n 6400, k 1024", rows: 1200, n: 6400, k: 1024, sizes: [200, 0, 129, 500, 371], skip: true, bias: true, formats: ["bf16"] },
  ];
  for (const c of MM) {
    for (const format of c.formats ?? (["bf16", "mxfp8"] as const)) {
      if (format === "mxfp8" && c.k % 32 !== 0) continue;
      seededTest(`grouped GEMM ${format}: ${c.name}`, (rng) => {
        const offsets = c.offsets !== undefined ? Int32Array.from(c.offsets) : Int32Array.from([0, ...c.sizes.map((_, i) => c.sizes.slice(0, i + 1).reduce((a, b) => a + b, 0))]);
        const groups = offsets.length - 1;
        const a = randBf16(rng, c.rows * c.k);
        const b = randWeights(rng, groups, c.n, c.k);
        const bias = Float32Array.from({ length: groups * c.n }, () => rng.normal() * 0.5);
        const rowMap = Int32Array.from({ length: c.rows }, (_, r) => (c.skip && rng.uniform() < 0.15 ? -1 : r));
        const [g, h] = both((x) => {
          using aT = up(x, a, [c.rows, c.k], "bf16");
          using bT = up(x, b, [groups, c.n, c.k], "bf16");
          using biasT = up(x, bias, [groups, c.n], "f32");
          using offT = up(x, offsets, [groups + 1], "i32");
          using mapT = up(x, rowMap, [c.rows], "i32");
          using out = x.empty([c.rows, c.n], "bf16").fill(0xff);
          const common = { bias: c.bias ? biasT : undefined, groupOffsets: offT, rowMap: c.skip ? mapT : undefined, out };
          if (format === "bf16") groupedMmBf16(x, { a: aT, b: bT, ...common });
          else {
            const aq = quantizeMxfp8(x, aT);
            const bq = quantizeMxfp8(x, bT);
            try {
              groupedMmMxfp8(x, { a: aq.data, aScale: aq.scale, b: bq.data, bScale: bq.scale, ...common });
            } finally {
              for (const t of [aq.data, aq.scale, bq.data, bq.scale]) t.dispose();
            }
          }
          return out.download();
        });
        const written: number[] = [];
        const poisoned: number[] = [];
        for (let r = 0; r < c.rows; ++r) (h.subarray(r * c.n, (r + 1) * c.n).every((v) => v === 0xffff) ? poisoned : written).push(r);
        expect(pickRows(g, c.n, poisoned).every((v) => v === 0xffff)).toBe(true);
        expectNoNaNBf16(pickRows(g, c.n, written), "written rows");
        expectNonZero(pickRows(h, c.n, written), "host");
        expectClose(pickRows(g, c.n, written), pickRows(h, c.n, written), TOL.gemm, `${format} GEMM`);
      });
    }
  }

  seededTest("grouped GEMM mxfp8: scales over e8m0's whole range (2^-127, NaN, 2^-127 x 2^111 pairs)", (rng) => {
    // Each 32-block kb has a base B (0 for kb % 8 == 0, 238 for kb % 8 == 1, else random); a
    // row of a gets B + d, a row of b 238 - B + d (d in -1..1, clamped to 0..254), so every
    // product scale is near 2^-16 and h stays O(100), while the blocks of base 0 and 238 hold
    // 2^-127 on one side and ~2^111 on the other: decoding 0x00 as zero drops them (~20% of
    // the terms), and scaling the partial sum by one side first overflows it. A few blocks are
    // NaN (0xFF) on either side: their rows / columns must come out NaN on both backends.
    const rows = 40, n = 96, k = 320, ks = k / 32;
    const offsets = Int32Array.from([0, 17, 17, 40]); // group 1 empty
    const groups = offsets.length - 1;
    const e4m3 = (count: number): Uint8Array => Uint8Array.from({ length: count }, () => {
      const b = rng.int(256);
      return (b & 0x7f) === 0x7f ? b ^ 1 : b; // no e4m3 NaN
    });
    const base = Array.from({ length: ks }, (_, kb) => (kb % 8 === 0 ? 0 : kb % 8 === 1 ? 238 : rng.int(239)));
    const clamp = (v: number): number => Math.min(254, Math.max(0, v));
    const aData = e4m3(rows * k), bData = e4m3(groups * n * k);
    const aScale = Uint8Array.from({ length: rows * ks }, (_, i) => {
      const r = Math.floor(i / ks), kb = i % ks;
      return r % 7 === 3 && kb === 2 ? 0xff : clamp(base[kb]! + rng.int(3) - 1);
    });
    const bScale = Uint8Array.from({ length: groups * n * ks }, (_, i) => {
      const j = Math.floor(i / ks) % n, kb = i % ks;
      return j % 29 === 5 && kb === j % ks ? 0xff : clamp(238 - base[kb]! + rng.int(3) - 1);
    });
    const [g, h] = both((x) => {
      using a = up(x, aData, [rows, k], "e4m3");
      using as = up(x, aScale, [rows, ks], "e8m0");
      using b = up(x, bData, [groups, n, k], "e4m3");
      using bs = up(x, bScale, [groups, n, ks], "e8m0");
      using off = up(x, offsets, [groups + 1], "i32");
      using out = x.empty([rows, n], "bf16").fill(0xff);
      groupedMmMxfp8(x, { a, aScale: as, b, bScale: bs, groupOffsets: off, out });
      return out.download();
    });
    const isNaN16 = (v: number): boolean => (v & 0x7fff) > 0x7f80;
    const nanMask = (o: Uint16Array): Uint16Array => o.map((v) => (isNaN16(v) ? 1 : 0));
    const hostNaN = nanMask(h);
    expect(hostNaN.some((v) => v === 1)).toBe(true);
    expect(hostNaN.some((v) => v === 0)).toBe(true);
    expectBitExact(nanMask(g), hostNaN, "NaN positions");
    const finite = (o: Uint16Array): Uint16Array => o.map((v) => (isNaN16(v) ? 0 : v));
    expectNonZero(finite(h), "host");
    expectClose(finite(g), finite(h), TOL.gemm, "mxfp8 GEMM over e8m0's range");
  });

  // ----------------------------------------------------------------------------------------------
  // unpermute

  for (const [T, H, topk, probs, corrupt] of [[0, 64, 2, true, false], [1, 64, 8, true, false], [9, 33, 2, true, true], [2, 2880, 2, false, false], [37, 128, 1, false, true], [4096, 1024, 8, true, true], [3, 7168, 12, true, true], [5, 2056, 9, true, false], [2, 33, 12, false, true]] as const) {
    seededTest(`unpermute: T = ${T}, H = ${H}, topk = ${topk}${probs ? ", probs" : ""}${corrupt ? ", corrupt inverse-map entries" : ""} (bit-exact)`, (rng) => {
      const rows = T * topk + 64;
      const input = randBf16(rng, rows * H);
      const inv = Int32Array.from({ length: T * topk }, () => (rng.uniform() < 0.15 ? -1 : rng.int(rows)));
      if (corrupt) for (let i = 0; i < inv.length; i += 7) inv[i] = i % 2 ? rows + rng.int(100) : -2 - rng.int(100);
      const p = Float32Array.from({ length: T * topk }, () => rng.uniform());
      const [g, h] = both((x) => {
        using inT = up(x, input, [rows, H], "bf16");
        using invT = up(x, inv, [T, topk], "i32");
        using pT = up(x, p, [T, topk], "f32");
        using out = unpermute(x, { input: inT, inverseMap: invT, probs: probs ? pT : undefined });
        return out.download();
      });
      expectBitExact(g, h, "unpermute");
    });
  }

  // ----------------------------------------------------------------------------------------------
  // route: the same code per token on both backends, the device's exp within 2 ulp of the host's.
  // Softmax without a bias or groups chooses by the logits: ids bit-exact. Otherwise ids equal
  // where the reference's relative margin exceeds 1e-5 (at least 90% of the tokens), weights within
  // 1e-5.

  for (const [name, E, o, bias] of [
    ["qwen3 softmax top-8 of 128", 128, { topk: 8 }, false],
    ["deepseek-v3 sigmoid + bias, 8 groups, top-4 groups, top-8 of 256, scale 2.5", 256, { topk: 8, scoring: "sigmoid", numGroups: 8, topkGroups: 4, scale: 2.5 }, true],
    ["softmax + bias, top-32 of 64 groups of one", 64, { topk: 32, numGroups: 64, topkGroups: 40, renormalize: false }, true],
    ["softmax top-4 of 200 (lanes with fewer experts)", 200, { topk: 4 }, false],
    ["softmax top-6 of 384 (more experts than the warp kernel keeps in registers)", 384, { topk: 6 }, false],
  ] as const) {
    seededTest(`route: ${name}, T = 0, 1, 8192`, (rng) => {
      let compared = 0;
      for (const T of [0, 1, 8192]) {
        const logits = Float32Array.from({ length: T * E }, () => rng.normal() * 2);
        const b = Float32Array.from({ length: E }, () => rng.normal() * 0.1);
        const [g, h] = both((x) => {
          using l = up(x, logits, [T, E], "f32");
          using bT = up(x, b, [E], "f32");
          const r = route(x, { ...o, logits: l, selectionBias: bias ? bT : undefined });
          using m = r.routingMap;
          using p = r.probs;
          return { ids: m.download(), probs: p.download() };
        });
        const exact = !bias && !("numGroups" in o);
        if (exact) expectBitExact(g.ids, h.ids, "ids");
        const ref = R.route({ logits, numTokens: T, numExperts: E, topk: o.topk, scoring: "scoring" in o ? o.scoring : "softmax", selectionBias: bias ? b : undefined, numGroups: "numGroups" in o ? o.numGroups : 1, topkGroups: "topkGroups" in o ? o.topkGroups : 1, renormalize: "renormalize" in o ? o.renormalize : true, scale: "scale" in o ? o.scale : 1 });
        for (let t = 0; t < T; ++t) {
          if (!exact && ref.margin[t]! <= 1e-5) continue;
          ++compared;
          for (let j = 0; j < o.topk; ++j) {
            const i = t * o.topk + j;
            if (g.ids[i] !== h.ids[i]) throw new Error(`token ${t} slot ${j}: cuda ${g.ids[i]}, host ${h.ids[i]}`);
            if (Math.abs(g.probs[i]! - h.probs[i]!) > 1e-5 * Math.max(1, Math.abs(h.probs[i]!))) throw new Error(`token ${t} slot ${j}: cuda weight ${g.probs[i]}, host ${h.probs[i]}`);
          }
        }
      }
      expect(compared).toBeGreaterThanOrEqual(0.9 * 8193);
    });
  }

  // ----------------------------------------------------------------------------------------------
  // FusedMoE: small shapes

  interface MoeCase { name: string; T: number; H: number; I: number; E: number; topk: number; activation: Activation; layout?: GatedLayout; alpha?: number; limit?: number; start?: number; local?: number; alignment?: number; bias?: boolean; invalid?: number; pattern?: RoutingPattern; onInput?: boolean; formats?: WeightFormat[] }
  const MOE: MoeCase[] = [];
  for (const act of ACTIVATIONS) MOE.push({ name: `${act}, biases`, T: 19, H: 64, I: 32, E: 8, topk: 2, activation: act, bias: true });
  MOE.push(
    { name: "silu interleaved", T: 40, H: 128, I: 64, E: 8, topk: 2, activation: "silu", layout: "interleaved" },
    { name: "swiglu_oai alpha 1.3 limit 2 interleaved", T: 12, H: 64, I: 32, E: 6, topk: 3, activation: "swiglu_oai", layout: "interleaved", alpha: 1.3, limit: 2, bias: true },
    { name: "T = 0", T: 0, H: 64, I: 32, E: 4, topk: 2, activation: "silu" },
    { name: "T = 1, topk = 8", T: 1, H: 64, I: 32, E: 16, topk: 8, activation: "silu" },
    { name: "odd H = 33, I = 17 (bf16)", T: 7, H: 33, I: 17, E: 3, topk: 2, activation: "silu", bias: true, formats: ["bf16"] },
    { name: "H = 2880, 2 experts, topk 1", T: 2, H: 2880, I: 64, E: 2, topk: 1, activation: "swiglu_oai", bias: true },
    { name: "all tokens on one expert, alignment 128", T: 300, H: 128, I: 64, E: 6, topk: 1, activation: "silu", pattern: "one-expert", alignment: 128 },
    { name: "expert-parallel slice [2, 5) of 8, out-of-range ids", T: 64, H: 64, I: 32, E: 8, topk: 2, activation: "gelu", start: 2, local: 3, invalid: 20 },
    { name: "alignment 1", T: 33, H: 64, I: 32, E: 8, topk: 2, activation: "squared_relu", alignment: 1 },
    { name: "apply_router_weight_on_input", T: 50, H: 64, I: 32, E: 5, topk: 1, activation: "silu", onInput: true },
    { name: "medium: T = 256, H = 1024, I = 512, 32 experts, topk 4", T: 256, H: 1024, I: 512, E: 32, topk: 4, activation: "silu", bias: true },
    // k tails on the prefill path: H = 224 and I = 96 end inside a k-block (64 bf16, 128 e4m3).
    { name: "prefill with k tails: T = 70, H = 224, I = 96", T: 70, H: 224, I: 96, E: 6, topk: 2, activation: "silu", bias: true },
    // The decode path past 32 tokens (T * topk <= 16 E): groups over the token tile take several tiles.
    { name: "decode path, T = 96: all 192 rows on one expert", T: 96, H: 128, I: 64, E: 128, topk: 2, activation: "silu", pattern: "one-expert", bias: true },
    { name: "decode path, T = 100: skewed routing, out-of-range ids", T: 100, H: 64, I: 32, E: 64, topk: 2, activation: "gelu", pattern: "skewed", invalid: 15 },
    // FC1 lays out its rows from the routing map itself up to 256 entries: at the limit, with
    // groups over the token tile and experts repeated in a token (MXFP8: its 16-token tile, so
    // permute's quantized copy); and an expert slice.
    { name: "decode, 256 routing entries: T = 32, topk 8, skewed, out-of-range ids", T: 32, H: 128, I: 64, E: 24, topk: 8, activation: "silu", pattern: "skewed", invalid: 30, bias: true },
    { name: "decode, expert slice [5, 13) of 16, T = 3, topk 6, out-of-range ids", T: 3, H: 64, I: 32, E: 16, start: 5, local: 8, topk: 6, activation: "gelu", invalid: 4 },
    // MXFP8 FC1 routes itself at the 8-token tile (the input rows quantized beside the routing):
    // groups over the tile, and every token on one expert.
    { name: "decode, T = 20, topk 2, groups over the 8-token tile, skewed, out-of-range ids", T: 20, H: 128, I: 64, E: 16, topk: 2, activation: "swiglu_oai", pattern: "skewed", invalid: 6, bias: true },
    { name: "decode, T = 8, topk 1, every token on one expert", T: 8, H: 192, I: 64, E: 12, topk: 1, activation: "silu", pattern: "one-expert" },
    // Split-K at decode (few items, >= 32 stages of k per part): the ranks' partial tiles summed
    // in the epilogue; the squared_relu tile ends past I = 96 (a last tile half outside the
    // activation). FC1 splits bf16 in 2 parts at H = 4096 and in 4 at 8192, MXFP8 in 2 at 8192.
    { name: "decode split-K: T = 1, H = 8192, interleaved swiglu_oai, biases", T: 1, H: 8192, I: 64, E: 4, topk: 2, activation: "swiglu_oai", layout: "interleaved", alpha: 1.702, limit: 7, bias: true },
    { name: "decode split-K: T = 3, H = 4096, I = 96, squared_relu, out-of-range ids", T: 3, H: 4096, I: 96, E: 6, topk: 2, activation: "squared_relu", invalid: 1 },
    { name: "decode split-K: T = 3, H = 8192, I = 96, squared_relu, out-of-range ids", T: 3, H: 8192, I: 96, E: 6, topk: 2, activation: "squared_relu", invalid: 1 },
    // Prefill with H % 64 == 0 and I % 64 == 0: MXFP8 takes the weights-in-registers kernels. Last
    // feature tiles partly past I and H (FC1 gated tiles are 128 features, FC2 and squared_relu 256).
    { name: "prefill: interleaved swiglu_oai, biases, H = 320, I = 192", T: 160, H: 320, I: 192, E: 4, topk: 2, activation: "swiglu_oai", layout: "interleaved", alpha: 1.702, limit: 7, bias: true },
    { name: "prefill: expert slice [1, 4) of 6, out-of-range ids, gelu, I = 320", T: 150, H: 192, I: 320, E: 6, start: 1, local: 3, topk: 2, activation: "gelu", invalid: 25, bias: true },
    { name: "prefill: squared_relu, biases, H = 384, I = 448", T: 130, H: 384, I: 448, E: 4, topk: 1, activation: "squared_relu", bias: true },
    { name: "prefill: apply_router_weight_on_input, skewed", T: 200, H: 128, I: 128, E: 4, topk: 1, activation: "silu", onInput: true, pattern: "skewed" },
    // Groups of ~66 rows on the wide (256-column) bf16 tiles: the groups of <= 64 rows run as half
    // tiles (each warpgroup against half of the B tile), the others as full tiles, in one launch.
    { name: "prefill: half and full tiles, interleaved silu, wide tiles, T = 4200, 128 experts", T: 4200, H: 64, I: 256, E: 128, topk: 2, activation: "silu", layout: "interleaved", bias: true },
    // Groups of ~262 rows (two full tiles and a short last one) on the wide bf16 tiles: the fused
    // layer draws its tiles dynamically and then halves the last tile of every group, here in the
    // halves layout, whose B tile comes in runs of gate and up rows.
    { name: "prefill: half last tiles in larger groups, halves silu, wide tiles, T = 4200, 32 experts", T: 4200, H: 64, I: 256, E: 32, topk: 2, activation: "silu", bias: true },
    // 1024 rows or more per expert (of the permuted buffer's capacity): MXFP8 takes the 128 x 256
    // register-kernel tiles (256 tokens), whose gated FC1 trades gate and up halves between the
    // warpgroups; skewed routing leaves some experts a few rows on those tiles.
    { name: "prefill: 256-token MXFP8 tiles, halves silu, T = 2100, 4 experts", T: 2100, H: 128, I: 192, E: 4, topk: 2, activation: "silu", bias: true },
    { name: "prefill: 256-token MXFP8 tiles, interleaved swiglu_oai, skewed, T = 2100, 4 experts", T: 2100, H: 192, I: 128, E: 4, topk: 2, activation: "swiglu_oai", layout: "interleaved", alpha: 1.702, limit: 7, pattern: "skewed", bias: true },
    // Weight matrices of >= 12 MiB per expert (FC1 24 MiB, FC2 12 MiB) with wide tiles for every
    // SM: both bf16 GEMMs run in CTA pairs, FC1 with the fused activation, tiles drawn in pairs
    // from the layer's counter; skewed routing leaves groups of odd tile counts.
    { name: "prefill: CTA pairs in FC1 and FC2, skewed, T = 1100, H = 2048, I = 3072", T: 1100, H: 2048, I: 3072, E: 3, topk: 2, activation: "silu", pattern: "skewed", bias: true, formats: ["bf16"] },
  );
  for (const c of MOE) {
    for (const format of c.formats ?? (["bf16", "mxfp8"] as const)) {
      seededTest(`FusedMoE ${format}: ${c.name}`, (rng) => {
        const E = c.local ?? c.E - (c.start ?? 0);
        const N1 = fc1Outputs(c.activation, c.I);
        const fc1 = randWeights(rng, E, N1, c.H);
        const fc2 = randWeights(rng, E, c.H, c.I);
        const b1 = Float32Array.from({ length: E * N1 }, () => rng.normal() * 0.2);
        const b2 = Float32Array.from({ length: E * c.H }, () => rng.normal() * 0.2);
        const hidden = randBf16(rng, c.T * c.H);
        const { routingMap, probs } = makeRouting(rng, c.T, c.E, c.topk, c.pattern, 2);
        if (c.invalid) injectInvalidIds(rng, routingMap, c.E, c.invalid);
        const [g, h] = both((x) => {
          using f1 = up(x, fc1, [E, N1, c.H], "bf16");
          using f2 = up(x, fc2, [E, c.H, c.I], "bf16");
          using b1T = up(x, b1, [E, N1], "f32");
          using b2T = up(x, b2, [E, c.H], "f32");
          using moe = new FusedMoE(x, {
            hidden: c.H, ffn: c.I, numExperts: c.E, numLocalExperts: c.local, localExpertStart: c.start, topk: c.topk, activation: c.activation,
            layout: c.layout, alpha: c.alpha, limit: c.limit, weightFormat: format, alignment: c.alignment, maxTokens: Math.max(1, c.T), applyRouterWeightOnInput: c.onInput,
          }, { fc1: f1, fc2: f2, fc1Bias: c.bias ? b1T : undefined, fc2Bias: c.bias ? b2T : undefined });
          using hT = up(x, hidden, [c.T, c.H], "bf16");
          using rT = up(x, routingMap, [c.T, c.topk], "i32");
          using pT = up(x, probs, [c.T, c.topk], "f32");
          using out = x.empty([c.T, c.H], "bf16").fill(0xff);
          moe.forward({ hidden: hT, routingMap: rT, probs: pT, out });
          return { out: out.download(), invalid: moe.invalidCount() };
        });
        expect(g.invalid).toBe(h.invalid);
        expectNoNaNBf16(g.out, "gpu output");
        expectNonZero(h.out, "host");
        expectClose(g.out, h.out, format === "bf16" ? TOL.moeBf16 : TOL.moeMxfp8, `${format} layer`);
      });
    }
  }

  // The MXFP8 decode kernel multiplies two scales by adding their f32 exponent fields while every
  // scale byte a thread holds is in [64, 191], and decodes and multiplies them otherwise. FC2's
  // weights are scaled here by 2^-60 (scale bytes near 56: the second way) on output features
  // f % 8 < 4 and by 2^-48 (near 68: the first way) on the others, so both ways run side by side
  // in one warp. Each set of features is compared on its own: the two differ 4096-fold in size.
  seededTest("FusedMoE mxfp8 decode: FC2 weight scales inside and outside the exponent-add range", (rng) => {
    const T = 6, H = 256, I = 128, E = 8, topk = 2;
    const fc1 = randWeights(rng, E, 2 * I, H);
    const fc2 = randWeights(rng, E, H, I);
    const low = (f: number): boolean => f % 8 < 4;
    for (let i = 0; i < fc2.length; ++i) {
      const f = Math.floor(i / I) % H;
      fc2[i] = f32ToBf16(bf16ToF32(fc2[i]!) * (low(f) ? 2 ** -60 : 2 ** -48));
    }
    const hidden = randBf16(rng, T * H);
    const { routingMap, probs } = makeRouting(rng, T, E, topk);
    const [g, h] = both((x) => {
      using f1 = up(x, fc1, [E, 2 * I, H], "bf16");
      using f2 = up(x, fc2, [E, H, I], "bf16");
      using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk, activation: "silu", weightFormat: "mxfp8", maxTokens: T }, { fc1: f1, fc2: f2 });
      using hT = up(x, hidden, [T, H], "bf16");
      using rT = up(x, routingMap, [T, topk], "i32");
      using pT = up(x, probs, [T, topk], "f32");
      using out = x.empty([T, H], "bf16").fill(0xff);
      moe.forward({ hidden: hT, routingMap: rT, probs: pT, out });
      return out.download();
    });
    expectNoNaNBf16(g, "gpu output");
    for (const want of [true, false]) {
      const cols = (o: Uint16Array): Uint16Array => o.filter((_, i) => low(i % H) === want);
      const scale = want ? 2 ** -60 : 2 ** -48;
      const hostCols = bf16ToF32(cols(h));
      // The outputs are of their weights' size, so neither comparison is against ~zero.
      const rms = Math.sqrt(hostCols.reduce((a, v) => a + v * v, 0) / hostCols.length);
      expect(rms).toBeGreaterThan(scale * 1e-2);
      expect(rms).toBeLessThan(scale * 1e2);
      expectClose(cols(g), cols(h), TOL.moeMxfp8, `features scaled by ${want ? "2^-60" : "2^-48"}`);
    }
  });

  for (const format of ["bf16", "mxfp8"] as const) {
    seededTest(`FusedMoE ${format} forwardGrouped: rows beyond sum(tokens_per_expert) zero, excess ignored`, (rng) => {
      const E = 4, H = 128, I = 64, rows = 90;
      const fc1 = randWeights(rng, E, 2 * I, H);
      const fc2 = randWeights(rng, E, H, I);
      const hidden = randBf16(rng, rows * H);
      const probs = Float32Array.from({ length: rows }, () => rng.uniform());
      for (const tpe of [[10, 0, 30, 20], [50, 40, 30, 20], [0, 0, 0, 90]]) {
        const [g, h] = both((x) => {
          using f1 = up(x, fc1, [E, 2 * I, H], "bf16");
          using f2 = up(x, fc2, [E, H, I], "bf16");
          using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk: 2, activation: "silu", weightFormat: format, maxTokens: 45 }, { fc1: f1, fc2: f2 });
          using hT = up(x, hidden, [rows, H], "bf16");
          using tT = x.upload(Int32Array.from(tpe));
          using pT = up(x, probs, [rows], "f32");
          using out = x.empty([rows, H], "bf16").fill(0xff);
          moe.forwardGrouped({ hidden: hT, tokensPerExpert: tT, probs: pT, out });
          return out.download();
        });
        const used = Math.min(rows, tpe.reduce((a, b) => a + b, 0));
        expect(g.subarray(used * H).every((v) => (v & 0x7fff) === 0)).toBe(true);
        expectNoNaNBf16(g, "gpu output");
        expectClose(g, h, format === "bf16" ? TOL.moeBf16 : TOL.moeMxfp8, `tokens_per_expert ${tpe}`);
      }
    });
  }

  // ----------------------------------------------------------------------------------------------
  // Real model shapes (lib/cases.ts) at T = 1, 33, 512

  /** Fills a bf16 tensor from a device pool of normal(0, std) values by shifted copies. */
  function fillFromPool(t: Tensor, pool: Tensor): void {
    let done = 0;
    let shift = 0;
    while (done < t.numel) {
      shift = (shift + 104729) % (pool.numel >> 1);
      const n = Math.min(t.numel - done, pool.numel - shift);
      using dst = t.view(done, [n]);
      using src = pool.view(shift, [n]);
      dst.copyFrom(src);
      done += n;
    }
  }

  function makePool(rng: Rng, x: Context, std: number): Tensor {
    const n = 1 << 22;
    return x.upload(randBf16(rng, n, std), [n], "bf16");
  }

  const expertBytes = (c: BenchCase): number => 2 * (fc1Outputs(c.activation, c.ffn) * c.hidden + c.hidden * c.ffn);

  /**
   * Host-backend output of the tokens `tokens` only, with the weights of just the experts they
   * route to (downloaded from the GPU), experts renumbered in first-seen order.
   */
  function hostSubset(c: BenchCase, fc1: Tensor<"bf16">, fc2: Tensor<"bf16">, hidden: Uint16Array, routing: Int32Array, probs: Float32Array, tokens: number[]): Record<WeightFormat, Uint16Array> {
    const x = cpu();
    const N1 = fc1Outputs(c.activation, c.ffn);
    const H = c.hidden, I = c.ffn, k = c.topk;
    const ids: number[] = [];
    const index = new Map<number, number>();
    const subRouting = new Int32Array(tokens.length * k);
    const subProbs = new Float32Array(tokens.length * k);
    const subHidden = new Uint16Array(tokens.length * H);
    tokens.forEach((t, i) => {
      subHidden.set(hidden.subarray(t * H, (t + 1) * H), i * H);
      for (let j = 0; j < k; ++j) {
        const id = routing[t * k + j]!;
        if (!index.has(id)) {
          index.set(id, ids.length);
          ids.push(id);
        }
        subRouting[i * k + j] = index.get(id)!;
        subProbs[i * k + j] = probs[t * k + j]!;
      }
    });
    const E = ids.length;
    using h1 = x.empty([E, N1, H], "bf16");
    using h2 = x.empty([E, H, I], "bf16");
    ids.forEach((id, j) => {
      using s1 = fc1.view(id * N1 * H, [N1 * H]);
      using d1 = h1.view(j * N1 * H, [N1 * H]);
      d1.copyFrom(s1.download());
      using s2 = fc2.view(id * H * I, [H * I]);
      using d2 = h2.view(j * H * I, [H * I]);
      d2.copyFrom(s2.download());
    });
    using hT = x.upload(subHidden, [tokens.length, H], "bf16");
    using rT = x.upload(subRouting, [tokens.length, k]);
    using pT = x.upload(subProbs, [tokens.length, k]);
    const out = {} as Record<WeightFormat, Uint16Array>;
    for (const format of ["bf16", "mxfp8"] as const) {
      using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk: k, activation: c.activation, weightFormat: format, maxTokens: tokens.length }, { fc1: h1, fc2: h2 });
      using o = moe.forward({ hidden: hT, routingMap: rT, probs: pT });
      out[format] = o.download();
    }
    return out;
  }

  for (const c of BENCH_CASES) {
    const N1 = fc1Outputs(c.activation, c.ffn);
    const elems = c.experts * (N1 * c.hidden + c.hidden * c.ffn);
    const big = c.name === "deepseek-v3";
    const title = big
      ? `${c.name} (256 experts, H 7168, ffn 2048: fc1 ${(c.experts * N1 * c.hidden / 1e9).toFixed(1)}e9 elements, 64-bit offsets), bf16 and mxfp8, T = 1, 33, 512, vs host on a few tokens`
      : `${c.name} (${c.experts} experts, H ${c.hidden}, ffn ${c.ffn}, topk ${c.topk}, ${c.activation}), bf16 and mxfp8, T = 1, 33, 512, vs host on a few tokens`;
    seededTest(title, (rng) => {
      const x = gpu();
      // bf16 weights + their MXFP8 copies (1 + 0.53 bytes per element) + pools and activations.
      const need = elems * 2 * 1.6 + 2 ** 30;
      if (x.props.globalMemoryBytes < Math.max(need, big ? 40e9 : 0)) {
        console.log(`cuda.test.ts: ${c.name}: skipped: needs ${(need / 1e9).toFixed(0)} GB of GPU memory, the device has ${(x.props.globalMemoryBytes / 1e9).toFixed(0)} GB`);
        return;
      }
      let fc1: Tensor<"bf16">;
      try {
        fc1 = x.empty([c.experts, N1, c.hidden], "bf16");
      } catch (err) {
        console.log(`cuda.test.ts: ${c.name}: skipped: allocation failed (${(err as Error).message})`);
        return;
      }
      const fc2 = x.empty([c.experts, c.hidden, c.ffn], "bf16");
      try {
        {
          using p1 = makePool(rng, x, 1 / Math.sqrt(c.hidden));
          using p2 = makePool(rng, x, 1 / Math.sqrt(c.ffn));
          fillFromPool(fc1, p1);
          fillFromPool(fc2, p2);
          x.synchronize();
        }
        const maxT = 512;
        using moeBf = new FusedMoE(x, { hidden: c.hidden, ffn: c.ffn, numExperts: c.experts, topk: c.topk, activation: c.activation, weightFormat: "bf16", maxTokens: maxT }, { fc1, fc2 });
        using moeMx = new FusedMoE(x, { hidden: c.hidden, ffn: c.ffn, numExperts: c.experts, topk: c.topk, activation: c.activation, weightFormat: "mxfp8", maxTokens: maxT }, { fc1, fc2 });
        for (const T of [1, 33, 512]) {
          const hidden = randBf16(rng, T * c.hidden);
          const { routingMap, probs } = randomRouting(rng, T, c.experts, c.topk);
          // Token 0 goes to the highest experts: their weights lie past 2^31 (deepseek: 2^32)
          // elements into fc1, where 32-bit index arithmetic would wrap.
          for (let j = 0; j < c.topk; ++j) routingMap[j] = c.experts - 1 - j;
          using hT = x.upload(hidden, [T, c.hidden], "bf16");
          using rT = x.upload(routingMap, [T, c.topk]);
          using pT = x.upload(probs, [T, c.topk]);
          using oBf = moeBf.forward({ hidden: hT, routingMap: rT, probs: pT });
          using oMx = moeMx.forward({ hidden: hT, routingMap: rT, probs: pT });
          const gBf = oBf.download();
          const gMx = oMx.download();
          expectNoNaNBf16(gBf, "bf16 output");
          expectNoNaNBf16(gMx, "mxfp8 output");
          expectNonZero(gBf, "bf16 output");
          // Tokens checked on the host: first, last, middle, ... while their experts' weights
          // stay under 1.5 GB (at least token 0).
          const tokens: number[] = [];
          const seen = new Set<number>();
          for (const t of [0, T - 1, T >> 1, 1, 2, T - 2, 3, T >> 2]) {
            if (t < 0 || t >= T || tokens.includes(t) || tokens.length >= 8) continue;
            const add = new Set(seen);
            for (let j = 0; j < c.topk; ++j) add.add(routingMap[t * c.topk + j]!);
            if (tokens.length > 0 && add.size * expertBytes(c) > 1.5e9) break;
            tokens.push(t);
            add.forEach((e) => seen.add(e));
          }
          const ref = hostSubset(c, fc1, fc2, hidden, routingMap, probs, tokens);
          expectClose(pickRows(gBf, c.hidden, tokens), ref.bf16, TOL.moeBf16, `T = ${T}, bf16, tokens ${tokens}`);
          expectClose(pickRows(gMx, c.hidden, tokens), ref.mxfp8, TOL.moeMxfp8, `T = ${T}, mxfp8, tokens ${tokens}`);
        }
      } finally {
        fc1.dispose();
        fc2.dispose();
      }
    }, 240_000);
  }

  // ----------------------------------------------------------------------------------------------
  // Determinism, graphs, streams

  for (const format of ["bf16", "mxfp8"] as const) {
    seededTest(`FusedMoE ${format}: the same inputs give bitwise the same output over 10 runs`, (rng) => {
      const x = gpu();
      const T = 512, H = 1024, I = 512, E = 32, topk = 4;
      using f1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
      using f2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
      using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk, activation: "silu", weightFormat: format, maxTokens: T }, { fc1: f1, fc2: f2 });
      const r = makeRouting(rng, T, E, topk, "skewed");
      using hT = x.upload(randBf16(rng, T * H), [T, H], "bf16");
      using rT = x.upload(r.routingMap, [T, topk]);
      using pT = x.upload(r.probs, [T, topk]);
      using out = x.empty([T, H], "bf16");
      let first: Uint16Array | undefined;
      for (let i = 0; i < 10; ++i) {
        out.fill(0xff);
        moe.forward({ hidden: hT, routingMap: rT, probs: pT, out });
        const o = out.download();
        if (first === undefined) first = o;
        else expectBitExact(o, first, `run ${i}`);
      }
    });
  }

  seededTest("grouped GEMM bf16 and mxfp8: bitwise the same over 10 runs", (rng) => {
    const x = gpu();
    const rows = 2048, n = 1024, k = 2048, groups = 8;
    using aT = x.upload(randBf16(rng, rows * k), [rows, k], "bf16");
    using bT = x.upload(randWeights(rng, groups, n, k), [groups, n, k], "bf16");
    using off = x.upload(Int32Array.of(0, 100, 612, 612, 1000, 1500, 1700, 2000, 2048));
    const aq = quantizeMxfp8(x, aT);
    const bq = quantizeMxfp8(x, bT);
    try {
      for (const format of ["bf16", "mxfp8"] as const) {
        let first: Uint16Array | undefined;
        for (let i = 0; i < 10; ++i) {
          using c = format === "bf16" ? groupedMmBf16(x, { a: aT, b: bT, groupOffsets: off }) : groupedMmMxfp8(x, { a: aq.data, aScale: aq.scale, b: bq.data, bScale: bq.scale, groupOffsets: off });
          const o = c.download();
          if (first === undefined) first = o;
          else expectBitExact(o, first, `${format} run ${i}`);
        }
      }
    } finally {
      for (const t of [aq.data, aq.scale, bq.data, bq.scale]) t.dispose();
    }
  });

  seededTest("graphs: every op captured and replayed with new inputs == eager, bit for bit", (rng) => {
    const x = gpu();
    using stream = x.createStream();
    const T = 64, H = 256, I = 128, E = 8, topk = 2, alignment = 16;
    const rows = (T * topk + E * (alignment - 1) + alignment - 1) - ((T * topk + E * (alignment - 1) + alignment - 1) % alignment);
    using hT = x.empty([T, H], "bf16");
    using rT = x.empty([T, topk], "i32");
    using pT = x.empty([T, topk], "f32");
    using counter = x.zeros([1], "i32");
    using fc1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
    using fc2bf = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
    const fc2 = quantizeMxfp8(x, fc2bf);
    const out = {
      permuted: x.empty([rows, H], "bf16"), permutedQ: x.empty([rows, H], "e4m3"), permutedScale: x.empty([rows, H / 32], "e8m0"),
      expertOffsets: x.empty([E + 1], "i32"), permutationMap: x.empty([rows], "i32"), inverseMap: x.empty([T, topk], "i32"),
    };
    using h1 = x.empty([rows, 2 * I], "bf16");
    using a = x.empty([rows, I], "bf16");
    using aq = x.empty([rows, I], "e4m3");
    using as = x.empty([rows, I / 32], "e8m0");
    using y = x.empty([rows, H], "bf16");
    using o = x.empty([T, H], "bf16");
    using deq = x.empty([rows, I], "f32");
    using sw = x.empty([swizzleRows(rows), 4], "e8m0");
    try {
      checkReplay(
        x, stream,
        [[hT, () => randBf16(rng, T * H)], [rT, () => { const r = makeRouting(rng, T, E, topk).routingMap; injectInvalidIds(rng, r, E, 3); return r; }], [pT, () => makeRouting(rng, T, E, topk).probs]],
        [o, out.expertOffsets, out.permutationMap, out.inverseMap, counter],
        (st) => {
          const p = permute(x, { hidden: hT, routingMap: rT, probs: undefined, numExperts: E, alignment, quantize: true, invalidCount: counter, out, stream: st });
          groupedMmBf16(x, { a: out.permuted, b: fc1, groupOffsets: out.expertOffsets, rowMap: out.permutationMap, out: h1, stream: st });
          activation(x, { input: h1, activation: "swiglu_oai", rowMap: out.permutationMap, nUsed: p.nUsed, out: a, stream: st });
          quantizeMxfp8(x, a, { out: { data: aq, scale: as }, stream: st });
          dequantizeMxfp8(x, aq, as, { out: deq, stream: st });
          swizzleScales(x, as, { out: sw, stream: st });
          unswizzleScales(x, sw, { rows, scaleCols: I / 32, out: as, stream: st });
          groupedMmMxfp8(x, { a: aq, aScale: as, b: fc2.data, bScale: fc2.scale, groupOffsets: out.expertOffsets, rowMap: out.permutationMap, out: y, stream: st });
          unpermute(x, { input: y, inverseMap: out.inverseMap, probs: pT, out: o, stream: st });
        },
      );
    } finally {
      for (const t of [...Object.values(out), fc2.data, fc2.scale]) t.dispose();
    }
  });

  seededTest("graphs: a capture refuses allocations and waits, holds frees until it ends, and records the rest", (rng) => {
    checkCaptureRefusals(gpu(), rng);
  });

  function swizzleRows(rows: number): number {
    return Math.ceil(rows / 128) * 128;
  }

  // Prefill (T = 96: forward and forwardGrouped) and the decode path. The decode chain launches
  // each kernel under the tail of the one ahead, and FC2 builds its tile table from the routing
  // kernel's offsets before its own wait: replays with new routing catch a table read from the
  // previous call's offsets. Decode with FC1's rows laid out from the routing map itself
  // (T * topk <= 256) and read from permutation_map (512 entries).
  const REPLAYS = [
    { name: "forward and forwardGrouped", T: 96, H: 512, I: 256, E: 16, topk: 4, grouped: true, passes: 1 },
    { name: "decode path (T = 8, topk 4) forward", T: 8, H: 256, I: 128, E: 16, topk: 4, grouped: false, passes: 2 },
    { name: "decode path (T = 64, topk 8) forward", T: 64, H: 256, I: 128, E: 64, topk: 8, grouped: false, passes: 2 },
  ];
  for (const format of ["bf16", "mxfp8"] as const) {
    for (const c of REPLAYS) {
      seededTest(`graphs: FusedMoE ${format} ${c.name} replayed with new routing == eager, bit for bit`, (rng) => {
        const x = gpu();
        using stream = x.createStream();
        const { T, H, I, E, topk } = c;
        using f1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
        using f2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
        using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk, activation: "silu", weightFormat: format, maxTokens: T }, { fc1: f1, fc2: f2 });
        using hT = x.empty([T, H], "bf16");
        using rT = x.empty([T, topk], "i32");
        using pT = x.empty([T, topk], "f32");
        using o = x.empty([T, H], "bf16");
        for (let pass = 0; pass < c.passes; ++pass) {
          checkReplay(x, stream, [[hT, () => randBf16(rng, T * H)], [rT, () => makeRouting(rng, T, E, topk, rng.uniform() < 0.5 ? "random" : "skewed").routingMap], [pT, () => makeRouting(rng, T, E, topk).probs]], [o], (st) => {
            moe.forward({ hidden: hT, routingMap: rT, probs: pT, out: o, stream: st });
          });
        }
        if (!c.grouped) return;
        const rows = T * topk;
        using gh = x.empty([rows, H], "bf16");
        using tT = x.empty([E], "i32");
        using gp = x.empty([rows], "f32");
        using go = x.empty([rows, H], "bf16");
        checkReplay(x, stream, [[gh, () => randBf16(rng, rows * H)], [tT, () => Int32Array.from({ length: E }, () => rng.int(2 * rows / E))], [gp, () => Float32Array.from({ length: rows }, () => rng.uniform())]], [go], (st) => {
          moe.forwardGrouped({ hidden: gh, tokensPerExpert: tT, probs: gp, out: go, stream: st });
        });
      });
    }
  }

  // The decode chain under full load at rows of 4096 bytes and more (H = I = 4096: FC1's 1024
  // items fill every CTA slot twice; MXFP8 weight rows of 4096 bytes, bf16 of 8192): a race
  // between a stage's copies and its readers would show as a forward that differs from the first.
  // Weights are filled on the device from a pool of random values (1.1 GB of bf16 per layer).
  for (const format of ["bf16", "mxfp8"] as const) {
    seededTest(`FusedMoE ${format} decode at H = I = 4096 under full load: 50 forwards of one input, bit for bit the first`, (rng) => {
      const x = gpu();
      const H = 4096, I = 4096, E = 8, topk = 2;
      using pool = makePool(rng, x, 1 / 64);
      using f1 = x.empty([E, 2 * I, H], "bf16");
      using f2 = x.empty([E, H, I], "bf16");
      fillFromPool(f1, pool);
      fillFromPool(f2, pool);
      using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk, activation: "silu", weightFormat: format, maxTokens: 8 }, { fc1: f1, fc2: f2 });
      for (const T of [8, 1]) {
        const r = makeRouting(rng, T, E, topk);
        using hidden = x.upload(randBf16(rng, T * H), [T, H], "bf16");
        using routingMap = x.upload(r.routingMap, [T, topk], "i32");
        using probs = x.upload(r.probs, [T, topk], "f32");
        using out = x.empty([T, H], "bf16");
        moe.forward({ hidden, routingMap, probs, out });
        const first = out.download();
        expectNonZero(bf16ToF32(first), `${format} T = ${T}`);
        for (let i = 0; i < 50; ++i) {
          moe.forward({ hidden, routingMap, probs, out });
          expectBitExact(out.download(), first, `${format} T = ${T}, forward ${i + 2}`);
        }
      }
    }, 120_000);
  }

  seededTest("two FusedMoE plans on two streams at once give the results of each run alone", (rng) => {
    const x = gpu();
    const layers = [
      { H: 1024, I: 512, E: 16, topk: 2, T: 200, format: "bf16" as const, act: "silu" as const },
      { H: 512, I: 1024, E: 8, topk: 1, T: 300, format: "mxfp8" as const, act: "squared_relu" as const },
    ];
    const setups = layers.map((l) => {
      const N1 = fc1Outputs(l.act, l.I);
      const f1 = x.upload(randWeights(rng, l.E, N1, l.H), [l.E, N1, l.H], "bf16");
      const f2 = x.upload(randWeights(rng, l.E, l.H, l.I), [l.E, l.H, l.I], "bf16");
      const moe = new FusedMoE(x, { hidden: l.H, ffn: l.I, numExperts: l.E, topk: l.topk, activation: l.act, weightFormat: l.format, maxTokens: l.T }, { fc1: f1, fc2: f2 });
      const r = makeRouting(rng, l.T, l.E, l.topk);
      const hT = x.upload(randBf16(rng, l.T * l.H), [l.T, l.H], "bf16");
      const rT = x.upload(r.routingMap, [l.T, l.topk]);
      const pT = x.upload(r.probs, [l.T, l.topk]);
      const out = x.empty([l.T, l.H], "bf16");
      const stream = x.createStream();
      return { f1, f2, moe, hT, rT, pT, out, stream };
    });
    try {
      const alone = setups.map((s) => {
        s.moe.forward({ hidden: s.hT, routingMap: s.rT, probs: s.pT, out: s.out, stream: s.stream });
        return s.out.download();
      });
      x.synchronize();
      for (let iter = 0; iter < 5; ++iter) {
        for (const s of setups) s.out.fill(0xff, s.stream);
        for (let rep = 0; rep < 3; ++rep) for (const s of setups) s.moe.forward({ hidden: s.hT, routingMap: s.rT, probs: s.pT, out: s.out, stream: s.stream });
        x.synchronize();
        setups.forEach((s, i) => expectBitExact(s.out.download(), alone[i]!, `iteration ${iter}, plan ${i}`));
      }
    } finally {
      for (const s of setups) for (const o of [s.moe, s.f1, s.f2, s.hT, s.rT, s.pT, s.out, s.stream]) o.dispose();
    }
  });

  seededTest("waits without blocking: long queued work is awaited while the event loop turns; 'not ready' leaves no error behind", async (rng) => {
    const x = gpu();
    const [rows, n, k] = [8192, 4096, 4096];
    // 30 products of 2.7e11 FLOP: ~12 ms on a Hopper part, far longer than queueing them and looking.
    using work = queueLongWork(x, rng, rows, n, k, 30);
    expect(work.done.query()).toBe(false);
    // The runtime leaves the query's "not ready" as the thread's last error; a launcher that read it
    // as its own launch's failure would throw here.
    using side = x.createStream();
    using sideOut = x.empty([64, n], "bf16").fill(0xff, side);
    using sideOff = x.upload(Int32Array.of(0, 10, 20, 40, 64));
    groupedMmBf16(x, { a: work.a.view(0, [64, k]), b: work.b, groupOffsets: sideOff, out: sideOut, stream: side });

    const turns = countEventLoopTurns();
    const awaited = await work.out.downloadAsync(work.stream);
    expect(turns()).toBeGreaterThan(0);
    expect(work.done.query()).toBe(true);
    expectBitExact(awaited, work.out.download(work.stream), "downloadAsync after 30 queued products");
    expectNonZero(bf16ToF32(awaited), "the products");

    // Every stream at once: work queued on two streams, one wait.
    for (let i = 0; i < 10; ++i) groupedMmBf16(x, { a: work.a, b: work.b, groupOffsets: sideOff, out: work.out, stream: work.stream });
    groupedMmBf16(x, { a: work.a.view(0, [64, k]), b: work.b, groupOffsets: sideOff, out: sideOut, stream: side });
    using onStream = x.createEvent().record(work.stream);
    using onSide = x.createEvent().record(side);
    await x.synchronizeAsync();
    expect(onStream.query()).toBe(true);
    expect(onSide.query()).toBe(true);
    expectBitExact(await sideOut.toFloat32Async(), sideOut.toFloat32(), "toFloat32Async of the side stream's product");
  });

  // test/waiting.test.ts has the cases on the host backend; here the check's event records and
  // queries on CUDA streams.
  seededTest("a graph's replay counts as a call of the layer captured in it: refused on another stream while the layer's last call may run, and refusing the next call there until it has run", async (rng) => {
    const x = gpu();
    using layer = layerWithInput(x, rng, 1 + rng.int(32), 128, 8, { hidden: 256 });
    const { H, moe, hidden, routingMap, probs } = layer;
    const T = hidden.shape[0]!;
    using alone = moe.forward({ hidden, routingMap, probs });
    const expected = alone.download();
    using other = x.createStream();
    using out = x.empty([T, H], "bf16");
    using graph = moe.capture({ hidden, routingMap, probs, out, stream: other });
    // ~100 ms of products (2.7e11 FLOP each) ahead of the layer's call: longer than the 20 ms a
    // call after a replay waits for the replay's stream before it is refused, on any part.
    using work = queueLongWork(x, rng, 8192, 4096, 4096, { lastingMs: 100 });
    using first = moe.forward({ hidden, routingMap, probs, stream: work.stream });
    expectFmoe(() => graph.launch(other), Status.INVALID_STATE, "Graph.launch", "may still be running");
    graph.launch(work.stream);
    expectFmoe(() => moe.forward({ hidden, routingMap, probs, stream: other }), Status.INVALID_STATE, "FusedMoE.forward", "may still be running");
    expect(work.done.query()).toBe(false);
    expectBitExact(await out.downloadAsync(work.stream), expected, "the replay queued behind the call");
    expectBitExact(first.download(), expected, "the call");
    // The replay's stream has finished: a call elsewhere runs at once.
    using later = moe.forward({ hidden, routingMap, probs, stream: other });
    expectBitExact(later.download(other), expected, "a call on another stream after the replay");
  });

  // FMOE_BUFFER_CACHE=0 turns the cache off (a comparison run), and this test with it.
  describe.skipIf(process.env.FMOE_BUFFER_CACHE === "0")("the buffer cache", () => {
    seededTest("a freed buffer comes back only after the work queued before its free, and the free does not wait", (rng) => {
      using x = Context.create("cuda"); // its own context: an empty buffer cache
      // 30 products of 2.7e11 FLOP: ~12 ms on a Hopper part.
      checkFreedBufferWaitsForItsWork(x, rng, 8192, 4096, 4096, 30);
    });
  });

  // ----------------------------------------------------------------------------------------------
  // Bad inputs: FmoeError or defined results, never a device fault

  seededTest("bad data never faults: huge routing ids, NaN probs, tokens_per_expert beyond rows, garbage offsets / maps / n_used", (rng) => {
    const x = gpu();
    const T = 64, H = 256, I = 128, E = 8;
    const fc1 = randWeights(rng, E, 2 * I, H), fc2 = randWeights(rng, E, H, I);
    const hidden = randBf16(rng, T * H);
    const { routingMap, probs } = makeRouting(rng, T, E, 2);
    for (let i = 0; i < routingMap.length; i += 5) routingMap[i] = i % 2 ? 2147483647 : -2147483648;
    probs[7] = NaN;
    const groupedHidden = randBf16(rng, T * 2 * H);
    const [g, h] = both((c) => {
      using f1 = c.upload(fc1, [E, 2 * I, H], "bf16");
      using f2 = c.upload(fc2, [E, H, I], "bf16");
      using moe = new FusedMoE(c, { hidden: H, ffn: I, numExperts: E, topk: 2, activation: "silu", maxTokens: T }, { fc1: f1, fc2: f2 });
      using hT = c.upload(hidden, [T, H], "bf16");
      using rT = c.upload(routingMap, [T, 2]);
      using pT = c.upload(probs, [T, 2]);
      using out = moe.forward({ hidden: hT, routingMap: rT, probs: pT });
      // skip-permute with tokens_per_expert summing far beyond the rows
      using tT = c.upload(Int32Array.of(1e9, 1e9, -5, 7, 2147483647, 0, 3, 1));
      using gp = c.upload(Float32Array.from({ length: T * 2 }, () => 1));
      using gh = c.upload(groupedHidden, [T * 2, H], "bf16");
      using go = moe.forwardGrouped({ hidden: gh, tokensPerExpert: tT, probs: gp });
      // grouped GEMM with garbage offsets and row map
      using off = c.upload(Int32Array.of(5, -100, 2147483647, 40, 30, 64, 64, -1, 64));
      using map = c.upload(Int32Array.from({ length: T }, (_, r) => (r % 3 === 0 ? -1 : r % 3 === 1 ? 2147483647 : r)));
      // fc2 [E, H, I] read as [E, I, H]: any [groups, n, k] bf16 will do.
      using b = f2.reshape([E, I, H]);
      using mmOut = c.empty([T, I], "bf16").fill(0xff);
      using mm = groupedMmBf16(c, { a: hT, b, groupOffsets: off, rowMap: map, out: mmOut });
      // activation with n_used far beyond rows; unpermute with garbage inverse map
      using nU = c.upload(Int32Array.of(2147483647));
      using act = activation(c, { input: hT, activation: "silu", nUsed: nU });
      using inv = c.upload(Int32Array.from({ length: T * 2 }, (_, i) => [-2147483648, 2147483647, -2, 99999, i][i % 5]!), [T, 2]);
      using un = unpermute(c, { input: hT, inverseMap: inv, probs: pT });
      c.synchronize();
      return { out: out.download(), invalid: moe.invalidCount(), go: go.download(), mm: mm.download(), act: act.download(), un: un.download() };
    });
    // The CUDA context still works after all that.
    using t = x.upload(Float32Array.of(1, 2, 3));
    expect(Array.from(t.download())).toEqual([1, 2, 3]);
    expect(g.invalid).toBe(h.invalid);
    const nanRow = (o: Uint16Array, t: number): boolean => o.subarray(t * H, (t + 1) * H).every((v) => (v & 0x7fff) > 0x7f80);
    expect(nanRow(h.out, 3)).toBe(nanRow(g.out, 3)); // probs[7] = slot 1 of token 3
    const finite = (o: Uint16Array): Uint16Array => o.map((v) => ((v & 0x7fff) > 0x7f80 ? 0 : v));
    expectClose(finite(g.out), finite(h.out), TOL.moeBf16, "layer with huge ids and a NaN prob");
    expectClose(g.go, h.go, TOL.moeBf16, "forwardGrouped with tokens_per_expert beyond rows");
    expectBitExact(g.mm.map((v) => (v === 0xffff ? 1 : 0)), h.mm.map((v) => (v === 0xffff ? 1 : 0)), "rows left unwritten by garbage offsets");
    expectClose(g.mm.map((v) => (v === 0xffff ? 0 : v)), h.mm.map((v) => (v === 0xffff ? 0 : v)), TOL.gemm, "GEMM rows written");
    expectClose(g.act, h.act, TOL.activation, "activation with n_used beyond rows");
    expectBitExact(g.un, h.un, "unpermute with a garbage inverse map");
  });

  for (const format of ["bf16", "mxfp8"] as const) {
    seededTest(`grouped GEMM ${format}: row map entries below -1 are treated alike by both backends`, (rng) => {
      // fmoe.h documents -1 as the skip marker; the host backend and the activation kernels skip
      // every negative entry. Both backends must agree on such (out-of-contract) maps.
      const rows = 96, n = 128, k = 256, groups = 2;
      const a = randBf16(rng, rows * k);
      const b = randWeights(rng, groups, n, k);
      const map = Int32Array.from({ length: rows }, (_, r) => [-1, r, -77, -2147483648][r % 4]!);
      const [g, h] = both((x) => {
        using aT = up(x, a, [rows, k], "bf16");
        using bT = up(x, b, [groups, n, k], "bf16");
        using off = x.upload(Int32Array.of(0, 40, 96));
        using mapT = up(x, map, [rows], "i32");
        using out = x.empty([rows, n], "bf16").fill(0xff);
        if (format === "bf16") groupedMmBf16(x, { a: aT, b: bT, groupOffsets: off, rowMap: mapT, out });
        else {
          const aq = quantizeMxfp8(x, aT);
          const bq = quantizeMxfp8(x, bT);
          try {
            groupedMmMxfp8(x, { a: aq.data, aScale: aq.scale, b: bq.data, bScale: bq.scale, groupOffsets: off, rowMap: mapT, out });
          } finally {
            for (const t of [aq.data, aq.scale, bq.data, bq.scale]) t.dispose();
          }
        }
        return out.download();
      });
      const unwritten = (o: Uint16Array): Uint8Array => Uint8Array.from({ length: rows }, (_, r) => (o.subarray(r * n, (r + 1) * n).every((v) => v === 0xffff) ? 1 : 0));
      expectBitExact(unwritten(g), unwritten(h), "rows left unwritten (1 = skipped), by row");
    });
  }

  seededTest("invalid calls on the CUDA context give FmoeError naming the argument", (rng) => {
    const x = gpu();
    const h = x._handle;
    const rows = 8, k = 64;
    const a = ffi.alloc(h, rows * k * 2);
    const q = ffi.alloc(h, rows * k - 1);
    const s = ffi.alloc(h, rows * 2);
    try {
      expectFmoe(() => ffi.quantizeMxfp8(h, 0, a, rows, k, q, s), Status.INVALID_ARGUMENT, "out_data needs");
      expectFmoe(() => ffi.quantizeMxfp8(h, 0, a, rows, 48, q, s), Status.INVALID_ARGUMENT, "cols (48)");
      expectFmoe(() => ffi.quantizeMxfp8(h, 0, 0, rows, k, q, s), Status.INVALID_ARGUMENT, "input is NULL");
    } finally {
      for (const p of [a, q, s]) ffi.free(h, p);
    }
    using stream = x.createStream();
    using t = x.upload(randBf16(rng, 64), [64], "bf16");
    expectFmoe(() => x.capture(stream, () => t.copyFrom(randBf16(rng, 64), stream)), Status.INVALID_STATE, "captur");
    using again = x.capture(stream, () => t.fill(0, stream));
    again.launch(stream);
    stream.synchronize();
    expect(t.download().every((v) => v === 0)).toBe(true);
    using other = Context.create({ backend: "cuda" });
    using foreign = other.createStream();
    expectFmoe(() => quantizeMxfp8(x, x.zeros([2, 32], "bf16"), { stream: foreign }), Status.INVALID_ARGUMENT, "stream");
  });
});
