// expand_group_ids: the synthetic routing map of skip-permute mode. Rows arrive grouped by local
// expert with tokens_per_expert[e] rows each; row r gets the global id of its group, and rows
// beyond the sum get -1 (dropped by permute, so they produce zeros).
#include <algorithm>

#include "host/host_backend.h"

namespace fmoe::host {

Status expand_group_ids(const int32_t* tokens_per_expert, int64_t num_local_experts,
                        int64_t local_expert_start, int64_t rows, int32_t* routing_rows) {
  int64_t r = 0;
  for (int64_t e = 0; e < num_local_experts && r < rows; ++e) {
    // Negative counts are treated as 0; counts past `rows` are cut.
    const int64_t n = std::min<int64_t>(std::max<int32_t>(tokens_per_expert[e], 0), rows - r);
    std::fill(routing_rows + r, routing_rows + r + n, int32_t(local_expert_start + e));
    r += n;
  }
  std::fill(routing_rows + r, routing_rows + rows, int32_t(-1));
  return FMOE_OK;
}

}  // namespace fmoe::host
