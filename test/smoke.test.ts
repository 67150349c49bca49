// Quick checks of the TypeScript binding against the host backend and lib/reference.ts. The
// full suites live in the per-op test files.
import { describe, expect, test } from "bun:test";
import {
  activation,
  Context,
  FmoeError,
  FusedMoE,
  groupedMmBf16,
  permute,
  quantizeMxfp8,
  randomRouting,
  reference as R,
  relFrobenius,
  Rng,
  Status,
  swizzleScales,
  TOLERANCE,
  unpermute,
  unswizzleScales,
} from "../lib/index.ts";

const hasLibrary = Context.libraryAvailable();

describe.skipIf(!hasLibrary)("smoke (host backend)", () => {
  test("upload/download round trip, views, fill", () => {
    using ctx = Context.create({ backend: "host" });
    using t = ctx.upload(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3], "bf16");
    expect(Array.from(t.toFloat32())).toEqual([1, 2, 3, 4, 5, 6]);
    const v = t.view(3, [3]);
    expect(Array.from(v.toFloat32())).toEqual([4, 5, 6]);
    v.zero();
    expect(Array.from(t.toFloat32())).toEqual([1, 2, 3, 0, 0, 0]);
  });

  test("disposal: idempotent, use after dispose throws, context frees children", () => {
    const ctx = Context.create({ backend: "host" });
    const t = ctx.empty([4], "f32");
    t.dispose();
    t.dispose();
    expect(() => t.download()).toThrow(FmoeError);
    const u = ctx.empty([8], "i32");
    expect(ctx.liveAllocations().count).toBe(1);
    ctx.dispose();
    expect(u.disposed).toBe(true);
    expect(() => u.ptr).toThrow(/disposed/);
    u.dispose(); // no double free
  });

  test("subarray uploads respect byteOffset", () => {
    using ctx = Context.create({ backend: "host" });
    const data = new Int32Array([1, 2, 3, 4, 5, 6]);
    using t = ctx.upload(data.subarray(2, 5));
    expect(Array.from(t.download())).toEqual([3, 4, 5]);
  });

  test("finalizers free forgotten tensors, never after their context", async () => {
    const ctx = Context.create({ backend: "host" });
    (() => {
      for (let i = 0; i < 50; ++i) ctx.empty([1024], "f32");
    })();
    // Finalizers run in a later task than the collection: collect, yield, repeat.
    for (let i = 0; i < 10 && ctx.liveAllocations().count >= 50; ++i) {
      Bun.gc(true);
      await Bun.sleep(5);
    }
    expect(ctx.liveAllocations().count).toBeLessThan(50);
    const kept = ctx.empty([4], "f32");
    ctx.dispose();
    Bun.gc(true);
    await Bun.sleep(5);
    expect(kept.disposed).toBe(true);
    kept.dispose(); // no double free after the context freed it
  });

  test("capture ends on throw; a graph refuses disposed tensors", () => {
    using ctx = Context.create({ backend: "host" });
    using stream = ctx.createStream();
    expect(() => ctx.capture(stream, () => { throw new Error("boom"); })).toThrow("boom");
    const t = ctx.zeros([8], "f32", stream);
    using g = ctx.capture(stream, () => { t.fill(1, stream); });
    expect(Array.from(t.download())).toEqual(new Array(8).fill(0)); // recorded, not run
    g.launch(stream);
    expect(t.download()[0]).not.toBe(0);
    t.dispose();
    expect(() => g.launch(stream)).toThrow(FmoeError);
  });

  test("shape errors are INVALID_ARGUMENT naming the argument", () => {
    using ctx = Context.create({ backend: "host" });
    using h = ctx.empty([4, 64], "bf16");
    using r = ctx.empty([3, 2], "i32");
    try {
      permute(ctx, { hidden: h, routingMap: r, numExperts: 4 });
      throw new Error("no throw");
    } catch (err) {
      expect(err).toBeInstanceOf(FmoeError);
      expect((err as FmoeError).code).toBe(Status.INVALID_ARGUMENT);
      expect((err as FmoeError).message).toContain("routingMap");
    }
  });

  test("ops match the reference", () => {
    using ctx = Context.create({ backend: "host" });
    const rng = new Rng(7);
    const T = 9, H = 64, E = 6, topk = 2, I = 32, alignment = 4;
    const hidden = rng.bf16Normal(T * H);
    const { routingMap, probs } = randomRouting(rng, T, E, topk);
    routingMap[3] = 99; // invalid id
    using hT = ctx.upload(hidden, [T, H]);
    using rT = ctx.upload(routingMap, [T, topk]);
    using pT = ctx.upload(probs, [T, topk]);
    using inv = ctx.zeros([1], "i32");
    const p = permute(ctx, { hidden: hT, routingMap: rT, numExperts: E, localExpertStart: 1, numLocalExperts: 4, alignment, invalidCount: inv });
    const ref = R.permute({ hidden, numTokens: T, hiddenSize: H, routingMap, topk, numExperts: E, localExpertStart: 1, numLocalExperts: 4, alignment });
    expect(p.maxRows).toBe(ref.maxRows);
    expect(Array.from(p.expertOffsets.download())).toEqual(Array.from(ref.expertOffsets));
    expect(Array.from(p.permutationMap.download())).toEqual(Array.from(ref.permutationMap));
    expect(Array.from(p.inverseMap.download())).toEqual(Array.from(ref.inverseMap));
    expect(inv.download()[0]).toBe(ref.invalidCount);
    expect(p.nUsed.download()[0]).toBe(ref.nUsed);
    const perm = p.permuted!.download();
    for (let r = 0; r < ref.nUsed; ++r) {
      if (ref.permutationMap[r] === -1) continue;
      expect(Array.from(perm.subarray(r * H, (r + 1) * H))).toEqual(Array.from(ref.permuted.subarray(r * H, (r + 1) * H)));
    }

    // FC1 (silu: N1 = 2I) on the permuted rows, then activation, FC2, unpermute.
    const fc1 = rng.bf16Normal(4 * 2 * I * H, 1 / 8);
    const fc2 = rng.bf16Normal(4 * H * I, 1 / 6);
    using fc1T = ctx.upload(fc1, [4, 2 * I, H]);
    using fc2T = ctx.upload(fc2, [4, H, I]);
    const h1 = groupedMmBf16(ctx, { a: p.permuted!, b: fc1T, groupOffsets: p.expertOffsets, rowMap: p.permutationMap });
    const h1Ref = R.groupedMm({ a: { bf16: ref.permuted }, b: { bf16: fc1 }, groupOffsets: ref.expertOffsets, rowMap: ref.permutationMap, rows: ref.maxRows, n: 2 * I, k: H, groups: 4 });
    const mask = (arr: Uint16Array, width: number): Uint16Array => {
      const out = arr.slice();
      for (let r = 0; r < ref.maxRows; ++r) if (ref.permutationMap[r] === -1) out.fill(0, r * width, (r + 1) * width);
      return out;
    };
    expect(relFrobenius(mask(h1.download(), 2 * I), h1Ref)).toBeLessThan(TOLERANCE.bf16);
    const a = activation(ctx, { input: h1, activation: "silu", rowMap: p.permutationMap, nUsed: p.nUsed });
    const aRef = R.activation({ input: h1Ref, rows: ref.maxRows, ffn: I, activation: "silu", rowMap: ref.permutationMap });
    expect(relFrobenius(mask(a.download(), I), aRef)).toBeLessThan(TOLERANCE.bf16);
    const y = groupedMmBf16(ctx, { a, b: fc2T, groupOffsets: p.expertOffsets, rowMap: p.permutationMap });
    const yRef = R.groupedMm({ a: { bf16: aRef }, b: { bf16: fc2 }, groupOffsets: ref.expertOffsets, rowMap: ref.permutationMap, rows: ref.maxRows, n: H, k: I, groups: 4 });
    const out = unpermute(ctx, { input: y, inverseMap: p.inverseMap, probs: pT });
    const outRef = R.unpermute({ input: yRef, rows: ref.maxRows, inverseMap: ref.inverseMap, probs, numTokens: T, hiddenSize: H, topk });
    expect(relFrobenius(out.download(), outRef)).toBeLessThan(TOLERANCE.bf16);

    // MXFP8: bit-exact quantization and swizzle round trip.
    const q = quantizeMxfp8(ctx, hT);
    const qRef = R.quantizeMxfp8(hidden, T, H);
    expect(Buffer.from(q.data.download()).equals(Buffer.from(qRef.data))).toBe(true);
    expect(Buffer.from(q.scale.download()).equals(Buffer.from(qRef.scale))).toBe(true);
    const sw = swizzleScales(ctx, q.scale);
    expect(Buffer.from(sw.download()).equals(Buffer.from(R.swizzleScales(qRef.scale, 1, T, H / 32)))).toBe(true);
    const back = unswizzleScales(ctx, sw, { rows: T, scaleCols: H / 32 });
    expect(Buffer.from(back.download()).equals(Buffer.from(qRef.scale))).toBe(true);
  });

  for (const weightFormat of ["bf16", "mxfp8"] as const) {
    test(`FusedMoE ${weightFormat} forward and graph replay match the reference`, () => {
      using ctx = Context.create({ backend: "host" });
      const rng = new Rng(11);
      const cfg = { hidden: 64, ffn: 32, numExperts: 8, numLocalExperts: 6, localExpertStart: 2, topk: 3, activation: "swiglu_oai" as const, weightFormat, maxTokens: 12 };
      const E = 6, N1 = 64;
      const fc1 = rng.bf16Normal(E * N1 * cfg.hidden, 1 / 8);
      const fc2 = rng.bf16Normal(E * cfg.hidden * cfg.ffn, 1 / 6);
      const fc1Bias = rng.f32Normal(E * N1, 0.1);
      using fc1T = ctx.upload(fc1, [E, N1, cfg.hidden]);
      using fc2T = ctx.upload(fc2, [E, cfg.hidden, cfg.ffn]);
      using b1T = ctx.upload(fc1Bias, [E, N1]);
      using moe = new FusedMoE(ctx, cfg, { fc1: fc1T, fc2: fc2T, fc1Bias: b1T });
      const T = 10;
      const hidden = rng.bf16Normal(T * cfg.hidden);
      const { routingMap, probs } = randomRouting(rng, T, cfg.numExperts, cfg.topk);
      routingMap[0] = -5;
      using hT = ctx.upload(hidden, [T, cfg.hidden]);
      using rT = ctx.upload(routingMap, [T, cfg.topk]);
      using pT = ctx.upload(probs, [T, cfg.topk]);
      using out = moe.forward({ hidden: hT, routingMap: rT, probs: pT });
      const ref = R.fusedMoe(cfg, { fc1, fc2, fc1Bias }, { hidden, numTokens: T, routingMap, probs });
      const tol = weightFormat === "bf16" ? TOLERANCE.bf16 : TOLERANCE.mxfp8;
      expect(relFrobenius(out.download(), ref.out)).toBeLessThan(tol);
      expect(moe.invalidCount()).toBe(1);
      moe.resetInvalidCount();
      expect(moe.invalidCount()).toBe(0);

      using stream = ctx.createStream();
      using gOut = ctx.empty([T, cfg.hidden], "bf16");
      using graph = moe.capture({ hidden: hT, routingMap: rT, probs: pT, out: gOut, stream });
      const r2 = randomRouting(rng, T, cfg.numExperts, cfg.topk);
      rT.copyFrom(r2.routingMap);
      pT.copyFrom(r2.probs);
      graph.launch(stream);
      stream.synchronize();
      const ref2 = R.fusedMoe(cfg, { fc1, fc2, fc1Bias }, { hidden, numTokens: T, routingMap: r2.routingMap, probs: r2.probs });
      expect(relFrobenius(gOut.download(), ref2.out)).toBeLessThan(tol);
    });
  }

  test("FusedMoE skip-permute matches the reference", () => {
    using ctx = Context.create({ backend: "host" });
    const rng = new Rng(3);
    const cfg = { hidden: 64, ffn: 32, numExperts: 4, topk: 2, activation: "squared_relu" as const, maxTokens: 8 };
    const fc1 = rng.bf16Normal(4 * 32 * 64, 1 / 8);
    const fc2 = rng.bf16Normal(4 * 64 * 32, 1 / 6);
    using fc1T = ctx.upload(fc1, [4, 32, 64]);
    using fc2T = ctx.upload(fc2, [4, 64, 32]);
    using moe = FusedMoE.create(ctx, cfg, { fc1: fc1T, fc2: fc2T });
    const rows = 12;
    const tpe = new Int32Array([3, 0, 5, 2]);
    const hidden = rng.bf16Normal(rows * 64);
    const probs = rng.f32Normal(rows);
    using out = moe.forwardGrouped({ hidden: ctx.upload(hidden, [rows, 64]), tokensPerExpert: ctx.upload(tpe), probs: ctx.upload(probs) });
    const ref = R.fusedMoe(cfg, { fc1, fc2 }, { hidden, numTokens: rows, probs, tokensPerExpert: tpe });
    expect(relFrobenius(out.download(), ref.out)).toBeLessThan(TOLERANCE.bf16);
  });
});
