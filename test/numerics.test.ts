// The scalar number rules of csrc/core/numerics.h, from C++: test/numerics_check.cpp, compiled
// here against the header, compares the branch-free MXFP8 forms that the CUDA kernels use
// (mx_quantize_fast, mx_round_trip_fast) with the scalar functions they stand for, for every scale
// byte of their range and every finite bf16 value a block of that scale can hold: bit for bit,
// no tolerance. Skipped, with the reason, where no C++ compiler is found.
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { suiteTempDir } from "./helpers.ts";

const ROOT = join(import.meta.dir, "..");
const CXX = process.env.CXX ?? "c++";
const HAS_CXX = Bun.which(CXX) !== null;
if (!HAS_CXX) console.log(`numerics: skipped, no C++ compiler (${CXX}) on PATH`);

describe.skipIf(!HAS_CXX)("numerics.h from C++", () => {
  const dir = suiteTempDir("fused-moe-numerics-");

  test("the fast MXFP8 quantization and round trip equal the scalar functions' for every bf16 value and scale", () => {
    const exe = join(dir(), "numerics_check");
    const args = [CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", `-I${join(ROOT, "csrc")}`, join(ROOT, "test/numerics_check.cpp"), "-o", exe];
    const cc = Bun.spawnSync(args, { stdout: "pipe", stderr: "pipe" });
    expect(cc.exitCode, `${args.join(" ")}\n${cc.stderr.toString()}`).toBe(0);
    const run = Bun.spawnSync([exe], { stdout: "pipe", stderr: "pipe" });
    const log = run.stdout.toString() + run.stderr.toString();
    expect(run.exitCode, log).toBe(0);
    const m = log.match(/scales (\d+), values compared (\d+), quantize mismatches (\d+), round trip mismatches (\d+)/);
    expect(m, log).not.toBeNull();
    // 223 scale bytes (17..239); each holds the ~35000 finite bf16 values at or below 448 * 2^s.
    expect(Number(m![1])).toBe(223);
    expect(Number(m![2])).toBeGreaterThan(7_000_000);
    expect(Number(m![3])).toBe(0);
    expect(Number(m![4])).toBe(0);
  });
});
