// permute: group the token copies of local slots by local expert, stable in (token, slot) order,
// each group padded to a multiple of `alignment` rows.
//
// The routing pass is sequential (it is a counting sort; O(T*topk) integer work); the row copies,
// the bulk of the bytes, are spread over the pool.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/numerics.h"
#include "host/host_backend.h"

namespace fmoe::host {

Status permute(ThreadPool& pool, const fmoe_permute_args& a) {
  const int64_t T = a.num_tokens, K = a.topk, H = a.hidden_size, E = a.num_local_experts;
  const int64_t align = a.alignment, start = a.local_expert_start;
  const int64_t slots = T * K;
  const int64_t max_rows = (slots + E * (align - 1) + align - 1) / align * align;

  // Local expert of each slot, -1 when non-local or invalid.
  std::vector<int32_t> local(size_t(slots), -1);
  std::vector<int64_t> count(size_t(E), 0);
  int64_t invalid = 0;
  for (int64_t s = 0; s < slots; ++s) {
    const int64_t id = a.routing_map[s];
    if (id < 0 || id >= a.num_experts) {
      ++invalid;
    } else if (id >= start && id < start + E) {
      local[s] = int32_t(id - start);
      ++count[id - start];
    }
  }

  std::vector<int64_t> offset(size_t(E) + 1, 0);
  for (int64_t e = 0; e < E; ++e)
    offset[e + 1] = offset[e] + (count[e] + align - 1) / align * align;
  const int64_t n_used = offset[E];
  for (int64_t e = 0; e <= E; ++e) a.expert_offsets[e] = int32_t(offset[e]);

  // slot_of_row: the slot whose copy fills each used row, -1 for padding.
  std::vector<int64_t> slot_of_row(size_t(n_used), -1);
  std::vector<int64_t> cursor(offset.begin(), offset.end() - 1);
  for (int64_t s = 0; s < slots; ++s) {
    if (local[s] < 0) {
      a.inverse_map[s] = -1;
      continue;
    }
    const int64_t row = cursor[local[s]]++;
    a.inverse_map[s] = int32_t(row);
    slot_of_row[row] = s;
  }
  for (int64_t r = 0; r < max_rows; ++r)
    a.permutation_map[r] = r < n_used && slot_of_row[r] >= 0 ? int32_t(slot_of_row[r] / K) : -1;

  if (a.invalid_count != nullptr && invalid != 0) {
    // Atomic and wrapping, as the device's atomicAdd on an i32: one plan's counter is shared by
    // its calls on every stream, whose work runs on threads of their own here.
    __atomic_fetch_add(reinterpret_cast<uint32_t*>(a.invalid_count), uint32_t(invalid),
                       __ATOMIC_RELAXED);
  }

  // Rows: bf16 copies (times the slot's prob when given), padding rows zeroed, and the MXFP8
  // copy quantized from exactly those bf16 values.
  const auto* hidden = static_cast<const uint16_t*>(a.hidden);
  auto* out = static_cast<uint16_t*>(a.permuted);
  const int64_t blocks = H / kMxBlock;
  pool.parallel_for(0, n_used, 16, [&](int64_t lo, int64_t hi) {
    std::vector<uint16_t> row(static_cast<size_t>(H));
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t s = slot_of_row[r];
      if (s < 0) {
        std::fill(row.begin(), row.end(), uint16_t(0));
      } else {
        const uint16_t* src = hidden + (s / K) * H;
        if (a.probs != nullptr) {
          const float p = a.probs[s];
          for (int64_t h = 0; h < H; ++h) row[h] = f32_to_bf16(bf16_to_f32(src[h]) * p);
        } else {
          std::memcpy(row.data(), src, size_t(H) * 2);
        }
      }
      if (out != nullptr) std::memcpy(out + r * H, row.data(), size_t(H) * 2);
      if (a.permuted_q != nullptr) {
        mx_quantize_row(row.data(), H, a.permuted_q + r * H, a.permuted_scale + r * blocks);
      }
    }
  });
  return FMOE_OK;
}

}  // namespace fmoe::host
