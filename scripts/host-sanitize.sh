#!/usr/bin/env bash
# Host sanitizers: builds a host-only library with AddressSanitizer and UndefinedBehaviorSanitizer
# into build/sanitize/, then runs every suite against it (FMOE_LIBRARY; the sanitizer runtime is
# preloaded, as Bun is not built with it; child processes the tests spawn inherit both). A use
# after free, an out-of-bounds access or undefined behaviour in the host backend or the core stops
# the run with the sanitizer's report. Leak checking is off: Bun's own allocations would drown it.
#   npm run sanitize:host [-- bun test arguments]   (or: bash scripts/host-sanitize.sh ...)
set -euo pipefail
cd "$(dirname "$0")/.."
asan=$(${CXX:-c++} -print-file-name=libasan.so)
if [ ! -e "$asan" ]; then
  echo "host-sanitize: the compiler has no AddressSanitizer runtime (libasan.so); nothing checked" >&2
  exit 2
fi
mkdir -p build
dir=build/sanitize
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
cmake -S csrc -B "$dir" "${generator[@]}" -DFMOE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer" > "$dir.configure.log" 2>&1 \
  || { cat "$dir.configure.log"; exit 1; }
cmake --build "$dir" --parallel "$(nproc)" > "$dir.build.log" 2>&1 || { tail -n 40 "$dir.build.log"; exit 1; }
echo "host-sanitize: $dir/libfusedmoe.so (ASan + UBSan), running the suites"
LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 FMOE_LIBRARY="$PWD/$dir/libfusedmoe.so" bun test "$@"
