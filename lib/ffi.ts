/**
 * The only module that touches bun:ffi: loads build/libfusedmoe.so, declares every fmoe_* symbol
 * of csrc/include/fmoe.h, and exposes each as a plain function that takes numbers (device
 * pointers and handles are plain numbers, 0 = NULL) and TypedArrays (host memory, out-params) and
 * throws FmoeError on a non-zero status. Everything above this file is ordinary typed TypeScript.
 *
 * The library is opened lazily, on the first call that needs it, so that the pure-TypeScript
 * parts of the package (reference, dtype conversions, safetensors) work without a build.
 */
import { dlopen, type Pointer } from "bun:ffi";
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { FmoeError, Status, statusName } from "./errors.ts";

/** The ABI version this binding was written against (FMOE_ABI_VERSION). */
export const ABI_VERSION = 1;


// Every symbol of fmoe.h with its C signature: int64_t -> i64, pointers -> ptr, int -> i32.
const SYMBOLS = {
  fmoe_last_error: { args: [], returns: "cstring" },
  fmoe_abi_version: { args: ["ptr"], returns: "i32" },
  fmoe_build_info: { args: [], returns: "cstring" },
  fmoe_cuda_device_count: { args: ["ptr"], returns: "i32" },

  fmoe_context_create: { args: ["i64", "i64", "ptr"], returns: "i32" },
  fmoe_context_destroy: { args: ["ptr"], returns: "i32" },
  fmoe_context_backend: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_context_device_name: { args: ["ptr", "ptr", "i64"], returns: "i32" },
  fmoe_context_device_props: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_context_live_allocations: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_context_synchronize: { args: ["ptr"], returns: "i32" },

  fmoe_alloc: { args: ["ptr", "i64", "ptr"], returns: "i32" },
  fmoe_free: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_memcpy: { args: ["ptr", "ptr", "ptr", "i64", "i64", "ptr"], returns: "i32" },
  fmoe_memset: { args: ["ptr", "ptr", "i64", "i64", "ptr"], returns: "i32" },

  fmoe_stream_create: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_stream_destroy: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_stream_synchronize: { args: ["ptr", "ptr"], returns: "i32" },

  fmoe_graph_capture_begin: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_graph_capture_end: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_graph_launch: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_graph_destroy: { args: ["ptr", "ptr"], returns: "i32" },

  fmoe_event_create: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_event_destroy: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_event_record: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_event_elapsed_ms: { args: ["ptr", "ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_event_query: { args: ["ptr", "ptr", "ptr"], returns: "i32" },

  fmoe_max_rows: { args: ["i64", "i64", "i64", "i64", "ptr"], returns: "i32" },
  fmoe_permute: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_activation_quant: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_quantize_mxfp8: { args: ["ptr", "ptr", "ptr", "i64", "i64", "ptr", "ptr"], returns: "i32" },
  fmoe_dequantize_mxfp8: { args: ["ptr", "ptr", "ptr", "ptr", "i64", "i64", "ptr"], returns: "i32" },
  fmoe_swizzled_scale_bytes: { args: ["i64", "i64", "i64", "ptr"], returns: "i32" },
  fmoe_swizzle_scales: { args: ["ptr", "ptr", "ptr", "i64", "i64", "i64", "ptr"], returns: "i32" },
  fmoe_unswizzle_scales: { args: ["ptr", "ptr", "ptr", "i64", "i64", "i64", "ptr"], returns: "i32" },
  fmoe_grouped_mm_bf16: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_grouped_mm_mxfp8: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_unpermute: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_route: { args: ["ptr", "ptr", "ptr"], returns: "i32" },

  fmoe_plan_create: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  fmoe_plan_destroy: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_plan_workspace_bytes: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_plan_invalid_count: { args: ["ptr", "ptr"], returns: "i32" },
  fmoe_fused_moe: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
} as const;

type Library = ReturnType<typeof dlopen<typeof SYMBOLS>>["symbols"];

/** Where the library is looked for: $FMOE_LIBRARY, else <package root>/build/libfusedmoe.so. */
export function libraryPath(): string {
  const fromEnv = process.env.FMOE_LIBRARY;
  if (fromEnv !== undefined && fromEnv !== "") return resolve(fromEnv);
  return join(import.meta.dir, "..", "build", "libfusedmoe.so");
}

let cached: Library | undefined;

function lib(): Library {
  if (cached !== undefined) return cached;
  const path = libraryPath();
  if (!existsSync(path)) {
    throw new FmoeError(
      Status.UNSUPPORTED,
      `fused-moe: native library not found at ${path}; run \`bun run build\` (or set FMOE_LIBRARY)`,
    );
  }
  let symbols: Library;
  try {
    symbols = dlopen(path, SYMBOLS).symbols;
  } catch (err) {
    const why = err instanceof Error ? err.message : String(err);
    throw new FmoeError(Status.UNSUPPORTED, `fused-moe: cannot load ${path}: ${why}; rebuild with \`bun run build\``);
  }
  const version = new BigInt64Array(1);
  check(symbols.fmoe_abi_version(version), "fmoe_abi_version", symbols);
  if (Number(version[0]) !== ABI_VERSION) {
    throw new FmoeError(
      Status.UNSUPPORTED,
      `fused-moe: ${path} has ABI version ${version[0]}, this package needs ${ABI_VERSION}; rebuild with \`bun run build\``,
    );
  }
  cached = symbols;
  return symbols;
}

/** True when the native library can be loaded (no exception). */
export function libraryAvailable(): boolean {
  try {
    lib();
    return true;
  } catch {
    return false;
  }
}

/** Throws FmoeError(status, fmoe_last_error()) unless status is FMOE_OK. */
function check(status: number, fn: string, symbols: Library = lib()): void {
  if (status === Status.OK) return;
  const message = String(symbols.fmoe_last_error() ?? "");
  throw new FmoeError(status as Status, message !== "" ? message : `${fn} failed: ${statusName(status)}`);
}

// Device pointers and handles live in TS as numbers (user-space addresses are < 2^53).
function p(address: number): Pointer | null {
  return address === 0 ? null : (address as Pointer);
}

/** Host memory or a device address: what fmoe_memcpy accepts on either side. */
export type HostOrDevice = number | ArrayBufferView;

function hostOrDevice(x: HostOrDevice): Pointer | NodeJS.TypedArray | null {
  if (typeof x === "number") return p(x);
  if (x instanceof DataView) return new Uint8Array(x.buffer, x.byteOffset, x.byteLength);
  return x as NodeJS.TypedArray;
}

function outPtr(): BigUint64Array {
  return new BigUint64Array(1);
}

function outI64(): BigInt64Array {
  return new BigInt64Array(1);
}

// ------------------------------------------------------------------------------------------------
// Argument structs. fmoe.h makes every field 8 bytes with `size` first, so one packer serves all:
// field i lives at byte 8*i. Omitted fields are 0 (NULL pointer, zero integer).

type FieldKind = "ptr" | "i64" | "f64";

/** The layout of one fmoe.h argument struct: its field names and kinds in declaration order. */
export interface StructDef<F extends string> {
  readonly name: string;
  readonly fields: readonly (readonly [F, FieldKind])[];
}

function defineStruct<const F extends string>(name: string, fields: readonly (readonly [F, FieldKind])[]): StructDef<F> {
  return { name, fields };
}

/** Field values of a struct: numbers (pointers as addresses, 0 = NULL); `size` is filled in. */
export type StructValues<F extends string> = { readonly [K in Exclude<F, "size">]?: number | null };

/** Packs `values` into the byte image of `def` (size = 8 * field count). */
export function packStruct<F extends string>(def: StructDef<F>, values: StructValues<F>): Uint8Array {
  const bytes = new Uint8Array(def.fields.length * 8);
  const view = new DataView(bytes.buffer);
  def.fields.forEach(([field, kind], i) => {
    const raw = field === "size" ? bytes.length : (values as Record<string, number | null | undefined>)[field];
    const value = raw ?? 0;
    if (!Number.isFinite(value) && kind !== "f64") {
      throw new FmoeError(Status.INVALID_ARGUMENT, `${def.name}.${field}: not a finite number (${value})`);
    }
    if (kind === "f64") view.setFloat64(i * 8, value, true);
    else if (kind === "ptr") view.setBigUint64(i * 8, BigInt(value), true);
    else view.setBigInt64(i * 8, BigInt(Math.trunc(value)), true);
  });
  return bytes;
}

/** Reads every field of a struct image back as numbers (i64 fields converted with Number). */
function unpackStruct<F extends string>(def: StructDef<F>, bytes: Uint8Array): Record<F, number> {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = {} as Record<F, number>;
  def.fields.forEach(([field, kind], i) => {
    out[field] = kind === "f64" ? view.getFloat64(i * 8, true) : Number(view.getBigInt64(i * 8, true));
  });
  return out;
}

export const DEVICE_PROPS = defineStruct("fmoe_device_props", [
  ["size", "i64"],
  ["backend", "i64"],
  ["device", "i64"],
  ["compute_capability", "i64"],
  ["multiprocessors", "i64"],
  ["global_memory_bytes", "i64"],
  ["l2_cache_bytes", "i64"],
  ["shared_memory_per_block_bytes", "i64"],
]);

export const PERMUTE_ARGS = defineStruct("fmoe_permute_args", [
  ["size", "i64"],
  ["hidden", "ptr"],
  ["routing_map", "ptr"],
  ["probs", "ptr"],
  ["permuted", "ptr"],
  ["permuted_q", "ptr"],
  ["permuted_scale", "ptr"],
  ["expert_offsets", "ptr"],
  ["permutation_map", "ptr"],
  ["inverse_map", "ptr"],
  ["invalid_count", "ptr"],
  ["num_tokens", "i64"],
  ["hidden_size", "i64"],
  ["topk", "i64"],
  ["num_experts", "i64"],
  ["local_expert_start", "i64"],
  ["num_local_experts", "i64"],
  ["alignment", "i64"],
]);

export const ACTIVATION_ARGS = defineStruct("fmoe_activation_args", [
  ["size", "i64"],
  ["input", "ptr"],
  ["output", "ptr"],
  ["output_q", "ptr"],
  ["output_scale", "ptr"],
  ["row_map", "ptr"],
  ["n_used", "ptr"],
  ["rows", "i64"],
  ["ffn", "i64"],
  ["activation", "i64"],
  ["layout", "i64"],
  ["alpha", "f64"],
  ["limit", "f64"],
]);

export const GROUPED_MM_ARGS = defineStruct("fmoe_grouped_mm_args", [
  ["size", "i64"],
  ["a", "ptr"],
  ["a_scale", "ptr"],
  ["b", "ptr"],
  ["b_scale", "ptr"],
  ["bias", "ptr"],
  ["c", "ptr"],
  ["group_offsets", "ptr"],
  ["row_map", "ptr"],
  ["rows", "i64"],
  ["n", "i64"],
  ["k", "i64"],
  ["groups", "i64"],
]);

export const UNPERMUTE_ARGS = defineStruct("fmoe_unpermute_args", [
  ["size", "i64"],
  ["input", "ptr"],
  ["inverse_map", "ptr"],
  ["probs", "ptr"],
  ["output", "ptr"],
  ["rows", "i64"],
  ["num_tokens", "i64"],
  ["hidden_size", "i64"],
  ["topk", "i64"],
]);

export const ROUTE_ARGS = defineStruct("fmoe_route_args", [
  ["size", "i64"],
  ["logits", "ptr"],
  ["selection_bias", "ptr"],
  ["routing_map", "ptr"],
  ["probs", "ptr"],
  ["num_tokens", "i64"],
  ["num_experts", "i64"],
  ["topk", "i64"],
  ["scoring", "i64"],
  ["num_groups", "i64"],
  ["topk_groups", "i64"],
  ["renormalize", "i64"],
  ["scale", "f64"],
]);

export const PLAN_DESC = defineStruct("fmoe_plan_desc", [
  ["size", "i64"],
  ["hidden_size", "i64"],
  ["ffn", "i64"],
  ["num_experts", "i64"],
  ["num_local_experts", "i64"],
  ["local_expert_start", "i64"],
  ["topk", "i64"],
  ["activation", "i64"],
  ["layout", "i64"],
  ["alpha", "f64"],
  ["limit", "f64"],
  ["weight_format", "i64"],
  ["alignment", "i64"],
  ["max_tokens", "i64"],
  ["apply_router_weight_on_input", "i64"],
]);

export const MOE_ARGS = defineStruct("fmoe_moe_args", [
  ["size", "i64"],
  ["hidden", "ptr"],
  ["routing_map", "ptr"],
  ["probs", "ptr"],
  ["tokens_per_expert", "ptr"],
  ["fc1", "ptr"],
  ["fc1_scale", "ptr"],
  ["fc2", "ptr"],
  ["fc2_scale", "ptr"],
  ["fc1_bias", "ptr"],
  ["fc2_bias", "ptr"],
  ["output", "ptr"],
  ["workspace", "ptr"],
  ["workspace_bytes", "i64"],
  ["num_tokens", "i64"],
]);

type FieldsOf<S> = S extends StructDef<infer F> ? StructValues<F> : never;
export type PermuteFields = FieldsOf<typeof PERMUTE_ARGS>;
export type ActivationFields = FieldsOf<typeof ACTIVATION_ARGS>;
export type GroupedMmFields = FieldsOf<typeof GROUPED_MM_ARGS>;
export type UnpermuteFields = FieldsOf<typeof UNPERMUTE_ARGS>;
export type RouteFields = FieldsOf<typeof ROUTE_ARGS>;
export type PlanDescFields = FieldsOf<typeof PLAN_DESC>;
export type MoeFields = FieldsOf<typeof MOE_ARGS>;

// ------------------------------------------------------------------------------------------------
// Library-wide

/** fmoe_build_info(): version, backends compiled in, CUDA version. */
export function buildInfo(): string {
  return String(lib().fmoe_build_info() ?? "");
}

/** fmoe_cuda_device_count(): 0 on a host-only build or without a device. */
export function cudaDeviceCount(): number {
  const out = outI64();
  check(lib().fmoe_cuda_device_count(out), "fmoe_cuda_device_count");
  return Number(out[0]);
}

/** fmoe_max_rows(): static row capacity of the permuted buffers. */
export function maxRows(numTokens: number, topk: number, numLocalExperts: number, alignment: number): number {
  const out = outI64();
  check(lib().fmoe_max_rows(numTokens, topk, numLocalExperts, alignment, out), "fmoe_max_rows");
  return Number(out[0]);
}

/** fmoe_swizzled_scale_bytes(). */
export function swizzledScaleBytes(batch: number, rows: number, scaleCols: number): number {
  const out = outI64();
  check(lib().fmoe_swizzled_scale_bytes(batch, rows, scaleCols, out), "fmoe_swizzled_scale_bytes");
  return Number(out[0]);
}

// ------------------------------------------------------------------------------------------------
// Contexts

export function contextCreate(backend: number, device: number): number {
  const out = outPtr();
  check(lib().fmoe_context_create(backend, device, out), "fmoe_context_create");
  return Number(out[0]);
}

export function contextDestroy(ctx: number): void {
  check(lib().fmoe_context_destroy(p(ctx)), "fmoe_context_destroy");
}

export function contextBackend(ctx: number): number {
  const out = outI64();
  check(lib().fmoe_context_backend(p(ctx), out), "fmoe_context_backend");
  return Number(out[0]);
}

export function contextDeviceName(ctx: number): string {
  const buf = new Uint8Array(256);
  check(lib().fmoe_context_device_name(p(ctx), buf, buf.length), "fmoe_context_device_name");
  const end = buf.indexOf(0);
  return new TextDecoder().decode(buf.subarray(0, end < 0 ? buf.length : end));
}

/** The fields of fmoe_device_props (size excluded). */
export type RawDeviceProps = Omit<Record<(typeof DEVICE_PROPS.fields)[number][0], number>, "size">;

export function contextDeviceProps(ctx: number): RawDeviceProps {
  const bytes = packStruct(DEVICE_PROPS, {});
  check(lib().fmoe_context_device_props(p(ctx), bytes), "fmoe_context_device_props");
  const { size: _size, ...rest } = unpackStruct(DEVICE_PROPS, bytes);
  return rest;
}

export function contextLiveAllocations(ctx: number): { count: number; bytes: number } {
  const count = outI64();
  const bytes = outI64();
  check(lib().fmoe_context_live_allocations(p(ctx), count, bytes), "fmoe_context_live_allocations");
  return { count: Number(count[0]), bytes: Number(bytes[0]) };
}

export function contextSynchronize(ctx: number): void {
  check(lib().fmoe_context_synchronize(p(ctx)), "fmoe_context_synchronize");
}

// ------------------------------------------------------------------------------------------------
// Memory

export function alloc(ctx: number, bytes: number): number {
  const out = outPtr();
  check(lib().fmoe_alloc(p(ctx), bytes, out), "fmoe_alloc");
  return Number(out[0]);
}

export function free(ctx: number, address: number): void {
  check(lib().fmoe_free(p(ctx), p(address)), "fmoe_free");
}

/** fmoe_memcpy kinds. */
export const MemcpyKind = { HostToDevice: 0, DeviceToHost: 1, DeviceToDevice: 2 } as const;

export function memcpy(ctx: number, dst: HostOrDevice, src: HostOrDevice, bytes: number, kind: number, stream: number): void {
  check(lib().fmoe_memcpy(p(ctx), hostOrDevice(dst), hostOrDevice(src), bytes, kind, p(stream)), "fmoe_memcpy");
}

export function memset(ctx: number, address: number, value: number, bytes: number, stream: number): void {
  check(lib().fmoe_memset(p(ctx), p(address), value, bytes, p(stream)), "fmoe_memset");
}

// ------------------------------------------------------------------------------------------------
// Streams, graphs, events

export function streamCreate(ctx: number): number {
  const out = outPtr();
  check(lib().fmoe_stream_create(p(ctx), out), "fmoe_stream_create");
  return Number(out[0]);
}

export function streamDestroy(ctx: number, stream: number): void {
  check(lib().fmoe_stream_destroy(p(ctx), p(stream)), "fmoe_stream_destroy");
}

export function streamSynchronize(ctx: number, stream: number): void {
  check(lib().fmoe_stream_synchronize(p(ctx), p(stream)), "fmoe_stream_synchronize");
}

export function graphCaptureBegin(ctx: number, stream: number): void {
  check(lib().fmoe_graph_capture_begin(p(ctx), p(stream)), "fmoe_graph_capture_begin");
}

export function graphCaptureEnd(ctx: number, stream: number): number {
  const out = outPtr();
  check(lib().fmoe_graph_capture_end(p(ctx), p(stream), out), "fmoe_graph_capture_end");
  return Number(out[0]);
}

export function graphLaunch(ctx: number, graph: number, stream: number): void {
  check(lib().fmoe_graph_launch(p(ctx), p(graph), p(stream)), "fmoe_graph_launch");
}

export function graphDestroy(ctx: number, graph: number): void {
  check(lib().fmoe_graph_destroy(p(ctx), p(graph)), "fmoe_graph_destroy");
}

export function eventCreate(ctx: number): number {
  const out = outPtr();
  check(lib().fmoe_event_create(p(ctx), out), "fmoe_event_create");
  return Number(out[0]);
}

export function eventDestroy(ctx: number, event: number): void {
  check(lib().fmoe_event_destroy(p(ctx), p(event)), "fmoe_event_destroy");
}

export function eventRecord(ctx: number, event: number, stream: number): void {
  check(lib().fmoe_event_record(p(ctx), p(event), p(stream)), "fmoe_event_record");
}

export function eventElapsedMs(ctx: number, start: number, end: number): number {
  const out = new Float64Array(1);
  check(lib().fmoe_event_elapsed_ms(p(ctx), p(start), p(end), out), "fmoe_event_elapsed_ms");
  return out[0]!;
}

export function eventQuery(ctx: number, event: number): boolean {
  const out = outI64();
  check(lib().fmoe_event_query(p(ctx), p(event), out), "fmoe_event_query");
  return out[0] !== 0n;
}

// ------------------------------------------------------------------------------------------------
// Ops

export function permute(ctx: number, stream: number, fields: PermuteFields): void {
  check(lib().fmoe_permute(p(ctx), p(stream), packStruct(PERMUTE_ARGS, fields)), "fmoe_permute");
}

export function activationQuant(ctx: number, stream: number, fields: ActivationFields): void {
  check(lib().fmoe_activation_quant(p(ctx), p(stream), packStruct(ACTIVATION_ARGS, fields)), "fmoe_activation_quant");
}

export function quantizeMxfp8(ctx: number, stream: number, input: number, rows: number, cols: number, data: number, scale: number): void {
  check(
    lib().fmoe_quantize_mxfp8(p(ctx), p(stream), p(input), rows, cols, p(data), p(scale)),
    "fmoe_quantize_mxfp8",
  );
}

export function dequantizeMxfp8(ctx: number, stream: number, data: number, scale: number, rows: number, cols: number, out: number): void {
  check(
    lib().fmoe_dequantize_mxfp8(p(ctx), p(stream), p(data), p(scale), rows, cols, p(out)),
    "fmoe_dequantize_mxfp8",
  );
}

export function swizzleScales(ctx: number, stream: number, linear: number, batch: number, rows: number, scaleCols: number, out: number): void {
  check(
    lib().fmoe_swizzle_scales(p(ctx), p(stream), p(linear), batch, rows, scaleCols, p(out)),
    "fmoe_swizzle_scales",
  );
}

export function unswizzleScales(ctx: number, stream: number, swizzled: number, batch: number, rows: number, scaleCols: number, out: number): void {
  check(
    lib().fmoe_unswizzle_scales(p(ctx), p(stream), p(swizzled), batch, rows, scaleCols, p(out)),
    "fmoe_unswizzle_scales",
  );
}

export function groupedMmBf16(ctx: number, stream: number, fields: GroupedMmFields): void {
  check(lib().fmoe_grouped_mm_bf16(p(ctx), p(stream), packStruct(GROUPED_MM_ARGS, fields)), "fmoe_grouped_mm_bf16");
}

export function groupedMmMxfp8(ctx: number, stream: number, fields: GroupedMmFields): void {
  check(lib().fmoe_grouped_mm_mxfp8(p(ctx), p(stream), packStruct(GROUPED_MM_ARGS, fields)), "fmoe_grouped_mm_mxfp8");
}

export function unpermute(ctx: number, stream: number, fields: UnpermuteFields): void {
  check(lib().fmoe_unpermute(p(ctx), p(stream), packStruct(UNPERMUTE_ARGS, fields)), "fmoe_unpermute");
}

export function route(ctx: number, stream: number, fields: RouteFields): void {
  check(lib().fmoe_route(p(ctx), p(stream), packStruct(ROUTE_ARGS, fields)), "fmoe_route");
}

// ------------------------------------------------------------------------------------------------
// Plans

export function planCreate(ctx: number, desc: PlanDescFields): number {
  const out = outPtr();
  check(lib().fmoe_plan_create(p(ctx), packStruct(PLAN_DESC, desc), out), "fmoe_plan_create");
  return Number(out[0]);
}

export function planDestroy(ctx: number, plan: number): void {
  check(lib().fmoe_plan_destroy(p(ctx), p(plan)), "fmoe_plan_destroy");
}

export function planWorkspaceBytes(plan: number): number {
  const out = outI64();
  check(lib().fmoe_plan_workspace_bytes(p(plan), out), "fmoe_plan_workspace_bytes");
  return Number(out[0]);
}

/** Device address of the plan's i32 invalid-id counter. */
export function planInvalidCount(plan: number): number {
  const out = outPtr();
  check(lib().fmoe_plan_invalid_count(p(plan), out), "fmoe_plan_invalid_count");
  return Number(out[0]);
}

export function fusedMoe(plan: number, stream: number, fields: MoeFields): void {
  check(lib().fmoe_fused_moe(p(plan), p(stream), packStruct(MOE_ARGS, fields)), "fmoe_fused_moe");
}
