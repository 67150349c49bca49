// scripts/bench-compare.ts: two `bun run bench --json` runs compared cell by cell. Checked on a
// hand-computed pair of runs (exact values), on random runs through an identity the geometric
// means must satisfy (tolerance 1e-12 relative: f64 rounding of sums of logs), and on the errors
// a bad file or two runs with nothing in common give.
import { describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  type BenchCell, type BenchRun, compareRuns, formatComparison, readBenchRun,
} from "../scripts/bench-compare.ts";
import { seededTest } from "./helpers.ts";

const cell = (name: string, T: number, us: number, floor: number, dtype = "bf16"): BenchCell => ({
  case: name, T, dtype, us, floor_us: floor, ratio: us / floor,
});
const run = (rows: BenchCell[], copy = 4e12, timing = "back-to-back"): BenchRun => ({
  device: "NVIDIA H200", dtype: "bf16", timing, copy_bandwidth_bytes_per_s: copy, rows,
});

describe("bench compare", () => {
  test("a hand-computed pair: matched cells, quotients, geometric means, cells of one run only", () => {
    const current = run([cell("a", 1, 10, 5), cell("a", 8, 20, 20), cell("b", 1, 40, 40)], 4.2e12);
    const previous = run([cell("a", 1, 20, 4), cell("a", 8, 20, 10), cell("c", 1, 7, 7)]);
    const cmp = compareRuns(current, previous);
    expect(cmp.cells.map((c) => [c.case, c.T])).toEqual([["a", 1], ["a", 8]]);
    expect(cmp.cells.map((c) => c.timeRatio)).toEqual([0.5, 1]);
    expect(cmp.cells.map((c) => c.ratioPreviousFloor)).toEqual([2.5, 2]);
    expect(cmp.timeRatio).toBeCloseTo(Math.SQRT1_2, 12);
    expect(cmp.ratio).toBeCloseTo(Math.SQRT2, 12);
    expect(cmp.ratioPreviousFloor).toBeCloseTo(Math.sqrt(5), 12);
    expect(cmp.previousRatio).toBeCloseTo(Math.sqrt(10), 12);
    expect(cmp.onlyCurrent).toEqual(["b 1 bf16"]);
    expect(cmp.onlyPrevious).toEqual(["c 1 bf16"]);
    const text = formatComparison(cmp, current, previous, { current: "new.json", previous: "old.json" });
    expect(text).toContain("copy 4.20 TB/s");
    expect(text).toContain("2 cells in common");
    expect(text).toContain("time ratio 0.707");
    expect(text).toContain("only in new.json: b 1 bf16");
    expect(text).toContain("only in old.json: c 1 bf16");
    expect(text).not.toContain("different devices");
    expect(text).toContain("back-to-back timing");
    expect(text).not.toContain("timed differently");
  });

  seededTest("random runs: each cell's quotients, and time/prev-floor = time ratio x previous ratio", (rng) => {
    const names = ["qwen3", "nemotron", "mixtral"];
    const cells = (scale: number): BenchCell[] =>
      names.flatMap((n) => [1, 8, 512].map((T) => cell(n, T, (1 + 99 * rng.uniform()) * scale, 1 + 99 * rng.uniform())));
    const current = run(cells(1));
    const previous = run(cells(1.3), 3.9e12);
    const cmp = compareRuns(current, previous);
    expect(cmp.cells.length).toBe(9);
    for (const [i, c] of cmp.cells.entries()) {
      expect(c.timeRatio).toBe(current.rows[i]!.us / previous.rows[i]!.us);
      expect(c.ratioPreviousFloor).toBe(current.rows[i]!.us / previous.rows[i]!.floor_us);
    }
    // us / prev_floor = (us / prev_us) * (prev_us / prev_floor), cell by cell, so also in geometric mean.
    expect(Math.abs(cmp.ratioPreviousFloor / (cmp.timeRatio * cmp.previousRatio) - 1)).toBeLessThan(1e-12);
    expect(cmp.onlyCurrent).toEqual([]);
    expect(cmp.onlyPrevious).toEqual([]);
  });

  test("cells match on case, T and dtype; none in common is an error; other devices are flagged", () => {
    const bf16 = run([cell("a", 1, 10, 5)]);
    const mx = run([cell("a", 1, 6, 3, "mxfp8")]);
    expect(() => compareRuns(bf16, mx)).toThrow(/no cell \(case, T, dtype\) in common/);
    const other = { ...run([cell("a", 1, 12, 5)]), device: "NVIDIA H100 80GB HBM3" };
    const text = formatComparison(compareRuns(bf16, other), bf16, other, { current: "x", previous: "y" });
    expect(text).toContain("different devices");
    const isolated = run([cell("a", 1, 11, 5)], 4e12, "isolated");
    const mixed = formatComparison(compareRuns(bf16, isolated), bf16, isolated, { current: "x", previous: "y" });
    expect(mixed).toContain("timed differently (back-to-back, isolated)");
  });

  test("readBenchRun reads a bench file and names what is wrong with a bad one", () => {
    const dir = mkdtempSync(join(tmpdir(), "fmoe-bench-compare-"));
    try {
      const write = (name: string, body: string): string => {
        const path = join(dir, name);
        writeFileSync(path, body);
        return path;
      };
      const good = run([cell("a", 1, 10, 5)]);
      expect(readBenchRun(write("good.json", JSON.stringify({ ...good, geomean_ratio: 2 })))).toEqual(good);
      // Files from before --timing: their replays were timed on an idle stream.
      const { timing: _, ...older } = good;
      expect(readBenchRun(write("older.json", JSON.stringify(older)))).toEqual({ ...good, timing: "isolated" });
      expect(() => readBenchRun(join(dir, "missing.json"))).toThrow(/missing\.json: cannot read a JSON file/);
      expect(() => readBenchRun(write("text.json", "not json"))).toThrow(/text\.json: cannot read a JSON file/);
      expect(() => readBenchRun(write("rows.json", JSON.stringify({ device: "d", copy_bandwidth_bytes_per_s: 1 }))))
        .toThrow(/rows\.json: not a bench run/);
      const badCell = { ...good, rows: [cell("a", 1, 10, 5), { ...cell("a", 8, 10, 5), us: -1 }] };
      expect(() => readBenchRun(write("cell.json", JSON.stringify(badCell)))).toThrow(/cell\.json: rows\[1\] is not a bench cell/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
