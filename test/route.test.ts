// route (fmoe_route) on the host backend: hand-worked cases (ties, NaN, groups, bias), then the
// routers of the bench's models on fresh random logits against lib/reference.ts (f64).
// - Ids: equal to the reference's, token by token, wherever the reference's margin (its smallest
//   relative gap between two choices it decided between) exceeds 1e-5: an f32 softmax score is
//   within ~1e-6 of the exact one, relatively (exp of a rounded logit difference), so closer
//   choices may order the other way. At least 90% of the tokens must be compared that way, or
//   the test fails.
// - Weights: within 1e-5 (relative, or absolute below 1) of the reference's, on those tokens.
// Every token's ids must be distinct and in range. Then: capture and replay, a layer routed this
// way against the reference layer, and bad arguments refused with a message naming them.
import { describe, expect } from "bun:test";
import { FusedMoE, reference as R, route, type RouteOptions, type Rng, Status, TOLERANCE } from "../lib/index.ts";
import { checkReplay, expectClose, expectFmoe, expectNonZero, randBf16, randWeights, seededTest, suiteContext } from "./helpers.ts";

const ARG = Status.INVALID_ARGUMENT;

/** Routes on `x` and returns host copies of the outputs. */
function routeOn(x: ReturnType<ReturnType<typeof suiteContext>>, logits: Float32Array, T: number, E: number, o: Omit<RouteOptions, "logits" | "selectionBias"> & { bias?: Float32Array }) {
  using l = x.upload(logits, [T, E], "f32");
  using bias = o.bias && x.upload(o.bias, [E], "f32");
  const { bias: _, ...rest } = o;
  const out = route(x, { ...rest, logits: l, selectionBias: bias });
  using m = out.routingMap;
  using p = out.probs;
  return { ids: m.download(), probs: p.download() };
}

describe("route (host backend)", () => {
  const ctx = suiteContext("host");

  seededTest("hand-worked: softmax ties go to the lower id; weights renormalized, scaled", () => {
    // Logits 1, 3, 2, 3: ids 1 and 3 tie on top; their softmax scores are equal, so each weighs
    // 0.5 renormalized, times 2.
    const { ids, probs } = routeOn(ctx(), Float32Array.of(1, 3, 2, 3), 1, 4, { topk: 2, scale: 2 });
    expect(Array.from(ids)).toEqual([1, 3]);
    expectClose(probs, [1, 1], 1e-6, "weights");
    // Not renormalized: the scores themselves, e^0 / (e^-2 + 1 + e^-1 + 1).
    const s = 1 / (Math.exp(-2) + 2 + Math.exp(-1));
    const raw = routeOn(ctx(), Float32Array.of(1, 3, 2, 3), 1, 4, { topk: 3, renormalize: false });
    expect(Array.from(raw.ids)).toEqual([1, 3, 2]);
    expectClose(raw.probs, [s, s, Math.exp(-1) * s], 1e-6, "scores");
  });

  seededTest("hand-worked: sigmoid with a selection bias and groups; NaN ranks last", () => {
    // 8 experts in 4 groups of 2. Sigmoid scores of logits 0 are 0.5; the bias makes the choices
    // 0.5 + bias: group values (two best summed) 1.3, 1.1, 1.4, 1.0 -> groups 2 and 0 kept.
    const bias = Float32Array.of(0.1, 0.2, 0.0, 0.1, 0.3, 0.1, 0.0, 0.0);
    const { ids, probs } = routeOn(ctx(), new Float32Array(8), 1, 8, { topk: 3, scoring: "sigmoid", bias, numGroups: 4, topkGroups: 2 });
    expect(Array.from(ids)).toEqual([4, 1, 0]);
    expectClose(probs, [1 / 3, 1 / 3, 1 / 3], 1e-6, "weights: the unbiased scores, renormalized");
    // A NaN logit is never chosen before a number; NaNs among themselves by id.
    const nan = routeOn(ctx(), Float32Array.of(Number.NaN, -5, Number.NaN, 2), 1, 4, { topk: 4, scoring: "sigmoid", renormalize: false });
    expect(Array.from(nan.ids)).toEqual([3, 1, 0, 2]);
  });

  interface Router {
    name: string;
    E: number;
    o: Omit<RouteOptions, "logits" | "selectionBias">;
    bias?: boolean;
  }
  const ROUTERS: Router[] = [
    { name: "qwen3-30b-a3b (softmax, top-8 of 128, renormalized)", E: 128, o: { topk: 8 } },
    { name: "mixtral-8x7b (softmax, top-2 of 8)", E: 8, o: { topk: 2 } },
    { name: "gpt-oss-120b (softmax, top-4 of 128)", E: 128, o: { topk: 4 } },
    { name: "deepseek-v3 (sigmoid + bias, 8 groups, top-4 groups, top-8 of 256, scale 2.5)", E: 256, o: { topk: 8, scoring: "sigmoid", numGroups: 8, topkGroups: 4, scale: 2.5 }, bias: true },
    { name: "nemotron3-nano (sigmoid + bias, top-6 of 128, scale 2.5)", E: 128, o: { topk: 6, scoring: "sigmoid", scale: 2.5 }, bias: true },
    { name: "softmax with a bias, not renormalized", E: 64, o: { topk: 5, renormalize: false }, bias: true },
    { name: "groups of one expert, softmax, top-32", E: 64, o: { topk: 32, numGroups: 64, topkGroups: 40 } },
  ];

  for (const r of ROUTERS) {
    seededTest(`${r.name} against the reference (T = 0, 1, 37, 300)`, (rng) => {
      let compared = 0;
      for (const T of [0, 1, 37, 300]) compared += checkRouter(r, rng, T);
      expect(compared).toBeGreaterThanOrEqual(0.9 * 338);
    });
  }

  /** Checks one routing against the reference; returns the tokens whose ids were compared. */
  function checkRouter(r: Router, rng: Rng, T: number): number {
    const x = ctx();
    const logits = Float32Array.from({ length: T * r.E }, () => rng.normal() * 2);
    const bias = r.bias ? Float32Array.from({ length: r.E }, () => rng.normal() * 0.1) : undefined;
    const got = routeOn(x, logits, T, r.E, { ...r.o, bias });
    const k = r.o.topk;
    expect(got.ids.length).toBe(T * k);
    const ref = R.route({
      logits, numTokens: T, numExperts: r.E, topk: k, scoring: r.o.scoring ?? "softmax", selectionBias: bias,
      numGroups: r.o.numGroups, topkGroups: r.o.topkGroups, renormalize: r.o.renormalize ?? true, scale: r.o.scale ?? 1,
    });
    let compared = 0;
    for (let t = 0; t < T; ++t) {
      const ids = Array.from(got.ids.subarray(t * k, (t + 1) * k));
      expect(new Set(ids).size).toBe(k);
      for (const e of ids) expect(e >= 0 && e < r.E).toBe(true);
      if (ref.margin[t]! <= 1e-5) continue;
      ++compared;
      expect(ids).toEqual(Array.from(ref.routingMap.subarray(t * k, (t + 1) * k)));
      for (let j = 0; j < k; ++j) {
        const [a, b] = [got.probs[t * k + j]!, ref.probs[t * k + j]!];
        if (Math.abs(a - b) > 1e-5 * Math.max(1, Math.abs(b))) throw new Error(`token ${t} slot ${j}: weight ${a}, reference ${b}`);
      }
    }
    return compared;
  }

  seededTest("captured into a graph, replayed with new logits and bias", (rng) => {
    const x = ctx();
    const [T, E] = [19, 64];
    using s = x.createStream();
    using logits = x.upload(Float32Array.from({ length: T * E }, () => rng.normal()), [T, E], "f32");
    using bias = x.upload(Float32Array.from({ length: E }, () => rng.normal() * 0.1), [E], "f32");
    using routingMap = x.empty([T, 6], "i32");
    using probs = x.empty([T, 6], "f32");
    checkReplay(
      x,
      s,
      [
        [logits, () => Float32Array.from({ length: T * E }, () => rng.normal())],
        [bias, () => Float32Array.from({ length: E }, () => rng.normal() * 0.1)],
      ],
      [routingMap, probs],
      (stream) => void route(x, { logits, topk: 6, scoring: "sigmoid", selectionBias: bias, numGroups: 4, topkGroups: 2, out: { routingMap, probs }, stream }),
    );
  });

  seededTest("a layer routed by route() computes the reference layer on the reference's routing", (rng) => {
    const x = ctx();
    const [T, H, I, E, topk] = [23, 64, 32, 16, 4];
    const logits = Float32Array.from({ length: T * E }, () => rng.normal() * 2);
    const fc1 = randWeights(rng, E, 2 * I, H);
    const fc2 = randWeights(rng, E, H, I);
    const hidden = randBf16(rng, T * H);
    using l = x.upload(logits, [T, E], "f32");
    using w1 = x.upload(fc1, [E, 2 * I, H], "bf16");
    using w2 = x.upload(fc2, [E, H, I], "bf16");
    using h = x.upload(hidden, [T, H], "bf16");
    const routed = route(x, { logits: l, topk });
    using m = routed.routingMap;
    using p = routed.probs;
    using moe = new FusedMoE(x, { hidden: H, ffn: I, numExperts: E, topk, activation: "silu", maxTokens: T }, { fc1: w1, fc2: w2 });
    using out = moe.forward({ hidden: h, routingMap: m, probs: p });
    const ref = R.route({ logits, numTokens: T, numExperts: E, topk, scoring: "softmax", renormalize: true, scale: 1 });
    const want = R.fusedMoe({ hidden: H, ffn: I, numExperts: E, topk, activation: "silu" }, { fc1, fc2 }, { hidden, numTokens: T, routingMap: ref.routingMap, probs: ref.probs });
    expectNonZero(want.out, "reference");
    expectClose(out.download(), want.out, TOLERANCE.bf16, "layer");
  });

  seededTest("FusedMoE with a router routes its logits: route() then forward(), bit for bit, eagerly and replayed", (rng) => {
    const x = ctx();
    const [T, H, I, E, topk] = [21, 64, 32, 32, 4];
    const router = { scoring: "sigmoid", numGroups: 4, topkGroups: 2, scale: 2.5 } as const;
    using w1 = x.upload(randWeights(rng, E, 2 * I, H), [E, 2 * I, H], "bf16");
    using w2 = x.upload(randWeights(rng, E, H, I), [E, H, I], "bf16");
    using bias = x.upload(Float32Array.from({ length: E }, () => rng.normal() * 0.1), [E], "f32");
    using h = x.upload(randBf16(rng, T * H), [T, H], "bf16");
    using logits = x.upload(Float32Array.from({ length: T * E }, () => rng.normal() * 2), [T, E], "f32");
    const config = { hidden: H, ffn: I, numExperts: E, topk, activation: "silu", maxTokens: T } as const;
    using routed = new FusedMoE(x, { ...config, router }, { fc1: w1, fc2: w2, selectionBias: bias });
    using plain = new FusedMoE(x, config, { fc1: w1, fc2: w2 });
    const direct = () => {
      const r = route(x, { logits, topk, ...router, selectionBias: bias });
      using m = r.routingMap;
      using p = r.probs;
      using out = plain.forward({ hidden: h, routingMap: m, probs: p });
      return out.download();
    };
    {
      using out = routed.forward({ hidden: h, routerLogits: logits });
      const want = direct();
      expectNonZero(want, "route() then forward()");
      expect(Buffer.from(out.download().buffer).equals(Buffer.from(want.buffer))).toBe(true);
    }
    using s = x.createStream();
    using out = x.empty([T, H], "bf16");
    checkReplay(x, s, [[logits, () => Float32Array.from({ length: T * E }, () => rng.normal() * 2)]], [out], (stream) => void routed.forward({ hidden: h, routerLogits: logits, out, stream }));
    expect(Buffer.from(out.download().buffer).equals(Buffer.from(direct().buffer))).toBe(true);
    // Fewer tokens than maxTokens route into the front of the layer's buffers.
    using few = routed.forward({ hidden: h.view(0, [5, H]), routerLogits: logits.view(0, [5, E]) });
    expect(Buffer.from(few.download().buffer).equals(Buffer.from(direct().subarray(0, 5 * H).buffer.slice(0, 5 * H * 2)))).toBe(true);
    // Refused: logits without a router, both kinds of routing, a bias without a router, shapes.
    using m = x.empty([T, topk], "i32");
    expectFmoe(() => plain.forward({ hidden: h, routerLogits: logits }), ARG, "config.router");
    expectFmoe(() => routed.forward({ hidden: h, routerLogits: logits, routingMap: m }), ARG, "not both");
    expectFmoe(() => routed.forward({ hidden: h, routerLogits: logits.view(0, [T, E / 2]) }), ARG, "routerLogits", `[${T}, ${E}]`);
    expectFmoe(() => new FusedMoE(x, config, { fc1: w1, fc2: w2, selectionBias: bias }), ARG, "selectionBias", "config.router");
    expectFmoe(() => new FusedMoE(x, { ...config, router: { groups: 2 } as never }, { fc1: w1, fc2: w2 }), ARG, '"groups"');
    // A router route() cannot run is refused when the layer is made, and leaves nothing behind.
    const live = x.liveAllocations().count;
    expectFmoe(() => new FusedMoE(x, { ...config, router: { numGroups: 3 } }, { fc1: w1, fc2: w2 }), ARG, "num_groups", "divide");
    expectFmoe(() => new FusedMoE(x, { ...config, router: { numGroups: 16, topkGroups: 1 } }, { fc1: w1, fc2: w2 }), ARG, "topk");
    expect(x.liveAllocations().count).toBe(live);
  });

  seededTest("bad arguments are refused, naming them", (rng) => {
    const x = ctx();
    using l = x.upload(Float32Array.from({ length: 2 * 16 }, () => rng.normal()), [2, 16], "f32");
    using bf = x.upload(randBf16(rng, 32), [2, 16], "bf16");
    using shortBias = x.upload(new Float32Array(8), [8], "f32");
    expectFmoe(() => route(x, { logits: l, topk: 33 }), ARG, "topk");
    expectFmoe(() => route(x, { logits: l, topk: 17 }), ARG, "topk");
    expectFmoe(() => route(x, { logits: l, topk: 0 }), ARG, "topk");
    expectFmoe(() => route(x, { logits: l, topk: 2, numGroups: 3 }), ARG, "num_groups", "divide");
    expectFmoe(() => route(x, { logits: l, topk: 2, numGroups: 4, topkGroups: 5 }), ARG, "topk_groups");
    expectFmoe(() => route(x, { logits: l, topk: 9, numGroups: 4, topkGroups: 2 }), ARG, "topk", "8");
    expectFmoe(() => route(x, { logits: l, topk: 2, scoring: "relu" as never }), ARG, "scoring", "relu");
    expectFmoe(() => route(x, { logits: l, topk: 2, scale: Number.NaN }), ARG, "scale");
    expectFmoe(() => route(x, { logits: bf, topk: 2 }), ARG, "logits", "f32");
    expectFmoe(() => route(x, { logits: l, topk: 2, selectionBias: shortBias }), ARG, "selectionBias", "[16]");
    expectFmoe(() => route(x, { logits: l, topk: 2, topK: 3 } as never), ARG, '"topK"');
    using small = x.empty([2, 1], "i32");
    expectFmoe(() => route(x, { logits: l, topk: 2, out: { routingMap: small } }), ARG, "out.routingMap", "[2, 2]");
  });
});
