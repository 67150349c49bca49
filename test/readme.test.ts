// The README's TypeScript examples, run as written (on the best backend present, as their "auto"
// context picks), so that the documentation cannot drift from the API (Bun does not type-check, but an unknown function or option throws).
// Each ```ts block of README.md runs with only these changes, each of which must still apply:
// - the first example's layer shape is shrunk (its `const [T, H, I, E, topk] = ...` line);
// - the router example gets the `logits` and `selectionBias` it assumes, and `route` imported;
// - the router and server fragments run after the first example, in blocks of their own (they
//   reuse its names);
// - the checkpoint example reads a small Qwen-style checkpoint written here instead of its path.
import { describe, expect } from "bun:test";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { perExpertWeights, putGatedExperts, seededTest, suiteTempDir, type Tensors, writeCheckpoint } from "./helpers.ts";

const ROOT = join(import.meta.dir, "..");
const README = readFileSync(join(ROOT, "README.md"), "utf8");
const BLOCKS = [...README.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]!);

/** `text` with `from` replaced once; fails when the README no longer holds `from`. */
function replaceOnce(text: string, from: string | RegExp, to: string): string {
  const found = typeof from === "string" ? text.includes(from) : from.test(text);
  if (!found) throw new Error(`README example: expected to find ${String(from)}; update test/readme.test.ts with the README`);
  return text.replace(from, to);
}

/** Runs `source` as a module inside the package (so `from "fused-moe"` resolves to it); its output. */
function runScript(dir: string, name: string, source: string): string {
  // Inside the package directory, where the import of "fused-moe" resolves to the package itself.
  const path = join(ROOT, "test", `.readme-${name}-${process.pid}.ts`);
  writeFileSync(path, source);
  try {
    const child = Bun.spawnSync([process.execPath, path], { cwd: dir, stdout: "pipe", stderr: "pipe" });
    const out = child.stdout.toString() + child.stderr.toString();
    if (child.exitCode !== 0) throw new Error(`README example "${name}" exited with ${child.exitCode}:\n${out}`);
    return out;
  } finally {
    rmSync(path, { force: true });
  }
}

describe("README examples", () => {
  const dir = suiteTempDir("fused-moe-readme-");

  seededTest("four TypeScript blocks, in the order this test expects", () => {
    expect(BLOCKS.length).toBe(4);
    expect(BLOCKS[0]).toContain("new FusedMoE(");
    expect(BLOCKS[1]).toContain("route(ctx,");
    expect(BLOCKS[2]).toContain("downloadAsync(stream)");
    expect(BLOCKS[3]).toContain("loadExpertLayer(");
  });

  seededTest("the layer, its graph, the router and the server's wait run as written (smaller shape)", () => {
    // E = 16 so that the router example's 8 groups, 4 kept, hold its topk of 8.
    let main = replaceOnce(BLOCKS[0]!, /const \[T, H, I, E, topk\] = \[[^\]]*\];/, "const [T, H, I, E, topk] = [5, 64, 32, 16, 4];");
    main = replaceOnce(main, 'import { Context, FusedMoE, Rng, randomRouting } from "fused-moe";', 'import { Context, FusedMoE, Rng, randomRouting, route } from "fused-moe";');
    const router = [
      'using logits = ctx.upload(rng.f32Normal(T * E), [T, E], "f32");',
      'using selectionBias = ctx.upload(rng.f32Normal(E, 0.1), [E], "f32");',
      BLOCKS[1]!,
    ].join("\n");
    const source = [
      main,
      'if (y.length !== T * H || !y.every(Number.isFinite) || !y.some((v) => v !== 0)) throw new Error("forward: no output");',
      `{\n${router}\nif (routingMap.shape.join() !== [T, 8].join()) throw new Error("route: wrong shape");\n}`,
      `{\n${BLOCKS[2]!}\nif (bits.length !== T * H) throw new Error("downloadAsync: wrong length");\n}`,
      'console.log("README example done");',
    ].join("\n");
    const out = runScript(dir(), "layer", source);
    expect(out).toMatch(/^(host|cuda) /m); // console.log(ctx.backend, ctx.deviceName)
    expect(out).toContain("README example done");
  });

  seededTest("the checkpoint example loads a layer and builds a FusedMoE from it", (rng) => {
    const [E, H, I] = [4, 64, 32];
    const tensors: Tensors = {};
    putGatedExperts(tensors, 0, perExpertWeights(rng, E, H, I, true), H, I);
    const ckpt = writeCheckpoint(join(dir(), "qwen"), tensors, { config: { model_type: "qwen3_moe", hidden_act: "silu", num_experts: E, num_experts_per_tok: 2 } });
    const source = [
      replaceOnce(BLOCKS[3]!, '"Qwen3-30B-A3B"', JSON.stringify(ckpt)),
      'console.log("loaded", layer.config.hidden, layer.config.ffn, layer.config.numExperts, moe.config.topk);',
    ].join("\n");
    expect(runScript(dir(), "checkpoint", source)).toContain(`loaded ${H} ${I} ${E} 2`);
  });
});
