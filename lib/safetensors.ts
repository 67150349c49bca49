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

/** Parses a safetensors image. Throws SafetensorsError naming what is wrong. */
export function parseSafetensors(bytes: Uint8Array, what = "safetensors"): { tensors: Map<string, HostTensor>; metadata: Record<string, string> } {
  if (bytes.length < 8) throw new SafetensorsError(`${what}: file too short (${bytes.length} bytes) for a safetensors header`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  if (headerLen > bytes.length - 8) throw new SafetensorsError(`${what}: header length ${headerLen} exceeds the file size (${bytes.length} bytes)`);
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + headerLen)));
  } catch (err) {
    throw new SafetensorsError(`${what}: header is not valid JSON (${err instanceof Error ? err.message : String(err)})`);
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) throw new SafetensorsError(`${what}: header is not a JSON object`);
  const dataStart = 8 + headerLen;
  const dataLen = bytes.length - dataStart;
  const tensors = new Map<string, HostTensor>();
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
    const dt = FROM_FILE[dtype];
    if (dt === undefined) throw new SafetensorsError(`${what}: tensor ${name}: unsupported dtype ${dtype} (BF16, F32, I32, U8, F8_E4M3, F8_E8M0)`);
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new SafetensorsError(`${what}: tensor ${name}: shape must be a list of non-negative integers`);
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((d) => Number.isSafeInteger(d) && d >= 0) || offsets[1] < offsets[0]) {
      throw new SafetensorsError(`${what}: tensor ${name}: data_offsets must be [begin, end] with 0 <= begin <= end`);
    }
    const [begin, end] = offsets as [number, number];
    const numel = (shape as number[]).reduce((a, b) => a * b, 1);
    const nbytes = numel * bytesPerElement(dt);
    if (end - begin !== nbytes) throw new SafetensorsError(`${what}: tensor ${name}: data_offsets span ${end - begin} bytes, shape [${shape.join(", ")}] ${dtype} needs ${nbytes}`);
    if (end > dataLen) throw new SafetensorsError(`${what}: tensor ${name}: data_offsets end ${end} lies past the end of the data (${dataLen} bytes)`);
    // Copy: the file buffer's alignment need not suit the TypedArray (e.g. f32 at an odd offset).
    // (A Node Buffer's slice() shares memory: copy through a fresh Uint8Array.)
    const copy = new Uint8Array(bytes.subarray(dataStart + begin, dataStart + end));
    const ctor = arrayConstructor(dt);
    const data = new ctor(copy.buffer, 0, numel) as DTypeArrayMap[DType];
    tensors.set(name, { dtype: dt, shape: [...(shape as number[])], data });
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

/** Serialises tensors (in the map's order) and optional string metadata to a safetensors image. */
export function serializeSafetensors(tensors: Map<string, HostTensor> | Record<string, HostTensor>, metadata?: Record<string, string>): Uint8Array {
  const entries = tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);
  const header: Record<string, unknown> = {};
  if (metadata !== undefined && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  for (const [name, t] of entries) {
    const numel = t.shape.reduce((a, b) => a * b, 1);
    if (numel !== t.data.length) throw new SafetensorsError(`tensor ${name}: shape [${t.shape.join(", ")}] holds ${numel} elements, data has ${t.data.length}`);
    if (!(t.data instanceof arrayConstructor(t.dtype))) throw new SafetensorsError(`tensor ${name}: a ${t.data.constructor.name} cannot hold ${t.dtype}`);
    header[name] = { dtype: TO_FILE[t.dtype], shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  // Pad the header with spaces so the data starts 8-byte aligned (as the reference writer does).
  json += " ".repeat((8 - ((8 + new TextEncoder().encode(json).length) % 8)) % 8);
  const headerBytes = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + headerBytes.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, 8);
  let at = 8 + headerBytes.length;
  for (const [, t] of entries) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), at);
    at += t.data.byteLength;
  }
  return out;
}

/** Writes a safetensors file. */
export function writeSafetensors(path: string, tensors: Map<string, HostTensor> | Record<string, HostTensor>, metadata?: Record<string, string>): void {
  writeFileSync(path, serializeSafetensors(tensors, metadata));
}
