// Pieces every standalone kernel check of bench/dev/ uses: the CUDA error check, a counter-based
// random fill (the same values for a given (index, seed) on any launch shape), a wait that reports
// a hang, and the timing of single launches.
#pragma once

#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

// A failing CUDA call ends the check with exit code 2 (mismatches use 1, hangs 3).
#define CHECK_CUDA(call)                                                                   \
  do {                                                                                     \
    cudaError_t err_ = (call);                                                             \
    if (err_ != cudaSuccess) {                                                             \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_), __FILE__,       \
                  __LINE__, #call);                                                        \
      std::fflush(stdout);                                                                 \
      _exit(2);                                                                            \
    }                                                                                      \
  } while (0)

__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

__device__ __forceinline__ uint32_t hash64(uint64_t i, uint32_t seed) {
  return hash32(uint32_t(i) ^ hash32(uint32_t(i >> 32) + seed * 0x9e3779b9U));
}

// Uniform in [-1, 1).
__device__ __forceinline__ float uniform_pm1(uint64_t i, uint32_t seed) {
  return float(hash64(i, seed) >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

__global__ void fill_f32(float* p, int64_t count, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = uniform_pm1(i, seed) * scale;
}

// Waits for `stream` with a timeout, so that a pipeline deadlock reports itself (exit 3) instead
// of hanging the run.
inline void sync_or_die(cudaStream_t stream, const char* what, double timeout_s = 60.0) {
  cudaEvent_t ev;
  CHECK_CUDA(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  CHECK_CUDA(cudaEventRecord(ev, stream));
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    const cudaError_t q = cudaEventQuery(ev);
    if (q == cudaSuccess) break;
    if (q != cudaErrorNotReady) {
      std::printf("CUDA error while waiting for %s: %s\n", what, cudaGetErrorString(q));
      std::fflush(stdout);
      _exit(2);
    }
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > timeout_s) {
      std::printf("TIMEOUT: %s did not finish within %.0f s (pipeline deadlock?)\n", what,
                  timeout_s);
      std::fflush(stdout);
      _exit(3);
    }
    usleep(200);
  }
  CHECK_CUDA(cudaEventDestroy(ev));
}

// Median and fastest time (ms) of `iters` single launches on the default stream, each between
// two events, after `warmup` untimed ones. `launch` enqueues one (checking its own errors).
struct LaunchTimes {
  float median_ms, min_ms;
};
template <class Launch>
LaunchTimes time_launches(const char* what, int warmup, int iters, Launch&& launch) {
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  for (int i = 0; i < warmup; ++i) launch();
  sync_or_die(0, what);
  std::vector<float> ms;
  for (int i = 0; i < iters; ++i) {
    CHECK_CUDA(cudaEventRecord(e0));
    launch();
    CHECK_CUDA(cudaEventRecord(e1));
    sync_or_die(0, what);
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front()};
}
