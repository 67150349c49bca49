// permute (fmoe_permute) on the host backend against lib/reference.ts: the maps, offsets, n_used
// and the invalid-id count are compared bit for bit, and so are the copied rows (a bf16 copy, or
// an f32 product rounded once when probs are applied) and their MXFP8 copy. Only real rows of the
// permuted buffers are compared: padding rows and rows >= n_used are unspecified.
import { describe, expect } from "bun:test";
import { maxRows, maxRowsFor, permute, reference as R, type Rng, Status } from "../lib/index.ts";
import {
  expectBitExact,
  expectNonZero,
  injectInvalidIds,
  makeRouting,
  pickRows,
  randBf16,
  realRows,
  type RoutingPattern,
  expectFmoe,
  seededTest,
  suiteContext,
} from "./helpers.ts";

interface Case {
  name: string;
  T: number;
  H: number;
  E: number;
  topk: number;
  alignment: number;
  start?: number;
  local?: number;
  pattern?: RoutingPattern;
  hot?: number;
  invalid?: number;
  probs?: boolean;
  /** "q" = MXFP8 copy only, "both" = bf16 and MXFP8 copies. */
  quantize?: "q" | "both";
}

const CASES: Case[] = [
  { name: "T = 0", T: 0, H: 64, E: 4, topk: 2, alignment: 16 },
  { name: "T = 1", T: 1, H: 64, E: 8, topk: 2, alignment: 16 },
  { name: "odd H = 33, T = 7, alignment 1", T: 7, H: 33, E: 5, topk: 2, alignment: 1 },
  { name: "odd H = 33 with probs on the input", T: 11, H: 33, E: 3, topk: 2, alignment: 4, probs: true },
  { name: "H = 2880, T = 3, MXFP8 copy", T: 3, H: 2880, E: 4, topk: 2, alignment: 16, quantize: "both" },
  { name: "topk = 1", T: 17, H: 64, E: 4, topk: 1, alignment: 16 },
  { name: "topk = 8 over 16 experts, MXFP8 copy only", T: 9, H: 96, E: 16, topk: 8, alignment: 16, quantize: "q" },
  { name: "experts with no tokens (3 tokens over 32 experts)", T: 3, H: 64, E: 32, topk: 2, alignment: 16 },
  { name: "all tokens on one expert", T: 20, H: 64, E: 6, topk: 1, alignment: 16, pattern: "one-expert", hot: 3 },
  { name: "all slots on one expert, topk = 4 (repeated id per token)", T: 6, H: 32, E: 6, topk: 4, alignment: 8, pattern: "one-expert", hot: 5 },
  { name: "skewed routing with repeated ids, alignment 128", T: 40, H: 32, E: 8, topk: 3, alignment: 128, pattern: "skewed" },
  {
    name: "expert-parallel slice: experts [2, 5) of 8, slots routed to other ranks dropped",
    T: 25, H: 64, E: 8, topk: 3, alignment: 16, start: 2, local: 3,
  },
  {
    name: "expert-parallel slice: last expert only, out-of-range ids",
    T: 30, H: 32, E: 4, topk: 2, alignment: 1, start: 3, local: 1, invalid: 6,
  },
  { name: "out-of-range ids (negative and >= numExperts) dropped and counted", T: 12, H: 64, E: 6, topk: 3, alignment: 16, invalid: 7, quantize: "both" },
  { name: "every id out of range: n_used = 0", T: 4, H: 32, E: 4, topk: 2, alignment: 16, invalid: 8 },
  { name: "alignment 1", T: 33, H: 64, E: 8, topk: 2, alignment: 1 },
  { name: "alignment 16 with probs", T: 33, H: 64, E: 8, topk: 2, alignment: 16, probs: true, quantize: "both" },
  { name: "alignment 128", T: 50, H: 64, E: 3, topk: 2, alignment: 128 },
  { name: "medium: T = 200, topk = 4, 16 experts", T: 200, H: 256, E: 16, topk: 4, alignment: 16, quantize: "both" },
];

describe("permute (host backend vs reference)", () => {
  const ctx = suiteContext("host");

  seededTest("maxRows is round_up(T*topk + E_local*(alignment-1), alignment)", () => {
    expect(maxRows(0, 2, 4, 16)).toBe(64);
    expect(maxRows(1, 1, 1, 1)).toBe(1);
    expect(maxRows(7, 2, 5, 1)).toBe(14);
    expect(maxRows(3, 8, 2, 128)).toBe(384);
    expect(maxRows(5, 3, 4, 16)).toBe(80); // 15 + 60 = 75 -> 80
    for (const [T, k, e, a] of [[0, 1, 1, 1], [13, 3, 7, 16], [512, 8, 128, 128], [8192, 8, 256, 16]] as const) {
      expect(maxRows(T, k, e, a)).toBe(maxRowsFor(T, k, e, a));
    }
  });

  for (const c of CASES) {
    seededTest(c.name, (rng) => runCase(c, rng));
  }

  function runCase(c: Case, rng: Rng): void {
    const { T, H, E, topk, alignment } = c;
    const start = c.start ?? 0;
    const local = c.local ?? E - start;
    const hidden = randBf16(rng, T * H);
    const { routingMap, probs } = makeRouting(rng, T, E, topk, c.pattern, c.hot);
    const injected = c.invalid !== undefined ? injectInvalidIds(rng, routingMap, E, c.invalid).length : 0;
    const ref = R.permute({
      hidden, numTokens: T, hiddenSize: H, routingMap, topk, probs: c.probs ? probs : undefined,
      numExperts: E, localExpertStart: start, numLocalExperts: local, alignment, quantize: c.quantize !== undefined,
    });
    expect(ref.invalidCount).toBe(injected);
    const rows = ref.maxRows;
    const x = ctx();
    using hT = x.upload(hidden, [T, H], "bf16");
    using rT = x.upload(routingMap, [T, topk]);
    using pT = x.upload(probs, [T, topk]);
    // Outputs poisoned with 0xFF: every byte the op must write is checked below.
    using permuted = x.empty([rows, H], "bf16").fill(0xff);
    using permutedQ = x.empty([rows, H], "e4m3").fill(0xff);
    using qScale = x.empty([rows, H % 32 === 0 ? H / 32 : 1], "e8m0").fill(0xff);
    using expertOffsets = x.empty([local + 1], "i32").fill(0xff);
    using permutationMap = x.empty([rows], "i32").fill(0xff);
    using inverseMap = x.empty([T, topk], "i32").fill(0xff);
    using counter = x.upload(new Int32Array([5]));
    const res = permute(x, {
      hidden: hT, routingMap: rT, probs: c.probs ? pT : undefined, numExperts: E, localExpertStart: start,
      numLocalExperts: local, alignment, quantize: c.quantize !== undefined, invalidCount: counter,
      out: {
        permuted: c.quantize === "q" ? undefined : permuted,
        permutedQ: c.quantize ? permutedQ : undefined,
        permutedScale: c.quantize ? qScale : undefined,
        expertOffsets, permutationMap, inverseMap,
      },
    });
    expect(res.maxRows).toBe(rows);
    expect(rows).toBe(maxRowsFor(T, topk, local, alignment));
    expectBitExact(expertOffsets.download(), ref.expertOffsets, "expertOffsets");
    expectBitExact(permutationMap.download(), ref.permutationMap, "permutationMap");
    expectBitExact(inverseMap.download(), ref.inverseMap, "inverseMap");
    expect(res.nUsed.download()[0]).toBe(ref.nUsed);
    // invalid_count is in/out: incremented, not overwritten.
    expect(counter.download()[0]).toBe(5 + injected);

    // Group sizes are multiples of the alignment and hold every local slot once.
    for (let e = 0; e < local; ++e) expect((ref.expertOffsets[e + 1]! - ref.expertOffsets[e]!) % alignment).toBe(0);
    const real = realRows(ref.permutationMap, ref.nUsed);
    let localSlots = 0;
    for (const id of routingMap) if (id >= start && id < start + local) ++localSlots;
    expect(real.length).toBe(localSlots);

    if (c.quantize !== "q") {
      const got = pickRows(permuted.download(), H, real);
      const want = pickRows(ref.permuted, H, real);
      expectNonZero(want, "permuted");
      expectBitExact(got, want, "permuted (real rows)");
    } else {
      // Not asked for: left untouched.
      expect(permuted.download().every((v) => v === 0xffff)).toBe(true);
    }
    if (c.quantize !== undefined) {
      expectBitExact(pickRows(permutedQ.download(), H, real), pickRows(ref.permutedQ!, H, real), "permutedQ (real rows)");
      expectBitExact(pickRows(qScale.download(), H / 32, real), pickRows(ref.permutedScale!, H / 32, real), "permutedScale (real rows)");
    }
  }

  seededTest("allocated outputs: shapes, dtypes and nUsed view", (rng) => {
    const x = ctx();
    const T = 5, H = 64, E = 4, topk = 2;
    const { routingMap } = makeRouting(rng, T, E, topk);
    using hT = x.upload(randBf16(rng, T * H), [T, H], "bf16");
    using rT = x.upload(routingMap, [T, topk]);
    const res = permute(x, { hidden: hT, routingMap: rT, numExperts: E, alignment: 8, quantize: true });
    try {
      expect(res.permuted).toBeUndefined(); // quantize without out.permuted: MXFP8 copy only
      expect(res.permutedQ!.shape).toEqual([res.maxRows, H]);
      expect(res.permutedQ!.dtype).toBe("e4m3");
      expect(res.permutedScale!.shape).toEqual([res.maxRows, H / 32]);
      expect(res.permutedScale!.dtype).toBe("e8m0");
      expect(res.expertOffsets.shape).toEqual([E + 1]);
      expect(res.permutationMap.shape).toEqual([res.maxRows]);
      expect(res.inverseMap.shape).toEqual([T, topk]);
      expect(res.nUsed.shape).toEqual([1]);
      expect(res.nUsed.download()[0]).toBe(res.expertOffsets.download()[E]!);
    } finally {
      for (const t of [res.permutedQ, res.permutedScale, res.expertOffsets, res.permutationMap, res.inverseMap]) t?.dispose();
    }
  });

  seededTest("an earlier result passed back as out: its buffers rewritten for new routing", (rng) => {
    const x = ctx();
    const T = 9, H = 64, E = 5, topk = 2;
    const first = makeRouting(rng, T, E, topk);
    const hidden = randBf16(rng, T * H);
    using hT = x.upload(hidden, [T, H], "bf16");
    using r1 = x.upload(first.routingMap, [T, topk]);
    const res = permute(x, { hidden: hT, routingMap: r1, numExperts: E, alignment: 4 });
    try {
      const second = makeRouting(rng, T, E, topk, "skewed");
      using r2 = x.upload(second.routingMap, [T, topk]);
      const again = permute(x, { hidden: hT, routingMap: r2, numExperts: E, alignment: 4, out: res });
      for (const k of ["permuted", "expertOffsets", "permutationMap", "inverseMap", "nUsed"] as const) {
        expect(again[k]!.ptr).toBe(res[k]!.ptr);
      }
      const ref = R.permute({ hidden, numTokens: T, hiddenSize: H, routingMap: second.routingMap, topk, numExperts: E, alignment: 4 });
      expectBitExact(res.expertOffsets.download(), ref.expertOffsets, "expertOffsets");
      expectBitExact(res.permutationMap.download(), ref.permutationMap, "permutationMap");
      expectBitExact(res.inverseMap.download(), ref.inverseMap, "inverseMap");
      expect(again.nUsed.download()[0]).toBe(ref.nUsed);
      const real = realRows(ref.permutationMap, ref.nUsed);
      expectBitExact(pickRows(res.permuted!.download(), H, real), pickRows(ref.permuted, H, real), "permuted (real rows)");

      // Its derived fields must fit this call: another capacity, or an nUsed of other offsets.
      expectFmoe(() => permute(x, { hidden: hT, routingMap: r2, numExperts: E, alignment: 8, out: res }), Status.INVALID_ARGUMENT, "out.maxRows");
      using other = x.empty([E + 1], "i32");
      expectFmoe(() => permute(x, { hidden: hT, routingMap: r2, numExperts: E, alignment: 4, out: { ...res, expertOffsets: other } }), Status.INVALID_ARGUMENT, "out.nUsed");
      expectFmoe(() => permute(x, { hidden: hT, routingMap: r2, numExperts: E, alignment: 4, out: { nUsed: res.nUsed } }), Status.INVALID_ARGUMENT, "out.nUsed");
      expectFmoe(() => permute(x, { hidden: hT, routingMap: r2, numExperts: E, alignment: 4, out: { ...res, count: 1 } as never }), Status.INVALID_ARGUMENT, "count");
    } finally {
      for (const t of [res.permuted, res.expertOffsets, res.permutationMap, res.inverseMap]) t?.dispose();
    }
  });
});
