/**
 * Seeded random inputs for tests, the demo and the benchmark: the same seed gives the same
 * tokens, weights and routing on every machine.
 */
import { f32ToBf16 } from "./dtype.ts";

/** A small seeded generator (splitmix32 state step + xorshift-multiply output). */
export class Rng {
  #state: number;

  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  /** Uniform 32-bit unsigned integer. */
  nextU32(): number {
    this.#state = (this.#state + 0x9e3779b9) >>> 0;
    let z = this.#state;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  }

  /** Uniform in [0, 1). */
  uniform(): number {
    return this.nextU32() / 4294967296;
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.uniform() * n);
  }

  /** Standard normal (Box-Muller). */
  normal(): number {
    const u = 1 - this.uniform(); // (0, 1]: log stays finite
    const v = this.uniform();
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
  }

  /** `n` normal(0, std) values rounded to bf16. */
  bf16Normal(n: number, std = 1): Uint16Array {
    const out = new Uint16Array(n);
    for (let i = 0; i < n; ++i) out[i] = f32ToBf16(this.normal() * std);
    return out;
  }

  /** `n` normal(0, std) f32 values. */
  f32Normal(n: number, std = 1): Float32Array {
    const out = new Float32Array(n);
    for (let i = 0; i < n; ++i) out[i] = this.normal() * std;
    return out;
  }
}

/**
 * Router output for T tokens: per token, softmax over normal(0,1) logits of `numExperts`
 * experts, the top-k, renormalised (the benchmark's definition). routingMap i32 [T, topk]
 * (distinct ids per token, highest prob first), probs f32 [T, topk].
 */
export function randomRouting(rng: Rng, numTokens: number, numExperts: number, topk: number): { routingMap: Int32Array; probs: Float32Array } {
  const routingMap = new Int32Array(numTokens * topk);
  const probs = new Float32Array(numTokens * topk);
  const logits = new Float64Array(numExperts);
  const order = new Int32Array(numExperts);
  for (let t = 0; t < numTokens; ++t) {
    for (let e = 0; e < numExperts; ++e) {
      logits[e] = rng.normal();
      order[e] = e;
    }
    order.sort((a, b) => logits[b]! - logits[a]!);
    // Softmax then renormalise over the top-k = softmax over the top-k logits alone.
    const top = logits[order[0]!]!;
    let sum = 0;
    for (let k = 0; k < topk; ++k) sum += Math.exp(logits[order[k]!]! - top);
    for (let k = 0; k < topk; ++k) {
      routingMap[t * topk + k] = order[k]!;
      probs[t * topk + k] = Math.exp(logits[order[k]!]! - top) / sum;
    }
  }
  return { routingMap, probs };
}
