#!/usr/bin/env bash
# Kernel timeline of the replayed decode step on the GPU machine, through CUPTI (no nsys needed).
#   bash scripts/trace-step.sh [bench args...]
# Builds scripts/cupti-trace.c against the machine's CUDA (gcc, CUPTI headers and library), runs
# `v4rt bench` (V4-Flash geometry, 4 blocks, 4K of synthetic context, 16 decode steps by
# default) under it, and prints scripts/trace-step.py's table of the last 8 replayed steps.
# V4RT_BIN picks the binary (default target/release/v4rt); TRACE_CSV where the trace goes.
set -euo pipefail
cuda=${CUDA_HOME:-/usr/local/cuda}
inc=$(dirname "$(find "$cuda"/ "$cuda"/extras/CUPTI/ -name cupti.h 2>/dev/null | head -1)")
lib=$(dirname "$(find "$cuda"/ "$cuda"/extras/CUPTI/ -name 'libcupti.so*' 2>/dev/null | head -1)")
[ -n "$inc" ] && [ -n "$lib" ] || { echo "no CUPTI under $cuda" >&2; exit 1; }
# The newest kernel record layout of these headers is the one CUPTI fills.
krec=$(grep -ho 'CUpti_ActivityKernel[0-9]\+;' "$inc"/cupti_activity*.h | tr -d ';' | sort -V | tail -1)
so=${TMPDIR:-/tmp}/libv4rt-trace.so
gcc -shared -fPIC -O2 -DKREC="$krec" -I"$inc" -I"$cuda/include" "$(dirname "$0")/cupti-trace.c" -o "$so" -L"$lib" -lcupti -Wl,-rpath,"$lib"
echo "tracer: $so ($krec, CUPTI from $lib)"
csv=${TRACE_CSV:-${TMPDIR:-/tmp}/v4rt-trace.csv}
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--preset v4-flash --layers 4 --backend cuda --fill 4096 --decode 16 --no-calibrate)
CUDA_INJECTION64_PATH=$so V4RT_TRACE_OUT=$csv "${V4RT_BIN:-target/release/v4rt}" bench "${args[@]}" | grep -E 'median step|backend'
python3 "$(dirname "$0")/trace-step.py" "$csv" 8
