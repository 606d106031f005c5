#!/usr/bin/env bash
# Run one fuzz target: fuzz/run.sh TARGET [SECONDS] [libFuzzer options or files...]
#   TARGET   decode | codec | handshake | reassembler | session
#   SECONDS  -max_total_time (default 600)
# With a crash file instead of options (fuzz/run.sh decode 0 build/fuzz/decode/crash-...), the
# file is run once: the reproducer. Uses the instrumented build from fuzz/build.sh when it is
# up to date, else the resonant that Python imports (its C code then gives no coverage).
set -euo pipefail
cd "$(dirname "$0")/.."
target="$1"; secs="${2:-600}"; shift $(( $# >= 2 ? 2 : 1 ))
PYTHON="${PYTHON:-python3}"
so=$(ls build/fuzz-pkg/resonant/_codec*.so 2>/dev/null | head -1 || true)
newest=$(ls -t resonant/_codec.pyx resonant/_*.pxi resonant/_*.pxd | head -1)  # the codec's sources
if [ -n "$so" ] && [ "$so" -nt "$newest" ]; then
    lib="$($PYTHON -c 'import atheris; print(atheris.path())')/ubsan_with_fuzzer.so"
    export LD_PRELOAD="$lib" PYTHONPATH="$PWD/build/fuzz-pkg${PYTHONPATH:+:$PYTHONPATH}"
    echo "fuzz/run.sh: $target with the instrumented extension ($so)" >&2
else
    echo "fuzz/run.sh: $target with an uninstrumented extension (run fuzz/build.sh for C coverage)" >&2
fi
args=("$@")
if [ "${#args[@]}" -eq 0 ] || [[ "${args[0]}" == -* ]]; then
    args=(-max_total_time="$secs" "${args[@]}")
fi
exec $PYTHON "fuzz/fuzz_$target.py" "${args[@]}"
