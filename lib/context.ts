/**
 * Context: one backend (host or CUDA device) with its memory, streams, graphs and plans.
 */
import { type DType, DTYPES, type ElementArray, isDType } from "./dtype.ts";
import { checkOptions, describeValue, FmoeError, optionNames, Status } from "./errors.ts";
import * as ffi from "./ffi.ts";
import { Graph, type LaunchGuard } from "./graph.ts";
import { ContextState, registerFinalizer, unregisterFinalizer } from "./lifetime.ts";
import { hostArrayFor, shapeNumel, Tensor } from "./tensor.ts";

/** Which backend to run on; "auto" = cuda when a CUDA device is present, host otherwise. */
export type BackendChoice = "auto" | "host" | "cuda";
/** The backend a context actually uses. */
export type BackendKind = "host" | "cuda";

const BACKEND_CODE: Record<BackendChoice, number> = { auto: 0, host: 1, cuda: 2 };
const CONTEXT_OPTIONS = optionNames<ContextOptions>({ backend: true, device: true });
const WAIT_OPTIONS = optionNames<WaitOptions>({ spinMs: true });
const DEFAULT_SPIN_MS = 5;

export interface ContextOptions {
  /** Default "auto". */
  backend?: BackendChoice;
  /** CUDA device ordinal (ignored by host). Default 0. */
  device?: number;
}

/** How the `...Async` waits poll for the device without blocking the event loop. */
export interface WaitOptions {
  /**
   * Milliseconds to poll on every turn of the event loop (a few microseconds apart) before
   * polling once per millisecond. Default 5: a decode step is seen as soon as it ends, a long
   * prefill costs no busy core. 0 polls once per millisecond from the start.
   */
  spinMs?: number;
}

/** Device properties (fmoe_device_props). */
export interface DeviceProps {
  backend: BackendKind;
  /** CUDA ordinal, -1 for host. */
  device: number;
  /** major*10 + minor (90 for Hopper), 0 for host. */
  computeCapability: number;
  /** SM count, or host worker threads. */
  multiprocessors: number;
  globalMemoryBytes: number;
  /** 0 for host. */
  l2CacheBytes: number;
  /** Opt-in maximum, 0 for host. */
  sharedMemoryPerBlockBytes: number;
}

function backendName(code: number): BackendKind {
  return code === BACKEND_CODE.cuda ? "cuda" : "host";
}

function checkCallback(fn: string, body: unknown): void {
  if (typeof body !== "function") throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: body must be a function, got ${describeValue(body)}`);
}

function checkDType(fn: string, dtype: unknown): void {
  if (!isDType(dtype)) throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: dtype must be one of ${DTYPES.join(", ")}, got ${describeValue(dtype)}`);
}

function inferDType(data: ElementArray): DType {
  if (data instanceof Uint16Array) return "bf16";
  if (data instanceof Float32Array) return "f32";
  if (data instanceof Int32Array) return "i32";
  throw new FmoeError(Status.INVALID_ARGUMENT, "upload: a Uint8Array may hold e4m3 or e8m0: pass the dtype");
}

/**
 * A backend instance. Create with `Context.create()`, free with `dispose()` or `using`, which also
 * frees every tensor, stream, graph and plan still allocated on it (they become disposed).
 *
 * @example
 *   using ctx = Context.create({ backend: "host" });
 *   using x = ctx.upload(new Float32Array([1, 2, 3, 4]), [2, 2], "bf16");
 */
export class Context {
  /** The backend in use. */
  readonly backend: BackendKind;
  /** "host (N threads)" or the CUDA device name. */
  readonly deviceName: string;
  /** Device properties. */
  readonly props: DeviceProps;

  /** @internal Shared with every child (see lifetime.ts). */
  readonly _state: ContextState;
  // Per capturing stream (keyed by its handle): the tensors its ops touch, which the graph keeps
  // alive, since replaying over a freed buffer would corrupt memory; and the launch guards of
  // what was captured (a FusedMoE: one workspace, whose calls and replays must not overlap).
  readonly #captures = new Map<number, { tensors: Set<Tensor>; guards: Set<LaunchGuard> }>();
  // Created on the first upload or downloadAsync (see _transferStream).
  #transferStream: Stream | undefined;

  private constructor(handle: number) {
    this._state = new ContextState(handle);
    const state = this._state;
    registerFinalizer(this, () => {
      if (!state.alive) return;
      state.alive = false;
      ffi.contextDestroy(state.handle);
    });
    this.backend = backendName(ffi.contextBackend(handle));
    this.deviceName = ffi.contextDeviceName(handle);
    const raw = ffi.contextDeviceProps(handle);
    this.props = {
      backend: backendName(raw.backend),
      device: raw.device,
      computeCapability: raw.compute_capability,
      multiprocessors: raw.multiprocessors,
      globalMemoryBytes: raw.global_memory_bytes,
      l2CacheBytes: raw.l2_cache_bytes,
      sharedMemoryPerBlockBytes: raw.shared_memory_per_block_bytes,
    };
  }

  /**
   * Creates a context: `Context.create()`, `Context.create("cuda")` or
   * `Context.create({ backend: "cuda", device: 1 })`. `backend: "cuda"` without a CUDA build or
   * device throws FmoeError(UNSUPPORTED); "auto" falls back to host.
   */
  static create(options: ContextOptions | BackendChoice = {}): Context {
    const o = typeof options === "string" ? { backend: options } : options;
    checkOptions("Context.create", "options", o, CONTEXT_OPTIONS);
    const backend = o.backend ?? "auto";
    if (!Object.hasOwn(BACKEND_CODE, backend)) {
      throw new FmoeError(Status.INVALID_ARGUMENT, `Context.create: backend must be auto, host or cuda, got ${String(backend)}`);
    }
    const device = o.device ?? 0;
    if (!Number.isSafeInteger(device) || device < 0) {
      throw new FmoeError(Status.INVALID_ARGUMENT, `Context.create: device must be an integer >= 0, got ${String(device)}`);
    }
    const handle = ffi.contextCreate(BACKEND_CODE[backend], device);
    return new Context(handle);
  }

  /** Number of usable CUDA devices (0 on a host-only build or without a GPU). */
  static cudaDeviceCount(): number {
    return ffi.cudaDeviceCount();
  }

  /** One line describing the library build (version, backends, CUDA version). */
  static buildInfo(): string {
    return ffi.buildInfo();
  }

  /** True when the native library can be loaded. */
  static libraryAvailable(): boolean {
    return ffi.libraryAvailable();
  }

  /** @internal The fmoe_context_t; throws once disposed. */
  get _handle(): number {
    this.assertAlive();
    return this._state.handle;
  }

  get disposed(): boolean {
    return !this._state.alive;
  }

  /** Throws FmoeError(INVALID_STATE) once disposed. */
  assertAlive(): void {
    if (!this._state.alive) throw new FmoeError(Status.INVALID_STATE, `context (${this.deviceName}) is disposed`);
  }

  /** Waits for all work of the context (every stream). Blocks the calling thread. */
  synchronize(): void {
    ffi.contextSynchronize(this._handle);
  }

  /**
   * Resolves once the work queued so far on every stream of the context has finished, as
   * synchronize() waits for, without blocking the event loop (it polls events; see WaitOptions).
   * Work queued after the call (another request's) is not waited for.
   */
  async synchronizeAsync(options?: WaitOptions): Promise<void> {
    const handles = [0, ...this._state.streams];
    const events: Event[] = [];
    try {
      for (const stream of handles) {
        const event = this.createEvent();
        events.push(event);
        ffi.eventRecord(this._handle, event.handle, stream);
      }
      for (const event of events) await event.synchronizeAsync(options);
    } finally {
      for (const event of events) event.dispose();
    }
  }

  /**
   * @internal The stream upload() and the async downloads copy on, each copy waited for at once:
   * no op ever runs there, so a copy waits for nothing but itself.
   */
  _transferStream(): Stream {
    this.#transferStream ??= this.createStream();
    return this.#transferStream;
  }

  /** Count and bytes of live buffers allocated on this context (leak checks). */
  liveAllocations(): { count: number; bytes: number } {
    return ffi.contextLiveAllocations(this._handle);
  }

  /** A new stream. Ops take `stream?: Stream`; omitted = the context's default stream. */
  createStream(): Stream {
    return new Stream(this, ffi.streamCreate(this._handle));
  }

  /** A new event (timing, waiting). */
  createEvent(): Event {
    return new Event(this, ffi.eventCreate(this._handle));
  }

  /** An uninitialised tensor of `shape` and `dtype` (contents unspecified). */
  empty<D extends DType>(shape: readonly number[], dtype: D): Tensor<D> {
    this.assertAlive();
    checkDType("empty", dtype);
    this._refuseWhileCapturing("empty", "a tensor cannot be allocated");
    return Tensor._allocate(this, shape, dtype, "empty");
  }

  /** A tensor of `shape` and `dtype` with every element zero. */
  zeros<D extends DType>(shape: readonly number[], dtype: D, stream?: Stream): Tensor<D> {
    this._streamHandle("zeros", stream); // before allocating: a bad stream must not leave a tensor behind
    this._refuseWhileCapturing("zeros", "a tensor cannot be allocated");
    return this.empty(shape, dtype).zero(stream);
  }

  /**
   * Copies host data to a new tensor. `data` is the dtype's TypedArray (Uint16Array bits for
   * bf16, Uint8Array for e4m3/e8m0) or, for bf16, a Float32Array that is rounded to nearest
   * even. `shape` defaults to [data.length]; `dtype` defaults from the array type (Uint16Array
   * -> bf16, Float32Array -> f32, Int32Array -> i32; a Uint8Array needs an explicit dtype).
   * The tensor is ready for every stream when upload returns.
   */
  upload(data: Uint16Array | Float32Array, shape: readonly number[] | undefined, dtype: "bf16"): Tensor<"bf16">;
  upload(data: Uint8Array, shape: readonly number[] | undefined, dtype: "e4m3"): Tensor<"e4m3">;
  upload(data: Uint8Array, shape: readonly number[] | undefined, dtype: "e8m0"): Tensor<"e8m0">;
  upload(data: Float32Array, shape?: readonly number[], dtype?: "f32"): Tensor<"f32">;
  upload(data: Int32Array, shape?: readonly number[], dtype?: "i32"): Tensor<"i32">;
  upload(data: Uint16Array, shape?: readonly number[], dtype?: "bf16"): Tensor<"bf16">;
  upload(data: ElementArray, shape?: readonly number[], dtype?: DType): Tensor;
  upload(data: ElementArray, shape?: readonly number[], dtype?: DType): Tensor {
    const dt = dtype ?? inferDType(data);
    checkDType("upload", dt);
    const host = hostArrayFor(data, dt, "upload");
    const dims = shape ?? [host.length];
    const n = shapeNumel(dims, "upload");
    if (n !== host.length) {
      throw new FmoeError(Status.INVALID_ARGUMENT, `upload: ${host.length} elements given for shape [${dims.join(", ")}] (${n} elements)`);
    }
    this._refuseWhileCapturing("upload", "a tensor cannot be uploaded");
    const t = this.empty(dims, dt);
    try {
      // Ready for every stream on return: the copy runs on a stream of its own and is waited for
      // (a copy on the default stream would be ordered before that stream's later work only).
      const transfer = this._transferStream();
      t.copyFrom(host, transfer);
      transfer.synchronize();
    } catch (err) {
      t.dispose();
      throw err;
    }
    return t;
  }

  /** Alias of upload(). */
  tensor(data: ElementArray, shape?: readonly number[], dtype?: DType): Tensor {
    return this.upload(data, shape, dtype as DType);
  }

  /**
   * Records every op that `body` enqueues on `stream` into a Graph, without running them (on
   * the host backend too). Outputs must be preallocated before capture (pass `out` to ops):
   * allocating, host copies and waiting for the device are refused inside it (INVALID_STATE),
   * and a tensor disposed inside it is freed once it has ended. The capture is always ended, also when
   * `body` throws (then the partial graph is destroyed and the error rethrown).
   */
  capture(stream: Stream | undefined, body: () => void): Graph {
    const s = this._streamHandle("capture", stream);
    checkCallback("capture", body);
    if (this.#captures.has(s)) throw new FmoeError(Status.INVALID_STATE, "capture: the stream is already capturing");
    ffi.graphCaptureBegin(this._handle, s);
    const used = { tensors: new Set<Tensor>(), guards: new Set<LaunchGuard>() };
    this.#captures.set(s, used);
    let failure: unknown;
    let failed = false;
    try {
      body();
    } catch (err) {
      failure = err;
      failed = true;
    }
    this.#captures.delete(s);
    let handle = 0;
    try {
      handle = ffi.graphCaptureEnd(this._handle, s);
    } catch (err) {
      if (!failed) throw err;
    }
    if (failed) {
      if (handle !== 0) ffi.graphDestroy(this._handle, handle);
      throw failure;
    }
    return new Graph(this, handle, [...used.tensors], [...used.guards]);
  }

  /**
   * @internal Throws INVALID_STATE while a capture of this context is open: `${fn}: ${what} while
   * a stream captures ...`. Memory is not allocated inside a capture (the graph would not record
   * it, and CUDA refuses it there), so a graph's buffers are allocated before ctx.capture().
   */
  _refuseWhileCapturing(fn: string, what: string): void {
    if (this.#captures.size === 0) return;
    throw new FmoeError(Status.INVALID_STATE, `${fn}: ${what} while a stream captures: allocate before ctx.capture() (a graph records no allocation)`);
  }

  /** @internal Whether `stream` (the default stream when undefined) is capturing. */
  _capturing(stream: Stream | undefined): boolean {
    return this.#captures.has(stream?.handle ?? 0);
  }

  /**
   * @internal The handle of `stream` for a call of `fn` (0, the default stream, when undefined),
   * checked to be a live Stream of this context: a number or another context's stream would
   * otherwise run the work on the default stream without a word.
   */
  _streamHandle(fn: string, stream: unknown): number {
    if (stream === undefined) return 0;
    if (!(stream instanceof Stream)) throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: stream must be a Stream, got ${describeValue(stream)}`);
    if (stream.ctx !== this) throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: stream belongs to another context`);
    return stream.handle;
  }

  /**
   * @internal Checks that `stream` is one of this context's (see _streamHandle), that every
   * tensor is alive and belongs to this context, and, when `stream` is capturing, records them
   * for the graph. Returns the stream's handle.
   */
  _use(fn: string, stream: Stream | undefined, tensors: readonly (Tensor | undefined)[]): number {
    this.assertAlive();
    const handle = this._streamHandle(fn, stream);
    const used = this.#captures.get(handle);
    for (const t of tensors) {
      if (t === undefined) continue;
      t.assertAlive(fn);
      if (t.ctx !== this) throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: ${t.toString()} belongs to another context`);
      used?.tensors.add(t);
    }
    return handle;
  }

  /** @internal When `stream` is capturing, the graph will run `guard` around each launch. */
  _guardLaunches(stream: Stream | undefined, guard: LaunchGuard): void {
    this.#captures.get(stream?.handle ?? 0)?.guards.add(guard);
  }

  /**
   * Milliseconds that the work `body` enqueues on `stream` takes, measured with events (CUDA
   * events; the host backend's clock). Waits for the end event.
   */
  time(stream: Stream | undefined, body: () => void): number {
    this._streamHandle("time", stream);
    checkCallback("time", body);
    using start = this.createEvent();
    using end = this.createEvent();
    start.record(stream);
    body();
    end.record(stream);
    return start.elapsedMs(end);
  }

  /** Destroys the context and everything still allocated on it. Idempotent. */
  dispose(): void {
    if (!this._state.alive) return;
    this._state.alive = false;
    unregisterFinalizer(this);
    ffi.contextDestroy(this._state.handle);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Releases a child handle of `ctx` on dispose or collection, unless the context died first. */
abstract class ContextChild {
  readonly ctx: Context;
  #handle: number;
  #disposed = false;

  protected constructor(ctx: Context, handle: number, destroy: (ctx: number, handle: number) => void) {
    this.ctx = ctx;
    this.#handle = handle;
    const state = ctx._state;
    this.#destroy = destroy;
    registerFinalizer(this, () => {
      if (state.alive) destroy(state.handle, handle);
    });
  }

  readonly #destroy: (ctx: number, handle: number) => void;

  protected abstract get kind(): string;

  get disposed(): boolean {
    return this.#disposed || this.ctx.disposed;
  }

  /** The native handle; throws FmoeError(INVALID_STATE) once disposed. */
  get handle(): number {
    if (this.disposed) throw new FmoeError(Status.INVALID_STATE, `${this.kind} is disposed`);
    return this.#handle;
  }

  dispose(): void {
    if (this.#disposed) return;
    // First: a refused destroy (a stream while it captures) leaves the handle alive and owned.
    if (!this.ctx.disposed) this.#destroy(this.ctx._handle, this.#handle);
    this.#disposed = true;
    unregisterFinalizer(this);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** An ordered queue of work (a CUDA stream; on the host backend, a thread of its own). */
export class Stream extends ContextChild {
  /** @internal Use ctx.createStream(). */
  constructor(ctx: Context, handle: number) {
    const streams = ctx._state.streams;
    streams.add(handle);
    super(ctx, handle, (c, h) => {
      ffi.streamDestroy(c, h);
      streams.delete(h);
    });
  }

  protected get kind(): string {
    return "stream";
  }

  /** Waits for all work on this stream. Blocks the calling thread. */
  synchronize(): void {
    ffi.streamSynchronize(this.ctx._handle, this.handle);
  }

  /**
   * Resolves once the work queued so far on this stream has finished, without blocking the event
   * loop (see WaitOptions).
   */
  async synchronizeAsync(options?: WaitOptions): Promise<void> {
    using event = this.ctx.createEvent();
    event.record(this);
    await event.synchronizeAsync(options);
  }
}

/** A marker on a stream: for timing (elapsedMs) and for waiting (query, synchronizeAsync). */
export class Event extends ContextChild {
  /** @internal Use ctx.createEvent(). */
  constructor(ctx: Context, handle: number) {
    super(ctx, handle, ffi.eventDestroy);
  }

  protected get kind(): string {
    return "event";
  }

  /** Records the event on `stream` (default stream when omitted). */
  record(stream?: Stream): this {
    ffi.eventRecord(this.ctx._handle, this.handle, this.ctx._streamHandle("record", stream));
    return this;
  }

  /** Milliseconds from this event to `end`; waits for `end`. Both must have been recorded. */
  elapsedMs(end: Event): number {
    return ffi.eventElapsedMs(this.ctx._handle, this.handle, end.handle);
  }

  /**
   * Whether the work queued before the last record() has finished (true if never recorded).
   * Never blocks.
   */
  query(): boolean {
    return ffi.eventQuery(this.ctx._handle, this.handle);
  }

  /**
   * Resolves once query() is true, polling without blocking the event loop (see WaitOptions).
   * Rejects with FmoeError if the event or its context is disposed meanwhile.
   */
  async synchronizeAsync(options: WaitOptions = {}): Promise<void> {
    checkOptions("synchronizeAsync", "options", options, WAIT_OPTIONS);
    const spinMs = options.spinMs ?? DEFAULT_SPIN_MS;
    if (typeof spinMs !== "number" || !(spinMs >= 0)) {
      throw new FmoeError(Status.INVALID_ARGUMENT, `synchronizeAsync: spinMs must be a number >= 0, got ${String(spinMs)}`);
    }
    const start = performance.now();
    while (!this.query()) {
      if (performance.now() - start < spinMs) await new Promise<void>((resolve) => setImmediate(resolve));
      else await new Promise<void>((resolve) => setTimeout(resolve, 1));
    }
  }
}

