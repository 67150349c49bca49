/**
 * Tensor: a device buffer (memory of the context's backend) with a shape and a dtype.
 *
 * Shapes are row-major and dense. Element counts may pass 2^31 (a DeepSeek-V3 fc1 holds 7.5e9
 * elements): all size arithmetic is in Number, exact up to 2^53.
 */
import type { Context, Stream, WaitOptions } from "./context.ts";
import {
  allocArray,
  arrayMatchesDType,
  bytesPerElement,
  type DType,
  type DTypeArrayMap,
  type ElementArray,
  toBf16Array,
  toFloat32Array,
} from "./dtype.ts";
import { describeValue, FmoeError, shownValue, Status } from "./errors.ts";
import * as ffi from "./ffi.ts";
import { registerFinalizer, unregisterFinalizer } from "./lifetime.ts";

/** Number of elements of `shape` (1 for the scalar shape []). Throws on a bad dimension. */
export function shapeNumel(shape: readonly number[], what = "shape"): number {
  if (!Array.isArray(shape)) throw new FmoeError(Status.INVALID_ARGUMENT, `${what}: the shape must be an array of dimensions, got ${describeValue(shape)}`);
  let n = 1;
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) {
      throw new FmoeError(Status.INVALID_ARGUMENT, `${what}: dimension ${d} of [${shape.join(", ")}] is not a non-negative integer`);
    }
    n *= d;
  }
  if (!Number.isSafeInteger(n)) throw new FmoeError(Status.INVALID_ARGUMENT, `${what}: [${shape.join(", ")}] has too many elements`);
  return n;
}

/**
 * Throws unless `value` is a live Tensor: INVALID_ARGUMENT naming `what` for anything else (Bun
 * runs TypeScript unchecked, so a number or a plain object can arrive), INVALID_STATE once
 * disposed.
 */
export function assertLiveTensor(value: unknown, what: string, ctx?: unknown): asserts value is Tensor {
  if (!(value instanceof Tensor)) throw new FmoeError(Status.INVALID_ARGUMENT, `${what} must be a Tensor, got ${describeValue(value)}`);
  value.assertAlive(what);
  if (ctx !== undefined && value.ctx !== ctx) throw new FmoeError(Status.INVALID_ARGUMENT, `${what}: ${value.toString()} belongs to another context`);
}

/**
 * `fn`'s tensor argument `name`: a live Tensor (of `ctx`, when given) of `dtype` and dims (null =
 * any size). `spec` names the dims for the message, e.g. "[T, topk]".
 */
export function expectTensor<D extends DType>(fn: string, name: string, t: Tensor | undefined, dtype: D, dims: readonly (number | null)[], spec: string, ctx?: Context): Tensor<D> {
  if (t === undefined) throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: ${name} is required (${spec} ${dtype})`);
  assertLiveTensor(t, `${fn}: ${name}`, ctx);
  const okShape = t.shape.length === dims.length && dims.every((d, i) => d === null || d === t.shape[i]);
  if (t.dtype !== dtype || !okShape) {
    const want = `[${dims.map((d) => (d === null ? "*" : String(d))).join(", ")}]`;
    throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: ${name} must be ${spec} = ${want} ${dtype}, got ${describe(t.shape, t.dtype)}`);
  }
  return t as Tensor<D>;
}

/** "[2, 3] bf16" */
export function describe(shape: readonly number[], dtype: DType): string {
  return `[${shape.join(", ")}] ${dtype}`;
}

/** Host data a tensor can be filled from: the dtype's own TypedArray, or f32 values for bf16. */
export type HostData<D extends DType = DType> = DTypeArrayMap[D] | (D extends "bf16" ? Float32Array : never);

/**
 * Converts `data` into the bytes of `dtype` (Float32Array -> bf16 rounds to nearest even).
 * Throws INVALID_ARGUMENT when the array type does not hold `dtype`.
 */
export function hostArrayFor(data: ElementArray, dtype: DType, what: string): ElementArray {
  if (!ArrayBuffer.isView(data)) {
    throw new FmoeError(Status.INVALID_ARGUMENT, `${what}: the data must be a typed array, got ${describeValue(data)}`);
  }
  if (arrayMatchesDType(data, dtype)) return data;
  if (dtype === "bf16" && data instanceof Float32Array) return toBf16Array(data);
  throw new FmoeError(
    Status.INVALID_ARGUMENT,
    `${what}: a ${data.constructor.name} cannot hold ${dtype} (expected ${allocArray(dtype, 0).constructor.name}${dtype === "bf16" ? " or Float32Array" : ""})`,
  );
}

/**
 * A dense row-major buffer on a Context's device. Created by `ctx.empty()`, `ctx.upload()`, the
 * ops and FusedMoE; free it with `dispose()` or `using`.
 *
 * A view (`view()`, `reshape()`) shares its base tensor's memory and never frees it; it is
 * disposed when its base is.
 */
export class Tensor<D extends DType = DType> {
  /** The context whose device holds the buffer. */
  readonly ctx: Context;
  /** Dimensions, row-major. [] is a scalar. */
  readonly shape: readonly number[];
  readonly dtype: D;
  /** Element count (product of shape). */
  readonly numel: number;
  /** Size in bytes (numel * bytes per element). */
  readonly bytes: number;
  /** Optional label used in error messages. */
  name: string | undefined;

  #ptr: number;
  #disposed = false;
  /** The owning tensor of a view; undefined for a tensor that owns its buffer. */
  readonly #base: Tensor | undefined;

  /** @internal Use ctx.empty(), ctx.upload() or tensor.view(). */
  constructor(ctx: Context, ptr: number, shape: readonly number[], dtype: D, base?: Tensor) {
    this.ctx = ctx;
    this.#ptr = ptr;
    this.shape = Object.freeze([...shape]);
    this.dtype = dtype;
    this.numel = shapeNumel(shape);
    this.bytes = this.numel * bytesPerElement(dtype);
    this.#base = base;
    if (base === undefined) {
      const state = ctx._state;
      registerFinalizer(this, () => {
        if (state.alive) ffi.free(state.handle, ptr);
      });
    }
  }

  /** @internal Allocates an uninitialised tensor; use ctx.empty(). */
  static _allocate<D extends DType>(ctx: Context, shape: readonly number[], dtype: D, what = "shape"): Tensor<D> {
    const bytes = shapeNumel(shape, what) * bytesPerElement(dtype);
    const ptr = ffi.alloc(ctx._handle, bytes);
    return new Tensor(ctx, ptr, shape, dtype);
  }

  /** True after dispose(), after the base of a view was disposed, or after the context was. */
  get disposed(): boolean {
    return this.#disposed || (this.#base?.disposed ?? false) || this.ctx.disposed;
  }

  /** The device address. Throws FmoeError(INVALID_STATE) once disposed. */
  get ptr(): number {
    this.assertAlive();
    return this.#ptr;
  }

  /** True for a view (does not own its memory). */
  get isView(): boolean {
    return this.#base !== undefined;
  }

  /** Throws FmoeError(INVALID_STATE) naming this tensor (and `what`, its role) when it is disposed. */
  assertAlive(what?: string): void {
    if (!this.disposed) return;
    const why = this.ctx.disposed ? "is gone: its context was disposed" : this.#disposed ? "was disposed" : "is gone: its base tensor was disposed";
    throw new FmoeError(Status.INVALID_STATE, `${what ?? "tensor"}: ${this.toString()} ${why}`);
  }

  /** "Tensor(name, [2, 3] bf16)" */
  toString(): string {
    return `Tensor(${this.name !== undefined ? `${this.name}, ` : ""}${describe(this.shape, this.dtype)})`;
  }

  /**
   * A view of `shape` starting `offsetElements` elements into this tensor (same dtype, shares
   * memory, freed with its base). The range must lie inside this tensor.
   */
  view(offsetElements: number, shape: readonly number[]): Tensor<D> {
    this.assertAlive("view");
    if (!Number.isSafeInteger(offsetElements)) {
      const hint = Array.isArray(offsetElements) ? " (view(offsetElements, shape): the offset comes first)" : "";
      throw new FmoeError(Status.INVALID_ARGUMENT, `view: offsetElements must be an integer, got ${shownValue(offsetElements)}${hint}`);
    }
    const n = shapeNumel(shape, "view");
    if (offsetElements < 0 || offsetElements + n > this.numel) {
      throw new FmoeError(
        Status.INVALID_ARGUMENT,
        `view: elements [${offsetElements}, ${offsetElements + n}) lie outside ${this.toString()}`,
      );
    }
    const base = this.#base ?? this;
    return new Tensor(this.ctx, this.#ptr + offsetElements * bytesPerElement(this.dtype), shape, this.dtype, base);
  }

  /** The same memory with another shape of the same element count. */
  reshape(shape: readonly number[]): Tensor<D> {
    const n = shapeNumel(shape, "reshape");
    if (n !== this.numel) {
      throw new FmoeError(Status.INVALID_ARGUMENT, `reshape: [${shape.join(", ")}] does not hold the ${this.numel} elements of ${this.toString()}`);
    }
    return this.view(0, shape);
  }

  /**
   * Copies the tensor to a new host TypedArray (Uint16Array for bf16, Uint8Array for e4m3/e8m0).
   * Without a stream, waits for all work of the context first, so results of ops on any stream
   * are visible; with one, copies in that stream's order.
   */
  download(stream?: Stream): DTypeArrayMap[D] {
    this.assertAlive("download");
    const out = allocArray(this.dtype, this.numel);
    if (this.bytes === 0) return out;
    const s = this.ctx._streamHandle("download", stream);
    if (stream === undefined) this.ctx.synchronize();
    ffi.memcpy(this.ctx._handle, out, this.#ptr, this.bytes, ffi.MemcpyKind.DeviceToHost, s);
    return out;
  }

  /** Downloads and widens to f32 (bf16/e4m3 exact, e8m0 as powers of two, i32 converted). */
  toFloat32(stream?: Stream): Float32Array {
    return toFloat32Array(this.download(stream), this.dtype);
  }

  /**
   * download() without blocking the event loop: resolves once the work queued so far on `stream`
   * (without one: on every stream of the context) has finished, then copies on a stream of its
   * own, so that work queued meanwhile (another request's layer) does not delay the copy.
   */
  async downloadAsync(stream?: Stream, options?: WaitOptions): Promise<DTypeArrayMap[D]> {
    this.assertAlive("downloadAsync");
    this.ctx._streamHandle("downloadAsync", stream);
    if (stream === undefined) await this.ctx.synchronizeAsync(options);
    else await stream.synchronizeAsync(options);
    this.assertAlive("downloadAsync");
    return this.download(this.ctx._transferStream());
  }

  /** toFloat32() without blocking the event loop, as downloadAsync(). */
  async toFloat32Async(stream?: Stream, options?: WaitOptions): Promise<Float32Array> {
    return toFloat32Array(await this.downloadAsync(stream, options), this.dtype);
  }

  /**
   * Overwrites the whole tensor: from host data (the dtype's TypedArray, or a Float32Array for
   * bf16, rounded to nearest even) or from another tensor of the same byte size (device copy,
   * asynchronous on `stream`).
   */
  copyFrom(src: Tensor | HostData<D>, stream?: Stream): this {
    this.assertAlive("copyFrom");
    const s = this.ctx._streamHandle("copyFrom", stream);
    if (src instanceof Tensor) {
      src.assertAlive("copyFrom source");
      if (src.ctx !== this.ctx) throw new FmoeError(Status.INVALID_ARGUMENT, "copyFrom: source tensor belongs to another context");
      if (src.bytes !== this.bytes) {
        throw new FmoeError(Status.INVALID_ARGUMENT, `copyFrom: source ${src.toString()} has ${src.bytes} bytes, ${this.toString()} has ${this.bytes}`);
      }
      this.ctx._use("copyFrom", stream, [this, src]);
      if (this.bytes > 0) ffi.memcpy(this.ctx._handle, this.#ptr, src.#ptr, this.bytes, ffi.MemcpyKind.DeviceToDevice, s);
      return this;
    }
    const host = hostArrayFor(src as ElementArray, this.dtype, "copyFrom");
    if (host.length !== this.numel) {
      throw new FmoeError(Status.INVALID_ARGUMENT, `copyFrom: ${host.length} elements given, ${this.toString()} holds ${this.numel}`);
    }
    if (this.bytes > 0) ffi.memcpy(this.ctx._handle, this.#ptr, host, this.bytes, ffi.MemcpyKind.HostToDevice, s);
    return this;
  }

  /** Sets every byte to `byteValue` (0..255) on `stream` (fmoe_memset). */
  fill(byteValue: number, stream?: Stream): this {
    this.assertAlive("fill");
    if (!Number.isInteger(byteValue) || byteValue < 0 || byteValue > 255) {
      throw new FmoeError(Status.INVALID_ARGUMENT, `fill: byte value ${shownValue(byteValue)} is not in 0..255`);
    }
    const s = this.ctx._use("fill", stream, [this]);
    if (this.bytes > 0) ffi.memset(this.ctx._handle, this.#ptr, byteValue, this.bytes, s);
    return this;
  }

  /** Sets every element to zero (all dtypes: 0 bits is zero). */
  zero(stream?: Stream): this {
    return this.fill(0, stream);
  }

  /** Frees the buffer (a view only marks itself disposed). Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    if (this.#base !== undefined) return;
    unregisterFinalizer(this);
    if (!this.ctx.disposed) ffi.free(this.ctx._handle, this.#ptr);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
