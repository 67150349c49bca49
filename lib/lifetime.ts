/**
 * Lifetimes of native objects. `using` / dispose() is the documented way to free them; a
 * FinalizationRegistry frees what callers forgot.
 *
 * The trap: fmoe_context_destroy frees every buffer, stream, graph and plan of the context, so a
 * finalizer that runs after its context was destroyed must not free again (double free). Every
 * child therefore shares its context's ContextState and its finalizer checks `alive` first.
 * Children hold a strong reference to their Context, so a context is never collected before its
 * children; when both die in one collection the order of finalizers does not matter either way.
 */

/** Shared between a Context and everything allocated on it. Holds no reference to the objects. */
export class ContextState {
  /** The fmoe_context_t, 0 once destroyed. */
  handle: number;
  alive = true;
  /** Handles of the live streams created on the context (not the default stream). */
  readonly streams = new Set<number>();

  constructor(handle: number) {
    this.handle = handle;
  }
}

// A held value is a release closure; it captures handles and the ContextState, never the object
// (a held value that referenced the target would keep it alive forever).
const registry = new FinalizationRegistry<() => void>((release) => {
  try {
    release();
  } catch {
    // Nothing can be reported from a finalizer: the error would surface in unrelated code.
  }
});

/** Frees `release` when `owner` is collected, unless unregistered first (by dispose()). */
export function registerFinalizer(owner: object, release: () => void): void {
  registry.register(owner, release, owner);
}

export function unregisterFinalizer(owner: object): void {
  registry.unregister(owner);
}
