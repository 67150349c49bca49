/**
 * MoE layer shapes of real models, used by the benchmark and the demo. The numbers are those of
 * the models' public configs (hidden_size, moe_intermediate_size / intermediate_size, number of
 * routed experts, experts per token, activation); the repository's benchmark definition keeps the
 * same table. They are embedded here so that the package needs nothing outside itself at run time.
 */
import type { Activation } from "./config.ts";

export interface BenchCase {
  name: string;
  /** Model width H (K of FC1, N of FC2). */
  hidden: number;
  /** Per-expert intermediate size I. */
  ffn: number;
  /** Routed experts. */
  experts: number;
  /** Experts per token. */
  topk: number;
  /** silu = gated SwiGLU (FC1 has 2*ffn outputs, gate half first); squared_relu = non-gated. */
  activation: Activation;
}

export const BENCH_CASES: readonly BenchCase[] = [
  { name: "qwen3-30b-a3b", hidden: 2048, ffn: 768, experts: 128, topk: 8, activation: "silu" },
  { name: "nemotron3-nano", hidden: 2688, ffn: 1856, experts: 128, topk: 6, activation: "squared_relu" },
  { name: "gpt-oss-120b", hidden: 2880, ffn: 2880, experts: 128, topk: 4, activation: "silu" },
  { name: "mixtral-8x7b", hidden: 4096, ffn: 14336, experts: 8, topk: 2, activation: "silu" },
  { name: "deepseek-v3", hidden: 7168, ffn: 2048, experts: 256, topk: 8, activation: "silu" },
];

/** Token counts of the benchmark grid: decode (1, 8) to prefill (8192). */
export const BENCH_TOKENS: readonly number[] = [1, 8, 32, 128, 512, 2048, 8192];

/** The case called `name`, or undefined. */
export function findCase(name: string): BenchCase | undefined {
  return BENCH_CASES.find((c) => c.name === name);
}
