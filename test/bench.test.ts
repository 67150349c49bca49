// scripts/bench.ts end to end on the host backend: one decode cell of a real model shape, with
// the per-step breakdown and the JSON file other tools read, and the flags it refuses. The times
// themselves are not checked (speed is measured, never asserted); the file's fields and their
// relations are: ratio = us / floor_us, and the floor is the larger of its two bounds.
import { describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const ROOT = join(import.meta.dir, "..");

function bench(...args: string[]): { code: number; out: string; err: string } {
  const p = Bun.spawnSync([process.execPath, join(ROOT, "scripts", "bench.ts"), "--backend", "host", ...args], {
    cwd: ROOT, env: { ...process.env }, stdout: "pipe", stderr: "pipe",
  });
  return { code: p.exitCode ?? -1, out: p.stdout.toString(), err: p.stderr.toString() };
}

describe("bench (host backend)", () => {
  test("qwen3-30b-a3b at T = 1: a row, the step breakdown and the JSON file", () => {
    const dir = mkdtempSync(join(tmpdir(), "fmoe-bench-"));
    try {
      const file = join(dir, "run.json");
      const r = bench("--cases", "qwen3-30b-a3b", "--tokens", "1", "--sets", "1", "--breakdown", "--json", file);
      expect(r.err).toBe("");
      expect(r.code).toBe(0);
      expect(r.out).toMatch(/bench: qwen3-30b-a3b +T= +1 +[0-9.]+ us +floor +[0-9.]+ us +ratio [0-9.]+/);
      const steps = r.out.match(/steps \(us\): (.*); sum ([0-9.]+)/);
      expect(steps).not.toBeNull();
      expect(steps![1]!.split(", ").map((s) => s.split(" ")[0])).toEqual(["permute", "fc1", "activation", "fc2", "unpermute"]);
      const run = JSON.parse(readFileSync(file, "utf8"));
      expect(run.device).toMatch(/^host/);
      expect(run.dtype).toBe("bf16");
      expect(run.rows.length).toBe(1);
      const row = run.rows[0];
      for (const k of ["case", "T", "dtype", "us", "floor_us", "ratio", "tflops", "gbps"]) expect(row).toHaveProperty(k);
      expect([row.case, row.T, row.dtype]).toEqual(["qwen3-30b-a3b", 1, "bf16"]);
      expect(row.us).toBeGreaterThan(0);
      expect(row.ratio).toBeCloseTo(row.us / row.floor_us, 9);
      // T = 1 reads 8 experts' weights (2 x 3 x 2048 x 768 bf16 each) and 2 x 2 x 2048 bytes of
      // activations; FLOPs 2 x 8 x 3 x 2048 x 768.
      const bytes = 8 * 3 * 2048 * 768 * 2 + 2048 * 4;
      const flops = 2 * 8 * 3 * 2048 * 768;
      const floor = Math.max(bytes / run.copy_bandwidth_bytes_per_s, flops / (run.matmul_peak_tflops * 1e12)) * 1e6;
      expect(row.floor_us).toBeCloseTo(floor, 6);
      expect(row.gbps).toBeCloseTo(bytes / (row.us * 1e3), 6);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 120_000);

  test("--help: every flag, exit status 0, no work", () => {
    const r = bench("--help");
    expect(r.code).toBe(0);
    for (const flag of ["--cases", "--tokens", "--dtype", "--json", "--iters", "--sets", "--backend", "--breakdown", "--compare", "--timing"]) {
      expect(r.out).toContain(`  ${flag} `);
    }
    expect(r.out).toContain("qwen3-30b-a3b");
    expect(r.out).not.toMatch(/filling|copy bandwidth/);
  });

  test("bad flags: a message naming the flag, exit status 2, before any work", () => {
    for (const [args, what] of [
      [["--tokens", "1,x"], /--tokens: "x" is not a positive integer/],
      [["--tokens", "0"], /--tokens: "0"/],
      [["--sets", "0"], /--sets: "0"/],
      [["--sets", "-1"], /--sets/],
      [["--frobnicate"], /Unknown option '--frobnicate'/],
      [["--cases", "llama"], /unknown case llama \(cases: qwen3-30b-a3b/],
      [["--dtype", "fp4"], /--dtype must be bf16 or mxfp8/],
      [["--backend", "tpu"], /--backend must be cuda or host/],
    ] as const) {
      const r = bench(...args);
      expect(r.code).toBe(2);
      expect(r.err).toMatch(what);
      expect(r.out).not.toMatch(/filling/);
    }
  });
});
