#!/usr/bin/env bun
/**
 * bun run demo [--backend auto|host|cuda] [--tokens T] [--weights bf16|mxfp8]
 *
 * Runs one real MoE layer shape (qwen3-30b-a3b: H 2048, I 768, 128 experts, top-8, SwiGLU) on the
 * best backend present and checks it: on the host backend against lib/reference.ts, on CUDA
 * against the host backend (on the first tokens: every token is computed independently).
 */
import { parseArgs } from "node:util";
import { BENCH_CASES, Context, FmoeError, fc1Outputs, FusedMoE, randomRouting, reference, relFrobenius, Rng, TOLERANCE } from "../lib/index.ts";

const { values } = parseArgs({
  options: {
    backend: { type: "string", default: "auto" },
    tokens: { type: "string" },
    weights: { type: "string", default: "bf16" },
    help: { type: "boolean", short: "h" },
  },
});
if (values.help) {
  console.log("usage: bun run demo [--backend auto|host|cuda] [--tokens T] [--weights bf16|mxfp8]");
  process.exit(0);
}
const backendArg = values.backend;
if (backendArg !== "auto" && backendArg !== "host" && backendArg !== "cuda") {
  console.error(`demo: --backend must be auto, host or cuda`);
  process.exit(2);
}
const weightFormat = values.weights === "mxfp8" ? "mxfp8" : "bf16";

const shape = BENCH_CASES.find((c) => c.name === "qwen3-30b-a3b")!;
const H = shape.hidden;
const I = shape.ffn;
const E = shape.experts;
const N1 = fc1Outputs(shape.activation, I);

function log(message: string): void {
  console.log(`demo: ${message}`);
}

function seconds(ms: number): string {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(2)} ms`;
}

/**
 * Random bf16 weights, normal / sqrt(fan_in): a pool of normal values copied with a shifting
 * start, because drawing 600M normals one by one takes far longer than the layer itself.
 */
function randomWeights(rng: Rng, n: number, fanIn: number): Uint16Array {
  const pool = rng.bf16Normal(1 << 22, 1 / Math.sqrt(fanIn));
  const out = new Uint16Array(n);
  let done = 0;
  let shift = 0;
  while (done < n) {
    shift = (shift + 104729) % (pool.length >> 1);
    const len = Math.min(n - done, pool.length - shift);
    out.set(pool.subarray(shift, shift + len), done);
    done += len;
  }
  return out;
}

function main(): void {
  log(`library: ${Context.buildInfo()}`);
  using ctx = Context.create({ backend: backendArg as "auto" | "host" | "cuda" });
  log(`backend ${ctx.backend}, device ${ctx.deviceName}`);
  // Host: a decode-sized batch that runs in seconds on a laptop; CUDA: a prefill-sized one.
  const T = values.tokens !== undefined ? Number(values.tokens) : ctx.backend === "cuda" ? 2048 : 16;
  if (!Number.isSafeInteger(T) || T < 1) {
    console.error("demo: --tokens must be a positive integer");
    process.exit(2);
  }
  log(`layer ${shape.name}: H ${H}, I ${I}, ${E} experts, top-${shape.topk}, ${shape.activation}, ${weightFormat} weights, T ${T}`);

  const rng = new Rng(2024);
  let t0 = performance.now();
  log(`generating ${((E * (N1 * H + H * I) * 2) / 2 ** 30).toFixed(2)} GiB of bf16 weights...`);
  const fc1 = randomWeights(rng, E * N1 * H, H);
  const fc2 = randomWeights(rng, E * H * I, I);
  const hidden = rng.bf16Normal(T * H);
  const { routingMap, probs } = randomRouting(rng, T, E, shape.topk);
  log(`  done in ${seconds(performance.now() - t0)}`);

  const config = { hidden: H, ffn: I, numExperts: E, topk: shape.topk, activation: shape.activation, weightFormat, maxTokens: T } as const;
  t0 = performance.now();
  using fc1T = ctx.upload(fc1, [E, N1, H]);
  using fc2T = ctx.upload(fc2, [E, H, I]);
  using moe = new FusedMoE(ctx, config, { fc1: fc1T, fc2: fc2T });
  using hT = ctx.upload(hidden, [T, H]);
  using rT = ctx.upload(routingMap, [T, shape.topk]);
  using pT = ctx.upload(probs, [T, shape.topk]);
  using out = ctx.empty([T, H], "bf16");
  ctx.synchronize();
  log(`uploaded weights and inputs, workspace ${(moe.workspaceBytes / 2 ** 20).toFixed(1)} MiB, in ${seconds(performance.now() - t0)}`);

  using stream = ctx.createStream();
  const run = (): void => {
    moe.forward({ hidden: hT, routingMap: rT, probs: pT, out, stream });
  };
  run(); // warm-up
  const iters = ctx.backend === "cuda" ? 20 : 3;
  const times: number[] = [];
  for (let i = 0; i < iters; ++i) times.push(ctx.time(stream, run));
  times.sort((a, b) => a - b);
  const ms = times[times.length >> 1]!;
  const flops = 2 * T * shape.topk * (N1 * H + H * I);
  log(`forward: ${seconds(ms)} (median of ${iters}), ${(flops / (ms * 1e6)).toFixed(1)} GFLOP/s`);
  const result = out.download();

  if (ctx.backend === "host") {
    t0 = performance.now();
    log("computing the TypeScript reference...");
    const ref = reference.fusedMoe(config, { fc1, fc2 }, { hidden, numTokens: T, routingMap, probs });
    const err = relFrobenius(result, ref.out);
    const tol = weightFormat === "mxfp8" ? TOLERANCE.mxfp8 : TOLERANCE.bf16;
    log(`  done in ${seconds(performance.now() - t0)}`);
    log(`relative error vs lib/reference.ts: ${err.toExponential(3)} (tolerance ${tol}) ${err <= tol ? "OK" : "FAIL"}`);
    if (!(err <= tol)) process.exitCode = 1;
    return;
  }

  // CUDA: check the first tokens against the host backend (tokens are independent).
  const check = Math.min(T, 32);
  log(`checking the first ${check} tokens against the host backend...`);
  t0 = performance.now();
  using host = Context.create({ backend: "host" });
  using hfc1 = host.upload(fc1, [E, N1, H]);
  using hfc2 = host.upload(fc2, [E, H, I]);
  using hmoe = new FusedMoE(host, { ...config, maxTokens: check }, { fc1: hfc1, fc2: hfc2 });
  using hOut = hmoe.forward({
    hidden: host.upload(hidden.subarray(0, check * H), [check, H]),
    routingMap: host.upload(routingMap.subarray(0, check * shape.topk), [check, shape.topk]),
    probs: host.upload(probs.subarray(0, check * shape.topk), [check, shape.topk]),
  });
  const err = relFrobenius(result.subarray(0, check * H), hOut.download());
  const tol = weightFormat === "mxfp8" ? TOLERANCE.mxfp8 : TOLERANCE.bf16;
  log(`  done in ${seconds(performance.now() - t0)}`);
  log(`relative error vs host backend: ${err.toExponential(3)} (tolerance ${tol}) ${err <= tol ? "OK" : "FAIL"}`);
  if (!(err <= tol)) process.exitCode = 1;
}

try {
  main();
} catch (err) {
  if (err instanceof FmoeError) {
    console.error(`demo: ${err.message}`);
    process.exit(1);
  }
  throw err;
}
