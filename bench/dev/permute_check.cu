// Standalone correctness check and benchmark of the CUDA permute (csrc/cuda/permute.cu), through
// the public ABI: every case runs fmoe_permute on a host context (the reference) and on a CUDA
// context and compares the results bit for bit.
//
// Build and run (H100 / H200, from the repository root, after building the library in build/):
//   cmake -S csrc -B build -G Ninja -DFMOE_CUDA=ON && cmake --build build && \
//   nvcc -std=c++17 -O2 -Icsrc/include bench/dev/permute_check.cu -Lbuild -lfusedmoe \
//     -Xlinker -rpath,$PWD/build -o /tmp/permute_check && /tmp/permute_check
// (Only host code here: the library carries the kernels and its own static CUDA runtime.)
// Options: --quick skips the T = 65536 cases; --bench-only skips the checks; --seed N;
// --self-test runs the harness host against host (no GPU needed; the unwritten-rows check is
// off there, since the host backend zeroes padding rows).
//
// Each case, on both contexts: random routing (pattern named in the case) and bf16 tokens, the
// CUDA outputs poisoned first (maps 0x7B7B7B7B, rows 0xA5 bytes) so that a missed write shows.
// Compared:
//  - expert_offsets [E_local + 1], permutation_map [max_rows] (all of it: the -1 fill too),
//    inverse_map [T, topk], invalid_count (starts at 7 on both);
//  - every real row (r < n_used, permutation_map[r] >= 0): bf16 row, and the MXFP8 data and
//    scale row when quantized, bit for bit (two NaNs count as equal in bf16 rows: a NaN times a
//    prob keeps its payload on the CPU but becomes the canonical NaN on the GPU);
//  - padding rows and rows >= n_used of the CUDA buffers still hold the poison: the CUDA copy
//    never writes them (fmoe.h leaves them unspecified; not writing them is the design).
// Then a graph capture replayed with new routing, and two streams running permute at once.
// Then the timing of permute alone (median of 20 after 3 warm-ups, CUDA events) at the bench
// shapes (T = 8192, alignment 16, distinct uniform experts per token).
// Exit code: 0 = all passed, 1 = a mismatch, 2 = an API error.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "fmoe.h"

#define CHECK(call)                                                                       \
  do {                                                                                    \
    int st_ = (call);                                                                     \
    if (st_ != FMOE_OK) {                                                                 \
      std::printf("API error %d at %s:%d: %s\n  %s\n", st_, __FILE__, __LINE__, #call,     \
                  fmoe_last_error());                                                     \
      std::exit(2);                                                                       \
    }                                                                                     \
  } while (0)

namespace {

uint64_t g_seed = 20240611;

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int64_t below(int64_t n) { return int64_t(next() % uint64_t(n)); }
  float uniform() { return float(next() >> 40) * (1.0f / 16777216.0f); }
};

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
bool bf16_is_nan(uint16_t h) { return (h & 0x7FFFu) > 0x7F80u; }

enum Pattern {
  kUniform,    // ids uniform in [0, num_experts), repeats allowed inside a token
  kDistinct,   // topk distinct ids per token (the router's output)
  kOneExpert,  // every slot on one local expert
  kInvalid,    // uniform, with ~20% ids outside [0, num_experts) (negative, -1, too large)
  kSkewed,     // ~80% of slots on the first two local experts
};
const char* pattern_name(Pattern p) {
  switch (p) {
    case kUniform: return "uniform";
    case kDistinct: return "distinct";
    case kOneExpert: return "one-expert";
    case kInvalid: return "invalid-ids";
    case kSkewed: return "skewed";
  }
  return "?";
}

struct Case {
  int64_t T, topk, num_experts, num_local, start, alignment, H;
  bool probs, quant, bf16;
  Pattern pattern;
  bool specials = false;   // some Inf / NaN / subnormal / zero blocks in the tokens
  int64_t misalign = 0;    // elements added to the hidden / permuted pointers (unaligned path)
};

std::string describe(const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "T=%lld topk=%lld E=%lld E_local=%lld start=%lld align=%lld H=%lld %s%s%s%s%s "
                "routing=%s",
                (long long)c.T, (long long)c.topk, (long long)c.num_experts,
                (long long)c.num_local, (long long)c.start, (long long)c.alignment,
                (long long)c.H, c.bf16 ? "bf16" : "", c.quant ? "+mxfp8" : "",
                c.probs ? " probs" : "", c.specials ? " specials" : "",
                c.misalign ? " misaligned" : "", pattern_name(c.pattern));
  return buf;
}

struct Inputs {
  std::vector<uint16_t> hidden;
  std::vector<int32_t> routing;
  std::vector<float> probs;
};

std::vector<int32_t> make_routing(const Case& c, Rng& rng) {
  const int64_t S = c.T * c.topk;
  std::vector<int32_t> r(static_cast<size_t>(S));
  for (int64_t t = 0; t < c.T; ++t) {
    for (int64_t k = 0; k < c.topk; ++k) {
      int64_t id = 0;
      switch (c.pattern) {
        case kUniform: id = rng.below(c.num_experts); break;
        case kDistinct: {
          bool fresh = false;
          while (!fresh) {
            id = rng.below(c.num_experts);
            fresh = true;
            for (int64_t j = 0; j < k; ++j) fresh = fresh && r[size_t(t * c.topk + j)] != id;
          }
          break;
        }
        case kOneExpert: id = c.start + c.num_local / 2; break;
        case kInvalid: {
          const int64_t u = rng.below(20);
          id = u == 0   ? -1
               : u == 1 ? c.num_experts + rng.below(5)
               : u == 2 ? -int64_t(rng.below(1000000)) - 2
               : u == 3 ? int64_t(INT32_MAX) - rng.below(3)
                        : rng.below(c.num_experts);
          break;
        }
        case kSkewed:
          id = rng.below(10) < 8 ? c.start + rng.below(std::min<int64_t>(2, c.num_local))
                                 : rng.below(c.num_experts);
          break;
      }
      r[size_t(t * c.topk + k)] = int32_t(id);
    }
  }
  return r;
}

Inputs make_inputs(const Case& c, Rng& rng) {
  Inputs in;
  in.hidden.resize(size_t(c.T * c.H));
  for (auto& h : in.hidden) {
    // Roughly normal(0, 1): the sum of 4 uniforms, scaled.
    float x = (rng.uniform() + rng.uniform() + rng.uniform() + rng.uniform() - 2.0f) * 1.7f;
    h = to_bf16(x);
  }
  if (c.specials) {
    // A few 32-element blocks: one NaN, one Inf, all zeros, tiny (subnormal bf16), huge.
    for (int64_t t = 0; t < c.T; t += 7) {
      const int64_t blocks = std::max<int64_t>(c.H / 32, 1);
      const int64_t b = rng.below(blocks) * 32;
      const int64_t kind = rng.below(5);
      for (int64_t j = b; j < std::min(b + 32, c.H); ++j) {
        uint16_t& h = in.hidden[size_t(t * c.H + j)];
        if (kind == 0 && j == b + 3) h = 0x7FC1;            // NaN with a payload
        if (kind == 1 && j == b + 5) h = 0xFF80;            // -Inf
        if (kind == 2) h = 0;                               // zero block
        if (kind == 3) h = uint16_t(rng.below(0x7F) | (rng.below(2) << 15));  // subnormals
        if (kind == 4) h = uint16_t(0x7F00 | rng.below(0x80));               // ~1e38
      }
    }
  }
  in.routing = make_routing(c, rng);
  in.probs.resize(size_t(c.T * c.topk));
  for (auto& p : in.probs) p = rng.uniform() * 1.5f - 0.25f;  // some negative, some > 1
  return in;
}

// The buffers of one permute on one context.
struct Buffers {
  fmoe_context_t ctx = nullptr;
  Case c;
  int64_t max_rows = 0;
  void* hidden = nullptr;  // allocation (the op gets hidden + misalign)
  int32_t* routing = nullptr;
  float* probs = nullptr;
  void* permuted = nullptr;
  uint8_t* permuted_q = nullptr;
  uint8_t* scale = nullptr;
  int32_t* offsets = nullptr;
  int32_t* perm_map = nullptr;
  int32_t* inv_map = nullptr;
  int32_t* invalid = nullptr;

  template <class P>
  void alloc(P** p, int64_t bytes) {
    void* v = nullptr;
    CHECK(fmoe_alloc(ctx, bytes, &v));
    *p = static_cast<P*>(v);
  }
  void create(fmoe_context_t context, const Case& cs) {
    ctx = context;
    c = cs;
    CHECK(fmoe_max_rows(c.T, c.topk, c.num_local, c.alignment, &max_rows));
    alloc(&hidden, (c.T * c.H + 16) * 2);
    alloc(&routing, c.T * c.topk * 4);
    alloc(&probs, c.T * c.topk * 4);
    if (c.bf16) alloc(&permuted, (max_rows * c.H + 16) * 2);
    if (c.quant) alloc(&permuted_q, max_rows * c.H);
    if (c.quant) alloc(&scale, max_rows * c.H / 32);
    alloc(&offsets, (c.num_local + 1) * 4);
    alloc(&perm_map, max_rows * 4);
    alloc(&inv_map, c.T * c.topk * 4);
    alloc(&invalid, 4);
  }
  void destroy() {
    for (void* p : {hidden, (void*)routing, (void*)probs, permuted, (void*)permuted_q,
                    (void*)scale, (void*)offsets, (void*)perm_map, (void*)inv_map,
                    (void*)invalid})
      CHECK(fmoe_free(ctx, p));
  }
  void upload(const Inputs& in, void* stream) {
    const int64_t S = c.T * c.topk;
    CHECK(fmoe_memcpy(ctx, static_cast<uint16_t*>(hidden) + c.misalign, in.hidden.data(),
                      c.T * c.H * 2, FMOE_MEMCPY_HOST_TO_DEVICE, stream));
    CHECK(fmoe_memcpy(ctx, routing, in.routing.data(), S * 4, FMOE_MEMCPY_HOST_TO_DEVICE,
                      stream));
    CHECK(fmoe_memcpy(ctx, probs, in.probs.data(), S * 4, FMOE_MEMCPY_HOST_TO_DEVICE, stream));
  }
  void poison(void* stream) {
    if (permuted) CHECK(fmoe_memset(ctx, permuted, 0xA5, (max_rows * c.H + 16) * 2, stream));
    if (permuted_q) CHECK(fmoe_memset(ctx, permuted_q, 0xA5, max_rows * c.H, stream));
    if (scale) CHECK(fmoe_memset(ctx, scale, 0xA5, max_rows * c.H / 32, stream));
    CHECK(fmoe_memset(ctx, offsets, 0x7B, (c.num_local + 1) * 4, stream));
    CHECK(fmoe_memset(ctx, perm_map, 0x7B, max_rows * 4, stream));
    CHECK(fmoe_memset(ctx, inv_map, 0x7B, c.T * c.topk * 4, stream));
    const int32_t seven = 7;
    CHECK(fmoe_memcpy(ctx, invalid, &seven, 4, FMOE_MEMCPY_HOST_TO_DEVICE, stream));
  }
  fmoe_permute_args args() const {
    fmoe_permute_args a{};
    a.size = sizeof a;
    a.hidden = static_cast<const uint16_t*>(hidden) + c.misalign;
    a.routing_map = routing;
    a.probs = c.probs ? probs : nullptr;
    a.permuted = permuted ? static_cast<uint16_t*>(permuted) + c.misalign : nullptr;
    a.permuted_q = permuted_q;
    a.permuted_scale = scale;
    a.expert_offsets = offsets;
    a.permutation_map = perm_map;
    a.inverse_map = inv_map;
    a.invalid_count = invalid;
    a.num_tokens = c.T;
    a.hidden_size = c.H;
    a.topk = c.topk;
    a.num_experts = c.num_experts;
    a.local_expert_start = c.start;
    a.num_local_experts = c.num_local;
    a.alignment = c.alignment;
    return a;
  }
  void run(void* stream) {
    fmoe_permute_args a = args();
    CHECK(fmoe_permute(ctx, stream, &a));
  }
};

struct Results {
  std::vector<int32_t> offsets, perm_map, inv_map;
  int32_t invalid = 0;
  std::vector<uint16_t> permuted;
  std::vector<uint8_t> q, scale;
};

Results download(const Buffers& b, void* stream) {
  const Case& c = b.c;
  Results r;
  r.offsets.resize(size_t(c.num_local + 1));
  r.perm_map.resize(size_t(b.max_rows));
  r.inv_map.resize(size_t(c.T * c.topk));
  auto get = [&](void* dst, const void* src, int64_t bytes) {
    CHECK(fmoe_memcpy(b.ctx, dst, src, bytes, FMOE_MEMCPY_DEVICE_TO_HOST, stream));
  };
  get(r.offsets.data(), b.offsets, (c.num_local + 1) * 4);
  get(r.perm_map.data(), b.perm_map, b.max_rows * 4);
  get(r.inv_map.data(), b.inv_map, c.T * c.topk * 4);
  get(&r.invalid, b.invalid, 4);
  if (b.permuted) {
    r.permuted.resize(size_t(b.max_rows * c.H));
    get(r.permuted.data(), static_cast<uint16_t*>(b.permuted) + c.misalign, b.max_rows * c.H * 2);
  }
  if (b.permuted_q) {
    r.q.resize(size_t(b.max_rows * c.H));
    r.scale.resize(size_t(b.max_rows * c.H / 32));
    get(r.q.data(), b.permuted_q, b.max_rows * c.H);
    get(r.scale.data(), b.scale, b.max_rows * c.H / 32);
  }
  return r;
}

int g_failures = 0;
bool g_self_test = false;

// Prints the first few mismatches of one comparison; returns whether all matched.
struct Diff {
  const char* what;
  int64_t count = 0;
  explicit Diff(const char* w) : what(w) {}
  void add(int64_t i, long long want, long long got) {
    if (count < 4)
      std::printf("    %s[%lld]: want %lld (0x%llx), got %lld (0x%llx)\n", what, (long long)i,
                  want, want, got, got);
    ++count;
  }
  bool ok() const {
    if (count > 0) std::printf("    %s: %lld mismatches\n", what, (long long)count);
    return count == 0;
  }
};

bool compare(const Case& c, int64_t max_rows, const Results& want, const Results& got) {
  bool ok = true;
  {
    Diff d("expert_offsets");
    for (size_t i = 0; i < want.offsets.size(); ++i)
      if (want.offsets[i] != got.offsets[i]) d.add(int64_t(i), want.offsets[i], got.offsets[i]);
    ok &= d.ok();
  }
  {
    Diff d("permutation_map");
    for (size_t i = 0; i < want.perm_map.size(); ++i)
      if (want.perm_map[i] != got.perm_map[i]) d.add(int64_t(i), want.perm_map[i], got.perm_map[i]);
    ok &= d.ok();
  }
  {
    Diff d("inverse_map");
    for (size_t i = 0; i < want.inv_map.size(); ++i)
      if (want.inv_map[i] != got.inv_map[i]) d.add(int64_t(i), want.inv_map[i], got.inv_map[i]);
    ok &= d.ok();
  }
  {
    Diff d("invalid_count");
    if (want.invalid != got.invalid) d.add(0, want.invalid, got.invalid);
    ok &= d.ok();
  }
  if (!ok) return false;  // rows are meaningless when the maps differ

  const int64_t n_used = want.offsets.back();
  const int64_t H = c.H, SB = c.H / 32;
  Diff rows("permuted"), qd("permuted_q"), sd("permuted_scale"), pad("unwritten rows");
  for (int64_t r = 0; r < max_rows; ++r) {
    const bool real = r < n_used && want.perm_map[size_t(r)] >= 0;
    for (int64_t j = 0; j < H; ++j) {
      const size_t i = size_t(r * H + j);
      if (!got.permuted.empty()) {
        const uint16_t w = want.permuted[i], g = got.permuted[i];
        if (real && w != g && !(bf16_is_nan(w) && bf16_is_nan(g))) rows.add(int64_t(i), w, g);
        if (!real && !g_self_test && g != 0xA5A5) pad.add(int64_t(i), 0xA5A5, g);
      }
      if (!got.q.empty()) {
        if (real && want.q[i] != got.q[i]) qd.add(int64_t(i), want.q[i], got.q[i]);
        if (!real && !g_self_test && got.q[i] != 0xA5) pad.add(int64_t(i), 0xA5, got.q[i]);
      }
    }
    for (int64_t b = 0; b < SB && !got.scale.empty(); ++b) {
      const size_t i = size_t(r * SB + b);
      if (real && want.scale[i] != got.scale[i]) sd.add(int64_t(i), want.scale[i], got.scale[i]);
      if (!real && !g_self_test && got.scale[i] != 0xA5) pad.add(int64_t(i), 0xA5, got.scale[i]);
    }
  }
  ok &= rows.ok();
  ok &= qd.ok();
  ok &= sd.ok();
  ok &= pad.ok();
  return ok;
}

Results run_host(fmoe_context_t host, const Case& c, const Inputs& in) {
  Buffers b;
  b.create(host, c);
  b.upload(in, nullptr);
  b.poison(nullptr);
  b.run(nullptr);
  Results r = download(b, nullptr);
  b.destroy();
  return r;
}

void check_case(fmoe_context_t host, fmoe_context_t dev, const Case& c, uint64_t seed) {
  Rng rng(seed);
  const Inputs in = make_inputs(c, rng);
  const Results want = run_host(host, c, in);
  Buffers b;
  b.create(dev, c);
  b.upload(in, nullptr);
  b.poison(nullptr);
  b.run(nullptr);
  const Results got = download(b, nullptr);
  const bool ok = compare(c, b.max_rows, want, got);
  b.destroy();
  std::printf("%s  %s (seed %llu)\n", ok ? "ok  " : "FAIL", describe(c).c_str(),
              (unsigned long long)seed);
  if (!ok) ++g_failures;
}

// One capture, replayed with two different routings written into the same buffers.
void check_graph(fmoe_context_t host, fmoe_context_t dev) {
  Case c{8192, 8, 128, 128, 0, 16, 256, true, true, true, kDistinct};
  fmoe_stream_t s = nullptr;
  CHECK(fmoe_stream_create(dev, &s));
  Buffers b;
  b.create(dev, c);
  Rng rng0(g_seed + 1000);
  b.upload(make_inputs(c, rng0), nullptr);
  CHECK(fmoe_graph_capture_begin(dev, s));
  b.run(s);
  fmoe_graph_t g = nullptr;
  CHECK(fmoe_graph_capture_end(dev, s, &g));
  bool ok = true;
  for (int rep = 0; rep < 2; ++rep) {
    Case cr = c;
    cr.pattern = rep == 0 ? kSkewed : kInvalid;
    Rng rng(g_seed + 1001 + rep);
    const Inputs in = make_inputs(cr, rng);
    const Results want = run_host(host, c, in);
    b.upload(in, nullptr);  // synchronous: done on return
    b.poison(nullptr);
    CHECK(fmoe_context_synchronize(dev));
    CHECK(fmoe_graph_launch(dev, g, s));
    CHECK(fmoe_stream_synchronize(dev, s));
    ok &= compare(c, b.max_rows, want, download(b, s));
  }
  CHECK(fmoe_graph_destroy(dev, g));
  b.destroy();
  CHECK(fmoe_stream_destroy(dev, s));
  std::printf("%s  graph: capture once, replay with 2 new routings (%s)\n", ok ? "ok  " : "FAIL",
              describe(c).c_str());
  if (!ok) ++g_failures;
}

// Two streams running permute at the same time on distinct buffers: nothing may be shared.
void check_streams(fmoe_context_t host, fmoe_context_t dev) {
  Case c{8192, 8, 256, 256, 0, 16, 512, false, true, false, kDistinct};
  fmoe_stream_t s[2];
  Buffers b[2];
  Inputs in[2];
  for (int i = 0; i < 2; ++i) {
    CHECK(fmoe_stream_create(dev, &s[i]));
    Rng rng(g_seed + 2000 + i);
    in[i] = make_inputs(c, rng);
    b[i].create(dev, c);
    b[i].upload(in[i], nullptr);
    b[i].poison(nullptr);
  }
  CHECK(fmoe_context_synchronize(dev));
  for (int rep = 0; rep < 3; ++rep)
    for (int i = 0; i < 2; ++i) b[i].run(s[i]);
  bool ok = true;
  for (int i = 0; i < 2; ++i) {
    CHECK(fmoe_stream_synchronize(dev, s[i]));
    // invalid_count accumulated 3 runs; the host reference ran once: compare the rest only.
    Results got = download(b[i], s[i]);
    Results want = run_host(host, c, in[i]);
    got.invalid = want.invalid;
    ok &= compare(c, b[i].max_rows, want, got);
    b[i].destroy();
    CHECK(fmoe_stream_destroy(dev, s[i]));
  }
  std::printf("%s  two concurrent streams (%s)\n", ok ? "ok  " : "FAIL", describe(c).c_str());
  if (!ok) ++g_failures;
}

void bench(fmoe_context_t dev, const char* name, Case c) {
  Rng rng(g_seed + 3000);
  const Inputs in = make_inputs(c, rng);
  Buffers b;
  b.create(dev, c);
  b.upload(in, nullptr);
  fmoe_event_t e0, e1;
  CHECK(fmoe_event_create(dev, &e0));
  CHECK(fmoe_event_create(dev, &e1));
  std::vector<double> ms;
  for (int it = 0; it < 23; ++it) {
    CHECK(fmoe_event_record(dev, e0, nullptr));
    b.run(nullptr);
    CHECK(fmoe_event_record(dev, e1, nullptr));
    double t = 0;
    CHECK(fmoe_event_elapsed_ms(dev, e0, e1, &t));
    if (it >= 3) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double us = ms[ms.size() / 2] * 1e3;
  int64_t local = 0;
  for (int32_t id : in.routing) local += id >= c.start && id < c.start + c.num_local;
  // Bytes: each token read once, each local slot's row written (bf16 and/or e4m3 + scales),
  // plus the maps.
  const double out_bytes = (c.bf16 ? 2.0 : 0.0) + (c.quant ? 1.0 + 1.0 / 32 : 0.0);
  const double bytes = double(c.T) * c.H * 2 + double(local) * c.H * out_bytes +
                       double(c.T * c.topk) * 4 * 3;
  std::printf("bench %-12s %-6s T=%-5lld H=%-5lld topk=%lld E=%-3lld: %8.1f us  %6.0f GB/s "
              "(min %.1f, max %.1f)\n",
              name, c.quant ? "mxfp8" : (c.probs ? "bf16*p" : "bf16"), (long long)c.T,
              (long long)c.H, (long long)c.topk, (long long)c.num_local, us, bytes / us * 1e-3,
              ms.front() * 1e3, ms.back() * 1e3);
  CHECK(fmoe_event_destroy(dev, e0));
  CHECK(fmoe_event_destroy(dev, e1));
  b.destroy();
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, bench_only = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--bench-only")) bench_only = true;
    if (!std::strcmp(argv[i], "--self-test")) g_self_test = true;
    if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) g_seed = std::strtoull(argv[++i], 0, 10);
  }
  int64_t devices = 0;
  CHECK(fmoe_cuda_device_count(&devices));
  if (devices == 0 && !g_self_test) {
    std::printf("no CUDA device: nothing to check (%s)\n", fmoe_build_info());
    return 2;
  }
  fmoe_context_t host = nullptr, dev = nullptr;
  CHECK(fmoe_context_create(FMOE_BACKEND_HOST, 0, &host));
  CHECK(fmoe_context_create(g_self_test ? FMOE_BACKEND_HOST : FMOE_BACKEND_CUDA, 0, &dev));
  char name[128];
  CHECK(fmoe_context_device_name(dev, name, sizeof name));
  std::printf("permute check on %s, seed %llu (%s)\n", name, (unsigned long long)g_seed,
              fmoe_build_info());

  if (!bench_only) {
    // {T, topk, E, E_local, start, align, H, probs, quant, bf16, pattern}
    std::vector<Case> cases = {
        // T = 0: only expert_offsets and the -1 fill are outputs.
        {0, 2, 8, 8, 0, 16, 256, false, false, true, kUniform},
        {0, 8, 256, 128, 128, 128, 7168, true, true, true, kUniform},
        // Decode (single-block route).
        {1, 8, 256, 256, 0, 1, 7168, false, true, true, kDistinct},
        {1, 8, 256, 256, 0, 128, 7168, true, true, true, kDistinct},
        {1, 2, 8, 8, 0, 16, 4096, true, false, true, kDistinct},
        {1, 1, 8, 4, 4, 16, 2048, false, false, true, kInvalid},
        {33, 2, 8, 8, 0, 16, 2880, true, true, true, kUniform, true},
        {33, 8, 128, 128, 0, 1, 2048, false, true, false, kSkewed, true},
        {33, 4, 128, 32, 64, 16, 2880, true, true, false, kInvalid},
        {33, 2, 8, 8, 0, 16, 100, true, false, true, kUniform},          // H % 8 != 0
        {33, 2, 8, 8, 0, 16, 40, true, false, true, kUniform},           // partial strip
        {33, 4, 16, 16, 0, 16, 64, true, true, true, kUniform, false, 1}, // unaligned pointers
        {512, 8, 128, 128, 0, 16, 256, true, true, true, kDistinct},       // 4096 slots: single
        // Multi-block route (> 4096 slots).
        {513, 8, 128, 128, 0, 16, 256, true, true, true, kDistinct},       // 4104: 4 chunks
        {4096, 8, 128, 128, 0, 16, 512, true, true, true, kDistinct, true},
        {4096, 8, 128, 128, 0, 1, 256, false, true, true, kUniform},
        {4096, 2, 8, 8, 0, 128, 512, true, false, true, kDistinct},
        {4096, 8, 256, 32, 96, 16, 256, false, false, true, kDistinct},    // EP slice
        {4096, 8, 256, 32, 224, 128, 256, true, true, false, kInvalid},    // last EP slice
        {4096, 1, 8, 8, 0, 16, 256, false, true, true, kOneExpert},
        {4096, 8, 128, 128, 0, 16, 256, true, false, true, kOneExpert},    // repeats in a token
        {8192, 8, 128, 128, 0, 16, 2048, false, false, true, kDistinct},
        {8192, 8, 128, 128, 0, 16, 2048, true, true, true, kDistinct},
        {8192, 8, 256, 256, 0, 16, 7168, false, true, false, kDistinct},
        {8192, 8, 256, 64, 128, 128, 1024, true, true, true, kSkewed},
        {8192, 2, 8, 8, 0, 16, 4096, false, false, true, kDistinct},
        {8192, 2, 8, 8, 0, 1, 4096, true, true, true, kInvalid},
        {8192, 4, 128, 128, 0, 16, 2880, false, true, true, kUniform, true},
        {8192, 6, 1024, 1024, 0, 16, 256, true, false, true, kUniform},    // widest chunk table
        {8192, 4, 2048, 2048, 0, 16, 128, true, false, true, kUniform},    // E > 1024: one block
        {8193, 8, 128, 128, 0, 16, 200, false, false, true, kUniform},     // H % 8 == 0, odd T
        {1000, 5, 64, 64, 0, 16, 36, true, false, true, kSkewed},          // H % 8 != 0
    };
    if (!quick) {
      cases.push_back({65536, 8, 256, 256, 0, 16, 128, true, true, true, kDistinct});
      cases.push_back({65536, 2, 8, 8, 0, 128, 256, false, false, true, kUniform});
      cases.push_back({65536, 8, 256, 32, 32, 16, 64, false, true, false, kOneExpert});
      cases.push_back({65536, 1, 128, 128, 0, 1, 64, true, false, true, kInvalid});
    }
    uint64_t seed = g_seed;
    for (const Case& c : cases) check_case(host, dev, c, seed++);
    check_graph(host, dev);
    check_streams(host, dev);
    std::printf("%s: %d failure(s)\n", g_failures ? "FAILED" : "all passed", g_failures);
  }

  // Bench shapes: {T, topk, E, E_local, start, align, H, probs, quant, bf16, pattern}.
  struct Shape {
    const char* name;
    int64_t H, topk, E;
  };
  for (const Shape& s : {Shape{"qwen3-30b", 2048, 8, 128}, Shape{"deepseek-v3", 7168, 8, 256},
                         Shape{"mixtral", 4096, 2, 8}}) {
    if (g_self_test) break;  // host timings say nothing
    for (int64_t T : {int64_t(1), int64_t(8192)}) {
      bench(dev, s.name, Case{T, s.topk, s.E, s.E, 0, 16, s.H, false, false, true, kDistinct});
      bench(dev, s.name, Case{T, s.topk, s.E, s.E, 0, 16, s.H, false, true, false, kDistinct});
    }
  }

  CHECK(fmoe_context_destroy(dev));
  CHECK(fmoe_context_destroy(host));
  return g_failures ? 1 : 0;
}
