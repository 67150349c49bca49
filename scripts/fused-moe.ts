#!/usr/bin/env bun
/**
 * fused-moe CLI: runs one MoE layer on tensors from a safetensors file.
 *
 *   bun run fused-moe run --input in.safetensors --output out.safetensors [options]
 *
 * Exit codes: 0 ok, 1 the library failed (FmoeError), 2 bad usage or bad input file.
 */
import { parseArgs } from "node:util";
import {
  bf16ToF32,
  Context,
  type DType,
  FmoeError,
  fc1Outputs,
  FusedMoE,
  type HostTensor,
  isActivation,
  isGatedLayout,
  readSafetensors,
  SafetensorsError,
  writeSafetensors,
} from "../lib/index.ts";

const USAGE = `usage: bun run fused-moe run --input IN.safetensors --output OUT.safetensors [options]

Computes out = MoE(hidden) with one fused layer and writes it to OUT as tensor "out" [T, H] BF16.

Input tensors (safetensors):
  hidden      [T, H]            BF16   tokens
  routing_map [T, topk]         I32    global expert ids
  probs       [T, topk]         F32    router weights
  fc1         [E_local, N1, H]  BF16   N1 = ffn (squared_relu) or 2*ffn (gated)
  fc2         [E_local, H, ffn] BF16
  fc1_bias    [E_local, N1]     F32 or BF16 (optional)
  fc2_bias    [E_local, H]      F32 or BF16 (optional)

Options:
  --backend auto|host|cuda           default auto (cuda when a GPU is present)
  --activation squared_relu|silu|gelu|swiglu_oai   default silu
  --layout halves|interleaved        gated layout of fc1's outputs, default halves
  --num-experts N                    global expert count, default E_local + local-expert-start
  --local-expert-start S             global id of fc1[0], default 0
  --weights bf16|mxfp8               compute format, default bf16 (mxfp8 quantizes on the device)
  --alignment A                      rows per expert group padded to a multiple of A, default 16
  --alpha X, --limit X               swiglu_oai parameters (defaults 1.702, 7.0)
  -h, --help                         this text`;

/** A usage or input-file problem: one line on stderr, exit 2. */
class UsageError extends Error {}

function intFlag(name: string, value: string | undefined, fallback: number, min: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < min) throw new UsageError(`--${name} must be an integer >= ${min}, got ${value}`);
  return n;
}

function numFlag(name: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isFinite(n)) throw new UsageError(`--${name} must be a number, got ${value}`);
  return n;
}

function main(argv: string[]): number {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        input: { type: "string", short: "i" },
        output: { type: "string", short: "o" },
        backend: { type: "string", default: "auto" },
        activation: { type: "string", default: "silu" },
        layout: { type: "string", default: "halves" },
        "num-experts": { type: "string" },
        "local-expert-start": { type: "string" },
        weights: { type: "string", default: "bf16" },
        alignment: { type: "string" },
        alpha: { type: "string" },
        limit: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  if (positionals.length !== 1 || positionals[0] !== "run") throw new UsageError(`expected the command "run" (see --help)`);
  if (values.input === undefined) throw new UsageError("--input is required");
  if (values.output === undefined) throw new UsageError("--output is required");
  const backend = values.backend;
  if (backend !== "auto" && backend !== "host" && backend !== "cuda") throw new UsageError(`--backend must be auto, host or cuda, got ${backend}`);
  const activation = values.activation;
  if (!isActivation(activation)) throw new UsageError(`--activation must be squared_relu, silu, gelu or swiglu_oai, got ${activation}`);
  const layout = values.layout;
  if (!isGatedLayout(layout)) throw new UsageError(`--layout must be halves or interleaved, got ${layout}`);
  const weightFormat = values.weights;
  if (weightFormat !== "bf16" && weightFormat !== "mxfp8") throw new UsageError(`--weights must be bf16 or mxfp8, got ${weightFormat}`);

  let file;
  try {
    file = readSafetensors(values.input);
  } catch (err) {
    if (err instanceof SafetensorsError) throw new UsageError(err.message);
    throw err;
  }
  const tensors = file.tensors;
  const get = (name: string, dtypes: readonly DType[], rank: number, optional = false): HostTensor | undefined => {
    const t = tensors.get(name);
    if (t === undefined) {
      if (optional) return undefined;
      throw new UsageError(`${values.input}: missing tensor "${name}"`);
    }
    if (!dtypes.includes(t.dtype)) throw new UsageError(`${values.input}: tensor "${name}" is ${t.dtype}, expected ${dtypes.join(" or ")}`);
    if (t.shape.length !== rank) throw new UsageError(`${values.input}: tensor "${name}" has shape [${t.shape.join(", ")}], expected rank ${rank}`);
    return t;
  };
  const expectShape = (name: string, t: HostTensor, shape: number[]): void => {
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new UsageError(`${values.input}: tensor "${name}" has shape [${t.shape.join(", ")}], expected [${shape.join(", ")}]`);
    }
  };

  const hidden = get("hidden", ["bf16"], 2)!;
  const [T, H] = hidden.shape as [number, number];
  const routing = get("routing_map", ["i32"], 2)!;
  const topk = routing.shape[1]!;
  expectShape("routing_map", routing, [T, topk]);
  const probs = get("probs", ["f32"], 2)!;
  expectShape("probs", probs, [T, topk]);
  const fc1 = get("fc1", ["bf16"], 3)!;
  const [E, N1] = fc1.shape as [number, number];
  expectShape("fc1", fc1, [E, N1, H]);
  const gated = activation !== "squared_relu";
  if (gated && N1 % 2 !== 0) throw new UsageError(`${values.input}: fc1 has ${N1} outputs: a gated activation needs an even count`);
  const ffn = gated ? N1 / 2 : N1;
  const fc2 = get("fc2", ["bf16"], 3)!;
  expectShape("fc2", fc2, [E, H, ffn]);
  if (fc1Outputs(activation, ffn) !== N1) throw new UsageError("internal: fc1 outputs mismatch");
  // Biases: f32 in the ABI; BF16 files are widened (exact).
  const bias = (name: string, shape: number[]): Float32Array | undefined => {
    const t = get(name, ["f32", "bf16"], 2, true);
    if (t === undefined) return undefined;
    expectShape(name, t, shape);
    return t.dtype === "bf16" ? bf16ToF32(t.data as Uint16Array) : (t.data as Float32Array);
  };
  const fc1Bias = bias("fc1_bias", [E, N1]);
  const fc2Bias = bias("fc2_bias", [E, H]);

  const start = intFlag("local-expert-start", values["local-expert-start"], 0, 0);
  const numExperts = intFlag("num-experts", values["num-experts"], start + E, 1);
  if (start + E > numExperts) throw new UsageError(`--local-expert-start ${start} + ${E} local experts exceeds --num-experts ${numExperts}`);
  const alignment = intFlag("alignment", values.alignment, 16, 1);

  using ctx = Context.create({ backend });
  using moe = new FusedMoE(
    ctx,
    {
      hidden: H,
      ffn,
      numExperts,
      numLocalExperts: E,
      localExpertStart: start,
      topk,
      activation,
      layout,
      alpha: numFlag("alpha", values.alpha),
      limit: numFlag("limit", values.limit),
      weightFormat,
      alignment,
      maxTokens: Math.max(1, T),
    },
    {
      fc1: ctx.upload(fc1.data, fc1.shape, "bf16"),
      fc2: ctx.upload(fc2.data, fc2.shape, "bf16"),
      fc1Bias: fc1Bias && ctx.upload(fc1Bias, [E, N1], "f32"),
      fc2Bias: fc2Bias && ctx.upload(fc2Bias, [E, H], "f32"),
    },
  );
  using out = moe.forward({
    hidden: ctx.upload(hidden.data, [T, H], "bf16"),
    routingMap: ctx.upload(routing.data, [T, topk], "i32"),
    probs: ctx.upload(probs.data, [T, topk], "f32"),
  });
  const result = out.download();
  const invalid = moe.invalidCount();
  writeSafetensors(values.output, { out: { dtype: "bf16", shape: [T, H], data: result } }, {
    backend: ctx.backend,
    device: ctx.deviceName,
    activation,
    weights: weightFormat,
  });
  const note = invalid > 0 ? `; ${invalid} routing ids outside [0, ${numExperts}) were dropped` : "";
  console.error(`fused-moe: wrote out [${T}, ${H}] bf16 to ${values.output} (${ctx.backend}: ${ctx.deviceName}${note})`);
  return 0;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (err) {
  if (err instanceof UsageError) {
    console.error(`fused-moe: ${err.message}`);
    process.exitCode = 2;
  } else if (err instanceof FmoeError) {
    console.error(`fused-moe: ${err.message}`);
    process.exitCode = 1;
  } else {
    throw err;
  }
}
