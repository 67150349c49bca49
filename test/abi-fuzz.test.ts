// The raw C ABI under random arguments. Each round builds a small valid call of one op, with random
// device-side contents where the ABI promises to cope with any (routing ids out of range, group
// offsets that decrease or pass the rows, row maps and inverse maps pointing anywhere, counts of
// tokens per expert beyond the rows), makes it, then makes it again with one to three integer
// fields set to edge values (0, -1, 31, 33, 2^31, 2^62, ...) or a pointer swapped for NULL or for a
// buffer a few bytes short. Every call must return, either done or refused with an FmoeError whose
// message starts with the function's name; none may fault, hang or leave an allocation behind.
// Under `npm run sanitize:host` (ASan + UBSan) the same rounds also catch an overflowing size
// check or an out-of-bounds access. Results are not compared here: the op suites do that.
import { describe, expect } from "bun:test";
import { FmoeError, type Rng } from "../lib/index.ts";
import * as ffi from "../lib/ffi.ts";
import { CUDA_DEVICES, seededTest, suiteContext } from "./helpers.ts";

const EDGES = [
  0, 1, -1, 2, 3, 7, 8, 16, 31, 32, 33, 64, 127, 128, 255, 256, 1024, 2 ** 31 - 1, 2 ** 31, -(2 ** 31),
  2 ** 32 + 1, 2 ** 40, 2 ** 52, 2 ** 62, -(2 ** 62), 2 ** 63 - 2 ** 10,
];
// FMOE_FUZZ_ROUNDS sets fewer (under compute-sanitizer, whose launches are slow) or more.
const ROUNDS_PER_OP = Number(process.env.FMOE_FUZZ_ROUNDS ?? 400);

type Fields = Record<string, number>;

/** One op's valid call: its fields, the byte sizes of its buffers, the integer fields to mutate. */
interface Case {
  readonly fn: string;
  readonly fields: Fields;
  readonly sizes: Record<string, number>;
  readonly ints: readonly string[];
  readonly call: (fields: Fields) => void;
}

/** Allocations and random contents for one round; everything is freed by `release`. */
class Round {
  private readonly live: number[] = [];
  constructor(
    private readonly ctx: number,
    readonly rng: Rng,
  ) {}

  pick<T>(a: readonly T[]): T {
    return a[this.rng.int(a.length)]!;
  }

  /** `bytes` of random content, or shaped by `fill` (which gets a view of the whole buffer). */
  buffer(bytes: number, fill?: (view: DataView) => void): number {
    const address = ffi.alloc(this.ctx, bytes);
    this.live.push(address);
    const host = new Uint8Array(bytes);
    for (let i = 0; i < bytes; ++i) host[i] = this.rng.int(256);
    fill?.(new DataView(host.buffer));
    if (bytes > 0) ffi.memcpy(this.ctx, address, host, bytes, ffi.MemcpyKind.HostToDevice, 0);
    return address;
  }

  i32(count: number, value: () => number): number {
    return this.buffer(count * 4, (v) => {
      for (let i = 0; i < count; ++i) v.setInt32(4 * i, value(), true);
    });
  }

  f32(count: number): number {
    return this.buffer(count * 4, (v) => {
      for (let i = 0; i < count; ++i) v.setFloat32(4 * i, this.rng.uniform() * 4 - 2, true);
    });
  }

  /** Finite bf16 values of magnitude 2^-8..2^7 (random bytes would be NaN and Inf often). */
  bf16(count: number): number {
    return this.buffer(count * 2, (v) => {
      for (let i = 0; i < count; ++i) v.setUint16(2 * i, ((this.rng.int(2) << 15) | ((119 + this.rng.int(16)) << 7) | this.rng.int(128)), true);
    });
  }

  /** Mostly in [0, limit), else out of range either way. */
  index(limit: number): number {
    return this.rng.uniform() < 0.8 ? this.rng.int(Math.max(limit, 1)) : this.pick([-1, -2, limit, limit + 1, 2 ** 31 - 1, -(2 ** 31)]);
  }

  maybe(p: number, make: () => number): number {
    return this.rng.uniform() < p ? make() : 0;
  }

  /** A copy of `c.fields` with one to three fields at edge values, or a pointer NULL or short. */
  mutate(c: Case): Fields {
    const fields = { ...c.fields };
    const pointers = Object.keys(c.sizes).filter((name) => fields[name] !== 0);
    for (let i = 1 + this.rng.int(3); i > 0; --i) {
      if (pointers.length === 0 || this.rng.uniform() < 0.75) {
        fields[this.pick(c.ints)] = this.pick(EDGES);
      } else {
        const name = this.pick(pointers);
        fields[name] = this.rng.uniform() < 0.5 ? 0 : this.buffer(Math.max(0, c.sizes[name]! - this.pick([1, 2, 4, 64])));
      }
    }
    return fields;
  }

  release(): void {
    ffi.contextSynchronize(this.ctx);
    while (this.live.length > 0) ffi.free(this.ctx, this.live.pop()!);
  }
}

// ------------------------------------------------------------------------------------------------
// One valid call per op, on random small shapes.

function permuteCase(r: Round, h: number): Case {
  const T = r.pick([0, 1, 2, 5, 9]), H = r.pick([32, 64, 96]), E = r.pick([1, 3, 4, 8]);
  const topk = 1 + r.rng.int(Math.min(E, 3)), start = r.rng.int(E), local = 1 + r.rng.int(E - start);
  const alignment = r.pick([1, 8, 16]), rows = ffi.maxRows(T, topk, local, alignment), q = r.rng.uniform() < 0.3;
  const sizes = {
    hidden: T * H * 2, routing_map: T * topk * 4, probs: T * topk * 4, permuted: rows * H * 2, permuted_q: rows * H,
    permuted_scale: (rows * H) / 32, expert_offsets: (local + 1) * 4, permutation_map: rows * 4, inverse_map: T * topk * 4, invalid_count: 4,
  };
  const fields: Fields = {
    hidden: r.bf16(T * H), routing_map: r.i32(T * topk, () => r.index(E)), probs: r.maybe(0.5, () => r.f32(T * topk)),
    permuted: q ? 0 : r.buffer(sizes.permuted), permuted_q: q ? r.buffer(sizes.permuted_q) : 0, permuted_scale: q ? r.buffer(sizes.permuted_scale) : 0,
    expert_offsets: r.buffer(sizes.expert_offsets), permutation_map: r.buffer(sizes.permutation_map), inverse_map: r.buffer(sizes.inverse_map),
    invalid_count: r.maybe(0.5, () => r.i32(1, () => 0)), num_tokens: T, hidden_size: H, topk, num_experts: E,
    local_expert_start: start, num_local_experts: local, alignment,
  };
  const ints = ["num_tokens", "hidden_size", "topk", "num_experts", "local_expert_start", "num_local_experts", "alignment"];
  return { fn: "fmoe_permute", fields, sizes, ints, call: (f) => ffi.permute(h, 0, f) };
}

function activationCase(r: Round, h: number): Case {
  const I = r.pick([32, 64]), act = r.rng.int(4), n1 = act === 0 ? I : 2 * I, rows = r.pick([0, 1, 5, 17]), q = r.rng.uniform() < 0.4;
  const sizes = { input: rows * n1 * 2, output: rows * I * 2, output_q: rows * I, output_scale: (rows * I) / 32, row_map: rows * 4, n_used: 4 };
  const fields: Fields = {
    input: r.bf16(rows * n1), output: q ? 0 : r.buffer(sizes.output), output_q: q ? r.buffer(sizes.output_q) : 0,
    output_scale: q ? r.buffer(sizes.output_scale) : 0, row_map: r.maybe(0.5, () => r.i32(rows, () => r.index(rows))),
    n_used: r.maybe(0.5, () => r.i32(1, () => r.index(rows + 1))), rows, ffn: I, activation: act, layout: r.rng.int(2), alpha: 1.702, limit: 7,
  };
  return { fn: "fmoe_activation_quant", fields, sizes, ints: ["rows", "ffn", "activation", "layout"], call: (f) => ffi.activationQuant(h, 0, f) };
}

function groupedMmCase(r: Round, h: number, mx: boolean): Case {
  const groups = r.pick([1, 2, 3]), rows = r.pick([0, 1, 8, 17]), n = r.pick([8, 16, 48]), k = r.pick([32, 64]), eb = mx ? 1 : 2;
  const sizes = {
    a: rows * k * eb, a_scale: (rows * k) / 32, b: groups * n * k * eb, b_scale: (groups * n * k) / 32, bias: groups * n * 4,
    c: rows * n * 2, group_offsets: (groups + 1) * 4, row_map: rows * 4,
  };
  const fields: Fields = {
    a: mx ? r.buffer(sizes.a) : r.bf16(rows * k), a_scale: mx ? r.buffer(sizes.a_scale) : 0,
    b: mx ? r.buffer(sizes.b) : r.bf16(groups * n * k), b_scale: mx ? r.buffer(sizes.b_scale) : 0,
    bias: r.maybe(0.3, () => r.f32(groups * n)), c: r.buffer(sizes.c), group_offsets: r.i32(groups + 1, () => r.index(rows + 1)),
    row_map: r.maybe(0.3, () => r.i32(rows, () => r.index(rows))), rows, n, k, groups,
  };
  const op = mx ? ffi.groupedMmMxfp8 : ffi.groupedMmBf16;
  return { fn: mx ? "fmoe_grouped_mm_mxfp8" : "fmoe_grouped_mm_bf16", fields, sizes, ints: ["rows", "n", "k", "groups"], call: (f) => op(h, 0, f) };
}

function unpermuteCase(r: Round, h: number): Case {
  const T = r.pick([0, 1, 2, 5, 9]), H = r.pick([32, 64, 96]), topk = r.pick([1, 2, 3]), rows = r.pick([0, 1, 8, 20]);
  const sizes = { input: rows * H * 2, inverse_map: T * topk * 4, probs: T * topk * 4, output: T * H * 2 };
  const fields: Fields = {
    input: r.bf16(rows * H), inverse_map: r.i32(T * topk, () => r.index(rows)), probs: r.maybe(0.5, () => r.f32(T * topk)),
    output: r.buffer(sizes.output), rows, num_tokens: T, hidden_size: H, topk,
  };
  return { fn: "fmoe_unpermute", fields, sizes, ints: ["rows", "num_tokens", "hidden_size", "topk"], call: (f) => ffi.unpermute(h, 0, f) };
}

function routeCase(r: Round, h: number): Case {
  const T = r.pick([0, 1, 2, 5, 9]), groups = r.pick([0, 1, 2, 4]), E = groups * r.pick([1, 2, 4]) || r.pick([1, 3, 8]);
  const topk = 1 + r.rng.int(Math.min(E, 4));
  const sizes = { logits: T * E * 4, selection_bias: E * 4, routing_map: T * topk * 4, probs: T * topk * 4 };
  const fields: Fields = {
    logits: r.f32(T * E), selection_bias: r.maybe(0.5, () => r.f32(E)), routing_map: r.buffer(sizes.routing_map), probs: r.buffer(sizes.probs),
    num_tokens: T, num_experts: E, topk, scoring: r.rng.int(2), num_groups: groups, topk_groups: groups > 0 ? 1 + r.rng.int(groups) : 0,
    renormalize: r.rng.int(2), scale: 1,
  };
  const ints = ["num_tokens", "num_experts", "topk", "scoring", "num_groups", "topk_groups", "renormalize"];
  return { fn: "fmoe_route", fields, sizes, ints, call: (f) => ffi.route(h, 0, f) };
}

/** quantize, dequantize, swizzle, unswizzle: positional arguments, mutated the same way. */
function scalesCase(r: Round, h: number): Case {
  const rows = r.pick([0, 1, 3]), cols = r.pick([32, 64]), batch = r.pick([1, 2]), which = r.rng.int(4), sc = cols / 32;
  const swizzled = ffi.swizzledScaleBytes(batch, rows, sc);
  if (which === 0) {
    const sizes = { input: rows * cols * 2, data: rows * cols, scale: rows * sc };
    const fields = { input: r.bf16(rows * cols), data: r.buffer(sizes.data), scale: r.buffer(sizes.scale), rows, cols };
    return { fn: "fmoe_quantize_mxfp8", fields, sizes, ints: ["rows", "cols"], call: (f) => ffi.quantizeMxfp8(h, 0, f.input!, f.rows!, f.cols!, f.data!, f.scale!) };
  }
  if (which === 1) {
    const sizes = { data: rows * cols, scale: rows * sc, out: rows * cols * 4 };
    const fields = { data: r.buffer(sizes.data), scale: r.buffer(sizes.scale), out: r.buffer(sizes.out), rows, cols };
    return { fn: "fmoe_dequantize_mxfp8", fields, sizes, ints: ["rows", "cols"], call: (f) => ffi.dequantizeMxfp8(h, 0, f.data!, f.scale!, f.rows!, f.cols!, f.out!) };
  }
  const to = which === 2;
  const sizes = { input: to ? batch * rows * sc : swizzled, out: to ? swizzled : batch * rows * sc };
  const fields = { input: r.buffer(sizes.input), out: r.buffer(sizes.out), batch, rows, sc };
  const op = to ? ffi.swizzleScales : ffi.unswizzleScales;
  return {
    fn: to ? "fmoe_swizzle_scales" : "fmoe_unswizzle_scales", fields, sizes, ints: ["batch", "rows", "sc"],
    call: (f) => op(h, 0, f.input!, f.batch!, f.rows!, f.sc!, f.out!),
  };
}

/** A plan (its description valid, or mutated) and, where it was made, a fused_moe call on it. */
function fusedMoeRound(r: Round, h: number, tally: Tally): void {
  const H = r.pick([32, 64]), I = r.pick([32, 64]), E = r.pick([1, 3, 4]), start = r.rng.int(E), local = 1 + r.rng.int(E - start);
  const topk = 1 + r.rng.int(Math.min(E, 3)), act = r.rng.int(4), mx = r.rng.uniform() < 0.4, T = r.pick([0, 1, 2, 5]);
  const desc: Fields = {
    hidden_size: H, ffn: I, num_experts: E, num_local_experts: local, local_expert_start: start, topk, activation: act, layout: r.rng.int(2),
    alpha: 1.702, limit: 7, weight_format: mx ? 1 : 0, alignment: r.pick([1, 8, 16]), max_tokens: Math.max(T, 1) + r.rng.int(4),
    apply_router_weight_on_input: 0,
  };
  const descCase: Case = { fn: "fmoe_plan_create", fields: desc, sizes: {}, ints: Object.keys(desc).filter((k) => k !== "alpha" && k !== "limit"), call: () => {} };
  const d = r.rng.uniform() < 0.5 ? desc : r.mutate(descCase);
  let plan = 0;
  tally.run("fmoe_plan_create", () => {
    plan = ffi.planCreate(h, d);
  });
  if (plan === 0) return;
  try {
    const ws = ffi.planWorkspaceBytes(plan);
    const [dh, di, dl, dk] = [d.hidden_size!, d.ffn!, d.num_local_experts!, d.topk!];
    const n1 = d.activation === 0 ? di : 2 * di, eb = d.weight_format === 1 ? 1 : 2;
    if (dh * di * dl > 2 ** 20 || ws > 2 ** 22) return; // a mutated plan too large to fill here
    const grouped = r.rng.uniform() < 0.3;
    const sizes = {
      hidden: T * dh * 2, routing_map: T * dk * 4, probs: (grouped ? T : T * dk) * 4, tokens_per_expert: dl * 4, fc1: dl * n1 * dh * eb,
      fc1_scale: (dl * n1 * dh) / 32, fc2: dl * dh * di * eb, fc2_scale: (dl * dh * di) / 32, fc1_bias: dl * n1 * 4, fc2_bias: dl * dh * 4,
      output: T * dh * 2, workspace: ws,
    };
    const fields: Fields = {
      hidden: r.bf16(T * dh), routing_map: grouped ? 0 : r.i32(T * dk, () => r.index(d.num_experts!)),
      tokens_per_expert: grouped ? r.i32(dl, () => r.index(T + 1)) : 0, probs: r.f32(sizes.probs / 4),
      fc1: eb === 2 ? r.bf16(dl * n1 * dh) : r.buffer(sizes.fc1), fc1_scale: eb === 1 ? r.buffer(sizes.fc1_scale) : 0,
      fc2: eb === 2 ? r.bf16(dl * dh * di) : r.buffer(sizes.fc2), fc2_scale: eb === 1 ? r.buffer(sizes.fc2_scale) : 0,
      fc1_bias: r.maybe(0.3, () => r.f32(dl * n1)), fc2_bias: r.maybe(0.3, () => r.f32(dl * dh)), output: r.buffer(sizes.output),
      workspace: r.buffer(ws), workspace_bytes: ws, num_tokens: T,
    };
    const c: Case = { fn: "fmoe_fused_moe", fields, sizes, ints: ["num_tokens", "workspace_bytes"], call: (f) => ffi.fusedMoe(plan, 0, f) };
    tally.run(c.fn, () => c.call(c.fields));
    tally.run(c.fn, () => c.call(r.mutate(c)));
  } finally {
    ffi.planDestroy(h, plan);
  }
}

// ------------------------------------------------------------------------------------------------

/** Calls made and refused per function; a throw other than the function's own FmoeError fails. */
class Tally {
  readonly done = new Map<string, number>();
  readonly refused = new Map<string, number>();

  run(fn: string, call: () => void): void {
    try {
      call();
      this.done.set(fn, (this.done.get(fn) ?? 0) + 1);
    } catch (err) {
      if (!(err instanceof FmoeError) || !err.message.startsWith(`${fn}: `)) {
        throw new Error(`${fn}: expected a return or an FmoeError naming ${fn}, got ${String(err)}`);
      }
      this.refused.set(fn, (this.refused.get(fn) ?? 0) + 1);
    }
  }
}

/** ROUNDS_PER_OP rounds of `body`, each with its own allocations; none may outlive its round. */
function fuzzRounds(h: number, rng: Rng, body: (round: Round, tally: Tally) => void): Tally {
  const before = ffi.contextLiveAllocations(h).count;
  const tally = new Tally();
  for (let i = 0; i < ROUNDS_PER_OP; ++i) {
    const round = new Round(h, rng);
    try {
      body(round, tally);
    } finally {
      round.release();
    }
  }
  expect(ffi.contextLiveAllocations(h).count).toBe(before);
  return tally;
}

function fuzzSuite(backend: "host" | "cuda"): void {
  const ctx = suiteContext(backend);
  const ops: [string, (r: Round, h: number) => Case][] = [
    ["permute", permuteCase],
    ["activation_quant", activationCase],
    ["grouped_mm_bf16", (r, h) => groupedMmCase(r, h, false)],
    ["grouped_mm_mxfp8", (r, h) => groupedMmCase(r, h, true)],
    ["unpermute", unpermuteCase],
    ["route", routeCase],
    ["quantize, dequantize, swizzle, unswizzle", scalesCase],
  ];
  for (const [name, make] of ops) {
    seededTest(`${backend}: ${name}, valid and mutated calls`, (rng) => {
      const h = ctx()._handle;
      const tally = fuzzRounds(h, rng, (round, t) => {
        const c = make(round, h);
        t.run(c.fn, () => c.call(c.fields));
        t.run(c.fn, () => c.call(round.mutate(c)));
      });
      // Both outcomes happen, or the rounds test nothing: most valid calls are done, and the
      // mutated ones are refused often (edge values mostly break a call).
      const done = [...tally.done.values()].reduce((a, b) => a + b, 0);
      const refused = [...tally.refused.values()].reduce((a, b) => a + b, 0);
      expect(done).toBeGreaterThan(ROUNDS_PER_OP / 2);
      expect(refused).toBeGreaterThan(ROUNDS_PER_OP / 4);
    });
  }

  seededTest(`${backend}: plans and fused_moe, valid and mutated`, (rng) => {
    const h = ctx()._handle;
    const tally = fuzzRounds(h, rng, (round, t) => fusedMoeRound(round, h, t));
    expect(tally.done.get("fmoe_plan_create") ?? 0).toBeGreaterThan(ROUNDS_PER_OP / 4);
    expect(tally.refused.get("fmoe_plan_create") ?? 0).toBeGreaterThan(ROUNDS_PER_OP / 8);
    expect(tally.done.get("fmoe_fused_moe") ?? 0).toBeGreaterThan(ROUNDS_PER_OP / 8);
    expect(tally.refused.get("fmoe_fused_moe") ?? 0).toBeGreaterThan(0);
  });
}

describe("abi fuzz: host backend", () => fuzzSuite("host"));
describe.skipIf(CUDA_DEVICES === 0)("abi fuzz: cuda backend (device-side contents out of range)", () => fuzzSuite("cuda"));
