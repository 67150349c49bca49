#!/usr/bin/env bun
/**
 * Builds build/libfusedmoe.so with CMake (csrc/CMakeLists.txt), driven through zx.
 *
 *   bun run build [--host-only] [--debug] [--clean]
 *
 * The CUDA backend (sm_90a) is compiled whenever nvcc is found (on PATH, CUDACXX or
 * /usr/local/cuda/bin), so CUDA sources are compiled on every machine that can; without nvcc the
 * library is host-only and says so. Environment: FMOE_CUDA=ON|OFF|AUTO overrides the detection.
 *
 * Why not cmake-ts: it builds Node-API addons and fetches Node headers at configure time; this
 * library is a plain C shared library loaded by bun:ffi, with no Node headers involved.
 */
import { $, fs, path } from "zx";

const root = path.resolve(import.meta.dir, "..");
const args = new Set(process.argv.slice(2));
const buildDir = path.join(root, "build");
$.verbose = false;

function findNvcc(): string | undefined {
  const candidates = [
    process.env.CUDACXX,
    ...(process.env.PATH ?? "").split(":").map((dir) => path.join(dir, "nvcc")),
    "/usr/local/cuda/bin/nvcc",
  ];
  return candidates.find((c) => c !== undefined && c !== "" && fs.existsSync(c));
}

async function main(): Promise<void> {
  if (args.has("--clean")) await fs.remove(buildDir);
  const nvcc = findNvcc();
  let cuda = process.env.FMOE_CUDA ?? (nvcc ? "ON" : "OFF");
  if (args.has("--host-only")) cuda = "OFF";
  const generator = (await $`command -v ninja`.nothrow()).exitCode === 0 ? ["-G", "Ninja"] : [];
  const buildType = args.has("--debug") ? "Debug" : "Release";

  console.log(`fused-moe build: CUDA backend ${cuda === "OFF" ? "off (host-only)" : `on (${nvcc ?? "nvcc"})`}, ${buildType}`);
  const configure = [
    "-S", path.join(root, "csrc"), "-B", buildDir, ...generator,
    `-DFMOE_CUDA=${cuda}`, `-DCMAKE_BUILD_TYPE=${buildType}`,
  ];
  if (nvcc && cuda !== "OFF") configure.push(`-DCMAKE_CUDA_COMPILER=${nvcc}`);
  // Configure output is noise unless it fails; the compile shows its progress.
  const conf = await $`cmake ${configure}`.nothrow();
  if (conf.exitCode !== 0) {
    process.stderr.write(conf.stdout + conf.stderr);
    throw new Error("cmake configure failed");
  }
  const jobs = String(Math.max(1, (await import("node:os")).availableParallelism()));
  await $({ stdio: "inherit" })`cmake --build ${buildDir} --parallel ${jobs}`;
  console.log(`fused-moe build: ${path.join(buildDir, "libfusedmoe.so")}`);
}

main().catch((err: unknown) => {
  console.error(`fused-moe build failed: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
