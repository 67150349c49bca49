#!/usr/bin/env bash
# Builds and runs the standalone kernel checks of bench/dev/ on a GPU machine (each compares a
# kernel against a naive reference and times it). Run from the repository root after the
# library is built (build/libfusedmoe.so: the permute check links it).
#   bash bench/dev/run-checks.sh [name...]     names: sm90 sm90_act sm90_mx small permute
# and, named only, stream: weight_stream_check.cu, a measurement of the copy engine's rates, and
# gather: row_gather_check.cu, the wide tile's copies of FC1's operands (one-row copies of A, a
# ring of 3 stages, operands in L2, clusters, tiles drawn in order, B multicast to CTA pairs).
set -uo pipefail
out=${FMOE_CHECK_DIR:-/tmp/fmoe-checks}
mkdir -p "$out"
flags=(-std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Icsrc/include -Icsrc)
declare -A build=(
  [sm90]="bench/dev/grouped_mm_sm90_check.cu csrc/cuda/grouped_mm_sm90.cu csrc/cuda/tensor_map.cu"
  [sm90_act]="bench/dev/grouped_mm_sm90_act_check.cu csrc/cuda/grouped_mm_sm90.cu csrc/cuda/tensor_map.cu csrc/core/status.cpp"
  [sm90_mx]="bench/dev/grouped_mm_sm90_mx_check.cu csrc/cuda/grouped_mm_sm90.cu csrc/cuda/tensor_map.cu"
  [small]="bench/dev/grouped_mm_small_check.cu csrc/cuda/grouped_mm_small.cu csrc/cuda/tensor_map.cu"
  [permute]="bench/dev/permute_check.cu -Lbuild -lfusedmoe -Xlinker -rpath,$PWD/build"
  [stream]="bench/dev/weight_stream_check.cu csrc/cuda/tensor_map.cu"
  [gather]="bench/dev/row_gather_check.cu csrc/cuda/tensor_map.cu"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(sm90 sm90_act sm90_mx small permute)
for n in "${names[@]}"; do
  # shellcheck disable=SC2086
  nvcc "${flags[@]}" ${build[$n]} -o "$out/$n" > "$out/$n.build.log" 2>&1 &
done
wait
status=0
summary=()
for n in "${names[@]}"; do
  if [ ! -x "$out/$n" ]; then
    tail -n 20 "$out/$n.build.log"; summary+=("$n: BUILD FAILED"); status=1; continue
  fi
  timeout 300 "$out/$n" > "$out/$n.log" 2>&1
  rc=$?
  grep -E "FAIL|MISMATCH|TIME|SPEEDUP|PASS.*(qwen|dense|fc)|ALL|summary" "$out/$n.log" | head -n 60
  summary+=("$n: exit $rc ($(grep -c PASS "$out/$n.log") PASS lines, $(grep -c FAIL "$out/$n.log") FAIL lines)")
  [ $rc -eq 0 ] || status=1
done
printf '%s\n' "${summary[@]}"
exit $status
