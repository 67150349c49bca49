// Grouped GEMM (fmoe_grouped_mm_bf16 / fmoe_grouped_mm_mxfp8) on the host backend against
// lib/reference.ts. Tolerance TOLERANCE.bf16 (relative Frobenius) for both: the operands are
// identical (the MXFP8 ones are quantized once and given to both), only the order of the f32 (vs
// f64) accumulation differs before the one bf16 rounding. Rows outside every group, rows of a
// group with bad offsets and rows whose row map is -1 must keep their 0xFF poison.
import { describe, expect } from "bun:test";
import { join } from "node:path";
import { bf16ToF32, f32ToBf16, groupedMmBf16, groupedMmMxfp8, quantizeMxfp8, reference as R, type Rng, TOLERANCE } from "../lib/index.ts";
import {
  expectBitExact,
  expectClose,
  expectNoNaNBf16,
  expectNonZero,
  expectPoisoned,
  pickRows,
  randBf16,
  randWeights,
  seededTest,
  suiteContext,
} from "./helpers.ts";

interface Case {
  name: string;
  rows: number;
  n: number;
  k: number;
  /** Rows of each group (sum <= rows); the rest of the rows lie beyond offsets[groups]. */
  sizes: number[];
  bias?: boolean;
  /** Fraction of rows with row map -1 (0 = no row map). */
  skip?: number;
  /** Overrides the offsets built from sizes (bad offsets). */
  offsets?: number[];
}

const CASES: Case[] = [
  { name: "rows = 0", rows: 0, n: 32, k: 64, sizes: [0, 0] },
  { name: "one row, one group", rows: 1, n: 32, k: 64, sizes: [1] },
  { name: "odd n = 17, k = 33 (bf16 only), an empty group", rows: 20, n: 17, k: 33, sizes: [7, 0, 9], bias: true },
  { name: "empty groups first and last, row map skips rows", rows: 48, n: 64, k: 96, sizes: [0, 16, 0, 20, 0], skip: 0.25 },
  { name: "rows beyond offsets[groups] are not written", rows: 40, n: 32, k: 64, sizes: [5, 10], bias: true },
  { name: "all rows in one group of four", rows: 33, n: 48, k: 64, sizes: [0, 33, 0, 0] },
  { name: "k = 2880, 5 rows, 2 groups", rows: 5, n: 16, k: 2880, sizes: [2, 3], bias: true },
  { name: "medium: 256 rows, n 128, k 256, 8 groups, row map", rows: 256, n: 128, k: 256, sizes: [32, 16, 0, 48, 64, 16, 32, 40], skip: 0.1, bias: true },
  {
    name: "bad offsets (decreasing, past rows) skip their group instead of faulting",
    rows: 30, n: 32, k: 64, sizes: [], offsets: [0, 10, 6, 6, 45],
  },
];

function offsetsOf(c: Case): Int32Array {
  if (c.offsets !== undefined) return Int32Array.from(c.offsets);
  const o = new Int32Array(c.sizes.length + 1);
  c.sizes.forEach((s, g) => (o[g + 1] = o[g]! + s));
  return o;
}

/** Rows the op writes: inside a valid group, row map not -1 (the reference's rule). */
function writtenRows(offsets: Int32Array, rowMap: Int32Array | undefined, rows: number): { written: number[]; skipped: number[] } {
  const isWritten = new Array<boolean>(rows).fill(false);
  for (let g = 0; g + 1 < offsets.length; ++g) {
    const lo = offsets[g]!, hi = offsets[g + 1]!;
    if (lo < 0 || hi < lo || hi > rows) continue;
    for (let r = lo; r < hi; ++r) if (rowMap === undefined || rowMap[r] !== -1) isWritten[r] = true;
  }
  const written: number[] = [];
  const skipped: number[] = [];
  isWritten.forEach((w, r) => (w ? written : skipped).push(r));
  return { written, skipped };
}

describe("grouped GEMM (host backend vs reference)", () => {
  const ctx = suiteContext("host");

  for (const c of CASES) {
    for (const format of ["bf16", "mxfp8"] as const) {
      if (format === "mxfp8" && c.k % 32 !== 0) continue;
      seededTest(`${format}: ${c.name}${c.bias ? ", bias" : ""}`, (rng) => runCase(c, format, rng));
    }
  }

  function runCase(c: Case, format: "bf16" | "mxfp8", rng: Rng): void {
    const x = ctx();
    const groups = offsetsOf(c).length - 1;
    const { rows, n, k } = c;
    const offsets = offsetsOf(c);
    const rowMap = c.skip !== undefined ? Int32Array.from({ length: rows }, (_, r) => (rng.uniform() < c.skip! ? -1 : r)) : undefined;
    const a = randBf16(rng, rows * k);
    const b = randWeights(rng, groups, n, k);
    const bias = c.bias ? Float32Array.from({ length: groups * n }, () => rng.normal() * 0.5) : undefined;
    using aT = x.upload(a, [rows, k], "bf16");
    using bT = x.upload(b, [groups, n, k], "bf16");
    using biasT = bias !== undefined ? x.upload(bias, [groups, n]) : undefined;
    using offT = x.upload(offsets);
    using mapT = rowMap !== undefined ? x.upload(rowMap) : undefined;
    using out = x.empty([rows, n], "bf16").fill(0xff);

    let ref: Uint16Array;
    if (format === "bf16") {
      groupedMmBf16(x, { a: aT, b: bT, bias: biasT, groupOffsets: offT, rowMap: mapT, out });
      ref = R.groupedMm({ a: { bf16: a }, b: { bf16: b }, bias, groupOffsets: offsets, rowMap, rows, n, k, groups });
    } else {
      const aq = R.quantizeMxfp8(a, rows, k);
      const bq = R.quantizeMxfp8(b, groups * n, k);
      using aD = x.upload(aq.data, [rows, k], "e4m3");
      using aS = x.upload(aq.scale, [rows, k / 32], "e8m0");
      using bD = x.upload(bq.data, [groups, n, k], "e4m3");
      using bS = x.upload(bq.scale, [groups, n, k / 32], "e8m0");
      groupedMmMxfp8(x, { a: aD, aScale: aS, b: bD, bScale: bS, bias: biasT, groupOffsets: offT, rowMap: mapT, out });
      ref = R.groupedMm({ a: aq, b: bq, bias, groupOffsets: offsets, rowMap, rows, n, k, groups });
    }
    const got = out.download();
    const { written, skipped } = writtenRows(offsets, rowMap, rows);
    expectPoisoned(got, n, skipped, "rows outside the groups");
    const gotRows = pickRows(got, n, written);
    const refRows = pickRows(ref, n, written);
    expectNoNaNBf16(gotRows, "written rows");
    expectNonZero(refRows, "reference");
    expectClose(gotRows, refRows, TOLERANCE.bf16, `${format} GEMM`);
    if (rows > 0 && c.offsets === undefined) expect(written.length).toBeGreaterThan(0);
  }

  seededTest("every vector width gives the same bits (FMOE_HOST_SIMD=sse | avx2 caps it; AVX-512 where the CPU has it)", async (rng) => {
    // Each width runs in its own process over the same inputs (bf16 and MXFP8; groups of more
    // than 8 rows take the widened path; n not a multiple of 4 or 16; k not of 4; a row map), and
    // prints a hash of every output. Widths the CPU lacks fall back to the widest it has.
    const seed = rng.nextU32();
    const script = `
      import { Context, groupedMmBf16, groupedMmMxfp8, quantizeMxfp8, Rng } from ${JSON.stringify(join(import.meta.dir, "..", "lib", "index.ts"))};
      import { createHash } from "node:crypto";
      using ctx = Context.create("host");
      const rng = new Rng(${seed});
      const hash = createHash("sha256");
      for (const [rowsPer, n, k] of [[9, 37, 64], [13, 130, 96], [33, 16, 1001], [70, 48, 160], [5, 100, 64]]) {
        const G = 3, rows = rowsPer * G;
        using a = ctx.upload(rng.f32Normal(rows * k), [rows, k], "bf16");
        using b = ctx.upload(rng.f32Normal(G * n * k, 0.1), [G, n, k], "bf16");
        using bias = ctx.upload(rng.f32Normal(G * n), [G, n], "f32");
        using offsets = ctx.upload(Int32Array.from({ length: G + 1 }, (_, g) => g * rowsPer));
        using rowMap = ctx.upload(Int32Array.from({ length: rows }, (_, r) => (rng.int(7) === 0 ? -1 : r)));
        using out = ctx.zeros([rows, n], "bf16");  // rows the map skips stay zeros
        groupedMmBf16(ctx, { a, b, bias, groupOffsets: offsets, rowMap, out });
        hash.update(out.download());
        if (k % 32 !== 0) continue;
        const qa = quantizeMxfp8(ctx, a), qb = quantizeMxfp8(ctx, b.reshape([G * n, k]));
        using mx = ctx.zeros([rows, n], "bf16");
        groupedMmMxfp8(ctx, { a: qa.data, aScale: qa.scale, b: qb.data.reshape([G, n, k]), bScale: qb.scale.reshape([G, n, k / 32]), bias, groupOffsets: offsets, rowMap, out: mx });
        hash.update(mx.download());
        for (const t of [qa.data, qa.scale, qb.data, qb.scale]) t.dispose();
      }
      console.log(hash.digest("hex"));`;
    const run = async (simd?: string) => {
      const env: Record<string, string | undefined> = { ...process.env, FMOE_HOST_SIMD: simd };
      const proc = Bun.spawn([process.execPath, "-e", script], { env, stdout: "pipe", stderr: "pipe" });
      const [out, err, code] = [await new Response(proc.stdout).text(), await new Response(proc.stderr).text(), await proc.exited];
      expect(err).toBe("");
      expect(code).toBe(0);
      return out.trim();
    };
    const widest = await run();
    expect(widest).toMatch(/^[0-9a-f]{64}$/);
    expect(await run("avx2")).toBe(widest);
    expect(await run("sse")).toBe(widest);
  }, 30_000);

  seededTest("a row's bits do not depend on its group's size (b read in place up to 8 rows, widened above)", (rng) => {
    // The same 5 rows of a, alone in their group and then among 12, against the same b: the two
    // paths must add the same products in the same order, bit for bit (NaN for NaN). bf16 and
    // MXFP8 (whose in-place path decodes chunks of e4m3); extreme and NaN scales and e4m3 NaN /
    // subnormal codes in b.
    const x = ctx();
    const [n, k, few, many] = [37, 96, 5, 12];
    const a = rng.f32Normal(many * k);
    using aT = x.upload(a, [many, k], "bf16");
    using bT = x.upload(rng.f32Normal(2 * n * k, 0.1), [2, n, k], "bf16");
    using fewOffsets = x.upload(new Int32Array([0, few, few]));
    using manyOffsets = x.upload(new Int32Array([0, many, many]));
    const qa = quantizeMxfp8(x, aT), qb = quantizeMxfp8(x, bT.reshape([2 * n, k]));
    using qaData = qa.data, qaScale = qa.scale, qbData = qb.data, qbScale = qb.scale;
    // Codes the quantizer never writes, still inputs the op must take: e4m3 NaN (0x7F, 0xFF) and
    // subnormals in b, scales 2^-127, 2^127 and NaN.
    const data = qbData.download(), scale = qbScale.download();
    for (let i = 0; i < 40; ++i) data[rng.int(data.length)] = [0x7f, 0xff, 0x01, 0x86][i % 4]!;
    for (let i = 0; i < 12; ++i) scale[rng.int(scale.length)] = [0x00, 0xfe, 0xff, 0x7f][i % 4]!;
    using bq = x.upload(data, [2, n, k], "e4m3");
    using bs = x.upload(scale, [2, n, k / 32], "e8m0");
    for (const mx of [false, true]) {
      const run = (offsets: typeof fewOffsets): Uint16Array => {
        using out = x.zeros([many, n], "bf16");
        if (mx) groupedMmMxfp8(x, { a: qaData, aScale: qaScale, b: bq, bScale: bs, groupOffsets: offsets, out });
        else groupedMmBf16(x, { a: aT, b: bT, groupOffsets: offsets, out });
        return out.download().slice(0, few * n);
      };
      const alone = run(fewOffsets), among = run(manyOffsets);
      expectNonZero(alone, mx ? "MXFP8 rows" : "bf16 rows");
      // NaN outputs (from the NaN codes and scales) are NaN on both paths; their sign is not
      // specified (which NaN an x86 add keeps depends on its operands' order). Widened to f32
      // (exact), expectBitExact compares the bits and takes any NaN for any NaN.
      expectBitExact(bf16ToF32(alone), bf16ToF32(among), `${mx ? "MXFP8" : "bf16"} rows alone vs among ${many}`);
    }
  });

  seededTest("MXFP8 dequantization of every e4m3 code under extreme and NaN scales, on both paths", () => {
    // b's row c holds code c at k = 0 (zeros elsewhere), under one scale for all rows; a's rows
    // are 1.0 at k = 0: each output is bf16(dequantize(c, scale)), compared by value with the
    // reference's dequantization (NaN for NaN; +-0 alike: the sum adds +0 lanes to it). One row
    // per group reads b in place, twelve widen it.
    const x = ctx();
    const [n, k] = [256, 32];
    const codes = new Uint8Array(n * k);
    for (let c = 0; c < n; ++c) codes[c * k] = c;
    using bq = x.upload(codes, [1, n, k], "e4m3");
    for (const rows of [1, 12]) {
      const ones = new Uint8Array(rows * k);
      for (let r = 0; r < rows; ++r) ones[r * k] = 0x38; // 1.0
      using aq = x.upload(ones, [rows, k], "e4m3");
      using as = x.upload(new Uint8Array(rows).fill(127), [rows, 1], "e8m0");
      using offsets = x.upload(new Int32Array([0, rows]));
      for (const sb of [0x00, 0x01, 0x40, 0x7f, 0x86, 0x87, 0xf0, 0xfe, 0xff]) {
        using bs = x.upload(new Uint8Array(n).fill(sb), [1, n, 1], "e8m0");
        using out = groupedMmMxfp8(x, { a: aq, aScale: as, b: bq, bScale: bs, groupOffsets: offsets });
        const got = out.download();
        const want = R.dequantizeMxfp8(codes, new Uint8Array(n).fill(sb), n, k);
        for (let r = 0; r < rows; ++r) {
          for (let c = 0; c < n; ++c) {
            const g = bf16ToF32(got[r * n + c]!), w = bf16ToF32(f32ToBf16(want[c * k]!));
            if (!(g === w || (Number.isNaN(g) && Number.isNaN(w)))) {
              throw new Error(`rows ${rows}, scale 0x${sb.toString(16)}, code 0x${c.toString(16)}: got ${g}, want ${w}`);
            }
          }
        }
      }
    }
  });

  seededTest("allocated output is [rows, n] bf16", (rng) => {
    const x = ctx();
    using aT = x.upload(randBf16(rng, 6 * 32), [6, 32], "bf16");
    using bT = x.upload(randBf16(rng, 2 * 8 * 32), [2, 8, 32], "bf16");
    using offT = x.upload(new Int32Array([0, 2, 6]));
    using out = groupedMmBf16(x, { a: aT, b: bT, groupOffsets: offT });
    expect(out.shape).toEqual([6, 8]);
    expect(out.dtype).toBe("bf16");
  });
});
