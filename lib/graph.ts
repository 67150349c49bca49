/**
 * Graph: a recorded op sequence replayed by launch(). Replays read the buffers' contents at
 * replay time, so writing new inputs (new routing) into the same tensors takes effect.
 */
import type { Context, Stream } from "./context.ts";
import { FmoeError, Status } from "./errors.ts";
import * as ffi from "./ffi.ts";
import { registerFinalizer, unregisterFinalizer } from "./lifetime.ts";
import type { Tensor } from "./tensor.ts";

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

  /** @internal Use ctx.capture(). */
  constructor(ctx: Context, handle: number, tensors: readonly Tensor[]) {
    this.ctx = ctx;
    this.#handle = handle;
    this.tensors = tensors;
    const state = ctx._state;
    registerFinalizer(this, () => {
      if (state.alive) ffi.graphDestroy(state.handle, handle);
    });
  }

  get disposed(): boolean {
    return this.#disposed || this.ctx.disposed;
  }

  /** Replays the graph on `stream` (default stream when omitted); asynchronous. */
  launch(stream?: Stream): void {
    if (this.disposed) throw new FmoeError(Status.INVALID_STATE, "graph is disposed");
    for (const t of this.tensors) t.assertAlive("graph launch");
    ffi.graphLaunch(this.ctx._handle, this.#handle, this.ctx._streamHandle("graph launch", stream));
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
