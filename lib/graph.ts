/**
 * Graph: a recorded op sequence replayed by launch(). Replays read the buffers' contents at
 * replay time, so writing new inputs (new routing) into the same tensors takes effect.
 */
import type { Context, Stream } from "./context.ts";
import { FmoeError, Status } from "./errors.ts";
import * as ffi from "./ffi.ts";
import { registerFinalizer, unregisterFinalizer } from "./lifetime.ts";
import type { Tensor } from "./tensor.ts";

/**
 * @internal What a graph runs around each launch for an object captured in it whose uses must
 * not overlap across streams (a FusedMoE: one workspace). `claim` throws before anything is
 * launched when the launch on `stream` could overlap the object's last use; `ran` records the
 * launch as its last use.
 */
export interface LaunchGuard {
  claim(stream: Stream | undefined, fn: string): void;
  ran(stream: Stream | undefined): void;
}

/** Created by `ctx.capture(stream, body)` or `FusedMoE.capture()`. */
export class Graph {
  readonly ctx: Context;
  /**
   * The tensors the captured ops read or write. Held so that no finalizer frees them while the
   * graph may replay over them; launch() refuses to run when one was disposed explicitly.
   */
  readonly tensors: readonly Tensor[];
  #handle: number;
  #disposed = false;
  readonly #guards: readonly LaunchGuard[];

  /** @internal Use ctx.capture(). */
  constructor(ctx: Context, handle: number, tensors: readonly Tensor[], guards: readonly LaunchGuard[] = []) {
    this.ctx = ctx;
    this.#handle = handle;
    this.tensors = tensors;
    this.#guards = guards;
    const state = ctx._state;
    registerFinalizer(this, () => {
      if (state.alive) ffi.graphDestroy(state.handle, handle);
    });
  }

  get disposed(): boolean {
    return this.#disposed || this.ctx.disposed;
  }

  /**
   * Replays the graph on `stream` (default stream when omitted); asynchronous. A replay counts as
   * a call of each FusedMoE captured in it: on another stream than the layer's last call or
   * replay, while that one may still run, the launch is refused (INVALID_STATE), as such a call is.
   */
  launch(stream?: Stream): void {
    if (this.disposed) throw new FmoeError(Status.INVALID_STATE, "graph is disposed");
    for (const t of this.tensors) t.assertAlive("graph launch");
    const handle = this.ctx._streamHandle("graph launch", stream);
    for (const g of this.#guards) g.claim(stream, "Graph.launch");
    ffi.graphLaunch(this.ctx._handle, this.#handle, handle);
    for (const g of this.#guards) g.ran(stream);
  }

  /** Destroys the graph (not its tensors). Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    unregisterFinalizer(this);
    if (!this.ctx.disposed) ffi.graphDestroy(this.ctx._handle, this.#handle);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
