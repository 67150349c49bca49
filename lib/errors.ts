/**
 * Errors are values in the C ABI (an int status plus a thread-local message); here they become
 * one exception class, FmoeError, carrying the same status code.
 */

/** Status codes of fmoe.h (`fmoe_status`), same numbers. */
export enum Status {
  OK = 0,
  /** A null, out-of-range or inconsistent argument. */
  INVALID_ARGUMENT = 1,
  /** Backend not built in, no device, or feature not available. */
  UNSUPPORTED = 2,
  /** An allocation failed. */
  OUT_OF_MEMORY = 3,
  /** A CUDA runtime call failed; the message names it. */
  CUDA = 4,
  /** E.g. ending a capture that was never begun, or using a disposed object. */
  INVALID_STATE = 5,
  /** A bug in the library. */
  INTERNAL = 6,
}

/** The name of a status code ("INVALID_ARGUMENT"), or "UNKNOWN(<n>)" for codes fmoe.h lacks. */
export function statusName(code: number): string {
  const name = (Status as unknown as Record<number, string | undefined>)[code];
  return name ?? `UNKNOWN(${code})`;
}

/**
 * The one error type of fused-moe. `code` is the fmoe.h status; `message` is the library's
 * message (naming the function and the argument at fault) or, for checks done in TypeScript
 * before calling the library, a message in the same style.
 */
export class FmoeError extends Error {
  readonly code: Status;

  constructor(code: Status, message: string) {
    super(message);
    this.name = "FmoeError";
    this.code = code;
  }

  /** The status code's name, e.g. "INVALID_ARGUMENT". */
  get statusName(): string {
    return statusName(this.code);
  }
}

/**
 * A value as a message names it: "null", "an array", "a Float32Array", "an Object", "number 3",
 * "string \"x\"", "bigint 3n", "symbol Symbol(s)". Never throws (a template literal would, on a
 * symbol; JSON.stringify would, on a bigint).
 */
export function describeValue(value: unknown): string {
  if (value === null || value === undefined) return String(value);
  if (Array.isArray(value)) return "an array";
  if (typeof value === "object") {
    const name = (value.constructor as { name?: string } | undefined)?.name ?? "object without a prototype";
    return `${/^[AEIOU]/i.test(name) ? "an" : "a"} ${name}`;
  }
  if (typeof value === "function") return "a function";
  if (typeof value === "string") return `string ${JSON.stringify(value)}`;
  return `${typeof value} ${String(value)}${typeof value === "bigint" ? "n" : ""}`; // String() takes symbols too
}

/** A value in a message after "got": a number as it is, anything else as describeValue says. */
export function shownValue(value: unknown): string {
  return typeof value === "number" ? String(value) : describeValue(value);
}

/** Throws FmoeError(INVALID_ARGUMENT, `${fn}: ${message}`) unless `cond`. */
export function ensureArg(cond: boolean, fn: string, message: string): asserts cond {
  if (!cond) throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: ${message}`);
}

/**
 * The option names of an options type, each listed once. The record must name every key of T
 * and no other (TypeScript rejects it otherwise), so the list cannot drift from the interface.
 */
export function optionNames<T>(names: { [K in keyof Required<T>]: true }): readonly string[] {
  return Object.keys(names);
}

/**
 * Throws FmoeError(INVALID_ARGUMENT) unless `options` is an object whose keys are all in `names`.
 * Bun runs TypeScript without type-checking it, so a misspelt optional key (`weightsFormat` for
 * `weightFormat`, `rowmap` for `rowMap`) would otherwise be dropped without a word and the call
 * would run with the default instead.
 */
export function checkOptions(fn: string, what: string, options: unknown, names: readonly string[]): void {
  if (options === null || typeof options !== "object" || Array.isArray(options)) {
    throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: ${what} must be an object, got ${describeValue(options)}`);
  }
  for (const key of Object.keys(options)) {
    if (!names.includes(key)) {
      throw new FmoeError(Status.INVALID_ARGUMENT, `${fn}: ${what} has no option "${key}" (its options: ${names.join(", ")})`);
    }
  }
}

/**
 * An optional boolean option: `fallback` when undefined, else it must be a boolean. A truthy
 * stand-in (`1`, `"false"`) would otherwise pick a mode the caller did not mean.
 */
export function booleanOption(fn: string, name: string, value: unknown, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  ensureArg(typeof value === "boolean", fn, `${name} must be true or false, got ${describeValue(value)}`);
  return value;
}

/** An optional number option: `fallback` when undefined, else it must be a finite number. */
export function finiteOption(fn: string, name: string, value: unknown, fallback: number): number {
  if (value === undefined) return fallback;
  ensureArg(typeof value === "number" && Number.isFinite(value), fn, `${name} must be a finite number, got ${shownValue(value)}`);
  return value;
}
