// safetensors reading and writing (lib/safetensors.ts), and the CLI (scripts/fused-moe.ts) run on
// a small file against lib/reference.ts (TOLERANCE.bf16 / TOLERANCE.mxfp8, relative Frobenius).
// Bad input files make the CLI exit 2 with one line on stderr.
import { describe, expect } from "bun:test";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  type HostTensor,
  parseSafetensors,
  readSafetensors,
  reference as R,
  SafetensorsError,
  serializeSafetensors,
  TOLERANCE,
  writeSafetensors,
} from "../lib/index.ts";
import { bf16ToF32, f32ToBf16 } from "../lib/dtype.ts";
import { expectBitExact, expectClose, expectNonZero, injectInvalidIds, makeRouting, randBf16, randWeights, seededTest, suiteTempDir } from "./helpers.ts";

const ROOT = join(import.meta.dir, "..");

function header(json: unknown, data = new Uint8Array(0)): Uint8Array {
  const h = new TextEncoder().encode(typeof json === "string" ? json : JSON.stringify(json));
  const out = new Uint8Array(8 + h.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(h.length), true);
  out.set(h, 8);
  out.set(data, 8 + h.length);
  return out;
}

describe("safetensors", () => {
  seededTest("round trip of every dtype with metadata; data starts 8-byte aligned", (rng) => {
    const tensors: Record<string, HostTensor> = {
      a: { dtype: "bf16", shape: [3, 5], data: randBf16(rng, 15) },
      b: { dtype: "f32", shape: [7], data: Float32Array.from({ length: 7 }, () => rng.normal()) },
      c: { dtype: "i32", shape: [2, 2, 2], data: Int32Array.from({ length: 8 }, () => rng.nextU32() | 0) },
      d: { dtype: "e4m3", shape: [9], data: Uint8Array.from({ length: 9 }, () => rng.int(256)) },
      e: { dtype: "e8m0", shape: [1, 3], data: Uint8Array.of(0, 127, 255) },
      empty: { dtype: "f32", shape: [0, 4], data: new Float32Array(0) },
      scalar: { dtype: "i32", shape: [], data: Int32Array.of(42) },
    };
    const bytes = serializeSafetensors(tensors, { producer: "test", n: "1" });
    const headerLen = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    expect((8 + headerLen) % 8).toBe(0);
    const { tensors: back, metadata } = parseSafetensors(bytes);
    expect(metadata).toEqual({ producer: "test", n: "1" });
    expect([...back.keys()].sort()).toEqual(Object.keys(tensors).sort());
    for (const [name, t] of Object.entries(tensors)) {
      const got = back.get(name)!;
      expect(got.dtype).toBe(t.dtype);
      expect(got.shape).toEqual(t.shape);
      expectBitExact(got.data, t.data, name);
    }
    // Reading from an unaligned buffer (an f32 tensor at an odd offset) still works.
    const shifted = new Uint8Array(bytes.length + 1);
    shifted.set(bytes, 1);
    expectBitExact(parseSafetensors(shifted.subarray(1)).tensors.get("b")!.data, tensors.b!.data, "unaligned");
  });

  seededTest("file dtypes: U8 and F8_E8M0 read as e8m0, F8_E4M3 as e4m3", () => {
    for (const [fileDtype, ours] of [["U8", "e8m0"], ["F8_E8M0", "e8m0"], ["F8_E4M3", "e4m3"]] as const) {
      const t = parseSafetensors(header({ x: { dtype: fileDtype, shape: [2], data_offsets: [0, 2] } }, Uint8Array.of(1, 2))).tensors.get("x")!;
      expect(t.dtype).toBe(ours);
      expect(Array.from(t.data)).toEqual([1, 2]);
    }
  });

  const BAD: [string, Uint8Array, RegExp][] = [
    ["file too short", new Uint8Array(5), /too short/],
    ["header length past the end", (() => { const b = new Uint8Array(16); new DataView(b.buffer).setBigUint64(0, 100n, true); return b; })(), /exceeds the file size/],
    ["header not JSON", header("{not json"), /not valid JSON/],
    ["header not an object", header("[1, 2]"), /not a JSON object/],
    ["unsupported dtype", header({ x: { dtype: "F64", shape: [1], data_offsets: [0, 8] } }, new Uint8Array(8)), /unsupported dtype F64/],
    ["offsets span the wrong size", header({ x: { dtype: "F32", shape: [2], data_offsets: [0, 4] } }, new Uint8Array(8)), /span 4 bytes.*needs 8/],
    ["offsets past the data", header({ x: { dtype: "F32", shape: [2], data_offsets: [0, 8] } }, new Uint8Array(4)), /past the end/],
    ["negative shape", header({ x: { dtype: "F32", shape: [-1], data_offsets: [0, 0] } }), /shape/],
  ];
  for (const [name, bytes, msg] of BAD) {
    seededTest(`malformed file: ${name} -> SafetensorsError`, () => {
      let err: unknown;
      try {
        parseSafetensors(bytes, "f.safetensors");
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(SafetensorsError);
      expect((err as Error).message).toMatch(msg);
      expect((err as Error).message).toContain("f.safetensors");
    });
  }

  seededTest("serialize refuses data that does not match its shape or dtype", () => {
    expect(() => serializeSafetensors({ x: { dtype: "f32", shape: [3], data: new Float32Array(2) } })).toThrow(SafetensorsError);
    expect(() => serializeSafetensors({ x: { dtype: "f32", shape: [2], data: new Int32Array(2) as never } })).toThrow(SafetensorsError);
  });
});

describe("CLI: bun scripts/fused-moe.ts run", () => {
  const dir = suiteTempDir("fused-moe-cli-");

  function cli(...args: string[]): { code: number; stdout: string; stderr: string } {
    const p = Bun.spawnSync([process.execPath, join(ROOT, "scripts", "fused-moe.ts"), ...args], { cwd: ROOT, env: { ...process.env } });
    return { code: p.exitCode ?? -1, stdout: p.stdout.toString(), stderr: p.stderr.toString() };
  }

  /** A small layer in safetensors form plus its reference output. */
  function writeInput(rng: import("../lib/index.ts").Rng, path: string, opts: { start: number; numExperts: number; E: number; invalid: number; drop?: string; reshape?: string }) {
    const T = 7, H = 64, I = 32, topk = 2, N1 = 2 * I;
    const hidden = randBf16(rng, T * H);
    const { routingMap, probs } = makeRouting(rng, T, opts.numExperts, topk);
    injectInvalidIds(rng, routingMap, opts.numExperts, opts.invalid);
    const fc1 = randWeights(rng, opts.E, N1, H);
    const fc2 = randWeights(rng, opts.E, H, I);
    const b1 = Float32Array.from({ length: opts.E * N1 }, () => rng.normal() * 0.2);
    const fc1BiasBf16 = f32ToBf16(b1);
    const tensors: Record<string, HostTensor> = {
      hidden: { dtype: "bf16", shape: [T, H], data: hidden },
      routing_map: { dtype: "i32", shape: [T, topk], data: routingMap },
      probs: { dtype: "f32", shape: [T, topk], data: probs },
      fc1: { dtype: "bf16", shape: [opts.E, N1, H], data: fc1 },
      fc2: { dtype: "bf16", shape: [opts.E, H, I], data: fc2 },
      // A bf16 bias: the CLI widens it to f32 (exactly).
      fc1_bias: { dtype: "bf16", shape: [opts.E, N1], data: fc1BiasBf16 },
    };
    if (opts.drop !== undefined) delete tensors[opts.drop];
    if (opts.reshape !== undefined) tensors[opts.reshape]!.shape = [...tensors[opts.reshape]!.shape].reverse();
    writeSafetensors(path, tensors);
    const cfg = { hidden: H, ffn: I, numExperts: opts.numExperts, numLocalExperts: opts.E, localExpertStart: opts.start, topk, activation: "silu" as const };
    const weights = { fc1, fc2, fc1Bias: bf16ToF32(fc1BiasBf16) };
    return { T, H, cfg, weights, inputs: { hidden, numTokens: T, routingMap, probs } };
  }

  for (const weights of ["bf16", "mxfp8"] as const) {
    seededTest(`${weights}: the output file matches the reference (expert-parallel slice, out-of-range ids)`, (rng) => {
      const input = join(dir(), `in-${weights}.safetensors`);
      const output = join(dir(), `out-${weights}.safetensors`);
      const w = writeInput(rng, input, { start: 2, numExperts: 8, E: 4, invalid: 3 });
      const r = cli("run", "--input", input, "--output", output, "--backend", "host", "--weights", weights, "--local-expert-start", "2", "--num-experts", "8", "--alignment", "8");
      expect(r.stderr).toContain("wrote out");
      expect(r.stderr).toContain("3 routing ids outside [0, 8)");
      expect(r.code).toBe(0);
      const { tensors, metadata } = readSafetensors(output);
      const out = tensors.get("out")!;
      expect(out.dtype).toBe("bf16");
      expect(out.shape).toEqual([w.T, w.H]);
      expect(metadata.backend).toBe("host");
      const ref = R.fusedMoe({ ...w.cfg, weightFormat: weights }, w.weights, w.inputs);
      expectNonZero(ref.out, "reference");
      expectClose(out.data as Uint16Array, ref.out, weights === "bf16" ? TOLERANCE.bf16 : TOLERANCE.mxfp8, "CLI output");
    }, 60_000);
  }

  seededTest("--help exits 0", () => {
    const r = cli("--help");
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("usage:");
  });

  function expectExit2(r: { code: number; stderr: string }, pattern: RegExp): void {
    expect(r.code).toBe(2);
    const lines = r.stderr.trimEnd().split("\n");
    expect(lines.length).toBe(1);
    expect(lines[0]).toMatch(pattern);
  }

  seededTest("missing tensor: exit 2, one line naming it", (rng) => {
    const input = join(dir(), "missing.safetensors");
    writeInput(rng, input, { start: 0, numExperts: 4, E: 4, invalid: 0, drop: "probs" });
    expectExit2(cli("run", "--input", input, "--output", join(dir(), "x.safetensors"), "--backend", "host"), /missing tensor "probs"/);
  }, 30_000);

  seededTest("wrong shape: exit 2, one line naming the tensor and shapes", (rng) => {
    const input = join(dir(), "shape.safetensors");
    writeInput(rng, input, { start: 0, numExperts: 4, E: 4, invalid: 0, reshape: "fc2" });
    expectExit2(cli("run", "--input", input, "--output", join(dir(), "x.safetensors"), "--backend", "host"), /tensor "fc2" has shape \[32, 64, 4\], expected \[4, 64, 32\]/);
  }, 30_000);

  seededTest("bad file and unreadable file: exit 2, one line", () => {
    const bad = join(dir(), "bad.safetensors");
    writeFileSync(bad, "this is not a safetensors file at all");
    expectExit2(cli("run", "--input", bad, "--output", join(dir(), "x.safetensors"), "--backend", "host"), /bad\.safetensors: header length/);
    expectExit2(cli("run", "--input", join(dir(), "nope.safetensors"), "--output", join(dir(), "x.safetensors")), /cannot read/);
    expectExit2(cli("run", "--output", join(dir(), "x.safetensors")), /--input is required/);
    expectExit2(cli("run", "--input", bad, "--output", "y", "--activation", "relu"), /--activation/);
    expectExit2(cli("run", "--input", bad, "--output", "y", "--port", "2"), /--port is not an option of run/);
    expectExit2(cli("serve", "--input", bad, "--topk", "2"), /--input is not an option of serve/);
    expectExit2(cli("serve", "--topk", "2"), /--layer is required/);
    expectExit2(cli("serve", "--layer", bad, "--topk", "2", "--port", "70000"), /--port must be at most 65535/);
    expectExit2(cli("serve", "--layer", bad, "--topk", "2"), /bad\.safetensors: header length/);
  }, 30_000);
});
