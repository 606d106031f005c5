#!/usr/bin/env bash
# Build the codec extension for fuzzing into build/fuzz-pkg/ (the source tree's own build is
# left alone): clang with -fsanitize=fuzzer-no-link, so that libFuzzer (inside atheris) sees
# the C code's coverage and comparisons, plus UndefinedBehaviorSanitizer (a UB report aborts:
# a finding). The package's Python files are symlinked next to it. fuzz/run.sh uses this build
# when it exists and is newer than the codec's sources (and preloads atheris's
# ubsan_with_fuzzer.so, which provides the sanitizer and coverage runtime).
set -euo pipefail
cd "$(dirname "$0")/.."
CC="${FUZZ_CC:-$(command -v clang || command -v clang-14 || true)}"
if [ -z "$CC" ]; then
    echo "fuzz/build.sh: no clang (apt-get install clang); the fuzzers will run on the uninstrumented extension" >&2
    exit 1
fi
PYTHON="${PYTHON:-python3}"
$PYTHON -m codegen
rm -rf build/fuzz-tmp
mkdir -p build/fuzz-pkg/resonant
# pointer-overflow: Cython's generated argument parsing adds 0 to NULL (harmless, and not ours);
# function/vptr need C++ runtime support.
CC="$CC" LDSHARED="$CC -shared" \
CFLAGS="-fsanitize=fuzzer-no-link,undefined -fno-sanitize-recover=undefined -fno-sanitize=function,vptr,pointer-overflow -Wno-unused-command-line-argument" \
    $PYTHON setup.py build_ext --force -b build/fuzz-pkg -t build/fuzz-tmp -q
for f in resonant/*.py resonant/py.typed; do
    ln -sf "../../../$f" build/fuzz-pkg/resonant/
done
echo "fuzz/build.sh: built build/fuzz-pkg/resonant/ with $CC (coverage + UBSan)"
