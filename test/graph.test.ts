// Graph capture and replay on the host backend (which records the op sequence and replays it).
// For every op, and for sequences of ops: capture once, then write new inputs (new routing) into
// the same tensors, replay, and compare with an eager run on the same inputs: bitwise equal,
// output buffers compared whole (both runs start from the same 0xFF poison, so unwritten rows
// match too). Capture itself must not run anything.
import { describe, expect } from "bun:test";
import {
  activation,
  type Context,
  dequantizeMxfp8,
  FmoeError,

  FusedMoE,
  groupedMmBf16,
  groupedMmMxfp8,
  maxRows,
  permute,
  quantizeMxfp8,
  type Rng,
  Status,
  type Stream,
  swizzleScales,
  type Tensor,
  unpermute,
  unswizzleScales,
} from "../lib/index.ts";
import {
  checkCaptureRefusals,
  checkReplay,
  expectBitExact,
  expectFmoe,
  type Fill,
  injectInvalidIds,
  makeRouting,
  randBf16,
  randWeights,
  seededTest,
  suiteContext,
} from "./helpers.ts";

describe("graph capture and replay (host backend)", () => {
  const ctx = suiteContext("host");

  seededTest("permute (+ MXFP8 copy, probs, invalid counter) replayed with new routing", (rng) => {
    const x = ctx();
    using stream = x.createStream();
    const T = 14, H = 64, E = 6, topk = 2, start = 1, local = 4, alignment = 8;
    const rows = maxRows(T, topk, local, alignment);
    using hT = x.upload(randBf16(rng, T * H), [T, H], "bf16");
    using rT = x.empty([T, topk], "i32");
    using pT = x.empty([T, topk], "f32");
    using counter = x.zeros([1], "i32");
    const out = {
      permuted: x.empty([rows, H], "bf16"), permutedQ: x.empty([rows, H], "e4m3"), permutedScale: x.empty([rows, H / 32], "e8m0"),
      expertOffsets: x.empty([local + 1], "i32"), permutationMap: x.empty([rows], "i32"), inverseMap: x.empty([T, topk], "i32"),
    };
    let invalid = 0;
    const routing = (): Int32Array => {
      const r = makeRouting(rng, T, E, topk).routingMap;
      invalid = injectInvalidIds(rng, r, E, 3).length;
      return r;
    };
    try {
      checkReplay(x, stream, [[hT, () => randBf16(rng, T * H)], [rT, routing], [pT, () => makeRouting(rng, T, E, topk).probs]], Object.values(out), (s) => {
        permute(x, { hidden: hT, routingMap: rT, probs: pT, numExperts: E, localExpertStart: start, numLocalExperts: local, alignment, quantize: true, invalidCount: counter, out, stream: s });
      });
      // Two rounds of (replay + eager), each adding the same count: the counter is live in replays.
      expect(counter.download()[0]).toBeGreaterThan(0);
      expect(invalid).toBe(3);
    } finally {
      for (const t of Object.values(out)) t.dispose();
    }
  });

  for (const quantize of [false, true]) {
    seededTest(`activation (${quantize ? "fused MXFP8" : "bf16"} output, row map, n_used) replayed with new rows`, (rng) => {
      const x = ctx();
      using stream = x.createStream();
      const rows = 24, I = 64;
      using inT = x.empty([rows, 2 * I], "bf16");
      using mapT = x.empty([rows], "i32");
      using nT = x.empty([1], "i32");
      const map = (): Int32Array => Int32Array.from({ length: rows }, (_, r) => (rng.uniform() < 0.3 ? -1 : r));
      const fills: [Tensor, Fill][] = [[inT, () => randBf16(rng, rows * 2 * I, 2)], [mapT, map], [nT, () => Int32Array.of(5 + rng.int(rows - 5))]];
      if (quantize) {
        using q = x.empty([rows, I], "e4m3");
        using s = x.empty([rows, I / 32], "e8m0");
        checkReplay(x, stream, fills, [q, s], (st) => {
          activation(x, { input: inT, activation: "swiglu_oai", layout: "interleaved", alpha: 1.5, limit: 3, rowMap: mapT, nUsed: nT, quantize: true, out: { data: q, scale: s }, stream: st });
        });
      } else {
        using o = x.empty([rows, I], "bf16");
        checkReplay(x, stream, fills, [o], (st) => {
          activation(x, { input: inT, activation: "gelu", rowMap: mapT, nUsed: nT, out: o, stream: st });
        });
      }
    });
  }

  seededTest("quantize, dequantize, swizzle and unswizzle replayed with new values", (rng) => {
    const x = ctx();
    using stream = x.createStream();
    const rows = 20, K = 128;
    using inT = x.empty([rows, K], "bf16");
    using q = x.empty([rows, K], "e4m3");
    using s = x.empty([rows, K / 32], "e8m0");
    using deq = x.empty([rows, K], "f32");
    using sw = x.empty([128, 4], "e8m0");
    using back = x.empty([rows, K / 32], "e8m0");
    checkReplay(x, stream, [[inT, () => randBf16(rng, rows * K, 10)]], [q, s, deq, sw, back], (st) => {
      quantizeMxfp8(x, inT, { out: { data: q, scale: s }, stream: st });
      dequantizeMxfp8(x, q, s, { out: deq, stream: st });
      swizzleScales(x, s, { out: sw, stream: st });
      unswizzleScales(x, sw, { rows, scaleCols: K / 32, out: back, stream: st });
    });
    expectBitExact(back.download(), s.download(), "unswizzle(swizzle(s))");
  });

  for (const format of ["bf16", "mxfp8"] as const) {
    seededTest(`grouped GEMM ${format} replayed with new group offsets and row map`, (rng) => {
      const x = ctx();
      using stream = x.createStream();
      const rows = 48, n = 32, k = 64, groups = 4;
      const offsets = (): Int32Array => {
        const cuts = [0, rng.int(rows + 1), rng.int(rows + 1), rng.int(rows + 1)].sort((a, b) => a - b);
        return Int32Array.from([...cuts, cuts[3]! + rng.int(rows - cuts[3]! + 1)]);
      };
      using aT = x.empty([rows, k], "bf16");
      using bT = x.upload(randWeights(rng, groups, n, k), [groups, n, k], "bf16");
      using biasT = x.upload(Float32Array.from({ length: groups * n }, () => rng.normal()), [groups, n]);
      using offT = x.empty([groups + 1], "i32");
      using mapT = x.empty([rows], "i32");
      using c = x.empty([rows, n], "bf16");
      const fills: [Tensor, Fill][] = [[aT, () => randBf16(rng, rows * k)], [offT, offsets], [mapT, () => Int32Array.from({ length: rows }, (_, r) => (rng.uniform() < 0.2 ? -1 : r))]];
      if (format === "bf16") {
        checkReplay(x, stream, fills, [c], (st) => groupedMmBf16(x, { a: aT, b: bT, bias: biasT, groupOffsets: offT, rowMap: mapT, out: c, stream: st }));
      } else {
        using aq = x.empty([rows, k], "e4m3");
        using as = x.empty([rows, k / 32], "e8m0");
        const bq = quantizeMxfp8(x, bT);
        try {
          checkReplay(x, stream, fills, [aq, as, c], (st) => {
            quantizeMxfp8(x, aT, { out: { data: aq, scale: as }, stream: st });
            groupedMmMxfp8(x, { a: aq, aScale: as, b: bq.data, bScale: bq.scale, bias: biasT, groupOffsets: offT, rowMap: mapT, out: c, stream: st });
          });
        } finally {
          bq.data.dispose();
          bq.scale.dispose();
        }
      }
    });
  }

  seededTest("unpermute replayed with a new inverse map and probs", (rng) => {
    const x = ctx();
    using stream = x.createStream();
    const T = 10, topk = 3, rows = 40, H = 64;
    using inT = x.empty([rows, H], "bf16");
    using invT = x.empty([T, topk], "i32");
    using pT = x.empty([T, topk], "f32");
    using o = x.empty([T, H], "bf16");
    checkReplay(
      x, stream,
      [[inT, () => randBf16(rng, rows * H)], [invT, () => Int32Array.from({ length: T * topk }, () => rng.int(rows + 10) - 5)], [pT, () => makeRouting(rng, T, 5, topk).probs]],
      [o],
      (st) => unpermute(x, { input: inT, inverseMap: invT, probs: pT, out: o, stream: st }),
    );
  });

  seededTest("a whole pipeline of ops (permute, FC1, fused activation + MXFP8, FC2 MXFP8, unpermute) as one graph", (rng) => {
    const x = ctx();
    using stream = x.createStream();
    const T = 12, H = 64, I = 32, E = 4, topk = 2, alignment = 16;
    const rows = maxRows(T, topk, E, alignment);
    using hT = x.empty([T, H], "bf16");
    using rT = x.empty([T, topk], "i32");
    using pT = x.empty([T, topk], "f32");
    using fc1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
    using fc2bf = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
    const fc2 = quantizeMxfp8(x, fc2bf);
    const out = {
      permuted: x.empty([rows, H], "bf16"), expertOffsets: x.empty([E + 1], "i32"),
      permutationMap: x.empty([rows], "i32"), inverseMap: x.empty([T, topk], "i32"),
    };
    using h1 = x.empty([rows, 2 * I], "bf16");
    using aq = x.empty([rows, I], "e4m3");
    using as = x.empty([rows, I / 32], "e8m0");
    using y = x.empty([rows, H], "bf16");
    using o = x.empty([T, H], "bf16");
    try {
      // Padding rows of the intermediates are unspecified: only the final output is compared,
      // together with the maps.
      checkReplay(
        x, stream,
        [[hT, () => randBf16(rng, T * H)], [rT, () => makeRouting(rng, T, E, topk).routingMap], [pT, () => makeRouting(rng, T, E, topk).probs]],
        [o, out.expertOffsets, out.inverseMap, out.permutationMap],
        (st) => {
          const p = permute(x, { hidden: hT, routingMap: rT, numExperts: E, alignment, out, stream: st });
          groupedMmBf16(x, { a: out.permuted, b: fc1, groupOffsets: out.expertOffsets, rowMap: out.permutationMap, out: h1, stream: st });
          activation(x, { input: h1, activation: "silu", rowMap: out.permutationMap, nUsed: p.nUsed, quantize: true, out: { data: aq, scale: as }, stream: st });
          groupedMmMxfp8(x, { a: aq, aScale: as, b: fc2.data, bScale: fc2.scale, groupOffsets: out.expertOffsets, rowMap: out.permutationMap, out: y, stream: st });
          unpermute(x, { input: y, inverseMap: out.inverseMap, probs: pT, out: o, stream: st });
        },
      );
    } finally {
      for (const t of [...Object.values(out), fc2.data, fc2.scale]) t.dispose();
    }
  });

  for (const format of ["bf16", "mxfp8"] as const) {
    seededTest(`FusedMoE ${format}: captured forward replayed with new routing == eager, bit for bit`, (rng) => {
      const x = ctx();
      using stream = x.createStream();
      const T = 16, H = 64, I = 32, E = 8, topk = 3;
      using fc1 = x.upload(randWeights(rng, 6, 2 * I, H), [6, 2 * I, H], "bf16");
      using fc2 = x.upload(randWeights(rng, 6, H, I), [6, H, I], "bf16");
      using b2 = x.upload(Float32Array.from({ length: 6 * H }, () => rng.normal() * 0.1), [6, H]);
      using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, numLocalExperts: 6, localExpertStart: 1, topk, activation: "silu", weightFormat: format, maxTokens: T }, { fc1, fc2, fc2Bias: b2 });
      using hT = x.empty([T, H], "bf16");
      using rT = x.empty([T, topk], "i32");
      using pT = x.empty([T, topk], "f32");
      using o = x.empty([T, H], "bf16");
      const routing = (): Int32Array => {
        const r = makeRouting(rng, T, E, topk).routingMap;
        injectInvalidIds(rng, r, E, 2);
        return r;
      };
      checkReplay(x, stream, [[hT, () => randBf16(rng, T * H)], [rT, routing], [pT, () => makeRouting(rng, T, E, topk).probs]], [o], (st) => {
        if (st === undefined) moe.forward({ hidden: hT, routingMap: rT, probs: pT, out: o });
        else {
          // FusedMoE.capture wraps ctx.capture: nest nothing, record the forward directly.
          moe.forward({ hidden: hT, routingMap: rT, probs: pT, out: o, stream: st });
        }
      });
      // 2 rounds x (replay + eager) x 2 invalid ids.
      expect(moe.invalidCount()).toBe(8);
    });

    seededTest(`FusedMoE ${format}: capture() of forwardGrouped replayed with new tokens_per_expert`, (rng) => {
      const x = ctx();
      using stream = x.createStream();
      const rows = 20, H = 64, I = 32, E = 4;
      using fc1 = x.upload(randWeights(rng, E, I, H), [E, I, H], "bf16");
      using fc2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
      using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk: 2, activation: "squared_relu", weightFormat: format, maxTokens: 10 }, { fc1, fc2 });
      using hT = x.upload(randBf16(rng, rows * H), [rows, H], "bf16");
      using tT = x.upload(Int32Array.of(5, 5, 5, 5));
      using pT = x.upload(Float32Array.from({ length: rows }, () => rng.uniform()));
      using o = x.empty([rows, H], "bf16").fill(0xff);
      using graph = moe.capture({ hidden: hT, tokensPerExpert: tT, probs: pT, out: o, stream });
      expect(new Uint8Array(o.download().buffer).every((b) => b === 0xff)).toBe(true);
      for (let round = 0; round < 3; ++round) {
        const tpe = Int32Array.from({ length: E }, () => rng.int(7));
        tT.copyFrom(tpe, stream);
        hT.copyFrom(randBf16(rng, rows * H), stream);
        o.fill(0xff, stream);
        graph.launch(stream);
        stream.synchronize();
        const replayed = o.download();
        o.fill(0xff);
        moe.forwardGrouped({ hidden: hT, tokensPerExpert: tT, probs: pT, out: o });
        expectBitExact(replayed, o.download(), `round ${round} (tokens_per_expert ${Array.from(tpe)})`);
      }
    });

    seededTest(`FusedMoE ${format}: capture() of forward, replayed many times with new routing`, (rng) => {
      const x = ctx();
      using stream = x.createStream();
      const T = 9, H = 32, I = 32, E = 4, topk = 2;
      using fc1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
      using fc2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
      using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk, activation: "gelu", weightFormat: format, maxTokens: T }, { fc1, fc2 });
      using hT = x.upload(randBf16(rng, T * H), [T, H], "bf16");
      using rT = x.upload(makeRouting(rng, T, E, topk).routingMap, [T, topk]);
      using pT = x.upload(makeRouting(rng, T, E, topk).probs, [T, topk]);
      using o = x.empty([T, H], "bf16");
      using graph = moe.capture({ hidden: hT, routingMap: rT, probs: pT, out: o, stream });
      let previous: Uint16Array | undefined;
      for (let round = 0; round < 4; ++round) {
        const r = makeRouting(rng, T, E, topk, round === 2 ? "one-expert" : "random", 1);
        rT.copyFrom(r.routingMap, stream);
        pT.copyFrom(r.probs, stream);
        graph.launch(stream);
        stream.synchronize();
        const replayed = o.download();
        using eager = moe.forward({ hidden: hT, routingMap: rT, probs: pT });
        expectBitExact(replayed, eager.download(), `round ${round}`);
        if (previous !== undefined) expect(Buffer.from(replayed.buffer).equals(Buffer.from(previous.buffer))).toBe(false);
        previous = replayed;
      }
    });
  }

  seededTest("fill and device-to-device copies are captured; host copies are refused (INVALID_STATE)", (rng) => {
    const x = ctx();
    using stream = x.createStream();
    using a = x.upload(randBf16(rng, 64), [64], "bf16");
    using b = x.zeros([64], "bf16");
    using c = x.zeros([16], "i32");
    using g = x.capture(stream, () => {
      b.copyFrom(a, stream);
      c.fill(7, stream);
    });
    expect(b.download().every((v) => v === 0)).toBe(true);
    g.launch(stream);
    stream.synchronize();
    expectBitExact(b.download(), a.download(), "captured device copy");
    expect(c.download().every((v) => v === 0x07070707)).toBe(true);
    const err = expectFmoe(() => x.capture(stream, () => a.copyFrom(randBf16(rng, 64), stream)), Status.INVALID_STATE, "captur");
    expect(err).toBeInstanceOf(FmoeError);
    expectFmoe(() => x.capture(stream, () => a.download(stream)), Status.INVALID_STATE, "captur");
    // The stream is usable again after a failed capture.
    using g2 = x.capture(stream, () => c.fill(1, stream));
    g2.launch(stream);
    expect(c.download()[0]).toBe(0x01010101);
  });

  seededTest("a capture refuses allocations and waits (INVALID_STATE), holds frees until it ends, and records the rest", (rng) => {
    checkCaptureRefusals(ctx(), rng);
  });

  seededTest("capturing a stream that is already capturing is INVALID_STATE; a capture that throws ends it", () => {
    const x = ctx();
    using stream = x.createStream();
    using t = x.zeros([4], "f32", stream);
    expectFmoe(() => x.capture(stream, () => { x.capture(stream, () => t.fill(1, stream)); }), Status.INVALID_STATE, "already capturing");
    expect(() => x.capture(stream, () => { throw new Error("body failed"); })).toThrow("body failed");
    using g = x.capture(stream, () => t.fill(2, stream));
    g.launch(stream);
    expect(new Uint8Array(t.download().buffer).every((b) => b === 2)).toBe(true);
  });
});

