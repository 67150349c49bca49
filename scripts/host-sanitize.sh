#!/usr/bin/env bash
# Host sanitizers: builds a host-only library with AddressSanitizer and UndefinedBehaviorSanitizer
# into build/sanitize/, then runs every suite against it (FMOE_LIBRARY; the sanitizer runtime is
# preloaded, as Bun is not built with it; child processes the tests spawn inherit both). A use
# after free, an out-of-bounds access or undefined behaviour in the host backend or the core stops
# the run with the sanitizer's report. Leak checking is off: Bun's own allocations would drown it.
# An allocation too large to serve returns NULL, as it does without the sanitizer, so that the
# library's out-of-memory answer is what the tests see.
# Then ThreadSanitizer: a host-only library built with it into build/tsan/, and the C program
# test/c_abi_threads.c (threads sharing a context and a plan on streams of their own, threads
# with contexts of their own), which must finish without a race reported.
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
LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:allocator_may_return_null=1 FMOE_LIBRARY="$PWD/$dir/libfusedmoe.so" bun test "$@"

tsan=build/tsan
cmake -S csrc -B "$tsan" "${generator[@]}" -DFMOE_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" > "$tsan.configure.log" 2>&1 \
  || { cat "$tsan.configure.log"; exit 1; }
cmake --build "$tsan" --parallel "$(nproc)" > "$tsan.build.log" 2>&1 || { tail -n 40 "$tsan.build.log"; exit 1; }
${CC:-cc} -std=c99 -g -O1 -fsanitize=thread -Wall -Wextra -Werror -Icsrc/include test/c_abi_threads.c \
  "$tsan/libfusedmoe.so" -Wl,-rpath,"$PWD/$tsan" -lpthread -o "$tsan/c_abi_threads"
echo "host-sanitize: $tsan/libfusedmoe.so (ThreadSanitizer), running test/c_abi_threads.c"
TSAN_OPTIONS=halt_on_error=1 "$tsan/c_abi_threads"
