// The typed API under values of any kind. Bun runs TypeScript without checking it, so an option
// can arrive as null, a string, NaN, a bigint, a symbol, an array, a disposed tensor, a tensor of
// the wrong dtype or a stream where a tensor belongs. Each round takes a valid call of one entry
// point (every op, FusedMoE's constructor, forward, forwardGrouped and capture, the Tensor and
// Context methods that take arguments), sets one of its options (and now and then `out`) to such
// a value, and makes it. The call must return or throw an FmoeError: never a TypeError from
// inside the library. A refused call must leave no allocation behind. test/abi-fuzz.test.ts does
// the same one level down, on the C ABI.
import { describe, expect } from "bun:test";
import {
  activation,
  Context,
  dequantizeMxfp8,
  FmoeError,
  FusedMoE,
  groupedMmBf16,
  groupedMmMxfp8,
  permute,
  quantizeMxfp8,
  route,
  swizzleScales,
  Tensor,
  unpermute,
  unswizzleScales,
} from "../lib/index.ts";
import { randBf16, randWeights, seededTest, suiteContext } from "./helpers.ts";

const ROUNDS = 4000;

/** Frees what a call returned: a tensor, or an object of tensors (views are skipped by dispose). */
function release(result: unknown): void {
  if (result instanceof Tensor) result.dispose();
  else if (typeof result === "object" && result !== null) for (const v of Object.values(result)) if (v instanceof Tensor) v.dispose();
}

describe("api fuzz: values of any kind in every option", () => {
  const ctx = suiteContext("host");

  seededTest("every call returns or throws an FmoeError; a refused call allocates nothing", (rng) => {
    const x = ctx();
    const [T, H, E, K, I] = [4, 64, 4, 2, 32];
    using h = x.upload(randBf16(rng, T * H), [T, H], "bf16");
    using r = x.upload(Int32Array.from({ length: T * K }, (_, i) => i % E), [T, K], "i32");
    using p = x.upload(Float32Array.from({ length: T * K }, () => 0.5), [T, K], "f32");
    using s = x.createStream();
    using wrongDtype = x.upload(new Float32Array(T * H), [T, H], "f32");
    const dead = x.upload(new Float32Array(4));
    dead.dispose();
    using fc1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
    using fc2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
    using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk: K, activation: "silu", maxTokens: 8 }, { fc1, fc2 });
    const perm = permute(x, { hidden: h, routingMap: r, numExperts: E });
    using a1 = x.upload(randBf16(rng, 8 * 2 * I), [8, 2 * I], "bf16");
    const q = quantizeMxfp8(x, h);
    using offsets = x.upload(Int32Array.of(0, 2, 4), [3], "i32");
    using b = x.upload(randWeights(rng, 2, 16, H), [2, 16, H], "bf16");
    const bq = quantizeMxfp8(x, b);
    using scales = x.upload(new Uint8Array(T * 2).fill(127), [T, 2], "e8m0");
    using swizzled = swizzleScales(x, scales);
    using logits = x.upload(rng.f32Normal(T * E), [T, E], "f32");
    using tpe = x.upload(Int32Array.of(1, 1, 1, 1), [E], "i32");
    using rowProbs = x.upload(new Float32Array(T).fill(1), [T], "f32");
    using captureOut = x.empty([T, H], "bf16");

    const junk: unknown[] = [undefined, null, 0, -1, 1.5, NaN, Infinity, "x", "", {}, [], [1, 2], true, false, 2 ** 40, 10n, Symbol("s"), () => 1, wrongDtype, dead, s, h];
    // [name, a valid call's options, the call]. The options are untyped on purpose (`any`): they
    // are what a caller without a type checker passes.
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    const calls: [string, Record<string, unknown>, (o: any) => unknown][] = [
      ["permute", { hidden: h, routingMap: r, numExperts: E, probs: p, alignment: 8, stream: s }, (o) => permute(x, o)],
      ["activation", { input: a1, activation: "silu", layout: "halves", alpha: 1, limit: 7, stream: s }, (o) => activation(x, o)],
      ["groupedMmBf16", { a: h, b, groupOffsets: offsets, stream: s }, (o) => groupedMmBf16(x, o)],
      ["groupedMmMxfp8", { a: q.data, aScale: q.scale, b: bq.data, bScale: bq.scale, groupOffsets: offsets }, (o) => groupedMmMxfp8(x, o)],
      ["unpermute", { input: perm.permuted, inverseMap: perm.inverseMap, probs: p, stream: s }, (o) => unpermute(x, o)],
      ["route", { logits, topk: 2, scoring: "softmax", numGroups: 1, topkGroups: 1, renormalize: true, scale: 1 }, (o) => route(x, o)],
      ["quantizeMxfp8", { stream: s }, (o) => quantizeMxfp8(x, h, o)],
      ["dequantizeMxfp8", { stream: s }, (o) => dequantizeMxfp8(x, q.data, q.scale, o)],
      ["swizzleScales", { stream: s }, (o) => swizzleScales(x, scales, o)],
      ["unswizzleScales", { rows: T, scaleCols: 2, stream: s }, (o) => unswizzleScales(x, swizzled, o)],
      ["FusedMoE", { hidden: H, ffn: I, numExperts: E, topk: K, activation: "silu", maxTokens: 8, alignment: 16, layout: "halves", weightFormat: "bf16" }, (o) => new FusedMoE(x, o, { fc1, fc2 }).dispose()],
      ["forward", { hidden: h, routingMap: r, probs: p, stream: s }, (o) => moe.forward(o)],
      ["forwardGrouped", { hidden: h, tokensPerExpert: tpe, probs: rowProbs, stream: s }, (o) => moe.forwardGrouped(o)],
      ["capture", { hidden: h, routingMap: r, probs: p, out: captureOut, stream: s }, (o) => moe.capture(o).dispose()],
      ["view", { offset: 0, shape: [2, 64] }, (o) => h.view(o.offset, o.shape)],
      ["fill", { value: 0, stream: s }, (o) => h.fill(o.value, o.stream)],
      ["copyFrom", { src: new Float32Array(T * H), stream: s }, (o) => h.copyFrom(o.src, o.stream)],
      ["download", { stream: s }, (o) => h.download(o.stream)],
      ["upload", { data: new Float32Array(4), shape: [4], dtype: "f32" }, (o) => x.upload(o.data, o.shape, o.dtype)],
      ["zeros", { shape: [4], dtype: "f32", stream: s }, (o) => x.zeros(o.shape, o.dtype, o.stream)],
      ["record", { stream: s }, (o) => x.createEvent().record(o.stream).dispose()],
      ["time", { stream: s, body: () => {} }, (o) => x.time(o.stream, o.body)],
      ["Context.create", { backend: "host", device: 0 }, (o) => Context.create(o).dispose()],
    ];
    let done = 0;
    let refused = 0;
    for (let i = 0; i < ROUNDS; ++i) {
      const [name, valid, call] = calls[rng.int(calls.length)]!;
      const options: Record<string, unknown> = { ...valid };
      const keys = Object.keys(valid);
      const key = keys[rng.int(keys.length)]!;
      options[key] = junk[rng.int(junk.length)];
      if (rng.uniform() < 0.2 && name !== "capture") options.out = junk[rng.int(junk.length)];
      const before = x.liveAllocations().count;
      try {
        release(call(options));
        ++done;
      } catch (err) {
        if (!(err instanceof FmoeError)) throw new Error(`${name} with ${key} = ${String(options[key])}: expected an FmoeError, got ${String(err)}`);
        const after = x.liveAllocations().count;
        if (after !== before) throw new Error(`${name} with ${key} = ${String(options[key])} refused (${err.message}) but left ${after - before} allocation(s) behind`);
        ++refused;
      }
    }
    s.synchronize();
    release(perm);
    release(q);
    release(bq);
    // Both outcomes happen (some junk stands in for the option's default, or is a valid value).
    expect(done).toBeGreaterThan(ROUNDS / 50);
    expect(refused).toBeGreaterThan(ROUNDS / 2);
  });
});
