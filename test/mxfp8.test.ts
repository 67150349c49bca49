// MXFP8 (fmoe_quantize_mxfp8, fmoe_dequantize_mxfp8, the swizzled scale layout) on the host
// backend. Quantization is bit-exact by contract: checked on hand-computed vectors (the expected
// bytes below are worked out by hand from the rule in fmoe.h, "Precision") and against
// lib/reference.ts on random inputs. Dequantization is exact too (e4m3 * 2^s is a float32).
//
// The rule: amax = m * 2^E (1 <= m < 2); s = E - 8 if m <= 1.75 else E - 7; s clamped to
// [-127, 127]; all-zero block s = 0 (byte 127); NaN/Inf in a block -> scale 0xFF, data 0x7F.
// Elements: x / 2^s rounded to nearest even e4m3 (bias 7; subnormals m * 2^-9; max 448 = 0x7E).
import { describe, expect } from "bun:test";
import {
  dequantizeMxfp8,
  quantizeMxfp8,
  reference as R,
  type Rng,
  swizzledScaleBytes,
  swizzleScales,
  TOLERANCE,
  unswizzleScales,
} from "../lib/index.ts";
import { bf16ToF32, e4m3ToF32, e8m0ScaleForAmax, f32ToBf16, f32ToE4m3 } from "../lib/dtype.ts";
import {
  expectBitExact,
  expectClose,
  MXFP8_VECTORS,
  mxfp8VectorData,
  mxfp8VectorInput,
  randBf16,
  seededTest,
  suiteContext,
} from "./helpers.ts";

describe("MXFP8 quantization: hand-computed vectors", () => {
  const ctx = suiteContext("host");

  for (const v of MXFP8_VECTORS) {
    seededTest(v.name, () => {
      const x = ctx();
      using inT = x.upload(mxfp8VectorInput(v), [1, 32], "bf16");
      using data = x.empty([1, 32], "e4m3").fill(0xaa);
      using scale = x.empty([1, 1], "e8m0").fill(0xaa);
      quantizeMxfp8(x, inT, { out: { data, scale } });
      expect(scale.download()[0]).toBe(v.scale);
      expectBitExact(data.download(), mxfp8VectorData(v), "data");
      // The TypeScript port (the reference) agrees with the hand computation too.
      const ref = R.quantizeMxfp8(mxfp8VectorInput(v), 1, 32);
      expect(ref.scale[0]).toBe(v.scale);
      expectBitExact(ref.data, mxfp8VectorData(v), "reference data");
    });
  }

  seededTest("all vectors at once: one row of 14 blocks and 14 rows of one block give the same bytes", () => {
    const x = ctx();
    const n = MXFP8_VECTORS.length;
    const input = new Uint16Array(n * 32);
    const wantData = new Uint8Array(n * 32);
    MXFP8_VECTORS.forEach((v, i) => {
      input.set(mxfp8VectorInput(v), i * 32);
      wantData.set(mxfp8VectorData(v), i * 32);
    });
    const wantScale = Uint8Array.from(MXFP8_VECTORS.map((v) => v.scale));
    for (const shape of [[1, n * 32], [n, 32], [2, 1, n * 16]] as const) {
      if (shape.length === 3 && n % 2 !== 0) continue;
      using inT = x.upload(input, [...shape], "bf16");
      const q = quantizeMxfp8(x, inT);
      try {
        expect(q.scale.shape).toEqual([...shape.slice(0, -1), shape[shape.length - 1]! / 32]);
        expectBitExact(q.data.download(), wantData, `data [${shape}]`);
        expectBitExact(q.scale.download(), wantScale, `scale [${shape}]`);
      } finally {
        q.data.dispose();
        q.scale.dispose();
      }
    }
  });

  seededTest("scale rule and e4m3 rounding helpers (lib/dtype.ts)", () => {
    expect(e8m0ScaleForAmax(0)).toBe(127);
    expect(e8m0ScaleForAmax(256)).toBe(127);
    expect(e8m0ScaleForAmax(448)).toBe(127);
    expect(e8m0ScaleForAmax(449)).toBe(128);
    expect(e8m0ScaleForAmax(1)).toBe(119);
    expect(e8m0ScaleForAmax(2 ** -140)).toBe(0); // f32 subnormal, clamped
    expect(e8m0ScaleForAmax(3.4e38)).toBe(127 + 120);
    expect(f32ToE4m3(448)).toBe(0x7e);
    expect(f32ToE4m3(460)).toBe(0x7e); // saturates rather than overflowing
    expect(f32ToE4m3(1e6)).toBe(0x7e);
    expect(f32ToE4m3(-1e6)).toBe(0xfe);
    expect(f32ToE4m3(2 ** -9)).toBe(0x01);
    expect(f32ToE4m3(2 ** -11)).toBe(0x00);
    expect(f32ToE4m3(-(2 ** -12))).toBe(0x80);
    expect(e4m3ToF32(0x7e)).toBe(448);
    expect(e4m3ToF32(0x01)).toBe(2 ** -9);
    expect(Number.isNaN(e4m3ToF32(0x7f))).toBe(true);
    expect(Number.isNaN(e4m3ToF32(0xff))).toBe(true);
    // Every finite e4m3 code survives value -> code.
    for (let b = 0; b < 256; ++b) {
      if ((b & 0x7f) === 0x7f) continue;
      expect(f32ToE4m3(e4m3ToF32(b))).toBe(b);
    }
  });
});

/** Random bf16 rows whose blocks span magnitudes 2^-130 .. 2^120, with some special blocks. */
function wideInput(rng: Rng, rows: number, cols: number): Uint16Array {
  const out = new Uint16Array(rows * cols);
  for (let b = 0; b < (rows * cols) / 32; ++b) {
    const exp = Math.floor(rng.uniform() * 250) - 130;
    const std = 2 ** exp;
    for (let i = 0; i < 32; ++i) out[b * 32 + i] = f32ToBf16(rng.normal() * std);
    const roll = rng.uniform();
    if (roll < 0.03) out[b * 32 + rng.int(32)] = 0x7fc0; // NaN
    else if (roll < 0.05) out[b * 32 + rng.int(32)] = rng.uniform() < 0.5 ? 0x7f80 : 0xff80; // +-Inf
    else if (roll < 0.08) out.fill(0, b * 32, b * 32 + 32);
  }
  return out;
}

describe("MXFP8 quantize / dequantize (host backend vs reference)", () => {
  const ctx = suiteContext("host");
  const SHAPES: [string, number[], boolean][] = [
    ["T = 0 rows", [0, 64], false],
    ["1 row of 32", [1, 32], true],
    ["7 x 64, values near 1", [7, 64], false],
    ["H = 2880, 3 rows, magnitudes 2^-130..2^120, NaN/Inf blocks", [3, 2880], true],
    ["64 x 256, wide magnitudes", [64, 256], true],
    ["batched [2, 5, 96] (rows = 10)", [2, 5, 96], true],
  ];
  for (const [name, shape, wide] of SHAPES) {
    seededTest(`quantize is bit-exact: ${name}`, (rng) => {
      const x = ctx();
      const cols = shape[shape.length - 1]!;
      const rows = shape.reduce((a, b) => a * b, 1) / cols;
      const input = wide ? wideInput(rng, rows, cols) : randBf16(rng, rows * cols);
      using inT = x.upload(input, shape, "bf16");
      using data = x.empty(shape, "e4m3").fill(0xff);
      using scale = x.empty([...shape.slice(0, -1), cols / 32], "e8m0").fill(0xaa);
      quantizeMxfp8(x, inT, { out: { data, scale } });
      const ref = R.quantizeMxfp8(input, rows, cols);
      expectBitExact(data.download(), ref.data, "data");
      expectBitExact(scale.download(), ref.scale, "scale");

      using deq = x.empty(shape, "f32").fill(0xff);
      dequantizeMxfp8(x, data, scale, { out: deq });
      const got = deq.download();
      expectBitExact(got, R.dequantizeMxfp8(ref.data, ref.scale, rows, cols), "dequantized");
      if (!wide && rows > 0) {
        // e4m3 keeps 3 mantissa bits: the relative error of each element is at most 2^-4.
        expectClose(got, bf16ToF32(input), 2 ** -4, "dequantize(quantize(x)) vs x");
        expect(TOLERANCE.f32).toBeLessThan(1e-5);
      }
    });
  }
});

describe("MXFP8 quantize / dequantize: every bf16 value", () => {
  const ctx = suiteContext("host");

  seededTest("every finite bf16 value, under its own scale and under scales up to 2^14 larger, against the reference", (rng) => {
    // Blocks of 32 consecutive bf16 bit patterns (one binade's values side by side), then the same
    // values 31 to a block beside one 2^1..2^14 times larger than the block's largest, which pushes
    // them into e4m3's subnormals and below: every element code the rounding can give, ties
    // included, and every scale a finite bf16 block can have. The host quantizes in vectors, the
    // reference one value at a time.
    const finite: number[] = [];
    for (let h = 0; h < 0x10000; ++h) if ((h & 0x7f80) !== 0x7f80) finite.push(h);
    const own = Uint16Array.from(finite);
    const beside: number[] = [];
    for (let i = 0; i < finite.length; i += 31) {
      const part = finite.slice(i, i + 31);
      let amax = 0;
      for (const h of part) amax = Math.max(amax, Math.abs(bf16ToF32(h)));
      const big = f32ToBf16((amax || 2 ** -133) * 2 ** (1 + rng.int(14)));
      beside.push(...part, (big & 0x7f80) === 0x7f80 ? 0x7f7f : big);  // past bf16's range: its largest
      while (beside.length % 32 !== 0) beside.push(0);
    }
    const x = ctx();
    for (const input of [own, Uint16Array.from(beside)]) {
      const rows = input.length / 32;
      using inT = x.upload(input, [rows, 32], "bf16");
      const q = quantizeMxfp8(x, inT);
      using data = q.data, scale = q.scale;
      const ref = R.quantizeMxfp8(input, rows, 32);
      expectBitExact(data.download(), ref.data, "data");
      expectBitExact(scale.download(), ref.scale, "scale");
      using deq = dequantizeMxfp8(x, data, scale);
      expectBitExact(deq.download(), R.dequantizeMxfp8(ref.data, ref.scale, rows, 32), "dequantized");
    }
  });
});

describe("MXFP8 scale swizzling (128x4 tiles)", () => {
  const ctx = suiteContext("host");

  seededTest("swizzledScaleBytes pads rows to 128 and scale columns to 4", () => {
    expect(swizzledScaleBytes(1, 130, 5)).toBe(256 * 8);
    expect(swizzledScaleBytes(3, 1, 1)).toBe(3 * 512);
    expect(swizzledScaleBytes(2, 128, 4)).toBe(1024);
    expect(swizzledScaleBytes(1, 0, 0)).toBe(0);
    expect(swizzledScaleBytes(4, 2880, 90)).toBe(R.swizzledScaleBytes(4, 2880, 90));
  });

  seededTest("literal positions: scale (r, c) at tile * 512 + (r % 32) * 16 + (r / 32 % 4) * 4 + c % 4", () => {
    const x = ctx();
    // Two matrices of [130, 5] scales: padded to [256, 8] = 2 x 2 tiles, 2048 bytes each.
    const rows = 130, cols = 5, batch = 2;
    const linear = new Uint8Array(batch * rows * cols);
    const put = (b: number, r: number, c: number, v: number): void => {
      linear[(b * rows + r) * cols + c] = v;
    };
    put(0, 0, 0, 0x11); // tile 0: byte 0
    put(0, 33, 2, 0x22); // tile 0: 1*16 + 1*4 + 2 = 22
    put(0, 127, 3, 0x33); // tile 0: 31*16 + 3*4 + 3 = 511
    put(0, 129, 4, 0x44); // tile (1, 1) = 3: 3*512 + 1*16 + 0 + 0 = 1552
    put(0, 5, 4, 0x55); // tile (0, 1) = 1: 512 + 5*16 + 0 = 592
    put(1, 64, 1, 0x66); // batch 1 at 2048, tile 0: 2048 + 0*16 + 2*4 + 1 = 2057
    const want = new Uint8Array(batch * 2048);
    want[0] = 0x11;
    want[22] = 0x22;
    want[511] = 0x33;
    want[1552] = 0x44;
    want[592] = 0x55;
    want[2057] = 0x66;
    using lin = x.upload(linear, [batch, rows, cols], "e8m0");
    using sw = x.empty([batch, 256, 8], "e8m0").fill(0xff); // padding must be written as 0
    swizzleScales(x, lin, { out: sw });
    expectBitExact(sw.download(), want, "swizzled bytes");
    expectBitExact(R.swizzleScales(linear, batch, rows, cols), want, "reference swizzle");
  });

  const SHAPES: [number, number, number][] = [[1, 1, 1], [1, 130, 5], [3, 128, 4], [2, 7, 90], [1, 300, 2], [4, 64, 9]];
  for (const [batch, rows, cols] of SHAPES) {
    seededTest(`swizzle / unswizzle round trip, batch ${batch} of [${rows}, ${cols}]`, (rng) => {
      const x = ctx();
      const linear = new Uint8Array(batch * rows * cols);
      for (let i = 0; i < linear.length; ++i) linear[i] = 1 + rng.int(254);
      using lin = x.upload(linear, [batch, rows, cols], "e8m0");
      using sw = swizzleScales(x, lin);
      expect(sw.numel).toBe(swizzledScaleBytes(batch, rows, cols));
      expectBitExact(sw.download(), R.swizzleScales(linear, batch, rows, cols), "swizzled vs reference");
      using back = x.empty([batch, rows, cols], "e8m0").fill(0);
      unswizzleScales(x, sw, { rows, scaleCols: cols, out: back });
      expectBitExact(back.download(), linear, "unswizzle(swizzle(s))");
      expectBitExact(R.unswizzleScales(R.swizzleScales(linear, batch, rows, cols), batch, rows, cols), linear, "reference round trip");
    });
  }

  seededTest("2-D scales: swizzle drops the batch dimension, unswizzle restores [rows, scaleCols]", (rng) => {
    const x = ctx();
    const linear = new Uint8Array(40 * 3);
    for (let i = 0; i < linear.length; ++i) linear[i] = rng.int(256);
    using lin = x.upload(linear, [40, 3], "e8m0");
    using sw = swizzleScales(x, lin);
    expect(sw.shape).toEqual([128, 4]);
    using back = unswizzleScales(x, sw, { rows: 40, scaleCols: 3 });
    expect(back.shape).toEqual([40, 3]);
    expectBitExact(back.download(), linear, "round trip");
  });
});
