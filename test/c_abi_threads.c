/* The C ABI from several threads at once, for ThreadSanitizer (scripts/host-sanitize.sh builds the
 * host backend and this program with -fsanitize=thread and runs it):
 * - four threads share one context and one plan, each on a stream of its own, with a plan of its
 *   own now and then: uploads, fused_moe (eager and captured into a graph, replayed), events,
 *   downloads, a refused call whose message must be the thread's own, frees into the shared
 *   buffer cache;
 * - two threads create and destroy contexts of their own, doing the same;
 * - first, one thread captures while another allocates and frees (held until the capture ends)
 *   and is refused a wait for the whole context and the end of the capture; the capturing thread
 *   is refused an allocation, a wait for the stream and its destruction.
 * Routing ids include out-of-range ones, so every layer adds to its plan's invalid-id counter.
 * Usage: c_abi_threads [backend] (FMOE_BACKEND_*, default host). Exit status 0 when every call did
 * what it should and nothing was left allocated. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "c_abi_check.h"
#include "fmoe.h"

enum { T = 6, H = 64, I = 32, E = 4, TOPK = 2, ROUNDS = 40, SHARED_THREADS = 4, OWN_THREADS = 2 };

static fmoe_context_t shared_ctx;
static fmoe_plan_t shared_plan;
static int64_t backend = FMOE_BACKEND_HOST;

/* `call` must fail with `status` and a message containing `part`. */
static void expect_refusal(int got, const char* call, int status, const char* part) {
  if (got != status || strstr(fmoe_last_error(), part) == NULL) {
    fprintf(stderr, "%s: expected status %d naming \"%s\", got %d: %s\n", call, status, part, got,
            fmoe_last_error());
    exit(1);
  }
}

/* `bytes` of finite bf16 values in a new buffer, uploaded on `stream`. */
static void* upload_bf16(fmoe_context_t ctx, fmoe_stream_t stream, int64_t bytes, unsigned seed) {
  uint16_t* host = malloc((size_t)bytes);
  for (int64_t i = 0; i < bytes / 2; ++i)
    host[i] = (uint16_t)(0x3c00 + ((seed + (unsigned)i * 2654435761u) >> 23) % 512);
  void* dev = NULL;
  CHECK(fmoe_alloc(ctx, bytes, &dev));
  CHECK(fmoe_memcpy(ctx, dev, host, bytes, FMOE_MEMCPY_HOST_TO_DEVICE, stream));
  free(host); /* reusable on return, even while the copy is queued */
  return dev;
}

static void* upload(fmoe_context_t ctx, fmoe_stream_t stream, const void* host, int64_t bytes) {
  void* dev = NULL;
  CHECK(fmoe_alloc(ctx, bytes, &dev));
  CHECK(fmoe_memcpy(ctx, dev, host, bytes, FMOE_MEMCPY_HOST_TO_DEVICE, stream));
  return dev;
}

static fmoe_plan_t make_plan(fmoe_context_t ctx) {
  fmoe_plan_desc d;
  memset(&d, 0, sizeof d);
  d.size = sizeof d;
  d.hidden_size = H;
  d.ffn = I;
  d.num_experts = E;
  d.num_local_experts = E;
  d.topk = TOPK;
  d.activation = FMOE_ACT_SILU;
  d.alignment = 16;
  d.max_tokens = T;
  fmoe_plan_t plan = NULL;
  CHECK(fmoe_plan_create(ctx, &d, &plan));
  return plan;
}

/* One layer on `stream` (NULL: the default stream), eager or captured and replayed three times. */
static void run_layer(fmoe_context_t ctx, fmoe_plan_t plan, fmoe_stream_t stream, unsigned seed,
                      int captured) {
  int32_t routing[T * TOPK];
  float probs[T * TOPK];
  for (int i = 0; i < T * TOPK; ++i) {
    routing[i] = (int32_t)((seed + 7u * (unsigned)i) % (E + 1)) - (i % 5 == 0); /* -1 and E too */
    probs[i] = 0.5f;
  }
  int64_t workspace_bytes = 0;
  CHECK(fmoe_plan_workspace_bytes(plan, &workspace_bytes));
  fmoe_moe_args a;
  memset(&a, 0, sizeof a);
  a.size = sizeof a;
  a.hidden = upload_bf16(ctx, stream, T * H * 2, seed);
  a.routing_map = upload(ctx, stream, routing, sizeof routing);
  a.probs = upload(ctx, stream, probs, sizeof probs);
  a.fc1 = upload_bf16(ctx, stream, E * 2 * I * H * 2, seed + 1);
  a.fc2 = upload_bf16(ctx, stream, E * H * I * 2, seed + 2);
  CHECK(fmoe_alloc(ctx, T * H * 2, &a.output));
  CHECK(fmoe_alloc(ctx, workspace_bytes, &a.workspace));
  a.workspace_bytes = workspace_bytes;
  a.num_tokens = T;
  if (captured) {
    fmoe_graph_t graph = NULL;
    CHECK(fmoe_graph_capture_begin(ctx, stream));
    CHECK(fmoe_fused_moe(plan, stream, &a));
    CHECK(fmoe_graph_capture_end(ctx, stream, &graph));
    for (int i = 0; i < 3; ++i) CHECK(fmoe_graph_launch(ctx, graph, stream));
    CHECK(fmoe_graph_destroy(ctx, graph));
  } else {
    CHECK(fmoe_fused_moe(plan, stream, &a));
  }
  fmoe_event_t done = NULL;
  int64_t complete = 0;
  CHECK(fmoe_event_create(ctx, &done));
  CHECK(fmoe_event_record(ctx, done, stream));
  CHECK(fmoe_event_query(ctx, done, &complete));
  uint16_t out[T * H];
  CHECK(fmoe_memcpy(ctx, out, a.output, sizeof out, FMOE_MEMCPY_DEVICE_TO_HOST, stream));
  CHECK(fmoe_event_destroy(ctx, done));

  a.num_tokens = T + 1; /* refused: the message must be this thread's */
  expect_refusal(fmoe_fused_moe(plan, stream, &a), "fmoe_fused_moe", FMOE_ERR_INVALID_ARGUMENT,
                 "num_tokens");
  const void* buffers[] = {a.hidden, a.routing_map, a.probs, a.fc1, a.fc2, a.output, a.workspace};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; ++i)
    CHECK(fmoe_free(ctx, (void*)buffers[i]));
}

static void* shared_context_thread(void* arg) {
  const unsigned id = (unsigned)(size_t)arg;
  fmoe_stream_t stream = NULL;
  CHECK(fmoe_stream_create(shared_ctx, &stream));
  for (unsigned round = 0; round < ROUNDS; ++round) {
    run_layer(shared_ctx, shared_plan, stream, 1000 * id + round, round % 3 == 0);
    if (round % 4 == 0) {
      fmoe_plan_t own = make_plan(shared_ctx);
      run_layer(shared_ctx, own, stream, id + round, 0);
      CHECK(fmoe_plan_destroy(shared_ctx, own));
    }
  }
  CHECK(fmoe_stream_synchronize(shared_ctx, stream));
  CHECK(fmoe_stream_destroy(shared_ctx, stream));
  return NULL;
}

static void* own_context_thread(void* arg) {
  const unsigned id = (unsigned)(size_t)arg;
  for (unsigned life = 0; life < 4; ++life) {
    fmoe_context_t ctx = NULL;
    CHECK(fmoe_context_create(backend, 0, &ctx));
    fmoe_plan_t plan = make_plan(ctx);
    for (unsigned round = 0; round < ROUNDS / 4; ++round) run_layer(ctx, plan, NULL, id + round, round % 2);
    CHECK(fmoe_plan_destroy(ctx, plan));
    CHECK(fmoe_context_destroy(ctx));
  }
  return NULL;
}

/* The two threads of capture_beside_another_thread take turns: each waits for the other's step. */
static pthread_mutex_t turn_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t turn_cv = PTHREAD_COND_INITIALIZER;
static int turn;

static void take_turn(int t) {
  pthread_mutex_lock(&turn_mu);
  while (turn != t) pthread_cond_wait(&turn_cv, &turn_mu);
  pthread_mutex_unlock(&turn_mu);
}

static void pass_turn(int t) {
  pthread_mutex_lock(&turn_mu);
  turn = t;
  pthread_cond_broadcast(&turn_cv);
  pthread_mutex_unlock(&turn_mu);
}

struct capture_scene {
  fmoe_context_t ctx;
  fmoe_stream_t stream; /* the one the main thread captures */
};

static void* beside_capture(void* arg) {
  const struct capture_scene* scene = arg;
  fmoe_context_t ctx = scene->ctx;
  take_turn(1);
  void* p = NULL;
  CHECK(fmoe_alloc(ctx, 4096, &p)); /* another thread may allocate */
  CHECK(fmoe_memset(ctx, p, 0, 4096, NULL));
  expect_refusal(fmoe_context_synchronize(ctx), "fmoe_context_synchronize", FMOE_ERR_INVALID_STATE,
                 "another thread is capturing");
  CHECK(fmoe_free(ctx, p)); /* held until the capture ends */
  fmoe_graph_t stolen = NULL;
  expect_refusal(fmoe_graph_capture_end(ctx, scene->stream, &stolen),
                 "fmoe_graph_capture_end", FMOE_ERR_INVALID_STATE, "another thread began");
  pass_turn(2);
  return NULL;
}

static void capture_beside_another_thread(void) {
  fmoe_context_t ctx = NULL;
  fmoe_stream_t stream = NULL;
  CHECK(fmoe_context_create(backend, 0, &ctx));
  CHECK(fmoe_stream_create(ctx, &stream));
  void* buf = NULL;
  CHECK(fmoe_alloc(ctx, 256, &buf));
  pthread_t other;
  struct capture_scene scene = {ctx, stream};
  if (pthread_create(&other, NULL, beside_capture, &scene) != 0) exit(2);
  CHECK(fmoe_graph_capture_begin(ctx, stream));
  void* refused = NULL;
  expect_refusal(fmoe_alloc(ctx, 64, &refused), "fmoe_alloc", FMOE_ERR_INVALID_STATE,
                 "this thread is capturing a graph on stream");
  expect_refusal(fmoe_stream_synchronize(ctx, stream), "fmoe_stream_synchronize",
                 FMOE_ERR_INVALID_STATE, "the stream is capturing");
  expect_refusal(fmoe_stream_destroy(ctx, stream), "fmoe_stream_destroy", FMOE_ERR_INVALID_STATE,
                 "the stream is capturing");
  CHECK(fmoe_memset(ctx, buf, 7, 256, stream));
  pass_turn(1);
  take_turn(2);
  fmoe_graph_t graph = NULL;
  CHECK(fmoe_graph_capture_end(ctx, stream, &graph));
  CHECK(fmoe_graph_launch(ctx, graph, stream));
  CHECK(fmoe_context_synchronize(ctx)); /* allowed again */
  unsigned char host[256];
  CHECK(fmoe_memcpy(ctx, host, buf, 256, FMOE_MEMCPY_DEVICE_TO_HOST, stream));
  if (host[0] != 7 || host[255] != 7) {
    fprintf(stderr, "capture beside another thread: the graph's memset did not run\n");
    exit(1);
  }
  if (pthread_join(other, NULL) != 0) exit(2);
  int64_t live = 0, live_bytes = 0;
  CHECK(fmoe_context_live_allocations(ctx, &live, &live_bytes));
  if (live != 1 || live_bytes != 256) {
    fprintf(stderr, "capture beside another thread: %lld live allocations (%lld bytes), expected 1\n",
            (long long)live, (long long)live_bytes);
    exit(1);
  }
  CHECK(fmoe_free(ctx, buf)); /* after the capture: hands the held buffer to the cache too */
  CHECK(fmoe_graph_destroy(ctx, graph));
  CHECK(fmoe_stream_destroy(ctx, stream));
  CHECK(fmoe_context_destroy(ctx));
}

int main(int argc, char** argv) {
  if (argc > 1) backend = atoi(argv[1]);
  capture_beside_another_thread();
  CHECK(fmoe_context_create(backend, 0, &shared_ctx));
  shared_plan = make_plan(shared_ctx);
  pthread_t threads[SHARED_THREADS + OWN_THREADS];
  for (int i = 0; i < SHARED_THREADS + OWN_THREADS; ++i) {
    void* (*body)(void*) = i < SHARED_THREADS ? shared_context_thread : own_context_thread;
    if (pthread_create(&threads[i], NULL, body, (void*)(size_t)(i + 1)) != 0) return 2;
  }
  for (int i = 0; i < SHARED_THREADS + OWN_THREADS; ++i) pthread_join(threads[i], NULL);
  CHECK(fmoe_plan_destroy(shared_ctx, shared_plan));
  int64_t live = 0, live_bytes = 0;
  CHECK(fmoe_context_live_allocations(shared_ctx, &live, &live_bytes));
  CHECK(fmoe_context_destroy(shared_ctx));
  printf("c_abi_threads: %d threads, %d rounds each, live allocations %lld\n",
         SHARED_THREADS + OWN_THREADS, ROUNDS, (long long)live);
  return live == 0 ? 0 : 1;
}
