// The CUDA backend's context, memory, stream, graph and event methods, and its factory.
#include <new>
#include <string>

#include "cuda/backend.h"

namespace fmoe {

using cuda::Event;
using cuda::Graph;
using cuda::Stream;

namespace {
Stream* as_stream(BackendStream* s) { return reinterpret_cast<Stream*>(s); }
Graph* as_graph(BackendGraph* g) { return reinterpret_cast<Graph*>(g); }
Event* as_event(BackendEvent* e) { return reinterpret_cast<Event*>(e); }
}  // namespace

int64_t cuda_device_count() {
  // With the static runtime this works on machines without a driver: the call fails
  // (cudaErrorInsufficientDriver / cudaErrorNoDevice), which means "no device", not an error.
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

const char* cuda_build_info() {
  // CUDART_VERSION is the runtime compiled in (static), e.g. 13000 -> "cuda 13.0 sm_90a".
  static const std::string info = "cuda " + std::to_string(CUDART_VERSION / 1000) + "." +
                                  std::to_string((CUDART_VERSION % 1000) / 10) + " sm_90a";
  return info.c_str();
}

Status make_cuda_backend(int64_t device, std::unique_ptr<Backend>* out) {
  int64_t count = cuda_device_count();
  if (count == 0)
    return set_error(FMOE_ERR_UNSUPPORTED,
                     "fmoe_context_create: no CUDA device (or no CUDA driver) is present");
  if (device < 0 || device >= count)
    return set_error(FMOE_ERR_UNSUPPORTED,
                     "fmoe_context_create: CUDA device %lld does not exist (%lld present)",
                     (long long)device, (long long)count);
  int dev = int(device);
  FMOE_CHECK_CUDA(cudaSetDevice(dev));
  cudaDeviceProp props;
  FMOE_CHECK_CUDA(cudaGetDeviceProperties(&props, dev));
  // The kernels are built for sm_90a only, whose code runs on compute capability 9.0 alone.
  if (props.major != 9 || props.minor != 0)
    return set_error(FMOE_ERR_UNSUPPORTED,
                     "fmoe_context_create: CUDA device %d (%s) has compute capability %d.%d; "
                     "this library's kernels are built for sm_90a (Hopper: H100, H200) only",
                     dev, props.name, props.major, props.minor);
  int max_smem_optin = 0;
  FMOE_CHECK_CUDA(
      cudaDeviceGetAttribute(&max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  FMOE_TRY(cuda::permute_prepare_device(max_smem_optin));
  FMOE_TRY(cuda::grouped_mm_bf16_prepare_device());
  FMOE_TRY(cuda::grouped_mm_mxfp8_prepare_device());
  cudaStream_t stream = nullptr;
  FMOE_CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  out->reset(new (std::nothrow) CudaBackend(dev, stream, props, max_smem_optin));
  if (!*out) {
    cudaStreamDestroy(stream);
    return set_error(FMOE_ERR_OUT_OF_MEMORY, "fmoe_context_create: out of host memory");
  }
  return FMOE_OK;
}

CudaBackend::CudaBackend(int device, cudaStream_t default_stream, const cudaDeviceProp& props,
                         int max_smem_optin)
    : device_(device),
      default_stream_(default_stream),
      props_(props),
      max_smem_optin_(max_smem_optin) {}

CudaBackend::~CudaBackend() {
  // Errors cannot be reported from a destructor; the core destroys streams, graphs and buffers
  // before the backend, so what is left is our own default stream (and streams the core did not
  // destroy, which must not leak either).
  if (cudaSetDevice(device_) != cudaSuccess) return;
  for (Stream* s : streams_) {
    cudaStreamSynchronize(s->stream);
    cudaStreamDestroy(s->stream);
    delete s;
  }
  cudaStreamSynchronize(default_stream_);
  cudaStreamDestroy(default_stream_);
  (void)cudaGetLastError();
}

Status CudaBackend::device_name(std::string* out) {
  *out = props_.name;
  return FMOE_OK;
}

Status CudaBackend::device_props(fmoe_device_props* out) {
  out->backend = FMOE_BACKEND_CUDA;
  out->device = device_;
  out->compute_capability = props_.major * 10 + props_.minor;
  out->multiprocessors = props_.multiProcessorCount;
  out->global_memory_bytes = int64_t(props_.totalGlobalMem);
  out->l2_cache_bytes = props_.l2CacheSize;
  out->shared_memory_per_block_bytes = max_smem_optin_;
  return FMOE_OK;
}

Status CudaBackend::synchronize() {
  FMOE_TRY(activate());
  FMOE_CHECK_CUDA(cudaStreamSynchronize(default_stream_));
  for (Stream* s : streams_) FMOE_CHECK_CUDA(cudaStreamSynchronize(s->stream));
  return FMOE_OK;
}

Status CudaBackend::alloc(size_t bytes, void** out) {
  FMOE_TRY(activate());
  // A zero-byte request still gets a distinct pointer (fmoe.h), so allocate a minimal block.
  // cudaMalloc returns 256-byte aligned memory.
  void* p = nullptr;
  FMOE_CHECK_CUDA(cudaMalloc(&p, bytes == 0 ? 256 : bytes));
  *out = p;
  return FMOE_OK;
}

Status CudaBackend::free(void* ptr) {
  FMOE_TRY(activate());
  // cudaFree waits for the device's outstanding work before releasing the memory.
  FMOE_CHECK_CUDA(cudaFree(ptr));
  return FMOE_OK;
}

Status CudaBackend::memcpy(void* dst, const void* src, size_t bytes, fmoe_memcpy_kind kind,
                           BackendStream* stream) {
  FMOE_TRY(activate());
  if (bytes == 0) return FMOE_OK;
  cudaStream_t st = stream_of(stream);
  cudaMemcpyKind k = kind == FMOE_MEMCPY_HOST_TO_DEVICE   ? cudaMemcpyHostToDevice
                     : kind == FMOE_MEMCPY_DEVICE_TO_HOST ? cudaMemcpyDeviceToHost
                                                          : cudaMemcpyDeviceToDevice;
  FMOE_CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, k, st));
  // Host memory may be pageable and the caller may reuse it on return (fmoe.h): wait for copies
  // that touch the host. The core refuses those while the stream is capturing, so this never
  // breaks a capture.
  if (k != cudaMemcpyDeviceToDevice) FMOE_CHECK_CUDA(cudaStreamSynchronize(st));
  return FMOE_OK;
}

Status CudaBackend::memset(void* ptr, int value, size_t bytes, BackendStream* stream) {
  FMOE_TRY(activate());
  if (bytes == 0) return FMOE_OK;
  FMOE_CHECK_CUDA(cudaMemsetAsync(ptr, value, bytes, stream_of(stream)));
  return FMOE_OK;
}

Status CudaBackend::stream_create(BackendStream** out) {
  FMOE_TRY(activate());
  Stream* s = new (std::nothrow) Stream{nullptr};
  if (!s) return set_error(FMOE_ERR_OUT_OF_MEMORY, "fmoe_stream_create: out of host memory");
  cudaError_t err = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking);
  if (err != cudaSuccess) {
    delete s;
    return cuda_error(err, "cudaStreamCreateWithFlags", __FILE__, __LINE__);
  }
  streams_.insert(s);
  *out = reinterpret_cast<BackendStream*>(s);
  return FMOE_OK;
}

Status CudaBackend::stream_destroy(BackendStream* stream) {
  FMOE_TRY(activate());
  Stream* s = as_stream(stream);
  streams_.erase(s);
  // cudaStreamDestroy returns at once and releases the stream when its work is done.
  cudaError_t err = cudaStreamDestroy(s->stream);
  delete s;
  if (err != cudaSuccess) return cuda_error(err, "cudaStreamDestroy", __FILE__, __LINE__);
  return FMOE_OK;
}

Status CudaBackend::stream_synchronize(BackendStream* stream) {
  FMOE_TRY(activate());
  FMOE_CHECK_CUDA(cudaStreamSynchronize(stream_of(stream)));
  return FMOE_OK;
}

Status CudaBackend::capture_begin(BackendStream* stream) {
  FMOE_TRY(activate());
  // Thread-local mode: only this thread's unsafe calls (a synchronous copy, a device sync) break
  // the capture; other threads keep working with their own streams.
  FMOE_CHECK_CUDA(cudaStreamBeginCapture(stream_of(stream), cudaStreamCaptureModeThreadLocal));
  return FMOE_OK;
}

Status CudaBackend::capture_end(BackendStream* stream, BackendGraph** out) {
  FMOE_TRY(activate());
  cudaGraph_t graph = nullptr;
  // Ends the capture even when it was invalidated (then graph is NULL and the error says why).
  FMOE_CHECK_CUDA(cudaStreamEndCapture(stream_of(stream), &graph));
  cudaGraphExec_t exec = nullptr;
  cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  if (err != cudaSuccess) {
    cudaGraphDestroy(graph);
    return cuda_error(err, "cudaGraphInstantiate", __FILE__, __LINE__);
  }
  Graph* g = new (std::nothrow) Graph{graph, exec};
  if (!g) {
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    return set_error(FMOE_ERR_OUT_OF_MEMORY, "fmoe_graph_capture_end: out of host memory");
  }
  *out = reinterpret_cast<BackendGraph*>(g);
  return FMOE_OK;
}

Status CudaBackend::graph_launch(BackendGraph* graph, BackendStream* stream) {
  FMOE_TRY(activate());
  FMOE_CHECK_CUDA(cudaGraphLaunch(as_graph(graph)->exec, stream_of(stream)));
  return FMOE_OK;
}

Status CudaBackend::graph_destroy(BackendGraph* graph) {
  FMOE_TRY(activate());
  Graph* g = as_graph(graph);
  cudaError_t e1 = cudaGraphExecDestroy(g->exec);
  cudaError_t e2 = cudaGraphDestroy(g->graph);
  delete g;
  if (e1 != cudaSuccess) return cuda_error(e1, "cudaGraphExecDestroy", __FILE__, __LINE__);
  if (e2 != cudaSuccess) return cuda_error(e2, "cudaGraphDestroy", __FILE__, __LINE__);
  return FMOE_OK;
}

bool CudaBackend::is_capturing(BackendStream* stream) {
  if (cudaSetDevice(device_) != cudaSuccess) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream_of(stream), &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  // An invalidated capture is still a capture until it is ended.
  return status != cudaStreamCaptureStatusNone;
}

Status CudaBackend::event_create(BackendEvent** out) {
  FMOE_TRY(activate());
  Event* e = new (std::nothrow) Event{nullptr};
  if (!e) return set_error(FMOE_ERR_OUT_OF_MEMORY, "fmoe_event_create: out of host memory");
  cudaError_t err = cudaEventCreate(&e->event);
  if (err != cudaSuccess) {
    delete e;
    return cuda_error(err, "cudaEventCreate", __FILE__, __LINE__);
  }
  *out = reinterpret_cast<BackendEvent*>(e);
  return FMOE_OK;
}

Status CudaBackend::event_destroy(BackendEvent* event) {
  FMOE_TRY(activate());
  Event* e = as_event(event);
  cudaError_t err = cudaEventDestroy(e->event);
  delete e;
  if (err != cudaSuccess) return cuda_error(err, "cudaEventDestroy", __FILE__, __LINE__);
  return FMOE_OK;
}

Status CudaBackend::event_record(BackendEvent* event, BackendStream* stream) {
  FMOE_TRY(activate());
  FMOE_CHECK_CUDA(cudaEventRecord(as_event(event)->event, stream_of(stream)));
  return FMOE_OK;
}

Status CudaBackend::event_elapsed_ms(BackendEvent* start, BackendEvent* end, double* out_ms) {
  FMOE_TRY(activate());
  FMOE_CHECK_CUDA(cudaEventSynchronize(as_event(end)->event));
  float ms = 0.0f;
  FMOE_CHECK_CUDA(cudaEventElapsedTime(&ms, as_event(start)->event, as_event(end)->event));
  *out_ms = ms;
  return FMOE_OK;
}

Status CudaBackend::event_query(BackendEvent* event, bool* out_complete) {
  FMOE_TRY(activate());
  cudaError_t err = cudaEventQuery(as_event(event)->event);
  if (err == cudaErrorNotReady) {
    // "Not ready" is an answer, not a failure, but the runtime also leaves it as the thread's last
    // error, where the next launch's cudaGetLastError would report it as that launch's failure.
    if (cudaPeekAtLastError() == cudaErrorNotReady) (void)cudaGetLastError();
    *out_complete = false;
    return FMOE_OK;
  }
  FMOE_CHECK_CUDA(err);
  *out_complete = true;
  return FMOE_OK;
}

}  // namespace fmoe
