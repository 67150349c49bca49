#!/usr/bin/env bun
/**
 * bun run bench:compare NEW.json OLD.json: two `bun run bench --json` runs, cell by cell.
 *
 * A cell's ratio divides its time by a floor built from the copy bandwidth measured in that run,
 * and that measurement moves between boots of the same machine (4.00 and 4.18 TB/s on one H200),
 * so two runs' ratios differ even where their times agree. This prints, for the cells both runs
 * have (same case, T and dtype), both times, their quotient, and the new time against both runs'
 * floors; then the geometric means of each (and a warning where the runs' devices or --timing
 * differ). `bun run bench --compare OLD.json` does the same
 * for the run it has just made (checking OLD.json before it starts).
 */
import { readFileSync } from "node:fs";

/** A cell as `bun run bench --json` writes it (the fields this comparison reads). */
export interface BenchCell {
  case: string;
  T: number;
  dtype: string;
  us: number;
  floor_us: number;
  ratio: number;
}

/** A run as `bun run bench --json` writes it (the fields this comparison reads). */
export interface BenchRun {
  device: string;
  dtype: string;
  /** bench --timing: "back-to-back", or "isolated" (also files written before the option). */
  timing: string;
  copy_bandwidth_bytes_per_s: number;
  rows: BenchCell[];
}

export interface ComparedCell {
  case: string;
  T: number;
  dtype: string;
  us: number;
  previousUs: number;
  /** us / previousUs. */
  timeRatio: number;
  /** The new time against the new run's floor. */
  ratio: number;
  /** The new time against the previous run's floor. */
  ratioPreviousFloor: number;
  previousRatio: number;
}

export interface Comparison {
  cells: ComparedCell[];
  /** "case T dtype" of the cells only one run has. */
  onlyCurrent: string[];
  onlyPrevious: string[];
  /** Geometric means over `cells`. */
  timeRatio: number;
  ratio: number;
  ratioPreviousFloor: number;
  previousRatio: number;
}

const cellKey = (c: BenchCell): string => `${c.case} ${c.T} ${c.dtype}`;

/** The geometric mean of xs (1 for none). */
export function geomean(xs: number[]): number {
  return Math.exp(xs.reduce((a, x) => a + Math.log(x), 0) / Math.max(1, xs.length));
}

/** Throws (naming the problem) where the runs have no cell in common. */
export function compareRuns(current: BenchRun, previous: BenchRun): Comparison {
  const before = new Map(previous.rows.map((c) => [cellKey(c), c]));
  const now = new Set(current.rows.map(cellKey));
  const cells: ComparedCell[] = [];
  const onlyCurrent: string[] = [];
  for (const c of current.rows) {
    const p = before.get(cellKey(c));
    if (!p) {
      onlyCurrent.push(cellKey(c));
      continue;
    }
    cells.push({
      case: c.case, T: c.T, dtype: c.dtype, us: c.us, previousUs: p.us, timeRatio: c.us / p.us,
      ratio: c.ratio, ratioPreviousFloor: c.us / p.floor_us, previousRatio: p.ratio,
    });
  }
  if (cells.length === 0) throw new Error("the two runs have no cell (case, T, dtype) in common");
  return {
    cells,
    onlyCurrent,
    onlyPrevious: previous.rows.map(cellKey).filter((k) => !now.has(k)),
    timeRatio: geomean(cells.map((c) => c.timeRatio)),
    ratio: geomean(cells.map((c) => c.ratio)),
    ratioPreviousFloor: geomean(cells.map((c) => c.ratioPreviousFloor)),
    previousRatio: geomean(cells.map((c) => c.previousRatio)),
  };
}

/** A right-aligned markdown table (bench's result table and this comparison). */
export function markdownTable(head: string[], lines: string[][]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  const fmt = (cells: string[]): string => "| " + cells.map((x, i) => x.padStart(widths[i]!)).join(" | ") + " |";
  return [fmt(head), "|" + widths.map((w) => "-".repeat(w + 2)).join("|") + "|", ...lines.map(fmt)].join("\n");
}

/** A run in one line: device, dtype, timing and measured copy rate (bench prints it too). */
export const runLabel = (r: BenchRun): string =>
  `${r.device}, ${r.dtype}, ${r.timing} timing, copy ${(r.copy_bandwidth_bytes_per_s / 1e12).toFixed(2)} TB/s`;

/** The comparison as lines of text: a header, a table, the geometric means. names: how the
 * header calls the two runs. */
export function formatComparison(cmp: Comparison, current: BenchRun, previous: BenchRun,
                                 names: { current: string; previous: string }): string {
  const head = ["case", "T", "us", "previous us", "time ratio", "ratio", "ratio vs previous floor", "previous ratio"];
  const lines = cmp.cells.map((c) => [
    c.case, String(c.T), c.us.toFixed(1), c.previousUs.toFixed(1), c.timeRatio.toFixed(3),
    c.ratio.toFixed(2), c.ratioPreviousFloor.toFixed(2), c.previousRatio.toFixed(2),
  ]);
  const out = [
    `compare: ${names.current} (${runLabel(current)}) against ${names.previous} (${runLabel(previous)}), ` +
      `${cmp.cells.length} cell${cmp.cells.length === 1 ? "" : "s"} in common`,
  ];
  if (current.device !== previous.device) out.push("compare: the runs are from different devices: their times do not compare");
  if (current.timing !== previous.timing) {
    out.push(`compare: the runs were timed differently (${current.timing}, ${previous.timing}): an isolated ` +
      "replay's time also holds the host's graph submission, a few microseconds (visible at decode)");
  }
  out.push("", markdownTable(head, lines), "");
  out.push(`compare: geometric means: time ratio ${cmp.timeRatio.toFixed(3)} (${names.current} / ${names.previous}); ` +
    `time/floor ${cmp.ratio.toFixed(3)} with ${names.current}'s floors, ${cmp.ratioPreviousFloor.toFixed(3)} with ` +
    `${names.previous}'s (${names.previous} itself: ${cmp.previousRatio.toFixed(3)})`);
  // A subset run (--cases, --tokens) against a full one leaves many cells out: the first few.
  const few = (keys: string[]): string =>
    keys.length <= 6 ? keys.join(", ") : `${keys.slice(0, 6).join(", ")} and ${keys.length - 6} more`;
  if (cmp.onlyCurrent.length) out.push(`compare: only in ${names.current}: ${few(cmp.onlyCurrent)}`);
  if (cmp.onlyPrevious.length) out.push(`compare: only in ${names.previous}: ${few(cmp.onlyPrevious)}`);
  return out.join("\n");
}

/** Reads a `bun run bench --json` file; throws naming the file and what is wrong with it. */
export function readBenchRun(path: string): BenchRun {
  let data: unknown;
  try {
    data = JSON.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new Error(`${path}: cannot read a JSON file (${(e as Error).message})`);
  }
  const run = data as Partial<BenchRun>;
  if (!run || typeof run !== "object" || !Array.isArray(run.rows) || typeof run.device !== "string" ||
      typeof run.copy_bandwidth_bytes_per_s !== "number") {
    throw new Error(`${path}: not a bench run (device, copy_bandwidth_bytes_per_s and rows expected)`);
  }
  run.rows.forEach((c, i) => {
    const ok = c && typeof c.case === "string" && Number.isInteger(c.T) && typeof c.dtype === "string" &&
      [c.us, c.floor_us, c.ratio].every((x) => typeof x === "number" && x > 0 && Number.isFinite(x));
    if (!ok) throw new Error(`${path}: rows[${i}] is not a bench cell (case, T, dtype, us, floor_us, ratio expected)`);
  });
  return {
    device: run.device, dtype: String(run.dtype ?? ""), timing: typeof run.timing === "string" ? run.timing : "isolated",
    copy_bandwidth_bytes_per_s: run.copy_bandwidth_bytes_per_s, rows: run.rows,
  };
}

if (import.meta.main) {
  const [currentPath, previousPath] = process.argv.slice(2);
  if (!currentPath || !previousPath) {
    console.error("usage: bun run bench:compare NEW.json OLD.json   (two `bun run bench --json` files)");
    process.exit(2);
  }
  try {
    const current = readBenchRun(currentPath);
    const previous = readBenchRun(previousPath);
    const names = { current: currentPath, previous: previousPath };
    console.log(formatComparison(compareRuns(current, previous), current, previous, names));
  } catch (e) {
    console.error(`bench:compare: ${(e as Error).message}`);
    process.exit(2);
  }
}
