/**
 * Element types and their scalar conversions.
 *
 * The conversions are a line-by-line port of csrc/core/numerics.h: the same bit operations in the
 * same order, so that TypeScript (the reference, the CLI, tests) and both native backends agree
 * bit for bit. Every helper takes and returns JS numbers; "f32" arguments are first rounded to
 * binary32 (Math.fround), exactly as a C `float` parameter would be.
 */
import { ensureArg } from "./errors.ts";

/** Element types of fused-moe tensors (fmoe.h, "Element types"). */
export type DType = "bf16" | "f32" | "i32" | "e4m3" | "e8m0";

/** The TypedArray that holds elements of each dtype on the host. */
export interface DTypeArrayMap {
  bf16: Uint16Array;
  f32: Float32Array;
  i32: Int32Array;
  e4m3: Uint8Array;
  e8m0: Uint8Array;
}

/** Any TypedArray a Tensor may be uploaded from or downloaded to. */
export type ElementArray = DTypeArrayMap[DType];

/** All dtypes, in a fixed order (for parametrised tests). */
export const DTYPES: readonly DType[] = ["bf16", "f32", "i32", "e4m3", "e8m0"];

/** Bytes per element of `dtype`. */
export function bytesPerElement(dtype: DType): number {
  switch (dtype) {
    case "bf16":
      return 2;
    case "f32":
    case "i32":
      return 4;
    case "e4m3":
    case "e8m0":
      return 1;
  }
}

/** True when `value` names a DType. */
export function isDType(value: unknown): value is DType {
  return typeof value === "string" && (DTYPES as readonly string[]).includes(value);
}

/** A zeroed TypedArray of `length` elements for `dtype`. */
export function allocArray<D extends DType>(dtype: D, length: number): DTypeArrayMap[D] {
  const ctor = arrayConstructor(dtype);
  return new ctor(length) as DTypeArrayMap[D];
}

/** The TypedArray constructor holding `dtype`. */
export function arrayConstructor(
  dtype: DType,
): Uint16ArrayConstructor | Float32ArrayConstructor | Int32ArrayConstructor | Uint8ArrayConstructor {
  switch (dtype) {
    case "bf16":
      return Uint16Array;
    case "f32":
      return Float32Array;
    case "i32":
      return Int32Array;
    case "e4m3":
    case "e8m0":
      return Uint8Array;
  }
}

/** True when `data` is the TypedArray type that holds `dtype` (see DTypeArrayMap). */
export function arrayMatchesDType(data: ElementArray, dtype: DType): boolean {
  return data instanceof arrayConstructor(dtype);
}

// ------------------------------------------------------------------------------------------------
// Bit access to binary32. One scratch pair: these helpers never re-enter.
const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** The binary32 bit pattern of `f` (rounded to f32 first). */
export function f32Bits(f: number): number {
  scratchF32[0] = f;
  return scratchU32[0]!;
}

/** The binary32 value of bit pattern `u`. */
export function f32FromBits(u: number): number {
  scratchU32[0] = u >>> 0;
  return scratchF32[0]!;
}

// ------------------------------------------------------------------------------------------------
// bf16

/** bf16 bits -> its value (exact). Given a Uint16Array, widens every element. */
export function bf16ToF32(h: number): number;
export function bf16ToF32(bits: Uint16Array): Float32Array;
export function bf16ToF32(h: number | Uint16Array): number | Float32Array {
  return typeof h === "number" ? f32FromBits((h & 0xffff) << 16) : bf16ArrayToF32(h);
}

/**
 * f32 -> bf16 bits, round to nearest, ties to even; NaN stays a quiet NaN (sign kept).
 * Given an array, converts every element (Uint16Array out).
 */
export function f32ToBf16(f: number): number;
export function f32ToBf16(values: ArrayLike<number>): Uint16Array;
export function f32ToBf16(f: number | ArrayLike<number>): number | Uint16Array {
  return typeof f === "number" ? bf16Bits(f) : toBf16Array(f);
}

function bf16Bits(f: number): number {
  let u = f32Bits(f);
  if ((u & 0x7fffffff) >>> 0 > 0x7f800000) return ((u >>> 16) | 0x0040) & 0xffff;
  // Carry out of bit 31 is impossible for finite or infinite inputs (max 0xFF800000 + 0x8000).
  u = (u + 0x7fff + ((u >>> 16) & 1)) >>> 0;
  return u >>> 16;
}

/** Rounds each value to bf16 (round to nearest even). */
export function toBf16Array(values: ArrayLike<number>): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; ++i) out[i] = bf16Bits(values[i]!);
  return out;
}

/** Widens bf16 bits to f32 (exact). */
export function bf16ArrayToF32(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  const outBits = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; ++i) outBits[i] = bits[i]! << 16;
  return out;
}

// ------------------------------------------------------------------------------------------------
// e4m3 / e8m0 (OCP FP8 E4M3: bias 7, max 448, 0x7F/0xFF = NaN, no infinity; E8M0: 2^(b-127))

/** Elements per MXFP8 scale. */
export const MX_BLOCK = 32;
export const E8M0_NAN = 0xff;
export const E4M3_NAN = 0x7f;
export const E4M3_MAX_FINITE = 0x7e; // 448

/** e4m3 byte -> value (exact; 0x7F/0xFF -> NaN). */
export function e4m3ToF32(b: number): number {
  const sign = (b & 0x80) !== 0;
  const mag = b & 0x7f;
  if (mag === 0x7f) return NaN;
  const e = mag >> 3;
  const m = mag & 7;
  const v = e === 0 ? m / 512 : (1 + m / 8) * 2 ** (e - 7);
  // -0 is a real e4m3 value (0x80): keep its sign like the C code does.
  return sign ? -v : v;
}

/** e8m0 byte -> 2^(b-127) (0xFF -> NaN; 0 -> 2^-127, an f32 subnormal). */
export function e8m0ToF32(b: number): number {
  if (b === E8M0_NAN) return NaN;
  return 2 ** ((b & 0xff) - 127);
}

/**
 * The e8m0 scale byte of a block whose largest magnitude is `amax` (finite, >= 0): the smallest
 * s with amax / 2^s <= 448, from the bits of amax (amax = m * 2^E: s = E - 8 if m <= 1.75 else
 * E - 7), clamped to [-127, 127]; amax == 0 gives s = 0 (byte 127).
 */
export function e8m0ScaleForAmax(amax: number): number {
  const u = f32Bits(amax) & 0x7fffffff;
  if (u === 0) return 127;
  const e = u >>> 23;
  let mant = u & 0x7fffff;
  let exp2: number;
  let m: number;
  if (e === 0) {
    // f32 subnormal: normalise so the significand test below sees the leading fraction bits.
    let shift = 0;
    while ((mant & 0x800000) === 0) {
      mant <<= 1;
      ++shift;
    }
    exp2 = -126 - shift;
    m = mant & 0x7fffff;
  } else {
    exp2 = e - 127;
    m = mant;
  }
  let s = m <= 0x600000 ? exp2 - 8 : exp2 - 7;
  if (s < -127) s = -127;
  if (s > 127) s = 127;
  return s + 127;
}

/** Finite f32 -> e4m3 byte, round to nearest even, saturating at +-448. */
export function f32ToE4m3(x: number): number {
  let u = f32Bits(x);
  const sign = (u >>> 24) & 0x80;
  u = (u & 0x7fffffff) >>> 0;
  if (u >= 0x43e80000) return sign | E4M3_MAX_FINITE; // >= 464 rounds past 448
  const e = (u >>> 23) - 127;
  if (e < -6) {
    // e4m3 subnormal range: code = round(|x| * 2^9) in 0..8, rounded on the integer significand.
    if (e < -11) return sign;
    const sig = (u & 0x7fffff) | 0x800000;
    const shift = 23 - (e + 9);
    let q = sig >>> shift;
    const rem = sig & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (q & 1) !== 0)) ++q;
    return sign | q;
  }
  const sig = u & 0x7fffff;
  let q = ((e + 7) << 3) | (sig >>> 20);
  const rem = sig & 0xfffff;
  if (rem > 0x80000 || (rem === 0x80000 && (q & 1) !== 0)) ++q;
  if (q > E4M3_MAX_FINITE) q = E4M3_MAX_FINITE;
  return sign | q;
}

/** x * 2^-(scaleByte-127) in f32, in the two power-of-two steps numerics.h uses. */
export function mxDivideByScale(x: number, scaleByte: number): number {
  const s = scaleByte - 127;
  const s1 = Math.trunc(s / 2); // C integer division truncates toward zero
  const s2 = s - s1;
  return Math.fround(Math.fround(Math.fround(x) * 2 ** -s1) * 2 ** -s2);
}

/**
 * Quantizes one block of 32 bf16 values (`input[inOffset .. +32)`) to e4m3 bytes
 * (`out[outOffset .. +32)`) and returns its e8m0 scale byte: the rule of fmoe.h ("MXFP8"). A block
 * holding a NaN or an infinity gets scale 0xFF and every element 0x7F.
 */
export function quantizeMxfp8Block(
  input: Uint16Array,
  inOffset: number,
  out: Uint8Array,
  outOffset: number,
): number {
  let amax = 0;
  let bad = false;
  for (let i = 0; i < MX_BLOCK; ++i) {
    const mag = input[inOffset + i]! & 0x7fff;
    if (mag >= 0x7f80) bad = true;
    const a = bf16ToF32(mag);
    if (a > amax) amax = a;
  }
  if (bad) {
    out.fill(E4M3_NAN, outOffset, outOffset + MX_BLOCK);
    return E8M0_NAN;
  }
  const scale = e8m0ScaleForAmax(amax);
  for (let i = 0; i < MX_BLOCK; ++i) {
    out[outOffset + i] = f32ToE4m3(mxDivideByScale(bf16ToF32(input[inOffset + i]!), scale));
  }
  return scale;
}

/**
 * MXFP8 of bf16 `input` [rows, cols] (cols % 32 == 0): data [rows, cols] e4m3 and
 * scale [rows, cols/32] e8m0, row-major.
 */
export function quantizeMxfp8Array(
  input: Uint16Array,
  rows: number,
  cols: number,
): { data: Uint8Array; scale: Uint8Array } {
  ensureArg(cols % MX_BLOCK === 0, "quantizeMxfp8", `cols (${cols}) must be a multiple of 32`);
  ensureArg(input.length >= rows * cols, "quantizeMxfp8", `input holds ${input.length} elements, needs ${rows * cols}`);
  const data = new Uint8Array(rows * cols);
  const scale = new Uint8Array((rows * cols) / MX_BLOCK);
  for (let b = 0; b < scale.length; ++b) scale[b] = quantizeMxfp8Block(input, b * MX_BLOCK, data, b * MX_BLOCK);
  return { data, scale };
}

/** Dequantizes MXFP8 data [rows, cols] with scales [rows, cols/32] to f32: e4m3 * 2^s. */
export function dequantizeMxfp8Array(data: Uint8Array, scale: Uint8Array, rows: number, cols: number): Float32Array {
  ensureArg(cols % MX_BLOCK === 0, "dequantizeMxfp8", `cols (${cols}) must be a multiple of 32`);
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < out.length; ++i) out[i] = e4m3ToF32(data[i]!) * e8m0ToF32(scale[Math.floor(i / MX_BLOCK)]!);
  return out;
}

/**
 * Widens a host array of `dtype` to f32 values: bf16/e4m3 exactly, f32 copied, i32 converted
 * (exact below 2^24), e8m0 as its power of two.
 */
export function toFloat32Array(data: ElementArray, dtype: DType): Float32Array {
  switch (dtype) {
    case "bf16":
      return bf16ArrayToF32(data as Uint16Array);
    case "f32":
      return new Float32Array(data as Float32Array);
    case "i32":
      return Float32Array.from(data as Int32Array);
    case "e4m3": {
      const out = new Float32Array(data.length);
      for (let i = 0; i < data.length; ++i) out[i] = e4m3ToF32(data[i]!);
      return out;
    }
    case "e8m0": {
      const out = new Float32Array(data.length);
      for (let i = 0; i < data.length; ++i) out[i] = e8m0ToF32(data[i]!);
      return out;
    }
  }
}
