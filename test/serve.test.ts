// The HTTP server of the CLI (`fused-moe serve`), run as its own process on a free port: requests
// sent at once, of different token counts (0 to --max-tokens, invalid routing ids among them), each
// answered with its own layer output (also when requests share a forward), compared with lib/reference.ts (TOLERANCE.bf16 / .mxfp8,
// relative Frobenius); bad requests answered 400 / 404 / 405 / 413 with a JSON error naming what
// is wrong; SIGTERM stops it with exit 0. On the host backend always (its streams run behind the
// server as a device does, so requests that did not take turns with the buffers would read each
// other's outputs), on CUDA where a device is.
import { describe, expect } from "bun:test";
import { join } from "node:path";
import { type HostTensor, parseSafetensors, reference as R, type Rng, serializeSafetensors, TOLERANCE, writeSafetensors } from "../lib/index.ts";
import { CUDA_DEVICES, expectClose, expectNonZero, injectInvalidIds, makeRouting, randBf16, randWeights, seededTest, suiteTempDir } from "./helpers.ts";

const ROOT = join(import.meta.dir, "..");
const [H, I, E, topk, maxTokens] = [64, 32, 6, 2, 24];

interface Server {
  url: string;
  stop(): Promise<{ code: number; stderr: string }>;
}

/** Starts `fused-moe serve` (with --topk unless `withTopk` is false) and waits for the line that
 *  names its address. */
async function startServer(layer: string, flags: string[], env: Record<string, string> = {}, withTopk = true): Promise<Server> {
  const proc = Bun.spawn(
    [process.execPath, join(ROOT, "scripts", "fused-moe.ts"), "serve", "--layer", layer, ...(withTopk ? ["--topk", String(topk)] : []), "--max-tokens", String(maxTokens), "--port", "0", ...flags],
    { cwd: ROOT, stdout: "pipe", stderr: "pipe", env: { ...process.env, ...env } },
  );
  const reader = proc.stdout.getReader();
  const decoder = new TextDecoder();
  let text = "";
  for (;;) {
    const found = /serving .* on (http:\/\/\S+)/.exec(text);
    if (found !== null) {
      reader.releaseLock();
      const url = found[1]!;
      return {
        url,
        async stop() {
          proc.kill("SIGTERM");
          const code = await proc.exited;
          return { code, stderr: await new Response(proc.stderr).text() };
        },
      };
    }
    const { value, done } = await reader.read();
    if (done) throw new Error(`fused-moe serve exited before listening (code ${await proc.exited}): ${text}${await new Response(proc.stderr).text()}`);
    text += decoder.decode(value);
  }
}

function tokens(rng: Rng, T: number, invalid = 0, h = H): { hidden: Uint16Array; routingMap: Int32Array; probs: Float32Array; invalid: number } {
  const { routingMap, probs } = makeRouting(rng, T, E, topk);
  injectInvalidIds(rng, routingMap, E, invalid);
  return { hidden: randBf16(rng, T * h), routingMap, probs, invalid: Math.min(invalid, T * topk) };
}

function body(t: { hidden: Uint16Array; routingMap: Int32Array; probs: Float32Array }, T: number, drop?: string, h = H): Uint8Array {
  const tensors: Record<string, HostTensor> = {
    hidden: { dtype: "bf16", shape: [T, h], data: t.hidden },
    routing_map: { dtype: "i32", shape: [T, topk], data: t.routingMap },
    probs: { dtype: "f32", shape: [T, topk], data: t.probs },
  };
  if (drop !== undefined) delete tensors[drop];
  return serializeSafetensors(tensors);
}

async function expectError(res: Response, status: number, ...names: string[]): Promise<void> {
  expect(res.status).toBe(status);
  const { error } = (await res.json()) as { error: string };
  for (const n of names) expect(error).toContain(n);
}

describe("fused-moe serve", () => {
  const dir = suiteTempDir("fused-moe-serve-");

  const runs: ["host" | "cuda", "bf16" | "mxfp8"][] = [["host", "bf16"], ["host", "mxfp8"]];
  if (CUDA_DEVICES > 0) runs.push(["cuda", "bf16"], ["cuda", "mxfp8"]);
  for (const [backend, weights] of runs) {
    seededTest(`${backend}, ${weights} weights: requests sent at once each get their own layer output`, async (rng) => {
      const fc1 = randWeights(rng, E, 2 * I, H);
      const fc2 = randWeights(rng, E, H, I);
      const layer = join(dir(), `layer-${backend}-${weights}.safetensors`);
      writeSafetensors(layer, { fc1: { dtype: "bf16", shape: [E, 2 * I, H], data: fc1 }, fc2: { dtype: "bf16", shape: [E, H, I], data: fc2 } });
      const server = await startServer(layer, ["--backend", backend, "--weights", weights]);
      try {
        const health = (await (await fetch(`${server.url}health`)).json()) as Record<string, unknown>;
        expect(health).toMatchObject({ backend, hidden: H, ffn: I, numExperts: E, topk, weights, maxTokens });

        const counts = [0, 1, 7, maxTokens, 1 + rng.int(maxTokens), 3];
        const sent = counts.map((T, i) => ({ T, ...tokens(rng, T, i === 2 ? 3 : 0) }));
        const answers = await Promise.all(sent.map((t) => fetch(`${server.url}forward`, { method: "POST", body: body(t, t.T) })));
        const cfg = { hidden: H, ffn: I, numExperts: E, topk, activation: "silu" as const, weightFormat: weights };
        for (const [i, res] of answers.entries()) {
          const t = sent[i]!;
          expect(res.status).toBe(200);
          const { tensors, metadata } = parseSafetensors(new Uint8Array(await res.arrayBuffer()), "answer");
          const out = tensors.get("out")!;
          expect(out.dtype).toBe("bf16");
          expect(out.shape).toEqual([t.T, H]);
          expect(metadata.invalid_ids).toBe(String(t.invalid));
          if (t.T === 0) continue;
          const ref = R.fusedMoe(cfg, { fc1, fc2 }, { hidden: t.hidden, numTokens: t.T, routingMap: t.routingMap, probs: t.probs });
          expectNonZero(ref.out, "reference");
          expectClose(out.data as Uint16Array, ref.out, weights === "bf16" ? TOLERANCE.bf16 : TOLERANCE.mxfp8, `request ${i} (T = ${t.T})`);
        }
        const { stats } = (await (await fetch(`${server.url}health`)).json()) as { stats: { requests: number; forwards: number } };
        expect(stats.requests).toBe(counts.length);
        expect(stats.forwards).toBeGreaterThan(0);
        expect(stats.forwards).toBeLessThanOrEqual(counts.length);
      } finally {
        const { code, stderr } = await server.stop();
        expect(code).toBe(0);
        expect(stderr).toContain("stopped");
      }
    }, 60_000);
  }

  seededTest("requests that arrive while the layer runs share its next forward", async (rng) => {
    // A wider layer on one host thread: its forward takes milliseconds, so the requests sent with
    // the first arrive while it runs and wait for the next forward together.
    const [wH, wI] = [512, 1024];
    const fc1 = randWeights(rng, E, 2 * wI, wH);
    const fc2 = randWeights(rng, E, wH, wI);
    const layer = join(dir(), "layer-batching.safetensors");
    writeSafetensors(layer, { fc1: { dtype: "bf16", shape: [E, 2 * wI, wH], data: fc1 }, fc2: { dtype: "bf16", shape: [E, wH, wI], data: fc2 } });
    const server = await startServer(layer, ["--backend", "host"], { FMOE_HOST_THREADS: "1" });
    try {
      const sent = Array.from({ length: 6 }, () => tokens(rng, 4, 0, wH));
      const answers = await Promise.all(sent.map((t) => fetch(`${server.url}forward`, { method: "POST", body: body(t, 4, undefined, wH) })));
      const cfg = { hidden: wH, ffn: wI, numExperts: E, topk, activation: "silu" as const };
      for (const [i, res] of answers.entries()) {
        expect(res.status).toBe(200);
        const out = parseSafetensors(new Uint8Array(await res.arrayBuffer())).tensors.get("out")!;
        expect(out.shape).toEqual([4, wH]);
        const ref = R.fusedMoe(cfg, { fc1, fc2 }, { hidden: sent[i]!.hidden, numTokens: 4, routingMap: sent[i]!.routingMap, probs: sent[i]!.probs });
        expectClose(out.data as Uint16Array, ref.out, TOLERANCE.bf16, `request ${i} of a batch`);
      }
      const { stats } = (await (await fetch(`${server.url}health`)).json()) as { stats: { requests: number; forwards: number } };
      expect(stats.requests).toBe(6);
      expect(stats.forwards).toBeLessThan(6);
    } finally {
      expect((await server.stop()).code).toBe(0);
    }
  }, 60_000);

  seededTest("a layer file's metadata (as fused-moe import writes it) gives topk, the activation and the expert range; a flag overrides it; a bad value exits 2", async (rng) => {
    // Experts [2, 5) of 6, not gated.
    const local = 3;
    const fc1 = randWeights(rng, local, I, H);
    const fc2 = randWeights(rng, local, H, I);
    const layer = join(dir(), "layer-metadata.safetensors");
    const weights: Record<string, HostTensor> = { fc1: { dtype: "bf16", shape: [local, I, H], data: fc1 }, fc2: { dtype: "bf16", shape: [local, H, I], data: fc2 } };
    writeSafetensors(layer, weights, { activation: "squared_relu", num_experts: String(E), local_expert_start: "2", topk: String(topk) });
    const server = await startServer(layer, ["--backend", "host"], {}, false);
    try {
      const health = (await (await fetch(`${server.url}health`)).json()) as Record<string, unknown>;
      expect(health).toMatchObject({ numExperts: E, numLocalExperts: local, localExpertStart: 2, topk, activation: "squared_relu" });
      const t = tokens(rng, 9);
      const res = await fetch(`${server.url}forward`, { method: "POST", body: body(t, 9) });
      expect(res.status).toBe(200);
      const out = parseSafetensors(new Uint8Array(await res.arrayBuffer())).tensors.get("out")!;
      const cfg = { hidden: H, ffn: I, numExperts: E, numLocalExperts: local, localExpertStart: 2, topk, activation: "squared_relu" as const };
      const ref = R.fusedMoe(cfg, { fc1, fc2 }, { hidden: t.hidden, numTokens: 9, routingMap: t.routingMap, probs: t.probs });
      expectNonZero(ref.out, "reference");
      expectClose(out.data as Uint16Array, ref.out, TOLERANCE.bf16, "layer configured by its metadata");
    } finally {
      expect((await server.stop()).code).toBe(0);
    }
    const overridden = await startServer(layer, ["--backend", "host", "--local-expert-start", "3"], {}, false);
    try {
      expect(await (await fetch(`${overridden.url}health`)).json()).toMatchObject({ localExpertStart: 3, numExperts: E });
    } finally {
      expect((await overridden.stop()).code).toBe(0);
    }
    const bad = join(dir(), "layer-bad-metadata.safetensors");
    for (const [metadata, message] of [
      [{ topk: "two" }, `${bad}: metadata topk must be an integer >= 1, got two`],
      [{ topk: "2", activation: "relu" }, `${bad}: metadata activation must be squared_relu, silu, gelu or swiglu_oai, got relu`],
      [{}, `--topk is required (${bad} has no topk in its metadata)`],
      [{ topk: "2", activation: "squared_relu", num_experts: String(E), local_expert_start: "2", router_num_groups: "4" }, `${bad}: its router (metadata router_*, top-k 2) is not one route() runs: fmoe_route: num_groups (4) must divide num_experts (${E})`],
    ] as const) {
      writeSafetensors(bad, weights, metadata);
      const proc = Bun.spawn([process.execPath, join(ROOT, "scripts", "fused-moe.ts"), "serve", "--layer", bad, "--backend", "host", "--port", "0"], { stdout: "pipe", stderr: "pipe" });
      expect(await proc.exited).toBe(2);
      expect((await new Response(proc.stderr).text()).trim()).toBe(`fused-moe: ${message}`);
    }
  }, 60_000);

  seededTest("router_logits requests are routed by the layer file's router (metadata and selection_bias), in one batch with routing_map requests", async (rng) => {
    const fc1 = randWeights(rng, E, 2 * I, H);
    const fc2 = randWeights(rng, E, H, I);
    const selectionBias = Float32Array.from({ length: E }, () => rng.normal() * 0.1);
    const layer = join(dir(), "layer-router.safetensors");
    writeSafetensors(
      layer,
      { fc1: { dtype: "bf16", shape: [E, 2 * I, H], data: fc1 }, fc2: { dtype: "bf16", shape: [E, H, I], data: fc2 }, selection_bias: { dtype: "f32", shape: [E], data: selectionBias } },
      { topk: String(topk), router_scoring: "sigmoid", router_num_groups: "3", router_topk_groups: "2", router_renormalize: "true", router_scale: "2.5" },
    );
    const server = await startServer(layer, ["--backend", "host"], {}, false);
    try {
      const cfg = { hidden: H, ffn: I, numExperts: E, topk, activation: "silu" as const };
      const withLogits = Array.from({ length: 3 }, (_, i) => ({ T: 5 + i, hidden: randBf16(rng, (5 + i) * H), logits: Float32Array.from({ length: (5 + i) * E }, () => rng.normal() * 2) }));
      const withRouting = tokens(rng, 6);
      const bodies = [
        ...withLogits.map((t) => serializeSafetensors({ hidden: { dtype: "bf16", shape: [t.T, H], data: t.hidden }, router_logits: { dtype: "f32", shape: [t.T, E], data: t.logits } })),
        body(withRouting, 6),
      ];
      const answers = await Promise.all(bodies.map((b) => fetch(`${server.url}forward`, { method: "POST", body: b })));
      for (const [i, res] of answers.entries()) {
        expect(res.status).toBe(200);
        const out = parseSafetensors(new Uint8Array(await res.arrayBuffer())).tensors.get("out")!.data as Uint16Array;
        let want: Uint16Array;
        if (i < withLogits.length) {
          const t = withLogits[i]!;
          const r = R.route({ logits: t.logits, numTokens: t.T, numExperts: E, topk, scoring: "sigmoid", selectionBias, numGroups: 3, topkGroups: 2, renormalize: true, scale: 2.5 });
          want = R.fusedMoe(cfg, { fc1, fc2 }, { hidden: t.hidden, numTokens: t.T, routingMap: r.routingMap, probs: r.probs }).out;
        } else {
          want = R.fusedMoe(cfg, { fc1, fc2 }, { hidden: withRouting.hidden, numTokens: 6, routingMap: withRouting.routingMap, probs: withRouting.probs }).out;
        }
        expectNonZero(want, "reference");
        expectClose(out, want, TOLERANCE.bf16, `request ${i}`);
      }
      const both = serializeSafetensors({ hidden: { dtype: "bf16", shape: [1, H], data: randBf16(rng, H) }, router_logits: { dtype: "f32", shape: [1, E], data: new Float32Array(E) }, probs: { dtype: "f32", shape: [1, topk], data: new Float32Array(topk) } });
      await expectError(await fetch(`${server.url}forward`, { method: "POST", body: both }), 400, "router_logits", "not both");
      const wrongE = serializeSafetensors({ hidden: { dtype: "bf16", shape: [1, H], data: randBf16(rng, H) }, router_logits: { dtype: "f32", shape: [1, E + 1], data: new Float32Array(E + 1) } });
      await expectError(await fetch(`${server.url}forward`, { method: "POST", body: wrongE }), 400, '"router_logits"', `[1, ${E}]`);
    } finally {
      expect((await server.stop()).code).toBe(0);
    }
  }, 60_000);

  seededTest("bad requests get a JSON error naming what is wrong, and the server keeps serving", async (rng) => {
    const layer = join(dir(), "layer-errors.safetensors");
    writeSafetensors(layer, { fc1: { dtype: "bf16", shape: [E, 2 * I, H], data: randWeights(rng, E, 2 * I, H) }, fc2: { dtype: "bf16", shape: [E, H, I], data: randWeights(rng, E, H, I) } });
    const server = await startServer(layer, ["--backend", "host"]);
    try {
      const post = (b: Uint8Array | string) => fetch(`${server.url}forward`, { method: "POST", body: b });
      const ok = tokens(rng, 4);
      await expectError(await post(body(tokens(rng, maxTokens + 1), maxTokens + 1)), 413, `${maxTokens + 1} tokens`, "--max-tokens");
      await expectError(await post(body(ok, 4, "probs")), 400, 'missing tensor "probs"');
      const wrongK = serializeSafetensors({
        hidden: { dtype: "bf16", shape: [4, H], data: ok.hidden },
        routing_map: { dtype: "i32", shape: [2, 4], data: ok.routingMap },
        probs: { dtype: "f32", shape: [4, topk], data: ok.probs },
      });
      await expectError(await post(wrongK), 400, '"routing_map"', "[2, 4]", `[4, ${topk}]`);
      const wrongH = serializeSafetensors({
        hidden: { dtype: "bf16", shape: [8, H / 2], data: ok.hidden },
        routing_map: { dtype: "i32", shape: [4, topk], data: ok.routingMap },
        probs: { dtype: "f32", shape: [4, topk], data: ok.probs },
      });
      await expectError(await post(wrongH), 400, '"hidden"', `[8, ${H / 2}]`);
      const wrongType = serializeSafetensors({ hidden: { dtype: "bf16", shape: [4, H], data: ok.hidden }, routing_map: { dtype: "f32", shape: [4, topk], data: ok.probs }, probs: { dtype: "f32", shape: [4, topk], data: ok.probs } });
      await expectError(await post(wrongType), 400, '"routing_map" is f32', "i32");
      await expectError(await post("not a safetensors body"), 400, "request body");
      await expectError(await fetch(`${server.url}forward`), 405, "POST");
      await expectError(await fetch(`${server.url}nowhere`), 404, "/nowhere");
      const res = await post(body(ok, 4));
      expect(res.status).toBe(200);
      expect(parseSafetensors(new Uint8Array(await res.arrayBuffer())).tensors.get("out")!.shape).toEqual([4, H]);
    } finally {
      expect((await server.stop()).code).toBe(0);
    }
  }, 60_000);
});
