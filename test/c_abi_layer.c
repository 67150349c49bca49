/* One MoE layer through the C ABI from plain C (C99), as a C or C++ caller (or another language's
 * FFI) would write it: context, buffers, plan, fused_moe, results, and a refused call's message.
 * test/c-abi.test.ts compiles it against csrc/include/fmoe.h, runs it on inputs it wrote and
 * compares the output with lib/reference.ts.
 *
 *   c_abi_layer IN OUT BACKEND    (BACKEND: 0 auto, 1 host, 2 cuda)
 *
 * IN holds int64 T, H, I, E, topk, then hidden bf16 [T, H], routing_map i32 [T, topk], probs f32
 * [T, topk], fc1 bf16 [E, 2I, H], fc2 bf16 [E, H, I] (a silu layer over all E experts). OUT gets
 * the output, bf16 [T, H]. Exit status 0 when every call did what it should. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "c_abi_check.h"
#include "fmoe.h"

static void* read_exact(FILE* f, size_t bytes) {
  void* p = malloc(bytes > 0 ? bytes : 1);
  if (p == NULL || fread(p, 1, bytes, f) != bytes) {
    fprintf(stderr, "input: short read\n");
    exit(2);
  }
  return p;
}

/* A device buffer holding `bytes` of `host`. */
static void* upload(fmoe_context_t ctx, const void* host, int64_t bytes) {
  void* dev = NULL;
  CHECK(fmoe_alloc(ctx, bytes, &dev));
  CHECK(fmoe_memcpy(ctx, dev, host, bytes, FMOE_MEMCPY_HOST_TO_DEVICE, NULL));
  return dev;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: c_abi_layer IN OUT BACKEND\n");
    return 2;
  }
  FILE* in = fopen(argv[1], "rb");
  if (in == NULL) {
    fprintf(stderr, "cannot open %s\n", argv[1]);
    return 2;
  }
  int64_t dims[5];
  if (fread(dims, sizeof dims, 1, in) != 1) {
    fprintf(stderr, "input: short read\n");
    return 2;
  }
  const int64_t T = dims[0], H = dims[1], I = dims[2], E = dims[3], topk = dims[4];
  const int64_t hidden_bytes = T * H * 2, slot_bytes = T * topk * 4;
  const int64_t fc1_bytes = E * 2 * I * H * 2, fc2_bytes = E * H * I * 2;
  void* hidden = read_exact(in, (size_t)hidden_bytes);
  void* routing = read_exact(in, (size_t)slot_bytes);
  void* probs = read_exact(in, (size_t)slot_bytes);
  void* fc1 = read_exact(in, (size_t)fc1_bytes);
  void* fc2 = read_exact(in, (size_t)fc2_bytes);
  fclose(in);

  int64_t version = 0;
  CHECK(fmoe_abi_version(&version));
  if (version != FMOE_ABI_VERSION) {
    fprintf(stderr, "library ABI %lld, header %d\n", (long long)version, FMOE_ABI_VERSION);
    return 1;
  }
  fmoe_context_t ctx = NULL;
  CHECK(fmoe_context_create(atoi(argv[3]), 0, &ctx));
  int64_t backend = 0;
  CHECK(fmoe_context_backend(ctx, &backend));
  printf("backend %s\n", backend == FMOE_BACKEND_CUDA ? "cuda" : "host");

  fmoe_plan_desc desc;
  memset(&desc, 0, sizeof desc);
  desc.size = sizeof desc; /* the ABI's version check: a struct of another revision is refused */
  desc.hidden_size = H;
  desc.ffn = I;
  desc.num_experts = E;
  desc.num_local_experts = E;
  desc.local_expert_start = 0;
  desc.topk = topk + E; /* wrong on purpose: the call is refused and says why */
  desc.activation = FMOE_ACT_SILU;
  desc.layout = FMOE_LAYOUT_HALVES;
  desc.weight_format = FMOE_WEIGHTS_BF16;
  desc.alignment = 16;
  desc.max_tokens = T > 0 ? T : 1;
  fmoe_plan_t plan = NULL;
  const int refused = fmoe_plan_create(ctx, &desc, &plan);
  printf("refused %d: %s\n", refused, fmoe_last_error());
  if (refused != FMOE_ERR_INVALID_ARGUMENT || plan != NULL) return 1;
  desc.topk = topk;
  CHECK(fmoe_plan_create(ctx, &desc, &plan));

  int64_t workspace_bytes = 0;
  CHECK(fmoe_plan_workspace_bytes(plan, &workspace_bytes));
  void* workspace = NULL;
  void* output = NULL;
  CHECK(fmoe_alloc(ctx, workspace_bytes, &workspace));
  CHECK(fmoe_alloc(ctx, hidden_bytes, &output));
  fmoe_moe_args args;
  memset(&args, 0, sizeof args);
  args.size = sizeof args;
  args.hidden = upload(ctx, hidden, hidden_bytes);
  args.routing_map = (const int32_t*)upload(ctx, routing, slot_bytes);
  args.probs = (const float*)upload(ctx, probs, slot_bytes);
  args.fc1 = upload(ctx, fc1, fc1_bytes);
  args.fc2 = upload(ctx, fc2, fc2_bytes);
  args.output = output;
  args.workspace = workspace;
  args.workspace_bytes = workspace_bytes;
  args.num_tokens = T;
  CHECK(fmoe_fused_moe(plan, NULL, &args));

  void* result = malloc((size_t)(hidden_bytes > 0 ? hidden_bytes : 1));
  /* A device-to-host copy waits for the work queued before it on its stream. */
  CHECK(fmoe_memcpy(ctx, result, output, hidden_bytes, FMOE_MEMCPY_DEVICE_TO_HOST, NULL));
  FILE* out = fopen(argv[2], "wb");
  if (out == NULL || fwrite(result, 1, (size_t)hidden_bytes, out) != (size_t)hidden_bytes) {
    fprintf(stderr, "cannot write %s\n", argv[2]);
    return 2;
  }
  fclose(out);

  const void* device_buffers[] = {args.hidden, args.routing_map, args.probs, args.fc1, args.fc2,
                                  output, workspace};
  for (size_t i = 0; i < sizeof device_buffers / sizeof device_buffers[0]; ++i)
    CHECK(fmoe_free(ctx, (void*)device_buffers[i]));
  CHECK(fmoe_plan_destroy(ctx, plan));
  int64_t live = 0, live_bytes = 0;
  CHECK(fmoe_context_live_allocations(ctx, &live, &live_bytes));
  printf("live allocations %lld\n", (long long)live);
  CHECK(fmoe_context_destroy(ctx));
  free(hidden);
  free(routing);
  free(probs);
  free(fc1);
  free(fc2);
  free(result);
  return live == 0 ? 0 : 1;
}
