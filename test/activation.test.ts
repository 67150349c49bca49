// activation (fmoe_activation_quant) on the host backend: every activation x gated layout x
// output (bf16, fused MXFP8), with skipped rows (row_map -1, rows >= n_used).
//
// Tolerances: the bf16 output against lib/reference.ts (f64 math, one bf16 rounding) within
// TOLERANCE.bf16 relative Frobenius: f32 vs f64 transcendental functions may flip a rounding.
// The fused MXFP8 output is bit-exact against fmoe_quantize_mxfp8 of the same backend's bf16
// output (the contract of fmoe.h). Skipped rows must keep their 0xFF poison.
import { describe, expect } from "bun:test";
import {
  activation,
  ACTIVATIONS,
  type Activation,
  type GatedLayout,
  isGated,
  quantizeMxfp8,
  reference as R,
  type Rng,
  TOLERANCE,
} from "../lib/index.ts";
import {
  expectBitExact,
  expectClose,
  expectNoNaNBf16,
  expectNonZero,
  expectPoisoned,
  pickRows,
  randBf16,
  seededTest,
  suiteContext,
} from "./helpers.ts";

interface Case {
  rows: number;
  ffn: number;
  activation: Activation;
  layout: GatedLayout;
  alpha?: number;
  limit?: number;
  quantize: boolean;
  /** Rows >= nUsed skipped; undefined = no n_used. */
  nUsed?: number;
  /** Skip every `skipEvery`-th row through row_map. */
  skipEvery?: number;
  std: number;
}

function title(c: Case): string {
  const params = c.alpha !== undefined ? `, alpha ${c.alpha}, limit ${c.limit}` : "";
  const skips = [c.nUsed !== undefined ? `n_used ${c.nUsed}` : "", c.skipEvery !== undefined ? `row_map -1 every ${c.skipEvery}` : ""].filter(Boolean).join(", ");
  return `${c.activation}${isGated(c.activation) ? ` ${c.layout}` : ""}${params} -> ${c.quantize ? "fused MXFP8" : "bf16"}, [${c.rows} x ${c.ffn}]${skips ? `, ${skips}` : ""}`;
}

const CASES: Case[] = [];
for (const act of ACTIVATIONS) {
  const layouts: GatedLayout[] = isGated(act) ? ["halves", "interleaved"] : ["halves"];
  for (const layout of layouts) {
    for (const quantize of [false, true]) {
      CASES.push({ rows: 37, ffn: 64, activation: act, layout, quantize, nUsed: 31, skipEvery: 5, std: 2 });
      if (act === "swiglu_oai") {
        // Non-default parameters, inputs wide enough that the clamps bite.
        CASES.push({ rows: 24, ffn: 96, activation: act, layout, alpha: 1.25, limit: 2.5, quantize, skipEvery: 3, std: 4 });
      }
    }
    // bf16 output allows any I: an odd one.
    CASES.push({ rows: 9, ffn: 33, activation: act, layout, quantize: false, std: 1.5 });
  }
}
CASES.push({ rows: 0, ffn: 64, activation: "silu", layout: "halves", quantize: true, std: 1 });
CASES.push({ rows: 1, ffn: 2880, activation: "swiglu_oai", layout: "interleaved", quantize: true, std: 3 });
CASES.push({ rows: 3, ffn: 2880, activation: "gelu", layout: "halves", quantize: false, nUsed: 2, std: 1 });

describe("activation (host backend vs reference)", () => {
  const ctx = suiteContext("host");

  for (const c of CASES) seededTest(title(c), (rng) => runCase(c, rng));

  function runCase(c: Case, rng: Rng): void {
    const x = ctx();
    const n1 = isGated(c.activation) ? 2 * c.ffn : c.ffn;
    const input = randBf16(rng, c.rows * n1, c.std);
    const rowMap = new Int32Array(c.rows);
    for (let r = 0; r < c.rows; ++r) rowMap[r] = c.skipEvery !== undefined && r % c.skipEvery === 1 ? -1 : r;
    const written: number[] = [];
    const skipped: number[] = [];
    for (let r = 0; r < c.rows; ++r) (rowMap[r] !== -1 && (c.nUsed === undefined || r < c.nUsed) ? written : skipped).push(r);

    using inT = x.upload(input, [c.rows, n1], "bf16");
    using mapT = x.upload(rowMap);
    using nUsedT = x.upload(new Int32Array([c.nUsed ?? 0]));
    const common = {
      input: inT, activation: c.activation, layout: c.layout, alpha: c.alpha, limit: c.limit,
      rowMap: c.skipEvery !== undefined ? mapT : undefined, nUsed: c.nUsed !== undefined ? nUsedT : undefined,
    };
    using out = x.empty([c.rows, c.ffn], "bf16").fill(0xff);
    activation(x, { ...common, out });
    const got = out.download();
    const ref = R.activation({
      input, rows: c.rows, ffn: c.ffn, activation: c.activation, layout: c.layout, alpha: c.alpha, limit: c.limit,
      rowMap, nUsed: c.nUsed,
    });
    expectPoisoned(got, c.ffn, skipped, "skipped rows");
    const gotRows = pickRows(got, c.ffn, written);
    const refRows = pickRows(ref, c.ffn, written);
    expectNoNaNBf16(gotRows, "written rows");
    expectNonZero(refRows, "reference");
    expectClose(gotRows, refRows, TOLERANCE.bf16, "bf16 output");

    if (!c.quantize) return;
    using q = x.empty([c.rows, c.ffn], "e4m3").fill(0xff);
    using s = x.empty([c.rows, c.ffn / 32], "e8m0").fill(0xff);
    activation(x, { ...common, quantize: true, out: { data: q, scale: s } });
    // The fused output is exactly the quantization of this backend's bf16 output.
    using bf = x.upload(got, [c.rows, c.ffn], "bf16");
    const want = quantizeMxfp8(x, bf);
    try {
      const qd = q.download();
      const sd = s.download();
      expectPoisoned(qd, c.ffn, skipped, "skipped rows (data)");
      expectPoisoned(sd, c.ffn / 32, skipped, "skipped rows (scale)");
      expectBitExact(pickRows(qd, c.ffn, written), pickRows(want.data.download(), c.ffn, written), "fused MXFP8 data");
      expectBitExact(pickRows(sd, c.ffn / 32, written), pickRows(want.scale.download(), c.ffn / 32, written), "fused MXFP8 scales");
      // And against the reference's quantization of the reference's bf16 rows (nearly equal).
      const refQ = R.quantizeMxfp8(refRows, written.length, c.ffn);
      const deq = R.dequantizeMxfp8(pickRows(qd, c.ffn, written), pickRows(sd, c.ffn / 32, written), written.length, c.ffn);
      expectClose(deq, R.dequantizeMxfp8(refQ.data, refQ.scale, written.length, c.ffn), TOLERANCE.mxfp8, "fused MXFP8 vs reference");
    } finally {
      want.data.dispose();
      want.scale.dispose();
    }
  }

  seededTest("squared_relu ignores the layout", (rng) => {
    const x = ctx();
    using inT = x.upload(randBf16(rng, 8 * 64), [8, 64], "bf16");
    using a = activation(x, { input: inT, activation: "squared_relu", layout: "halves" });
    using b = activation(x, { input: inT, activation: "squared_relu", layout: "interleaved" });
    expectBitExact(b.download(), a.download(), "interleaved vs halves");
  });

  seededTest("halves and interleaved agree on the same (gate, up) pairs", (rng) => {
    const x = ctx();
    const rows = 6, I = 32;
    const halves = randBf16(rng, rows * 2 * I, 2);
    const inter = new Uint16Array(halves.length);
    for (let r = 0; r < rows; ++r) {
      for (let j = 0; j < I; ++j) {
        inter[r * 2 * I + 2 * j] = halves[r * 2 * I + j]!;
        inter[r * 2 * I + 2 * j + 1] = halves[r * 2 * I + I + j]!;
      }
    }
    for (const act of ["silu", "gelu", "swiglu_oai"] as const) {
      using hT = x.upload(halves, [rows, 2 * I], "bf16");
      using iT = x.upload(inter, [rows, 2 * I], "bf16");
      using a = activation(x, { input: hT, activation: act, layout: "halves" });
      using b = activation(x, { input: iT, activation: act, layout: "interleaved" });
      expectBitExact(b.download(), a.download(), `${act}: interleaved vs halves`);
    }
  });

  seededTest("swiglu_oai: alpha and limit change the result", (rng) => {
    const x = ctx();
    using inT = x.upload(randBf16(rng, 4 * 64, 5), [4, 64], "bf16");
    using a = activation(x, { input: inT, activation: "swiglu_oai" });
    using b = activation(x, { input: inT, activation: "swiglu_oai", alpha: 1.0, limit: 1.5 });
    expect(Buffer.from(a.download().buffer).equals(Buffer.from(b.download().buffer))).toBe(false);
  });
});
