#!/usr/bin/env bun
/**
 * A short run of every op on the CUDA backend, each checked against the host backend, for
 * compute-sanitizer (memcheck, racecheck, ...):
 *
 *   compute-sanitizer --tool memcheck bun scripts/sanitize-ops.ts
 *
 * Shapes are small (a few seconds natively) but cover the paths that index memory differently:
 * padding rows, empty experts, skipped rows, out-of-range routing ids, MXFP8 on both operands,
 * skip-permute mode, a graph replay and a download awaited without blocking. Prints one line per op; exit 1 on a mismatch, exit 0 with
 * a message when no CUDA device is present.
 * Tolerances (relative Frobenius): bit-exact for permute, quantization, swizzling, unpermute,
 * route's ids and graph replay vs eager; 1e-5 for route's weights; 1e-2 for activation and GEMMs; 2e-2 / 3e-2 for the bf16 / mxfp8 layer.
 */
import {
  activation,
  ACTIVATIONS,
  Context,
  dequantizeMxfp8,
  fc1Outputs,
  FusedMoE,
  groupedMmBf16,
  groupedMmMxfp8,
  maxRows,
  permute,
  quantizeMxfp8,
  randomRouting,
  relFrobenius,
  Rng,
  route,
  swizzleScales,
  unpermute,
  unswizzleScales,
} from "../lib/index.ts";

if (Context.cudaDeviceCount() === 0) {
  console.log(`sanitize-ops: no CUDA device (${Context.buildInfo()}): nothing to check`);
  process.exit(0);
}

// Under racecheck and synccheck, compute-sanitizer (CUDA 13.0 here) does not run the kernels of a
// launched CUDA graph: a one-op graph leaves its output untouched there, while it is right
// natively and under memcheck. scripts/gpu-check.sh names the tool in FMOE_SANITIZER; graph
// replays run only where the tool executes them.
const sanitizer = process.env.FMOE_SANITIZER ?? "";
const graphs = sanitizer !== "racecheck" && sanitizer !== "synccheck";
if (!graphs) console.log(`sanitize-ops: graph replays skipped under ${sanitizer} (the tool does not run graph kernels)`);

using gpu = Context.create({ backend: "cuda" });
using cpu = Context.create({ backend: "host" });
const rng = new Rng(Number(process.env.FMOE_TEST_SEED ?? 1234) >>> 0);
let failures = 0;

type Arr = Uint16Array | Uint8Array | Int32Array | Float32Array;

/** Runs `body` on both contexts and compares each named result (tol 0 = bit-exact). */
async function check(name: string, body: (x: Context) => Record<string, Arr> | Promise<Record<string, Arr>>, tol: number | Record<string, number> = 0): Promise<void> {
  let line: string;
  try {
    const g = await body(gpu);
    const h = await body(cpu);
    const worst: string[] = [];
    let ok = true;
    for (const key of Object.keys(h)) {
      const t = typeof tol === "number" ? tol : (tol[key] ?? 0);
      const a = g[key]!, b = h[key]!;
      if (t === 0) {
        // Any NaN equals any NaN (backends need not agree on NaN payloads or signs).
        const ab = new Uint8Array(canonical(a).buffer);
        const bb = new Uint8Array(canonical(b).buffer);
        const same = ab.length === bb.length && ab.every((v, i) => v === bb[i]);
        if (!same) {
          ok = false;
          worst.push(`${key}: bytes differ`);
        }
      } else {
        const err = relFrobenius(a, b);
        if (!(err <= t)) ok = false;
        worst.push(`${key}: ${err.toExponential(2)} (tol ${t})`);
      }
    }
    line = `${ok ? "ok  " : "FAIL"} ${name}${worst.length ? `: ${worst.join(", ")}` : ""}`;
    if (!ok) ++failures;
  } catch (err) {
    ++failures;
    line = `FAIL ${name}: ${err instanceof Error ? err.message : String(err)}`;
  }
  console.log(`sanitize-ops: ${line}`);
}

function canonical(a: Arr): Arr {
  if (!(a instanceof Float32Array)) return a.slice();
  return a.map((v) => (Number.isNaN(v) ? NaN : v));
}

/** Zeroes the rows of a bf16 [rows, width] array whose map entry is -1 or at/after nUsed. */
function realOnly<A extends Arr>(a: A, width: number, map: Int32Array, nUsed: number): A {
  const out = a.slice() as A;
  for (let r = 0; r < map.length; ++r) if (r >= nUsed || map[r] === -1) out.fill(0, r * width, (r + 1) * width);
  return out;
}

// Shared inputs: T tokens over E experts, an expert-parallel slice, a few invalid ids.
const T = 81, H = 128, I = 64, E = 8, topk = 2, start = 1, local = 6, alignment = 16;
const hidden = rng.bf16Normal(T * H);
const { routingMap, probs } = randomRouting(rng, T, E, topk);
routingMap[3] = -4;
routingMap[10] = E + 2;
const rows = maxRows(T, topk, local, alignment);

await check("permute + MXFP8 copy (EP slice, invalid ids)", (x) => {
  using hT = x.upload(hidden, [T, H], "bf16");
  using rT = x.upload(routingMap, [T, topk]);
  using pT = x.upload(probs, [T, topk]);
  using counter = x.zeros([1], "i32");
  using permuted = x.zeros([rows, H], "bf16");
  const p = permute(x, { hidden: hT, routingMap: rT, probs: pT, numExperts: E, localExpertStart: start, numLocalExperts: local, alignment, quantize: true, invalidCount: counter, out: { permuted } });
  try {
    const map = p.permutationMap.download();
    const n = p.nUsed.download()[0]!;
    return {
      offsets: p.expertOffsets.download(), map, inv: p.inverseMap.download(), counter: counter.download(),
      rows: realOnly(permuted.download(), H, map, n), q: realOnly(p.permutedQ!.download(), H, map, n), s: realOnly(p.permutedScale!.download(), H / 32, map, n),
    };
  } finally {
    for (const t of [p.permutedQ, p.permutedScale, p.expertOffsets, p.permutationMap, p.inverseMap]) t?.dispose();
  }
});

const actRows = 40;
const rowMap = Int32Array.from({ length: actRows }, (_, r) => (r % 5 === 2 ? -1 : r));
for (const act of ACTIVATIONS) {
  const n1 = fc1Outputs(act, I);
  const input = rng.bf16Normal(actRows * n1, 2);
  await check(`activation ${act} (bf16 and fused MXFP8, row map, n_used)`, (x) => {
    using inT = x.upload(input, [actRows, n1], "bf16");
    using mapT = x.upload(rowMap);
    using nT = x.upload(Int32Array.of(33));
    using out = x.zeros([actRows, I], "bf16");
    activation(x, { input: inT, activation: act, layout: "interleaved", rowMap: mapT, nUsed: nT, out });
    using q = x.zeros([actRows, I], "e4m3");
    using s = x.zeros([actRows, I / 32], "e8m0");
    activation(x, { input: inT, activation: act, layout: "interleaved", rowMap: mapT, nUsed: nT, quantize: true, out: { data: q, scale: s } });
    const deq = dequantizeMxfp8(x, q, s);
    try {
      return { bf16: out.download(), mxfp8: deq.download() };
    } finally {
      deq.dispose();
    }
  }, { bf16: 1e-2, mxfp8: 3e-2 });
}

await check("quantize / dequantize / swizzle / unswizzle", (x) => {
  using inT = x.upload(hiddenWithSpecials(), [T, H], "bf16");
  const q = quantizeMxfp8(x, inT);
  try {
    using deq = dequantizeMxfp8(x, q.data, q.scale);
    using sw = swizzleScales(x, q.scale);
    using back = unswizzleScales(x, sw, { rows: T, scaleCols: H / 32 });
    return { data: q.data.download(), scale: q.scale.download(), deq: deq.download(), sw: sw.download(), back: back.download() };
  } finally {
    q.data.dispose();
    q.scale.dispose();
  }
});

function hiddenWithSpecials(): Uint16Array {
  const a = hidden.slice();
  a[5] = 0x7fc0; // NaN block
  a[40] = 0x7f80; // Inf block
  a.fill(0, 64, 96); // zero block
  a[100] = 0x0001; // subnormal
  return a;
}

// Grouped GEMMs over 5 groups with empty ones, a row map and rows beyond the last offset.
const mmRows = 70, n = 96, k = 128;
const offsets = Int32Array.of(0, 0, 17, 17, 50, 60);
const a = rng.bf16Normal(mmRows * k);
const b = rng.bf16Normal(5 * n * k, 1 / Math.sqrt(k));
const bias = rng.f32Normal(5 * n, 0.3);
const mmMap = Int32Array.from({ length: mmRows }, (_, r) => (r % 7 === 3 ? -1 : r));
for (const format of ["bf16", "mxfp8"] as const) {
  await check(`grouped GEMM ${format} (empty groups, row map, bias)`, (x) => {
    using aT = x.upload(a, [mmRows, k], "bf16");
    using bT = x.upload(b, [5, n, k], "bf16");
    using biasT = x.upload(bias, [5, n]);
    using offT = x.upload(offsets);
    using mapT = x.upload(mmMap);
    using c = x.zeros([mmRows, n], "bf16");
    if (format === "bf16") groupedMmBf16(x, { a: aT, b: bT, bias: biasT, groupOffsets: offT, rowMap: mapT, out: c });
    else {
      const aq = quantizeMxfp8(x, aT);
      const bq = quantizeMxfp8(x, bT);
      try {
        groupedMmMxfp8(x, { a: aq.data, aScale: aq.scale, b: bq.data, bScale: bq.scale, bias: biasT, groupOffsets: offT, rowMap: mapT, out: c });
      } finally {
        for (const t of [aq.data, aq.scale, bq.data, bq.scale]) t.dispose();
      }
    }
    return { c: c.download() };
  }, 1e-2);
}

const unRows = 90;
const unInput = rng.bf16Normal(unRows * H);
const inv = Int32Array.from({ length: T * topk }, (_, i) => (i % 6 === 0 ? -1 : i % 11 === 0 ? unRows + 5 : (i * 7) % unRows));
await check("unpermute (probs, -1 and out-of-range entries)", (x) => {
  using inT = x.upload(unInput, [unRows, H], "bf16");
  using invT = x.upload(inv, [T, topk]);
  using pT = x.upload(probs, [T, topk]);
  using out = unpermute(x, { input: inT, inverseMap: invT, probs: pT });
  return { out: out.download() };
});

// Router logits of 256 experts: sigmoid with a bias, groups (DeepSeek-V3's router). Ids may differ
// where two choices are within an ulp (the device's exp); these logits are far apart.
const routeLogits = Float32Array.from({ length: 300 * 256 }, (_, i) => ((i * 7919 + (i >> 8) * 37) % 256) / 16 - 8);
const routeBias = Float32Array.from({ length: 256 }, (_, e) => ((e * 31) % 17) / 100);
await check("route (sigmoid, bias, 8 groups, 300 tokens)", (x) => {
  using l = x.upload(routeLogits, [300, 256], "f32");
  using b = x.upload(routeBias, [256], "f32");
  const r = route(x, { logits: l, topk: 8, scoring: "sigmoid", selectionBias: b, numGroups: 8, topkGroups: 4, scale: 2.5 });
  using m = r.routingMap;
  using p = r.probs;
  return { ids: m.download(), probs: p.download() };
}, { probs: 1e-5 });

// More than 4096 slots: the multi-block routing path of the CUDA permute.
const bigT = 2100, bigH = 64;
const bigRouting = randomRouting(rng, bigT, E, topk);
bigRouting.routingMap[7] = E + 5;
const bigHidden = rng.bf16Normal(bigT * bigH);
await check("permute, 4200 slots (multi-block routing)", (x) => {
  const r = bigRouting;
  using hT = x.upload(bigHidden, [bigT, bigH], "bf16");
  using rT = x.upload(r.routingMap, [bigT, topk]);
  using permuted = x.zeros([maxRows(bigT, topk, local, alignment), bigH], "bf16");
  const p = permute(x, { hidden: hT, routingMap: rT, numExperts: E, localExpertStart: start, numLocalExperts: local, alignment, out: { permuted } });
  try {
    const map = p.permutationMap.download();
    return { offsets: p.expertOffsets.download(), map, inv: p.inverseMap.download(), rows: realOnly(permuted.download(), bigH, map, p.nUsed.download()[0]!) };
  } finally {
    for (const t of [p.expertOffsets, p.permutationMap, p.inverseMap]) t.dispose();
  }
});

const fc1 = rng.bf16Normal(local * 2 * I * H, 1 / Math.sqrt(H));
const fc2 = rng.bf16Normal(local * H * I, 1 / Math.sqrt(I));
const tpe = Int32Array.of(5, 0, 9, 3, 0, 6);
const gRows = 30;
const gHidden = rng.bf16Normal(gRows * H);
const gProbs = rng.f32Normal(gRows);
// n = T takes the prefill path of the CUDA fused op (T * topk > 16 E), n = 6 its decode path.
for (const [format, n] of [["bf16", T], ["mxfp8", T], ["bf16", 6], ["mxfp8", 6]] as const) {
  const tol = format === "bf16" ? 2e-2 : 3e-2;
  const nHidden = hidden.subarray(0, n * H);
  const nRouting = routingMap.subarray(0, n * topk);
  const nProbs = probs.subarray(0, n * topk);
  await check(`FusedMoE ${format}, T = ${n}: forward, forwardGrouped, graph replay`, async (x) => {
    using f1 = x.upload(fc1, [local, 2 * I, H], "bf16");
    using f2 = x.upload(fc2, [local, H, I], "bf16");
    using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, numLocalExperts: local, localExpertStart: start, topk, activation: "silu", weightFormat: format, alignment, maxTokens: Math.max(n, gRows / topk) }, { fc1: f1, fc2: f2 });
    using hT = x.upload(nHidden, [n, H], "bf16");
    using rT = x.upload(nRouting, [n, topk]);
    using pT = x.upload(nProbs, [n, topk]);
    using out = moe.forward({ hidden: hT, routingMap: rT, probs: pT });
    const eager = await out.downloadAsync();
    using gh = x.upload(gHidden, [gRows, H], "bf16");
    using tT = x.upload(tpe);
    using gp = x.upload(gProbs);
    using gout = moe.forwardGrouped({ hidden: gh, tokensPerExpert: tT, probs: gp });
    const results: Record<string, Arr> = { forward: eager, grouped: gout.download() };
    if (!graphs) return results;
    // Graph: capture, then replay with the routing reversed token-wise (new routing, same tensors).
    using stream = x.createStream();
    using replayOut = x.zeros([n, H], "bf16");
    using graph = moe.capture({ hidden: hT, routingMap: rT, probs: pT, out: replayOut, stream });
    const reversed = new Int32Array(nRouting.length);
    for (let t = 0; t < n; ++t) for (let j = 0; j < topk; ++j) reversed[t * topk + j] = nRouting[(n - 1 - t) * topk + j]!;
    rT.copyFrom(reversed, stream);
    graph.launch(stream);
    stream.synchronize();
    const replayed = replayOut.download();
    using again = moe.forward({ hidden: hT, routingMap: rT, probs: pT });
    const same = Buffer.from(replayed.buffer).equals(Buffer.from(again.download().buffer));
    return { ...results, replay: replayed, replayEqualsEager: Int32Array.of(same ? 1 : 0), invalid: Int32Array.of(moe.invalidCount()) };
  }, { forward: tol, grouped: tol, replay: tol, replayEqualsEager: 0, invalid: 0 });
}

if (failures > 0) {
  console.log(`sanitize-ops: ${failures} op(s) FAILED`);
  process.exit(1);
}
console.log("sanitize-ops: all ops match the host backend");
