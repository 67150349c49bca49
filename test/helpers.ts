/**
 * Shared fixtures of the test suites: the seed, backend contexts, random inputs, and the two ways
 * results are compared (bit for bit, or relative Frobenius norm against lib/reference.ts with the
 * TOLERANCE table).
 *
 * Seeds: every run draws fresh inputs. The base seed comes from FMOE_TEST_SEED, else the clock;
 * each test derives its own seed from the base and its title, so a failing test reports a seed
 * that reproduces it alone (`FMOE_TEST_SEED=<base> bun test -t '<title>'`).
 */
import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  Context,
  type BackendChoice,
  type Event,
  FmoeError,
  FusedMoE,
  type FusedMoEConfig,
  groupedMmBf16,
  permute,
  randomRouting,
  relFrobenius,
  Rng,
  serializeSafetensorsBytes,
  Status,
  type Stream,
  type Tensor,
} from "../lib/index.ts";
import { bf16ToF32 } from "../lib/dtype.ts";
import * as ffi from "../lib/ffi.ts";

// ------------------------------------------------------------------------------------------------
// Seeds

function baseSeed(): number {
  const env = process.env.FMOE_TEST_SEED;
  if (env !== undefined && env !== "") {
    const n = Number(env);
    if (!Number.isSafeInteger(n)) throw new Error(`FMOE_TEST_SEED must be an integer, got ${env}`);
    return n >>> 0;
  }
  return (Date.now() ^ (process.pid << 16)) >>> 0;
}

/** The run's base seed (FMOE_TEST_SEED or time-based). */
export const BASE_SEED = baseSeed();

/** A 32-bit FNV-1a hash, to give every test title its own stream of random numbers. */
function hashTitle(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; ++i) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

export function seedFor(title: string): number {
  return (BASE_SEED ^ hashTitle(title)) >>> 0;
}

/** Appends the seed to a failure so that it can be replayed. */
function annotate(err: unknown, title: string): unknown {
  const note = ` [seed ${seedFor(title)}; replay: FMOE_TEST_SEED=${BASE_SEED} bun test -t '${title.replace(/'/g, ".")}']`;
  if (err instanceof Error) {
    err.message += note;
    return err;
  }
  return new Error(String(err) + note);
}

/**
 * A test whose body gets a seeded Rng; a failure's message carries the seed. `timeoutMs` defaults
 * to bunfig's.
 */
export function seededTest(title: string, body: (rng: Rng) => void | Promise<void>, timeoutMs?: number): void {
  test(
    title,
    async () => {
      try {
        await body(new Rng(seedFor(title)));
      } catch (err) {
        throw annotate(err, title);
      }
    },
    timeoutMs,
  );
}

// ------------------------------------------------------------------------------------------------
// Contexts

/** True when the native library loads; the host suites need it (they fail, not skip, without). */
export const HAS_LIBRARY = Context.libraryAvailable();
/** CUDA devices visible to the library (0 on a host-only build). */
export const CUDA_DEVICES = HAS_LIBRARY ? Context.cudaDeviceCount() : 0;

/**
 * One context per describe block: created before its tests, disposed after. Returns a getter
 * (the context does not exist yet when the describe body runs).
 */
export function suiteContext(backend: BackendChoice = "host"): () => Context {
  let ctx: Context | undefined;
  beforeAll(() => {
    ctx = Context.create({ backend });
  });
  afterAll(() => {
    ctx?.dispose();
  });
  return () => {
    if (ctx === undefined) throw new Error("suiteContext: used outside a test");
    return ctx;
  };
}

/** A temporary directory per describe block, removed after its tests; returns a getter. */
export function suiteTempDir(prefix: string): () => string {
  let dir = "";
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), prefix));
  });
  afterAll(() => {
    if (dir !== "") rmSync(dir, { recursive: true, force: true });
  });
  return () => {
    if (dir === "") throw new Error("suiteTempDir: used outside a test");
    return dir;
  };
}

// ------------------------------------------------------------------------------------------------
// Random inputs

/** n bf16 values, normal(0, std). Never all zeros. */
export function randBf16(rng: Rng, n: number, std = 1): Uint16Array {
  return rng.bf16Normal(n, std);
}

/** Expert weights with std 1/sqrt(fan_in), so that every layer keeps values O(1). */
export function randWeights(rng: Rng, experts: number, out: number, fanIn: number): Uint16Array {
  return rng.bf16Normal(experts * out * fanIn, 1 / Math.sqrt(fanIn));
}

/** f32 values, uniform in [lo, hi). */
export function randUniformF32(rng: Rng, n: number, lo: number, hi: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; ++i) out[i] = lo + (hi - lo) * rng.uniform();
  return out;
}

/** How the routing of a case is drawn. */
export type RoutingPattern =
  | "random" // softmax top-k of normal logits (distinct experts per token)
  | "one-expert" // every slot of every token on expert `hot`
  | "skewed"; // 80 % of slots on the first two experts, the rest uniform (empty experts likely)

export interface Routing {
  routingMap: Int32Array;
  probs: Float32Array;
}

/** Routing of T tokens over E experts with `topk` slots each. */
export function makeRouting(rng: Rng, T: number, E: number, topk: number, pattern: RoutingPattern = "random", hot = 0): Routing {
  if (pattern === "random") return randomRouting(rng, T, E, topk);
  const routingMap = new Int32Array(T * topk);
  const probs = randUniformF32(rng, T * topk, 0.05, 1);
  for (let i = 0; i < T * topk; ++i) {
    if (pattern === "one-expert") routingMap[i] = hot;
    else routingMap[i] = rng.uniform() < 0.8 ? rng.int(Math.min(2, E)) : rng.int(E);
  }
  return { routingMap, probs };
}

/**
 * Overwrites `count` random slots with ids outside [0, E): alternately negative (down to -2^31)
 * and >= E (up to 2^31-1). Returns the slots changed.
 */
export function injectInvalidIds(rng: Rng, routingMap: Int32Array, E: number, count: number): number[] {
  const slots = new Set<number>();
  while (slots.size < Math.min(count, routingMap.length)) slots.add(rng.int(routingMap.length));
  const list = [...slots];
  const bad = [-1, E, -2147483648, 2147483647, -7, E + 3];
  list.forEach((s, i) => {
    routingMap[s] = bad[i % bad.length]!;
  });
  return list;
}

// ------------------------------------------------------------------------------------------------
// Comparisons

type NumArray = Uint8Array | Uint16Array | Int32Array | Float32Array | Uint32Array;

/** Copies the rows `rows` (each `width` elements) of `a` into a new array of the same type. */
export function pickRows<A extends NumArray>(a: A, width: number, rows: readonly number[]): A {
  const ctor = a.constructor as new (n: number) => A;
  const out = new ctor(rows.length * width);
  rows.forEach((r, i) => out.set(a.subarray(r * width, (r + 1) * width) as never, i * width));
  return out;
}

/** Rows r < nUsed whose permutation map entry is not -1: the rows an op writes. */
export function realRows(permutationMap: Int32Array, nUsed = permutationMap.length): number[] {
  const rows: number[] = [];
  for (let r = 0; r < Math.min(nUsed, permutationMap.length); ++r) if (permutationMap[r] !== -1) rows.push(r);
  return rows;
}

/**
 * Throws unless `actual` equals `expected` element for element (Float32Array: the same bits, any
 * NaN equal to any NaN). The message gives the first mismatches.
 */
export function expectBitExact(actual: NumArray, expected: NumArray, what: string): void {
  if (actual.length !== expected.length) throw new Error(`${what}: length ${actual.length}, expected ${expected.length}`);
  const float = actual instanceof Float32Array;
  const ab = float ? new Uint32Array(actual.buffer, actual.byteOffset, actual.length) : actual;
  const eb = float ? new Uint32Array(expected.buffer, expected.byteOffset, expected.length) : expected;
  const bad: string[] = [];
  let count = 0;
  for (let i = 0; i < actual.length; ++i) {
    if (ab[i] === eb[i] || (float && Number.isNaN(actual[i]!) && Number.isNaN(expected[i]!))) continue;
    ++count;
    if (bad.length < 8) bad.push(`[${i}] ${fmt(actual, i)} != ${fmt(expected, i)}`);
  }
  if (count > 0) throw new Error(`${what}: ${count} of ${actual.length} elements differ (bit-exact expected): ${bad.join(", ")}`);
}

function fmt(a: NumArray, i: number): string {
  const v = a[i]!;
  if (a instanceof Uint16Array) return `0x${v.toString(16).padStart(4, "0")} (${bf16ToF32(v)})`;
  if (a instanceof Uint8Array) return `0x${v.toString(16).padStart(2, "0")}`;
  return String(v);
}

/**
 * Throws unless relFrobenius(actual, expected) <= tol (bf16 inputs as Uint16Array bits). The
 * reference must be non-zero, else the comparison could not fail.
 */
export function expectClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string): number {
  const err = relFrobenius(actual, expected);
  if (!(err <= tol)) throw new Error(`${what}: relative Frobenius error ${err} > tolerance ${tol}`);
  return err;
}

/** Throws when the reference is all zeros (a comparison against it would prove nothing). */
export function expectNonZero(a: ArrayLike<number>, what: string): void {
  const bf = a instanceof Uint16Array;
  for (let i = 0; i < a.length; ++i) if ((bf ? a[i]! & 0x7fff : a[i]) !== 0) return;
  if (a.length > 0) throw new Error(`${what}: reference is all zeros: the test would prove nothing`);
}

/** Throws when any bf16 value is NaN (the 0xFF poison reads as NaN: an unwritten row). */
export function expectNoNaNBf16(a: Uint16Array, what: string): void {
  for (let i = 0; i < a.length; ++i) {
    if ((a[i]! & 0x7fff) > 0x7f80) throw new Error(`${what}: element ${i} is NaN (0x${a[i]!.toString(16)}): not written?`);
  }
}

/** Throws unless every byte of `rows` (width `width` elements of `bytesPer` bytes) is 0xFF. */
export function expectPoisoned(a: NumArray, width: number, rows: readonly number[], what: string): void {
  const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  const bpe = a.BYTES_PER_ELEMENT;
  for (const r of rows) {
    for (let i = r * width * bpe; i < (r + 1) * width * bpe; ++i) {
      if (bytes[i] !== 0xff) throw new Error(`${what}: row ${r} was written (byte ${i} = 0x${bytes[i]!.toString(16)}); it must be skipped`);
    }
  }
}

function asFmoe(err: unknown): FmoeError {
  if (err instanceof FmoeError) return err;
  throw new Error(`expected an FmoeError, got ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`);
}

/** Runs `fn` and returns the FmoeError it throws (fails when it does not throw one). */
export function catchFmoe(fn: () => unknown): FmoeError {
  try {
    fn();
  } catch (err) {
    return asFmoe(err);
  }
  throw new Error("expected an FmoeError, nothing was thrown");
}

/** Throws unless `fn` throws FmoeError with `code` and a message matching every `names`. */
export function expectFmoe(fn: () => unknown, code: Status, ...names: (string | RegExp)[]): FmoeError {
  return checkFmoe(catchFmoe(fn), code, names);
}

/** expectFmoe for a promise: it must reject with FmoeError `code` naming every `names`. */
export async function expectFmoeRejects(promise: Promise<unknown>, code: Status, ...names: (string | RegExp)[]): Promise<FmoeError> {
  try {
    await promise;
  } catch (err) {
    return checkFmoe(asFmoe(err), code, names);
  }
  throw new Error("expected a rejection with an FmoeError, the promise resolved");
}

function checkFmoe(err: FmoeError, code: Status, names: readonly (string | RegExp)[]): FmoeError {
  if (err.code !== code) throw new Error(`expected status ${Status[code]}, got ${err.statusName}: ${err.message}`);
  for (const n of names) {
    const ok = typeof n === "string" ? err.message.includes(n) : n.test(err.message);
    if (!ok) throw new Error(`error message does not name ${String(n)}: "${err.message}"`);
  }
  return err;
}

/**
 * Work that keeps a new stream of `x` busy for a while: `reps` grouped products of rows x n x k
 * (four groups) into `out`, and `done` recorded after them. The shapes are chosen per backend so
 * that the work lasts far longer than the host takes to queue it and look (milliseconds).
 * `{ lastingMs }` instead of a count times two products first and queues as many as last about
 * that long on this machine: for tests whose checks wait for the work themselves (a call after a
 * graph replay waits up to 20 ms), which a faster machine must not finish early.
 */
export function queueLongWork(x: Context, rng: Rng, rows: number, n: number, k: number, reps: number | { lastingMs: number }): { a: Tensor<"bf16">; b: Tensor<"bf16">; stream: Stream; out: Tensor<"bf16">; done: Event; [Symbol.dispose](): void } {
  const a = x.upload(randBf16(rng, rows * k), [rows, k], "bf16");
  const b = x.upload(randWeights(rng, 4, n, k), [4, n, k], "bf16");
  const offsets = x.upload(Int32Array.of(0, rows >> 3, rows >> 1, rows - (rows >> 2), rows));
  const stream = x.createStream();
  const out = x.empty([rows, n], "bf16");
  const product = () => groupedMmBf16(x, { a, b, groupOffsets: offsets, out, stream });
  let count: number;
  if (typeof reps === "number") {
    count = reps;
  } else {
    product(); // the first one pays for warming up
    stream.synchronize();
    const t0 = performance.now();
    product();
    stream.synchronize();
    // At least 4, and a bound that only a product timed at a few microseconds would reach.
    count = Math.min(20000, Math.max(4, Math.ceil(reps.lastingMs / Math.max(performance.now() - t0, 1e-3))));
  }
  for (let i = 0; i < count; ++i) product();
  const done = x.createEvent().record(stream);
  return {
    a,
    b,
    stream,
    out,
    done,
    [Symbol.dispose]() {
      stream.synchronize();
      for (const t of [a, b, offsets, out, stream, done]) t.dispose();
    },
  };
}

/**
 * A silu layer (topk = 2; H = 64 unless `more.hidden` says otherwise) with random weights and one
 * random input of T tokens, disposed together; `config` is the layer's, for more layers over the
 * same weights.
 */
export function layerWithInput(x: Context, rng: Rng, T: number, I: number, E: number, more: Partial<FusedMoEConfig> = {}) {
  const topk = 2;
  const config: FusedMoEConfig = { hidden: 64, ffn: I, numExperts: E, topk, activation: "silu", maxTokens: 32, ...more };
  const H = config.hidden;
  const fc1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
  const fc2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
  const moe = new FusedMoE(x, config, { fc1, fc2 });
  const routing = randomRouting(rng, T, E, topk);
  const hidden = x.upload(randBf16(rng, T * H), [T, H], "bf16");
  const routingMap = x.upload(routing.routingMap, [T, topk], "i32");
  const probs = x.upload(routing.probs, [T, topk], "f32");
  return {
    H, config, fc1, fc2, moe, hidden, routingMap, probs,
    [Symbol.dispose]() {
      for (const o of [moe, fc1, fc2, hidden, routingMap, probs]) o.dispose();
    },
  };
}

/**
 * The buffer cache's contract (csrc/core/buffer_cache.h), on a stream kept busy by
 * queueLongWork: freeing the buffer its work writes does not wait for that work, the buffer is not
 * handed out again before the work has finished, and then it is.
 */
export function checkFreedBufferWaitsForItsWork(x: Context, rng: Rng, rows: number, n: number, k: number, reps: number): void {
  using work = queueLongWork(x, rng, rows, n, k, reps);
  const freed = work.out.ptr;
  work.out.dispose();
  expect(work.done.query()).toBe(false); // a free that waited (cudaFree) would have seen it done
  using early = x.empty([rows, n], "bf16");
  expect(early.ptr).not.toBe(freed);
  work.stream.synchronize();
  early.dispose();
  x.synchronize(); // the fences recorded at the two frees have passed
  using late = x.empty([rows, n], "bf16");
  expect(late.ptr).toBe(freed);
}

/** Counts turns of the event loop from now; the returned function stops counting and says how many. */
export function countEventLoopTurns(): () => number {
  let turns = 0;
  let counting = true;
  const turn = (): void => {
    if (!counting) return;
    ++turns;
    setImmediate(turn);
  };
  setImmediate(turn);
  return () => {
    counting = false;
    return turns;
  };
}

/** Downloads a tensor after filling it with the 0xFF poison first: convenience for outputs. */
export function poisoned<T extends Tensor>(t: T): T {
  return t.fill(0xff);
}

// ------------------------------------------------------------------------------------------------
// Graph replay

export type Fill = () => Uint16Array | Float32Array | Int32Array | Uint8Array;

/**
 * Captures `run(stream)`, then twice: writes fresh data into each input, replays, and checks the
 * outputs against an eager `run()` (default stream) on the same inputs, bit for bit. Output
 * buffers are compared whole: both runs start from the same 0xFF poison. Every copy and fill of
 * a replay is on `stream`, so the check holds on CUDA too (the default stream of a context need
 * not be ordered with other streams).
 */
export function checkReplay(x: Context, stream: Stream, inputs: [Tensor, Fill][], outputs: Tensor[], run: (s: Stream | undefined) => void): void {
  for (const o of outputs) o.fill(0xff);
  using graph = x.capture(stream, () => run(stream));
  for (const o of outputs) {
    const bytes = new Uint8Array(o.download().buffer);
    expect(bytes.every((b) => b === 0xff)).toBe(true); // recorded, not run
  }
  for (let round = 0; round < 2; ++round) {
    for (const [t, fill] of inputs) t.copyFrom(fill() as never, stream);
    for (const o of outputs) o.fill(0xff, stream);
    // Round 1 replays on the default stream, which is not ordered after `stream`'s copies.
    if (round === 1) stream.synchronize();
    graph.launch(round === 0 ? stream : undefined);
    stream.synchronize();
    const replayed = outputs.map((o) => new Uint8Array(o.download().buffer));
    for (const o of outputs) o.fill(0xff);
    run(undefined);
    const eager = outputs.map((o) => new Uint8Array(o.download().buffer));
    replayed.forEach((r, i) => expectBitExact(r, eager[i]!, `round ${round}: output ${i} (${outputs[i]!.toString()}) replay vs eager`));
    expect(eager.some((e) => e.some((b) => b !== 0xff))).toBe(true);
  }
}

// ------------------------------------------------------------------------------------------------
// MXFP8 hand-computed vectors (one block of 32 each). The expected bytes are worked out by hand
// from the rule in fmoe.h ("Precision"): amax = m * 2^E (1 <= m < 2); s = E - 8 if m <= 1.75
// else E - 7; s clamped to [-127, 127]; all-zero block s = 0 (byte 127); NaN/Inf in a block ->
// scale 0xFF, data 0x7F; elements x / 2^s rounded to nearest even e4m3 (bias 7, subnormals
// m * 2^-9, max 448 = 0x7E).

export interface Mxfp8Vector {
  name: string;
  /** bf16 bits at the given positions; the rest of the 32 are `fill` (default +0). */
  input: Record<number, number>;
  fill?: number;
  scale: number;
  /** Expected e4m3 bytes at positions; the rest `dataFill` (default 0x00). */
  data: Record<number, number>;
  dataFill?: number;
}

/**
 * What the thread that captures may not do, refused alike on every backend (CUDA captures in
 * thread-local mode, which forbids these calls): allocate (a tensor, an op's or a layer's output
 * left out, a layer, a plan) or wait for the device. Each refusal leaves the capture whole: the
 * layer recorded around them replays to the eager result. A tensor disposed (or a plan
 * destroyed) inside the capture stops counting as live at once and is freed once it has ended.
 * An event recorded inside it cannot be queried or timed until recorded outside one again.
 */
export function checkCaptureRefusals(x: Context, rng: Rng): void {
  const T = 3, H = 64, I = 32, E = 4, topk = 2;
  const config = { hidden: H, ffn: I, numExperts: E, topk, activation: "silu", maxTokens: T } as const;
  const desc: ffi.PlanDescFields = {
    hidden_size: H, ffn: I, num_experts: E, num_local_experts: E, local_expert_start: 0, topk, activation: 1,
    layout: 0, alpha: 1.702, limit: 7, weight_format: 0, alignment: 16, max_tokens: T, apply_router_weight_on_input: 0,
  };
  using stream = x.createStream();
  const routing = randomRouting(rng, T, E, topk);
  using hidden = x.upload(randBf16(rng, T * H), [T, H], "bf16");
  using routingMap = x.upload(routing.routingMap, [T, topk], "i32");
  using probs = x.upload(routing.probs, [T, topk], "f32");
  using fc1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
  using fc2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
  using moe = new FusedMoE(x, config, { fc1, fc2 });
  // Downloaded (the context synchronized) before the replay: the eager forward on the default
  // stream and the replay on `stream` share the layer's workspace, and the two streams are not
  // ordered with each other.
  using eagerOut = moe.forward({ hidden, routingMap, probs });
  const eager = eagerOut.download();
  using out = x.empty([T, H], "bf16");
  const plan = ffi.planCreate(x._handle, desc);
  using mark = x.createEvent().record(stream);
  const doomed = x.empty([1000], "f32");
  const live = x.liveAllocations();
  const inCapture = /this thread is capturing a graph on stream/;
  using graph = x.capture(stream, () => {
    expectFmoe(() => x.empty([4], "f32"), Status.INVALID_STATE, "empty: a tensor cannot be allocated while a stream captures");
    expectFmoe(() => x.zeros([4], "f32", stream), Status.INVALID_STATE, "zeros:", "while a stream captures");
    expectFmoe(() => x.upload(new Float32Array(4)), Status.INVALID_STATE, "upload:", "while a stream captures");
    expectFmoe(() => permute(x, { hidden, routingMap, numExperts: E, stream }), Status.INVALID_STATE, "permute: out.permuted must be given");
    expectFmoe(() => moe.forward({ hidden, routingMap, probs, stream }), Status.INVALID_STATE, "FusedMoE: out must be given");
    expectFmoe(() => new FusedMoE(x, config, { fc1, fc2 }), Status.INVALID_STATE, "FusedMoE: a layer cannot be built");
    expectFmoe(() => x.synchronize(), Status.INVALID_STATE, "fmoe_context_synchronize", inCapture);
    expectFmoe(() => stream.synchronize(), Status.INVALID_STATE, "fmoe_stream_synchronize: the stream is capturing");
    expectFmoe(() => stream.dispose(), Status.INVALID_STATE, "fmoe_stream_destroy: the stream is capturing");
    expectFmoe(() => ffi.alloc(x._handle, 64), Status.INVALID_STATE, "fmoe_alloc", inCapture);
    expectFmoe(() => ffi.planCreate(x._handle, desc), Status.INVALID_STATE, "fmoe_plan_create", inCapture);
    moe.forward({ hidden, routingMap, probs, out, stream });
    mark.record(stream); // a point of the graph, not of the device's work
    doomed.dispose();
    ffi.planDestroy(x._handle, plan); // does not wait: its counter is held like a freed buffer
    expect(x.liveAllocations()).toEqual({ count: live.count - 1, bytes: live.bytes - 4000 });
  });
  expectFmoe(() => mark.query(), Status.INVALID_STATE, "fmoe_event_query: event was last recorded inside a capture");
  using start = x.createEvent().record(stream);
  expectFmoe(() => start.elapsedMs(mark), Status.INVALID_STATE, "fmoe_event_elapsed_ms: end was last recorded inside a capture");
  graph.launch(stream);
  mark.record(stream);
  expect(start.elapsedMs(mark)).toBeGreaterThanOrEqual(0);
  stream.synchronize();
  expectBitExact(out.download(), eager, "the layer captured around the refusals");
  using after = x.empty([1000], "f32"); // allocating works again, and hands the held buffer to the cache
  after.fill(0, stream);
  expect(x.liveAllocations()).toEqual(live);
}

export const MXFP8_VECTORS: Mxfp8Vector[] = [
  { name: "all-zero block: scale byte 127, data 0", input: {}, scale: 127, data: {} },
  { name: "all negative zeros: scale 127, data 0x80 (-0)", input: {}, fill: 0x8000, scale: 127, data: {}, dataFill: 0x80 },
  {
    // 256 = 1.0 * 2^8: m <= 1.75 -> s = 8 - 8 = 0.
    name: "amax exactly a power of two (256): s = 0",
    input: { 0: 0x4380 /* 256 */, 1: 0x3f80 /* 1 */, 2: 0xc000 /* -2 */, 3: 0x3f00 /* 0.5 */, 4: 0x4040 /* 3 */ },
    scale: 127,
    data: { 0: 0x78, 1: 0x38, 2: 0xc0, 3: 0x30, 4: 0x44 },
  },
  {
    // 448 = 1.75 * 2^8: still s = 0. 432 lies halfway between 416 (0x7D) and 448 (0x7E): even
    // mantissa 6 wins; 400 halfway between 384 (0x7C) and 416 (0x7D): 0x7C. e4m3 subnormals:
    // 2^-9 -> 1, 2^-10 (halfway 0..1) -> 0, 1.5 * 2^-9 (halfway 1..2) -> 2, 2^-7 -> 4, 2^-6 -> 0x08.
    name: "amax 448 (m = 1.75): s = 0, ties to even, e4m3 subnormals",
    input: {
      0: 0x43e0, 1: 0xc3e0, 2: 0x43d8 /* 432 */, 3: 0x43c8 /* 400 */, 4: 0x3b00 /* 2^-9 */, 5: 0x3a80 /* 2^-10 */,
      6: 0x3b40 /* 1.5*2^-9 */, 7: 0x3c00 /* 2^-7 */, 8: 0x3c80 /* 2^-6 */, 9: 0xbb80 /* -2^-8 */,
    },
    scale: 127,
    data: { 0: 0x7e, 1: 0xfe, 2: 0x7e, 3: 0x7c, 4: 0x01, 5: 0x00, 6: 0x02, 7: 0x04, 8: 0x08, 9: 0x82 },
  },
  {
    // 464 = 1.8125 * 2^8 would overflow 448 at s = 0: m > 1.75 -> s = 1 (byte 128). 464 / 2 = 232
    // lies halfway between 224 (0x76) and 240 (0x77): 0x76. 2 -> 1 (0x38), -3 -> -1.5 (0xBC),
    // 2^-8 -> 2^-9 (0x01).
    name: "amax 464 would pass 448: s = 1, tie to even",
    input: { 0: 0x43e8, 1: 0x4000, 2: 0xc040, 3: 0x3b80 },
    scale: 128,
    data: { 0: 0x76, 1: 0x38, 2: 0xbc, 3: 0x01 },
  },
  { name: "amax 480 (m = 1.875): s = 1, 240 -> 0x77", input: { 7: 0x43f0 }, scale: 128, data: { 7: 0x77 } },
  {
    // 1.0 = 1.0 * 2^0 -> s = -8 (byte 119): x * 256. 0.10009765625 (bf16 0x3DCD) * 256 = 25.625
    // = 1.6015625 * 2^4: mantissa 4.8125/8 rounds to 5 -> (11 << 3) | 5 = 0x5D.
    name: "amax 1: negative scale s = -8",
    input: { 0: 0x3f80, 1: 0xbf00 /* -0.5 */, 2: 0x3dcd },
    scale: 119,
    data: { 0: 0x78, 1: 0xf0, 2: 0x5d },
  },
  {
    // amax = 2^-127 (bf16 subnormal 0x0040): s = -135 clamped to -127 (byte 0). x / 2^-127:
    // 2^-133 -> 2^-6 (0x08), 2^-132 -> 2^-5 (0x10), -2^-133 -> 0x88, 2^-127 -> 1 (0x38).
    name: "subnormal bf16 inputs: scale clamped to 2^-127 (byte 0)",
    input: { 0: 0x0001, 1: 0x0002, 2: 0x8001, 3: 0x0040 },
    scale: 0,
    data: { 0: 0x08, 1: 0x10, 2: 0x88, 3: 0x38 },
  },
  {
    // amax = 2^-120: s = -128 clamped to -127: 2^-120 / 2^-127 = 128 (0x70), not 256.
    // 2^-126 -> 2 (0x40).
    name: "tiny normal amax 2^-120: s clamped at -127",
    input: { 0: 0x0380, 1: 0x0080 },
    scale: 0,
    data: { 0: 0x70, 1: 0x40 },
  },
  {
    // amax = the largest bf16 (1.9921875 * 2^127): s = 120 (byte 247); / 2^120 = 255 rounds up
    // to 256 (mantissa carry into the exponent): 0x78. 1.5 * 2^127 -> 192 (0x74).
    name: "largest bf16: s = 120, rounding carries into the exponent",
    input: { 0: 0x7f7f, 1: 0x7f40 },
    scale: 247,
    data: { 0: 0x78, 1: 0x74 },
  },
  { name: "NaN in a block: scale 0xFF, every element 0x7F", input: { 0: 0x3f80, 3: 0x7fc0, 9: 0x4380 }, scale: 0xff, data: {}, dataFill: 0x7f },
  { name: "negative NaN payload: scale 0xFF, data 0x7F", input: { 31: 0xffc1 }, fill: 0x3f80, scale: 0xff, data: {}, dataFill: 0x7f },
  { name: "+Inf in a block: scale 0xFF, data 0x7F", input: { 31: 0x7f80, 0: 0x3f80 }, scale: 0xff, data: {}, dataFill: 0x7f },
  { name: "-Inf in a block: scale 0xFF, data 0x7F", input: { 0: 0xff80 }, fill: 0xbf80, scale: 0xff, data: {}, dataFill: 0x7f },
];

export function mxfp8VectorInput(v: Mxfp8Vector): Uint16Array {
  const a = new Uint16Array(32).fill(v.fill ?? 0);
  for (const [i, bits] of Object.entries(v.input)) a[Number(i)] = bits;
  return a;
}

export function mxfp8VectorData(v: Mxfp8Vector): Uint8Array {
  const a = new Uint8Array(32).fill(v.dataFill ?? 0);
  for (const [i, b] of Object.entries(v.data)) a[Number(i)] = b;
  return a;
}

// ------------------------------------------------------------------------------------------------
// Checkpoints written for the tests (Hugging Face layout)

export interface RawTensor {
  dtype: string;
  shape: number[];
  data: Uint8Array | Uint16Array | Float32Array;
}
export type Tensors = Record<string, RawTensor>;

export const shardBytes = (tensors: [string, RawTensor][]): Uint8Array => serializeSafetensorsBytes(tensors.map(([name, t]) => ({ name, ...t })));

/** A checkpoint directory: `shards` files (tensors dealt out in turn) with an index, or one
 *  model.safetensors; config.json when given. */
export function writeCheckpoint(dir: string, tensors: Tensors, options: { shards?: number; config?: Record<string, unknown> } = {}): string {
  mkdirSync(dir, { recursive: true });
  const shards = options.shards ?? 1;
  const names = Object.keys(tensors);
  if (shards === 1) {
    writeFileSync(join(dir, "model.safetensors"), shardBytes(names.map((n) => [n, tensors[n]!])));
  } else {
    const file = (i: number) => `model-${String(i + 1).padStart(5, "0")}-of-${String(shards).padStart(5, "0")}.safetensors`;
    const weightMap: Record<string, string> = {};
    for (let i = 0; i < shards; ++i) {
      const mine = names.filter((_, j) => j % shards === i);
      for (const n of mine) weightMap[n] = file(i);
      writeFileSync(join(dir, file(i)), shardBytes(mine.map((n) => [n, tensors[n]!])));
    }
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: {}, weight_map: weightMap }));
  }
  if (options.config !== undefined) writeFileSync(join(dir, "config.json"), JSON.stringify(options.config));
  return dir;
}

/** Per-expert [gate, up, down] weights (bf16 bits) of E experts, as an MoE layer stores them. */
export function perExpertWeights(rng: Rng, E: number, H: number, I: number, gated: boolean) {
  return Array.from({ length: E }, () => ({
    gate: gated ? randBf16(rng, I * H, 1 / Math.sqrt(H)) : undefined,
    up: randBf16(rng, I * H, 1 / Math.sqrt(H)),
    down: randBf16(rng, H * I, 1 / Math.sqrt(I)),
  }));
}

/** Qwen-MoE-named tensors of gated `experts` in `layers.<layer>.mlp.experts.<e>`. */
export function putGatedExperts(tensors: Tensors, layer: number, experts: ReturnType<typeof perExpertWeights>, H: number, I: number): void {
  const bf16 = (shape: number[], data: Uint16Array): RawTensor => ({ dtype: "BF16", shape, data });
  experts.forEach((w, e) => {
    const p = `model.layers.${layer}.mlp.experts.${e}`;
    tensors[`${p}.gate_proj.weight`] = bf16([I, H], w.gate!);
    tensors[`${p}.up_proj.weight`] = bf16([I, H], w.up);
    tensors[`${p}.down_proj.weight`] = bf16([H, I], w.down);
  });
}
