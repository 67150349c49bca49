// Lifetimes of native objects on the host backend: dispose() is idempotent, use after dispose is
// FmoeError(INVALID_STATE), a context frees its children, finalizers free what callers forgot
// (never after the context), and allocation cycles leak nothing (ctx.liveAllocations()).
// Also the basic Tensor contract (upload/download round trips, views) that every suite relies on.
import { describe, expect } from "bun:test";
import { Context, FmoeError, FusedMoE, permute, quantizeMxfp8, Status, type DType } from "../lib/index.ts";
import * as ffi from "../lib/ffi.ts";
import { checkFreedBufferWaitsForItsWork, expectBitExact, expectFmoe, randBf16, randWeights, seededTest, suiteContext } from "./helpers.ts";

const STATE = Status.INVALID_STATE;

describe("tensors: round trips and views", () => {
  const ctx = suiteContext("host");

  seededTest("upload / download round trip of every dtype, and bf16 from f32 rounds to nearest even", (rng) => {
    const x = ctx();
    const data: Record<DType, Uint16Array | Float32Array | Int32Array | Uint8Array> = {
      bf16: randBf16(rng, 37),
      f32: Float32Array.from({ length: 37 }, () => rng.normal()),
      i32: Int32Array.from({ length: 37 }, () => rng.nextU32() | 0),
      e4m3: Uint8Array.from({ length: 37 }, () => rng.int(256)),
      e8m0: Uint8Array.from({ length: 37 }, () => rng.int(256)),
    };
    for (const [dtype, arr] of Object.entries(data) as [DType, Uint8Array][]) {
      using t = x.upload(arr, [37], dtype);
      expect(t.dtype).toBe(dtype);
      expectBitExact(t.download(), arr, `${dtype} round trip`);
    }
    // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties to even -> 1; 1 + 3 * 2^-8 -> 1 + 2^-6.
    using b = x.upload(Float32Array.of(1, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5), [4], "bf16");
    expect(Array.from(b.toFloat32())).toEqual([1, 1, 1 + 2 ** -6, -2.5]);
  });

  seededTest("subarray uploads respect byteOffset; views share memory; fill and zero", () => {
    const x = ctx();
    const big = Int32Array.of(1, 2, 3, 4, 5, 6);
    using t = x.upload(big.subarray(2, 5));
    expect(Array.from(t.download())).toEqual([3, 4, 5]);
    using m = x.upload(Float32Array.of(1, 2, 3, 4, 5, 6), [2, 3], "bf16");
    const v = m.view(3, [3]);
    expect(v.isView).toBe(true);
    expect(Array.from(v.toFloat32())).toEqual([4, 5, 6]);
    v.zero();
    expect(Array.from(m.toFloat32())).toEqual([1, 2, 3, 0, 0, 0]);
    const r = m.reshape([3, 2]);
    expect(r.shape).toEqual([3, 2]);
    v.dispose(); // a view never frees its base
    expect(Array.from(m.toFloat32())).toEqual([1, 2, 3, 0, 0, 0]);
    using z = x.empty([0, 7], "bf16");
    expect(z.download().length).toBe(0);
  });
});

describe("lifetimes", () => {
  seededTest("dispose twice is harmless; use after dispose is INVALID_STATE (tensor, stream, event, graph, plan, context)", (rng) => {
    const x = Context.create({ backend: "host" });
    const t = x.zeros([4], "f32");
    t.dispose();
    t.dispose();
    expect(t.disposed).toBe(true);
    expectFmoe(() => t.download(), STATE, "disposed");
    expectFmoe(() => t.fill(0), STATE, "disposed");
    expectFmoe(() => t.ptr, STATE, "disposed");

    const s = x.createStream();
    s.dispose();
    s.dispose();
    expectFmoe(() => s.synchronize(), STATE, "stream is disposed");
    expectFmoe(() => x.zeros([4], "f32", s), STATE, "stream is disposed");

    const e = x.createEvent();
    e.dispose();
    e.dispose();
    expectFmoe(() => e.record(), STATE, "event is disposed");

    const u = x.zeros([4], "f32");
    const g = x.capture(undefined, () => u.fill(1));
    g.dispose();
    g.dispose();
    expectFmoe(() => g.launch(), STATE, "graph is disposed");

    const fc1 = x.upload(randWeights(rng, 2, 32, 32), [2, 32, 32], "bf16");
    const fc2 = x.upload(randWeights(rng, 2, 32, 32), [2, 32, 32], "bf16");
    const moe = new FusedMoE(x, { hidden: 32, ffn: 32, numExperts: 2, topk: 1, activation: "squared_relu", maxTokens: 4 }, { fc1, fc2 });
    moe.dispose();
    moe.dispose();
    const h = x.zeros([1, 32], "bf16");
    const r = x.zeros([1, 1], "i32");
    const p = x.zeros([1, 1], "f32");
    expectFmoe(() => moe.forward({ hidden: h, routingMap: r, probs: p }), STATE, "FusedMoE is disposed");
    expectFmoe(() => moe.invalidCount(), STATE, "FusedMoE is disposed");

    x.dispose();
    x.dispose();
    expect(x.disposed).toBe(true);
    expectFmoe(() => x.liveAllocations(), STATE, "disposed");
    expectFmoe(() => x.empty([1], "f32"), STATE, "disposed");
    expectFmoe(() => x.createStream(), STATE, "disposed");
    // Children were freed by the context: they read as disposed and their dispose is a no-op.
    for (const child of [u, fc1, fc2, h, r, p]) {
      expect(child.disposed).toBe(true);
      child.dispose();
    }
    expectFmoe(() => u.download(), STATE, "its context was disposed");
  });

  seededTest("10,000 alloc/free cycles leak nothing (liveAllocations back to baseline)", (rng) => {
    using x = Context.create({ backend: "host" });
    const base = x.liveAllocations();
    expect(base).toEqual({ count: 0, bytes: 0 });
    const dtypes: DType[] = ["bf16", "f32", "i32", "e4m3", "e8m0"];
    const held: { dispose(): void }[] = [];
    for (let i = 0; i < 10_000; ++i) {
      const t = x.empty([1 + rng.int(300)], dtypes[i % dtypes.length]!);
      if (i % 7 === 0) held.push(t);
      else t.dispose();
      if (held.length > 20) held.splice(0, 10).forEach((h) => h.dispose());
    }
    for (const h of held) h.dispose();
    expect(x.liveAllocations()).toEqual(base);
    // Zero-byte tensors are real allocations too.
    const zs = Array.from({ length: 100 }, () => x.empty([0], "f32"));
    expect(x.liveAllocations().count).toBe(100);
    zs.forEach((z) => z.dispose());
    expect(x.liveAllocations()).toEqual(base);
  });

  seededTest("ops that allocate outputs, FusedMoE and failed calls leak nothing", (rng) => {
    using x = Context.create({ backend: "host" });
    using h = x.upload(randBf16(rng, 8 * 64), [8, 64], "bf16");
    using r = x.upload(Int32Array.from({ length: 16 }, () => rng.int(4)), [8, 2]);
    using fc1 = x.upload(randWeights(rng, 4, 32, 64), [4, 32, 64], "bf16");
    using fc2 = x.upload(randWeights(rng, 4, 64, 32), [4, 64, 32], "bf16");
    using other = Context.create({ backend: "host" });
    using foreign = other.createStream();
    const base = x.liveAllocations();
    for (let i = 0; i < 300; ++i) {
      const q = quantizeMxfp8(x, h);
      q.data.dispose();
      q.scale.dispose();
      const p = permute(x, { hidden: h, routingMap: r, numExperts: 4, quantize: i % 2 === 0 });
      for (const t of [p.permuted, p.permutedQ, p.permutedScale, p.expertOffsets, p.permutationMap, p.inverseMap]) t?.dispose();
      // Fails in the library (stream of another context) after the outputs were allocated.
      expect(() => permute(x, { hidden: h, routingMap: r, numExperts: 4, stream: foreign })).toThrow(FmoeError);
    }
    expect(x.liveAllocations()).toEqual(base);
    for (const weightFormat of ["bf16", "mxfp8"] as const) {
      const moe = new FusedMoE(x, { hidden: 64, ffn: 32, numExperts: 4, topk: 2, activation: "squared_relu", weightFormat, maxTokens: 8 }, { fc1, fc2 });
      using p = x.upload(new Float32Array(16), [8, 2]);
      moe.forward({ hidden: h, routingMap: r, probs: p }).dispose();
      moe.dispose();
      // Borrowed weights stay alive; owned copies (quantized weights, workspace) are gone.
      expect(fc1.disposed).toBe(false);
      expect(x.liveAllocations().count).toBe(base.count + 1); // + p, disposed at the end of the loop body
    }
    expect(x.liveAllocations()).toEqual(base);
  });

  seededTest("a context frees every child it still owns; their later dispose is no double free", () => {
    const x = Context.create({ backend: "host" });
    const ts = Array.from({ length: 10 }, (_, i) => x.empty([i + 1], "f32"));
    const s = x.createStream();
    const g = x.capture(s, () => ts[0]!.fill(0, s));
    expect(x.liveAllocations().count).toBe(10);
    x.dispose();
    for (const t of ts) {
      expect(t.disposed).toBe(true);
      t.dispose();
    }
    expect(s.disposed).toBe(true);
    s.dispose();
    expect(g.disposed).toBe(true);
    g.dispose();
  });

  seededTest("finalizers free forgotten tensors, never after their context", async () => {
    const x = Context.create({ backend: "host" });
    (() => {
      for (let i = 0; i < 50; ++i) x.empty([1024], "f32");
    })();
    // Finalizers run in a later task than the collection: collect, yield, repeat.
    for (let i = 0; i < 20 && x.liveAllocations().count >= 50; ++i) {
      Bun.gc(true);
      await Bun.sleep(5);
    }
    expect(x.liveAllocations().count).toBeLessThan(50);
    const kept = x.empty([4], "f32");
    (() => {
      for (let i = 0; i < 20; ++i) x.empty([16], "i32");
    })();
    x.dispose();
    Bun.gc(true);
    await Bun.sleep(5);
    Bun.gc(true);
    expect(kept.disposed).toBe(true);
    kept.dispose();
  });

  seededTest("a graph refuses to replay over a disposed tensor; the stream survives", () => {
    using x = Context.create({ backend: "host" });
    using stream = x.createStream();
    const t = x.zeros([8], "f32", stream);
    using g = x.capture(stream, () => {
      t.fill(1, stream);
    });
    expect(Array.from(t.download())).toEqual(new Array(8).fill(0)); // recorded, not run
    g.launch(stream);
    expect(t.download()[0]).not.toBe(0);
    t.dispose();
    expectFmoe(() => g.launch(stream), STATE, "graph launch", "disposed");
    expect(g.tensors.length).toBe(1);
  });
});

// Freed buffers go to the context's cache (csrc/core/buffer_cache.h) and come back to the next
// allocation of their size class once the work queued before the free has finished (which
// synchronize() makes sure of here). Each test uses a fresh context, so the cache starts empty.
// FMOE_BUFFER_CACHE=0 turns the cache off (a comparison run), and these tests with it.
describe.skipIf(process.env.FMOE_BUFFER_CACHE === "0")("freed buffers are reused", () => {
  seededTest("by the next allocation of the same size class, once, oldest first", () => {
    using x = Context.create("host");
    const a = x.empty([1000], "f32");
    const pa = a.ptr;
    a.dispose();
    x.synchronize();
    using b = x.empty([1010], "f32"); // 4040 bytes: the 4096-byte class of 4000
    expect(b.ptr).toBe(pa);
    using c = x.empty([1000], "f32"); // b holds the block
    expect(c.ptr).not.toBe(pa);
    using d = x.empty([3000], "f32"); // another class
    expect(d.ptr).not.toBe(pa);
    expect(x.liveAllocations()).toEqual({ count: 3, bytes: 4040 + 4000 + 12000 });
    // Ops may touch the bytes asked for, not the class's rounding.
    expectFmoe(() => ffi.memset(x._handle, b.ptr, 0, 4096, 0), Status.INVALID_ARGUMENT, "needs 4096 bytes", "holds 4040");
    ffi.memset(x._handle, b.ptr, 0, 4040, 0);
  });

  seededTest("at most 1024 blocks are kept: the oldest are freed first", () => {
    using x = Context.create("host");
    const first = Array.from({ length: 1100 }, () => x.empty([64], "i32"));
    const freed = first.map((t) => t.ptr);
    for (const t of first) t.dispose();
    x.synchronize();
    const again = Array.from({ length: 1024 }, () => x.empty([64], "i32"));
    expect(again.map((t) => t.ptr)).toEqual(freed.slice(1100 - 1024));
    for (const t of again) t.dispose();
    expect(x.liveAllocations()).toEqual({ count: 0, bytes: 0 });
  });

  seededTest("not while a stream captures: a buffer freed then reaches the cache after the capture", () => {
    using x = Context.create("host");
    using out = x.zeros([4], "f32");
    const a = x.empty([256], "bf16");
    const pa = a.ptr;
    using s = x.createStream();
    using g = x.capture(s, () => {
      a.dispose();
      out.fill(1, s);
    });
    expect(x.liveAllocations()).toEqual({ count: 1, bytes: 16 });
    using other = x.empty([1000], "f32"); // another size class; the first allocation after the capture hands `a` to the cache
    x.synchronize();
    using b = x.empty([256], "bf16");
    expect(b.ptr).toBe(pa);
    g.launch(s);
    s.synchronize();
    expect(new Uint8Array(out.download().buffer).every((byte) => byte === 1)).toBe(true);
  });

  seededTest("not before the work queued before the free has finished, and the free does not wait for it", (rng) => {
    using x = Context.create("host");
    // Four products of 512^3 (~0.1 s on two cores): far longer than queueing them and looking.
    checkFreedBufferWaitsForItsWork(x, rng, 512, 512, 512, 4);
  });
});
