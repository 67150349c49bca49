#!/usr/bin/env bun
/**
 * bun run bench: times the fused MoE layer on the CUDA backend against the floor of each cell.
 *
 *   bun run bench [--cases a,b] [--tokens 1,8,...] [--dtype bf16|mxfp8] [--json FILE]
 *                 [--iters N] [--sets R] [--backend cuda|host] [--breakdown]
 *                 [--compare OLD.json] [--timing back-to-back|isolated] [--help]
 *
 * --compare also prints this run beside an earlier `--json` file, cell by cell, with the
 * geometric mean of the time quotients and this run's times against both runs' floors
 * (scripts/bench-compare.ts: the floors move with each run's measured copy bandwidth).
 *
 * --breakdown also times each step of the bf16 layer as its own op (permute, FC1, activation,
 * FC2, unpermute) on the first input set, to show where a cell's time goes.
 *
 * For every (case, T) cell: the layer is built once per case (weights filled on the device from a
 * random pool), R input sets are drawn (per token, softmax over normal(0,1) logits, top-k,
 * renormalised), fused_moe is captured in one CUDA graph per input set, and the graphs are replayed
 * in rotation, each replay timed with events; the cell's time is the median replay. Rotating
 * routings means each replay reads a different set of experts, so decode cells are not served
 * from L2.
 *
 * Timing (--timing): back-to-back (the default) enqueues an untimed replay of the previous input
 * set right before each timed one, so the GPU is still busy with it while the host records the
 * start event and submits the timed graph: the start event fires when the GPU turns to the timed
 * replay, and the time is the GPU's, as a model's layers run back to back in a server. isolated
 * times each replay on an idle stream, so its time also holds the host's graph submission
 * (a few microseconds: visible at decode).
 *
 * Floor (shared definition, see lib/cases.ts): max(bytes / copy_bandwidth, flops / matmul_peak),
 * bytes = distinct_experts_routed * (fc1_out*H + H*ffn) * weight_bytes + T*H*2*2,
 * flops = 2*T*topk*(fc1_out*H + H*ffn). copy_bandwidth is measured in this run (a 1 GiB
 * device-to-device copy, bytes read + written); the matmul peak is the larger of this library's
 * own bf16 GEMM on an 8192^3 product, measured in this run, and the part's reference (763 TFLOP/s
 * on an H100, 788 on an H200: bf16 8192^3 products measured elsewhere). Both are printed with
 * their source.
 */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { writeFileSync } from "node:fs";
import { BENCH_CASES, BENCH_TOKENS, type BenchCase } from "../lib/cases.ts";
import {
  activation, Context, FusedMoE, type Graph, groupedMmBf16, permute, type Tensor, unpermute,
} from "../lib/index.ts";
import { f32ToBf16 } from "../lib/dtype.ts";
import { randomRouting, Rng } from "../lib/random.ts";
import { type BenchRun, compareRuns, formatComparison, geomean, markdownTable, readBenchRun, runLabel } from "./bench-compare.ts";

const { values } = parseFlags({
  options: {
    cases: { type: "string" },
    tokens: { type: "string" },
    dtype: { type: "string", default: "bf16" },
    json: { type: "string" },
    iters: { type: "string", default: "60" },
    sets: { type: "string", default: "4" },
    backend: { type: "string", default: "cuda" },
    breakdown: { type: "boolean", default: false },
    compare: { type: "string" },
    timing: { type: "string", default: "back-to-back" },
    help: { type: "boolean", short: "h" },
  },
} as const);

if (values.help) {
  console.log(`usage: bun run bench [flags]
  --cases a,b          cases to run (default all: ${BENCH_CASES.map((c) => c.name).join(", ")})
  --tokens 1,8,...     token counts T (default ${BENCH_TOKENS.join(",")})
  --dtype bf16|mxfp8   the weights' format (default bf16)
  --json FILE          also write the run as JSON (for --compare and bench:compare)
  --iters N            timed replays per cell, at least 50 (default 60); the cell's time is their median
  --sets R             input sets (routings) per cell, each its own graph, replayed in rotation (default 4)
  --backend cuda|host  the backend timed (default cuda)
  --breakdown          also time each step of the bf16 layer as its own op
  --compare OLD.json   also print this run beside an earlier --json file, cell by cell
  --timing back-to-back|isolated
                       back-to-back (default): the GPU's time, each replay queued behind another;
                       isolated: each replay on an idle stream, the host's submission included`);
  process.exit(0);
}

// parseArgs, its errors (an unknown flag, a flag without its value) as a message and exit status 2.
function parseFlags<T extends ParseArgsConfig>(config: T): ReturnType<typeof parseArgs<T>> {
  try {
    return parseArgs(config);
  } catch (e) {
    fail((e as Error).message);
  }
}

const dtype = values.dtype === "mxfp8" ? "mxfp8" : "bf16";
if (values.dtype !== "bf16" && values.dtype !== "mxfp8") fail(`--dtype must be bf16 or mxfp8`);
if (values.timing !== "back-to-back" && values.timing !== "isolated") fail(`--timing must be back-to-back or isolated`);
if (values.backend !== "cuda" && values.backend !== "host") fail(`--backend must be cuda or host`);
const backToBack = values.timing === "back-to-back";
const iters = Math.max(50, positiveInt("--iters", values.iters!));
const numSets = positiveInt("--sets", values.sets!);
const cases = values.cases
  ? values.cases.split(",").map((name) => BENCH_CASES.find((c) => c.name === name) ?? fail(`unknown case ${name} (cases: ${BENCH_CASES.map((c) => c.name).join(", ")})`))
  : BENCH_CASES;
const tokens = values.tokens ? values.tokens.split(",").map((t) => positiveInt("--tokens", t)) : BENCH_TOKENS;
if (values.breakdown && dtype === "mxfp8") console.log("bench: --breakdown times the bf16 steps only; not with --dtype mxfp8");
// Read before the run, so that a bad file fails in a second rather than after the benchmark.
const previousRun = values.compare !== undefined ? readPrevious(values.compare) : undefined;

function readPrevious(path: string): BenchRun {
  try {
    return readBenchRun(path);
  } catch (e) {
    fail(`--compare: ${(e as Error).message}`);
  }
}

function fail(msg: string): never {
  console.error(`bench: ${msg}`);
  process.exit(2);
}

function positiveInt(flag: string, text: string): number {
  const n = Number(text);
  if (text.trim() === "" || !Number.isSafeInteger(n) || n < 1) fail(`${flag}: "${text}" is not a positive integer`);
  return n;
}

const backend = values.backend === "host" ? "host" : "cuda";
if (backend === "cuda" && Context.cudaDeviceCount() === 0) fail("no CUDA device: the benchmark times the cuda backend");
using ctx = Context.create({ backend });
const device = ctx.deviceName;
const stream = ctx.createStream();

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB copy. */
function measureCopyBandwidth(): number {
  const bytes = backend === "cuda" ? 1 << 30 : 1 << 26;
  using src = ctx.empty([bytes], "e4m3");
  using dst = ctx.empty([bytes], "e4m3");
  src.fill(1);
  const times: number[] = [];
  for (let i = 0; i < 12; i++) times.push(ctx.time(stream, () => dst.copyFrom(src, stream)));
  return (2 * bytes) / (median(times.slice(2)) * 1e-3);
}

/** The part's bf16 8192^3 product rate as measured elsewhere (the fallback ceiling). */
function referencePeak(): { tflops: number; source: string } {
  if (/H200/i.test(device)) return { tflops: 788, source: "H200 bf16 8192^3 product (measured reference)" };
  if (/H100/i.test(device)) return { tflops: 763, source: "H100 bf16 8192^3 product (measured reference)" };
  return { tflops: 763, source: `unknown device ${device}: H100 figure assumed` };
}

/**
 * The matmul ceiling: the faster of this library's own bf16 GEMM on a dense n^3 product (one
 * group, random data, median of 10 after two warm-ups) and the part's reference figure, so that
 * a slow GEMM never lowers the floors. The reference alone on the host backend (its rate is no
 * ceiling of anything) or if the measurement fails.
 */
function matmulPeak(n = 8192): { tflops: number; source: string } {
  const reference = referencePeak();
  if (backend !== "cuda") return reference;
  const pool = new Map<number, Tensor>();
  try {
    using a = ctx.empty([n, n], "bf16");
    using b = ctx.empty([1, n, n], "bf16");
    using out = ctx.empty([n, n], "bf16");
    using offsets = ctx.upload(Int32Array.from([0, n]), [2], "i32");
    const rng = new Rng(0x9ea4);
    fillRandomBf16(a, rng, 1, pool);
    fillRandomBf16(b, rng, 1 / Math.sqrt(n), pool);
    const run = (): void => void groupedMmBf16(ctx, { a, b, groupOffsets: offsets, out, stream });
    run();
    run();
    const times: number[] = [];
    for (let i = 0; i < 10; i++) times.push(ctx.time(stream, run));
    const own = (2 * n ** 3) / (median(times) * 1e-3) / 1e12;
    return {
      tflops: Math.max(own, reference.tflops),
      source: `the larger of this library's bf16 GEMM on ${n}^3, measured ${own.toFixed(0)}, and the ${reference.source}`,
    };
  } catch (e) {
    return { ...reference, source: `${reference.source}; own ${n}^3 GEMM failed: ${(e as Error).message}` };
  } finally {
    for (const t of pool.values()) t.dispose();
  }
}

/** Fills a bf16 tensor from a pool of random normal values scaled by `std`, by device copies. */
function fillRandomBf16(t: Tensor, rng: Rng, std: number, pool: Map<number, Tensor>): void {
  let src = pool.get(std);
  if (!src) {
    const n = 1 << 22; // 4M values: distinct enough, cheap to draw
    const vals = new Float32Array(n);
    for (let i = 0; i < n; i++) vals[i] = rng.normal() * std;
    src = ctx.upload(f32ToBf16(vals), [n], "bf16");
    pool.set(std, src);
  }
  const poolElems = src.numel;
  let done = 0;
  let shift = 0;
  while (done < t.numel) {
    // Shift the start in the pool on every copy so that neighbouring experts differ.
    shift = (shift + 104729) % (poolElems >> 1);
    const n = Math.min(t.numel - done, poolElems - shift);
    t.view(done, [n]).copyFrom(src.view(shift, [n]), stream);
    done += n;
  }
}

/** Times each step of a bf16 layer as its own op; returns microseconds per step. */
function breakdown(c: BenchCase, fc1: Tensor, fc2: Tensor, hidden: Tensor, routing: Tensor, probs: Tensor): Record<string, number> {
  const timeUs = (body: () => void): number => {
    body();
    const ts: number[] = [];
    for (let i = 0; i < 20; i++) ts.push(ctx.time(stream, body));
    return median(ts) * 1e3;
  };
  const p = permute(ctx, { hidden, routingMap: routing, numExperts: c.experts, stream });
  const rows = p.maxRows;
  const fc1Out = c.activation === "squared_relu" ? c.ffn : 2 * c.ffn;
  using h1 = ctx.empty([rows, fc1Out], "bf16");
  using a1 = ctx.empty([rows, c.ffn], "bf16");
  using h2 = ctx.empty([rows, c.hidden], "bf16");
  using out = ctx.empty([hidden.shape[0]!, c.hidden], "bf16");
  const steps: Record<string, number> = {
    permute: timeUs(() => permute(ctx, { hidden, routingMap: routing, numExperts: c.experts, out: p, stream })),
    fc1: timeUs(() => groupedMmBf16(ctx, { a: p.permuted!, b: fc1, groupOffsets: p.expertOffsets, rowMap: p.permutationMap, out: h1, stream })),
    activation: timeUs(() => activation(ctx, { input: h1, activation: c.activation, rowMap: p.permutationMap, nUsed: p.nUsed, out: a1, stream })),
    fc2: timeUs(() => groupedMmBf16(ctx, { a: a1, b: fc2, groupOffsets: p.expertOffsets, rowMap: p.permutationMap, out: h2, stream })),
    unpermute: timeUs(() => unpermute(ctx, { input: h2, inverseMap: p.inverseMap, probs, out, stream })),
  };
  for (const t of [p.permuted, p.expertOffsets, p.permutationMap, p.inverseMap]) t?.dispose();
  return steps;
}

interface Row {
  case: string; T: number; dtype: string; us: number; floor_us: number; ratio: number;
  tflops: number; gbps: number; bf16_floor_us: number;
}

const copyBw = measureCopyBandwidth();
const peak = matmulPeak();
console.log(`bench: device ${device}, backend ${backend}, dtype ${dtype}`);
console.log(`bench: copy bandwidth ${(copyBw / 1e12).toFixed(2)} TB/s (measured, 1 GiB D2D copy, read + write)`);
console.log(`bench: matmul peak ${peak.tflops.toFixed(0)} TFLOP/s (${peak.source})`);

const rows: Row[] = [];
for (const c of cases) {
  const fc1Out = c.activation === "squared_relu" ? c.ffn : 2 * c.ffn;
  const perExpert = fc1Out * c.hidden + c.hidden * c.ffn;
  const maxT = Math.max(...tokens);
  const rng = new Rng(0x5eed + c.hidden);
  process.stdout.write(`bench: ${c.name}: filling ${((c.experts * perExpert * 2) / 2 ** 30).toFixed(1)} GiB of weights...\n`);
  const pool = new Map<number, Tensor>();
  using fc1 = ctx.empty([c.experts, fc1Out, c.hidden], "bf16");
  using fc2 = ctx.empty([c.experts, c.hidden, c.ffn], "bf16");
  fillRandomBf16(fc1, rng, 1 / Math.sqrt(c.hidden), pool);
  fillRandomBf16(fc2, rng, 1 / Math.sqrt(c.ffn), pool);
  using moe = new FusedMoE(ctx, {
    hidden: c.hidden, ffn: c.ffn, numExperts: c.experts, topk: c.topk,
    activation: c.activation, weightFormat: dtype, maxTokens: maxT,
  }, { fc1, fc2 });
  ctx.synchronize();
  for (const p of pool.values()) p.dispose();

  for (const T of tokens) {
    const sets: { hidden: Tensor; routing: Tensor; probs: Tensor; out: Tensor; graph: Graph; distinct: number }[] = [];
    for (let s = 0; s < numSets; s++) {
      const r = randomRouting(rng, T, c.experts, c.topk);
      const h = new Float32Array(T * c.hidden);
      for (let i = 0; i < h.length; i++) h[i] = rng.normal();
      const hidden = ctx.upload(f32ToBf16(h), [T, c.hidden], "bf16");
      const routing = ctx.upload(r.routingMap, [T, c.topk], "i32");
      const probs = ctx.upload(r.probs, [T, c.topk], "f32");
      const out = ctx.empty([T, c.hidden], "bf16");
      const graph = moe.capture({ hidden, routingMap: routing, probs, out, stream });
      sets.push({ hidden, routing, probs, out, graph, distinct: new Set(r.routingMap).size });
    }
    for (let i = 0; i < 5 * numSets; i++) sets[i % numSets]!.graph.launch(stream);
    const times: number[] = [];
    for (let i = 0; i < iters; i++) {
      const set = sets[i % numSets]!;
      if (backToBack) sets[(i + numSets - 1) % numSets]!.graph.launch(stream);
      times.push(ctx.time(stream, () => set.graph.launch(stream)));
    }
    const us = median(times) * 1e3;
    const distinct = sets.reduce((a, s) => a + s.distinct, 0) / sets.length;
    const flops = 2 * T * c.topk * perExpert;
    const wBytes = dtype === "mxfp8" ? 1 + 1 / 32 : 2;
    const bytesOf = (wb: number): number => distinct * perExpert * wb + T * c.hidden * 2 * 2;
    const floorOf = (wb: number): number => Math.max(bytesOf(wb) / copyBw, flops / (peak.tflops * 1e12)) * 1e6;
    const row: Row = {
      case: c.name, T, dtype, us, floor_us: floorOf(wBytes), ratio: us / floorOf(wBytes),
      tflops: flops / (us * 1e6), gbps: bytesOf(wBytes) / (us * 1e3), bf16_floor_us: floorOf(2),
    };
    rows.push(row);
    console.log(`bench: ${c.name.padEnd(15)} T=${String(T).padStart(5)}  ${us.toFixed(1).padStart(9)} us  floor ${row.floor_us.toFixed(1).padStart(8)} us  ratio ${row.ratio.toFixed(2)}`);
    if (values.breakdown && dtype === "bf16") {
      const s0 = sets[0]!;
      const steps = breakdown(c, fc1, fc2, s0.hidden, s0.routing, s0.probs);
      const sum = Object.values(steps).reduce((a, b) => a + b, 0);
      console.log(`bench:   steps (us): ${Object.entries(steps).map(([k, v]) => `${k} ${v.toFixed(1)}`).join(", ")}; sum ${sum.toFixed(1)}`);
    }
    for (const s of sets) {
      s.graph.dispose(); s.hidden.dispose(); s.routing.dispose(); s.probs.dispose(); s.out.dispose();
    }
  }
}

function table(rs: Row[]): string {
  const head = ["case", "T", "us", "TFLOP/s", "GB/s", "floor_us", "ratio", ...(dtype === "mxfp8" ? ["vs_bf16_floor"] : [])];
  const lines = rs.map((r) => [
    r.case, String(r.T), r.us.toFixed(1), r.tflops.toFixed(1), r.gbps.toFixed(0), r.floor_us.toFixed(1),
    r.ratio.toFixed(2), ...(dtype === "mxfp8" ? [(r.us / r.bf16_floor_us).toFixed(2)] : []),
  ]);
  return markdownTable(head, lines);
}

const geomeanRatio = geomean(rows.map((r) => r.ratio));
const current: BenchRun = { device, dtype, timing: values.timing!, copy_bandwidth_bytes_per_s: copyBw, rows };
console.log(`\n${runLabel(current)}, peak ${peak.tflops.toFixed(0)} TFLOP/s\n`);
console.log(table(rows));
console.log(`\ngeometric mean of time/floor over ${rows.length} cells: ${geomeanRatio.toFixed(3)} (worst ${Math.max(...rows.map((r) => r.ratio)).toFixed(2)})`);
if (values.json) {
  writeFileSync(values.json, JSON.stringify({
    device, backend, dtype, timing: values.timing, copy_bandwidth_bytes_per_s: copyBw, matmul_peak_tflops: peak.tflops,
    matmul_peak_source: peak.source, geomean_ratio: geomeanRatio, rows,
  }, null, 2));
  console.log(`bench: wrote ${values.json}`);
}
if (previousRun) {
  try {
    const cmp = compareRuns(current, previousRun);
    console.log("\n" + formatComparison(cmp, current, previousRun, { current: "this run", previous: values.compare! }));
  } catch (e) {
    console.error(`bench: --compare: ${(e as Error).message}`);
  }
}
stream.dispose();
