/**
 * safetensors files: an 8-byte little-endian header length N, N bytes of JSON
 * ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"?: {string: string}}), then
 * the data, each tensor row-major little-endian at data_offsets relative to the end of the header.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { arrayConstructor, bytesPerElement, type DType, type DTypeArrayMap } from "./dtype.ts";

/** A tensor of a safetensors file, on the host. */
export interface HostTensor<D extends DType = DType> {
  dtype: D;
  shape: number[];
  data: DTypeArrayMap[D];
}

/** A malformed or unsupported safetensors file. */
export class SafetensorsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "SafetensorsError";
  }
}

// File dtype names <-> ours. U8 is read as e8m0 (the usual container of MXFP8 scales); e8m0 is
// written as U8, which every reader understands.
const FROM_FILE: Record<string, DType> = { BF16: "bf16", F32: "f32", I32: "i32", F8_E4M3: "e4m3", F8_E8M0: "e8m0", U8: "e8m0" };
const TO_FILE: Record<DType, string> = { bf16: "BF16", f32: "F32", i32: "I32", e4m3: "F8_E4M3", e8m0: "U8" };

/** Bytes per element of every dtype the safetensors format names. */
const FILE_DTYPE_BYTES: Record<string, number> = {
  BOOL: 1, U8: 1, I8: 1, F8_E4M3: 1, F8_E5M2: 1, F8_E8M0: 1,
  I16: 2, U16: 2, F16: 2, BF16: 2,
  I32: 4, U32: 4, F32: 4,
  I64: 8, U64: 8, F64: 8,
};

/** Where one tensor of a safetensors file lies: `begin`/`end` are offsets into the data section. */
export interface SafetensorsEntry {
  name: string;
  /** The file's dtype name (BF16, F16, F32, F8_E4M3, ...). */
  dtype: string;
  shape: number[];
  begin: number;
  end: number;
}

/**
 * Reads the 8-byte length and the JSON header at the start of `bytes` (the file's first bytes: the
 * header alone is enough), checking every entry against `fileLen`, the whole file's size. Throws
 * SafetensorsError naming `what` and the tensor.
 */
export function parseSafetensorsHeader(
  bytes: Uint8Array,
  fileLen: number,
  what = "safetensors",
): { entries: SafetensorsEntry[]; metadata: Record<string, string>; dataStart: number } {
  if (bytes.length < 8) throw new SafetensorsError(`${what}: file too short (${bytes.length} bytes) for a safetensors header`);
  const headerLen = Number(new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true));
  if (headerLen > fileLen - 8) throw new SafetensorsError(`${what}: header length ${headerLen} exceeds the file size (${fileLen} bytes)`);
  if (headerLen > bytes.length - 8) throw new SafetensorsError(`${what}: header cut short (${bytes.length - 8} of ${headerLen} bytes given)`);
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + headerLen)));
  } catch (err) {
    throw new SafetensorsError(`${what}: header is not valid JSON (${err instanceof Error ? err.message : String(err)})`);
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) throw new SafetensorsError(`${what}: header is not a JSON object`);
  const dataStart = 8 + headerLen;
  const dataLen = fileLen - dataStart;
  const entries: SafetensorsEntry[] = [];
  let metadata: Record<string, string> = {};
  for (const [name, entry] of Object.entries(header as Record<string, unknown>)) {
    if (name === "__metadata__") {
      if (typeof entry !== "object" || entry === null || Array.isArray(entry)) throw new SafetensorsError(`${what}: __metadata__ is not an object`);
      metadata = Object.fromEntries(Object.entries(entry as Record<string, unknown>).map(([k, v]) => [k, String(v)]));
      continue;
    }
    if (typeof entry !== "object" || entry === null) throw new SafetensorsError(`${what}: tensor ${name}: entry is not an object`);
    const { dtype, shape, data_offsets: offsets } = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
    if (typeof dtype !== "string") throw new SafetensorsError(`${what}: tensor ${name}: missing dtype`);
    const elementBytes = FILE_DTYPE_BYTES[dtype];
    if (elementBytes === undefined) throw new SafetensorsError(`${what}: tensor ${name}: unknown dtype ${dtype}`);
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new SafetensorsError(`${what}: tensor ${name}: shape must be a list of non-negative integers`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((d) => Number.isSafeInteger(d) && d >= 0) || offsets[1] < offsets[0]) {
      throw new SafetensorsError(`${what}: tensor ${name}: data_offsets must be [begin, end] with 0 <= begin <= end`);
    }
    const [begin, end] = offsets as [number, number];
    const nbytes = (shape as number[]).reduce((a, b) => a * b, 1) * elementBytes;
    if (end - begin !== nbytes) throw new SafetensorsError(`${what}: tensor ${name}: data_offsets span ${end - begin} bytes, shape [${shape.join(", ")}] ${dtype} needs ${nbytes}`);
    if (end > dataLen) throw new SafetensorsError(`${what}: tensor ${name}: data_offsets end ${end} lies past the end of the data (${dataLen} bytes)`);
    entries.push({ name, dtype, shape: [...(shape as number[])], begin, end });
  }
  return { entries, metadata, dataStart };
}

/** Parses a safetensors image. Throws SafetensorsError naming what is wrong. */
export function parseSafetensors(bytes: Uint8Array, what = "safetensors"): { tensors: Map<string, HostTensor>; metadata: Record<string, string> } {
  const { entries, metadata, dataStart } = parseSafetensorsHeader(bytes, bytes.length, what);
  const tensors = new Map<string, HostTensor>();
  for (const { name, dtype, shape, begin, end } of entries) {
    const dt = FROM_FILE[dtype];
    if (dt === undefined) throw new SafetensorsError(`${what}: tensor ${name}: unsupported dtype ${dtype} (BF16, F32, I32, U8, F8_E4M3, F8_E8M0)`);
    // Copy: the file buffer's alignment need not suit the TypedArray (e.g. f32 at an odd offset).
    // (A Node Buffer's slice() shares memory: copy through a fresh Uint8Array.)
    const copy = new Uint8Array(bytes.subarray(dataStart + begin, dataStart + end));
    const ctor = arrayConstructor(dt);
    const data = new ctor(copy.buffer, 0, (end - begin) / bytesPerElement(dt)) as DTypeArrayMap[DType];
    tensors.set(name, { dtype: dt, shape, data });
  }
  return { tensors, metadata };
}

/** Reads a safetensors file. Throws SafetensorsError for a malformed file, Error when unreadable. */
export function readSafetensors(path: string): { tensors: Map<string, HostTensor>; metadata: Record<string, string> } {
  let bytes: Uint8Array;
  try {
    bytes = readFileSync(path);
  } catch (err) {
    throw new SafetensorsError(`${path}: cannot read (${err instanceof Error ? err.message : String(err)})`);
  }
  return parseSafetensors(bytes, path);
}

/**
 * The header of a safetensors file (length, JSON, padding) for tensors of the given file dtypes,
 * shapes and byte sizes, laid out back to back in order; the data follows it.
 */
export function safetensorsHeader(tensors: readonly { name: string; dtype: string; shape: readonly number[]; bytes: number }[], metadata?: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = {};
  if (metadata !== undefined && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes] };
    offset += t.bytes;
  }
  let json = JSON.stringify(header);
  // Pad the header with spaces so the data starts 8-byte aligned (as the reference writer does).
  json += " ".repeat((8 - ((8 + new TextEncoder().encode(json).length) % 8)) % 8);
  const headerBytes = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + headerBytes.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, 8);
  return out;
}

/** Serialises tensors (in the map's order) and optional string metadata to a safetensors image. */
export function serializeSafetensors(tensors: Map<string, HostTensor> | Record<string, HostTensor>, metadata?: Record<string, string>): Uint8Array {
  const entries = tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);
  for (const [name, t] of entries) {
    const numel = t.shape.reduce((a, b) => a * b, 1);
    if (numel !== t.data.length) throw new SafetensorsError(`tensor ${name}: shape [${t.shape.join(", ")}] holds ${numel} elements, data has ${t.data.length}`);
    if (!(t.data instanceof arrayConstructor(t.dtype))) throw new SafetensorsError(`tensor ${name}: a ${t.data.constructor.name} cannot hold ${t.dtype}`);
  }
  return serializeSafetensorsBytes(entries.map(([name, t]) => ({ name, dtype: TO_FILE[t.dtype], shape: t.shape, data: t.data })), metadata);
}

/**
 * A safetensors image of tensors given as bytes under any file dtype name (F16, F8_E4M3, ...),
 * in order. The caller vouches that each `data` holds its shape's bytes.
 */
export function serializeSafetensorsBytes(tensors: readonly { name: string; dtype: string; shape: readonly number[]; data: ArrayBufferView }[], metadata?: Record<string, string>): Uint8Array {
  const header = safetensorsHeader(tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, bytes: t.data.byteLength })), metadata);
  const out = new Uint8Array(header.length + tensors.reduce((n, t) => n + t.data.byteLength, 0));
  out.set(header);
  let at = header.length;
  for (const { data } of tensors) {
    out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), at);
    at += data.byteLength;
  }
  return out;
}

/** Writes a safetensors file. */
export function writeSafetensors(path: string, tensors: Map<string, HostTensor> | Record<string, HostTensor>, metadata?: Record<string, string>): void {
  writeFileSync(path, serializeSafetensors(tensors, metadata));
}
