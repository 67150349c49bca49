// The C ABI from C: test/c_abi_layer.c, compiled here as C99 with warnings as errors against
// csrc/include/fmoe.h and linked against the library under test, runs a silu layer on random
// inputs written here. Its output must match lib/reference.ts within TOLERANCE.bf16 (relative
// Frobenius), its deliberately wrong plan must be refused with a message naming topk, and it must
// free everything it allocated. test/c_abi_threads.c (threads sharing a context, a capture beside
// another thread's calls) must finish with nothing allocated. Skipped, with the reason, where no C
// compiler is found.
import { describe, expect } from "bun:test";
import { existsSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { libraryPath } from "../lib/ffi.ts";
import { randomRouting, reference as R, TOLERANCE } from "../lib/index.ts";
import { CUDA_DEVICES, expectClose, expectNonZero, randBf16, randWeights, seededTest, suiteTempDir } from "./helpers.ts";

const ROOT = join(import.meta.dir, "..");
const CC = process.env.CC ?? "cc";
const HAS_CC = Bun.which(CC) !== null;
if (!HAS_CC) console.log(`c-abi: skipped, no C compiler (${CC}) on PATH`);

describe.skipIf(!HAS_CC)("the C ABI from a C program", () => {
  const dir = suiteTempDir("fused-moe-c-abi-");

  function build(name: "c_abi_layer" | "c_abi_threads"): string {
    const exe = join(dir(), name);
    // The library under test under the name its SONAME gives (FMOE_LIBRARY may name another file),
    // found at run time through the rpath.
    const lib = join(dir(), "libfusedmoe.so");
    if (!existsSync(lib)) symlinkSync(resolve(libraryPath()), lib);
    const args = [CC, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", `-I${join(ROOT, "csrc/include")}`, join(ROOT, `test/${name}.c`), lib, `-Wl,-rpath,${dir()}`, "-lpthread", "-o", exe];
    const cc = Bun.spawnSync(args, { stdout: "pipe", stderr: "pipe" });
    if (cc.exitCode !== 0) throw new Error(`${args.join(" ")}\n${cc.stderr.toString()}`);
    return exe;
  }

  const backends: [string, number][] = [["host", 1]];
  if (CUDA_DEVICES > 0) backends.push(["cuda", 2]);
  for (const [name, code] of backends) {
    seededTest(`${name}: one silu layer matches the reference; a bad plan is refused by name; nothing left allocated`, (rng) => {
      const exe = build("c_abi_layer");
      const [T, H, I, E, topk] = [7, 64, 32, 4, 2];
      const hidden = randBf16(rng, T * H);
      const { routingMap, probs } = randomRouting(rng, T, E, topk);
      const fc1 = randWeights(rng, E, 2 * I, H);
      const fc2 = randWeights(rng, E, H, I);
      const input = join(dir(), `in-${name}.bin`), output = join(dir(), `out-${name}.bin`);
      const parts = [BigInt64Array.from([T, H, I, E, topk].map(BigInt)), hidden, routingMap, probs, fc1, fc2];
      writeFileSync(input, Buffer.concat(parts.map((p) => new Uint8Array(p.buffer, p.byteOffset, p.byteLength))));
      const run = Bun.spawnSync([exe, input, output, String(code)], { stdout: "pipe", stderr: "pipe" });
      const log = run.stdout.toString() + run.stderr.toString();
      expect(run.exitCode, log).toBe(0);
      expect(log).toContain(`backend ${name}`);
      expect(log).toMatch(/refused 1: fmoe_plan_create: topk \(\d+\) exceeds num_experts \(4\)/);
      expect(log).toContain("live allocations 0");

      const bytes = readFileSync(output);
      const got = new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
      const ref = R.fusedMoe({ hidden: H, ffn: I, numExperts: E, topk, activation: "silu" }, { fc1, fc2 }, { hidden, numTokens: T, routingMap, probs });
      expectNonZero(ref.out, "reference");
      expectClose(got, ref.out, TOLERANCE.bf16, "C program's layer vs reference");
    });

    seededTest(`${name}: threads sharing a context, and a capture beside another thread's calls`, () => {
      const run = Bun.spawnSync([build("c_abi_threads"), String(code)], { stdout: "pipe", stderr: "pipe" });
      const log = run.stdout.toString() + run.stderr.toString();
      expect(run.exitCode, log).toBe(0);
      expect(log).toContain("live allocations 0");
    });
  }
});
