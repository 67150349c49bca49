// unpermute (fmoe_unpermute) on the host backend against lib/reference.ts:
// out[t] = bf16(sum over k in order of probs[t,k] * input[inverse_map[t,k]]), f32 sum.
// Tolerance: TOLERANCE.bf16 relative Frobenius against the reference (which sums in f64); with
// topk = 1 and no probs the op is a pure row copy and is compared bit for bit. Every output row
// is written (tokens with no local slot get zeros), so the whole output is compared.
import { describe, expect } from "bun:test";
import { type Rng, reference as R, TOLERANCE, unpermute } from "../lib/index.ts";
import { bf16ToF32, f32ToBf16 } from "../lib/dtype.ts";
import {
  expectBitExact,
  expectClose,
  expectNoNaNBf16,
  expectNonZero,
  makeRouting,
  randBf16,
  type RoutingPattern,
  seededTest,
  suiteContext,
} from "./helpers.ts";

interface Case {
  name: string;
  T: number;
  H: number;
  E: number;
  topk: number;
  start?: number;
  local?: number;
  alignment?: number;
  probs: boolean;
  pattern?: RoutingPattern;
  /** Corrupt this many inverse-map entries with values < -1 or >= rows (read as -1). */
  corrupt?: number;
}

const CASES: Case[] = [
  { name: "T = 0", T: 0, H: 64, E: 4, topk: 2, probs: true },
  { name: "T = 1, topk = 8", T: 1, H: 64, E: 8, topk: 8, probs: true },
  { name: "odd H = 33", T: 9, H: 33, E: 5, topk: 2, probs: true },
  { name: "H = 2880, T = 2", T: 2, H: 2880, E: 4, topk: 2, probs: true },
  { name: "topk = 1 without probs: a bit-exact row copy", T: 21, H: 64, E: 4, topk: 1, probs: false },
  { name: "topk = 8 without probs (weight 1)", T: 13, H: 64, E: 16, topk: 8, probs: false },
  { name: "expert-parallel slice: tokens with no local slot get zeros", T: 30, H: 32, E: 8, topk: 2, start: 6, local: 2, probs: true },
  { name: "all tokens on one expert", T: 16, H: 32, E: 4, topk: 2, pattern: "one-expert", probs: true },
  { name: "inverse map entries < -1 or >= rows are read as -1", T: 20, H: 48, E: 6, topk: 3, probs: true, corrupt: 12 },
  { name: "medium: T = 128, H = 256, topk = 4, alignment 128", T: 128, H: 256, E: 16, topk: 4, alignment: 128, probs: true },
];

describe("unpermute (host backend vs reference)", () => {
  const ctx = suiteContext("host");

  for (const c of CASES) seededTest(c.name, (rng) => runCase(c, rng));

  function runCase(c: Case, rng: Rng): void {
    const x = ctx();
    const { T, H, E, topk } = c;
    const { routingMap, probs } = makeRouting(rng, T, E, topk, c.pattern);
    // A realistic inverse map: the one permute builds for this routing.
    const perm = R.permute({
      hidden: new Uint16Array(T * H), numTokens: T, hiddenSize: H, routingMap, topk, numExperts: E,
      localExpertStart: c.start, numLocalExperts: c.local, alignment: c.alignment ?? 16,
    });
    const rows = perm.maxRows;
    const inverseMap = perm.inverseMap;
    for (let i = 0; i < (c.corrupt ?? 0); ++i) {
      const slot = rng.int(inverseMap.length);
      inverseMap[slot] = i % 3 === 0 ? -2 - rng.int(1000) : i % 3 === 1 ? rows + rng.int(1000) : 2147483647;
    }
    const input = randBf16(rng, rows * H);
    using inT = x.upload(input, [rows, H], "bf16");
    using invT = x.upload(inverseMap, [T, topk]);
    using pT = x.upload(probs, [T, topk]);
    using out = x.empty([T, H], "bf16").fill(0xff);
    unpermute(x, { input: inT, inverseMap: invT, probs: c.probs ? pT : undefined, out });
    const got = out.download();
    const ref = R.unpermute({ input, rows, inverseMap, probs: c.probs ? probs : undefined, numTokens: T, hiddenSize: H, topk });
    expectNoNaNBf16(got, "output");
    expectNonZero(ref, "reference");
    if (topk === 1 && !c.probs) expectBitExact(got, ref, "row copy");
    else expectClose(got, ref, TOLERANCE.bf16, "unpermute");
    // Tokens without a valid local slot: exactly zero.
    for (let t = 0; t < T; ++t) {
      let any = false;
      for (let k = 0; k < topk; ++k) {
        const r = inverseMap[t * topk + k]!;
        if (r >= 0 && r < rows) any = true;
      }
      if (!any) expect(got.subarray(t * H, (t + 1) * H).every((v) => v === 0 || v === 0x8000)).toBe(true);
    }
  }

  seededTest("slots are summed in f32 in slot order (f32 products, then f32 adds): bit for bit", (rng) => {
    // Small enough to emulate exactly here: binary32 arithmetic through Math.fround.
    const x = ctx();
    const T = 3, H = 64, topk = 3, rows = 9;
    const input = randBf16(rng, rows * H, 3);
    const inverseMap = Int32Array.from([0, 4, 8, 1, -1, 5, 7, 2, 3]);
    const probs = Float32Array.from({ length: T * topk }, () => rng.uniform());
    using inT = x.upload(input, [rows, H], "bf16");
    using invT = x.upload(inverseMap, [T, topk]);
    using pT = x.upload(probs, [T, topk]);
    using out = unpermute(x, { input: inT, inverseMap: invT, probs: pT });
    const acc = new Float32Array(T * H);
    for (let t = 0; t < T; ++t) {
      for (let k = 0; k < topk; ++k) {
        const r = inverseMap[t * topk + k]!;
        if (r < 0) continue;
        for (let h = 0; h < H; ++h) acc[t * H + h] = Math.fround(acc[t * H + h]! + Math.fround(probs[t * topk + k]! * bf16ToF32(input[r * H + h]!)));
      }
    }
    expectBitExact(out.download(), f32ToBf16(acc), "f32 emulation");
  });
});
