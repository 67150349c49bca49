#!/usr/bin/env bash
# GPU check: build with the CUDA backend, run the whole test suite (the CUDA suites run when a
# device is present), then compute-sanitizer memcheck, racecheck and synccheck over a short run of
# every op (scripts/sanitize-ops.ts). Prints one summary line per step and exits non-zero if any failed.
#   bash scripts/gpu-check.sh [--no-tests] [--no-sanitize]
set -uo pipefail
cd "$(dirname "$0")/.."
run_tests=1; run_sanitize=1
for a in "$@"; do
  case "$a" in
    --no-tests) run_tests=0 ;;
    --no-sanitize) run_sanitize=0 ;;
    *) echo "gpu-check: unknown flag $a" >&2; exit 2 ;;
  esac
done
logdir=${FMOE_LOG_DIR:-build/gpu-check}
mkdir -p "$logdir"
summary=()
failed=0

FMOE_CUDA=ON bun scripts/build.ts > "$logdir/build.log" 2>&1 || { tail -n 40 "$logdir/build.log"; echo "gpu-check: build FAILED"; exit 1; }
summary+=("build: ok")
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu-check: device: /'

if [ $run_tests -eq 1 ]; then
  echo "gpu-check: bun test"
  bun test > "$logdir/tests.log" 2>&1
  rc=$?
  tail -n 30 "$logdir/tests.log"
  counts=$(grep -Eo '^ *[0-9]+ (pass|fail|skip)$' "$logdir/tests.log" | tr -s ' ' | sed 's/^ //' | paste -sd, -)
  summary+=("tests: ${counts:-no counts} (exit $rc)")
  [ $rc -eq 0 ] || failed=1
fi

if [ $run_sanitize -eq 1 ]; then
  for tool in memcheck racecheck synccheck; do
    FMOE_SANITIZER=$tool compute-sanitizer --tool "$tool" --error-exitcode 3 \
      --target-processes all bun scripts/sanitize-ops.ts > "$logdir/$tool.log" 2>&1
    rc=$?
    tail -n 8 "$logdir/$tool.log"
    line=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$logdir/$tool.log" | tail -1)
    summary+=("$tool: ${line:-no summary} (exit $rc)")
    [ $rc -eq 0 ] || failed=1
  done
fi

echo
echo "gpu-check summary:"
printf '  %s\n' "${summary[@]}"
exit $failed
