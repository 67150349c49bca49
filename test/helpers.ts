/**
 * Shared fixtures of the test suites: the seed, backend contexts, random inputs, and the two ways
 * results are compared (bit for bit, or relative Frobenius norm against lib/reference.ts with the
 * TOLERANCE table).
 *
 * Seeds: every run draws fresh inputs. The base seed comes from FMOE_TEST_SEED, else the clock;
 * each test derives its own seed from the base and its title, so a failing test reports a seed
 * that reproduces it alone (`FMOE_TEST_SEED=<base> bun test -t '<title>'`).
 */
import { afterAll, beforeAll, test } from "bun:test";
import {
  Context,
  type BackendChoice,
  FmoeError,
  randomRouting,
  relFrobenius,
  Rng,
  Status,
  type Tensor,
} from "../lib/index.ts";
import { bf16ToF32 } from "../lib/dtype.ts";

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

/** Runs `fn` and returns the FmoeError it throws (fails when it does not throw one). */
export function catchFmoe(fn: () => unknown): FmoeError {
  try {
    fn();
  } catch (err) {
    if (err instanceof FmoeError) return err;
    throw new Error(`expected an FmoeError, got ${err instanceof Error ? `${err.name}: ${err.message}` : String(err)}`);
  }
  throw new Error("expected an FmoeError, nothing was thrown");
}

/** Throws unless `fn` throws FmoeError with `code` and a message matching every `names`. */
export function expectFmoe(fn: () => unknown, code: Status, ...names: (string | RegExp)[]): FmoeError {
  const err = catchFmoe(fn);
  if (err.code !== code) throw new Error(`expected status ${Status[code]}, got ${err.statusName}: ${err.message}`);
  for (const n of names) {
    const ok = typeof n === "string" ? err.message.includes(n) : n.test(err.message);
    if (!ok) throw new Error(`error message does not name ${String(n)}: "${err.message}"`);
  }
  return err;
}

/** Downloads a tensor after filling it with the 0xFF poison first: convenience for outputs. */
export function poisoned<T extends Tensor>(t: T): T {
  return t.fill(0xff);
}
