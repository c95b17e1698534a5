#!/usr/bin/env bash
# Runs `v4rt bench` on a CUDA machine with a v4rt binary built elsewhere (issue 5 figures).
#
#   Build (any x86-64 Linux with Rust; no CUDA needed):
#     cargo build --release -p v4rt-tools
#   Run on the GPU machine, from the repository root:
#     bash scripts/gpu-bench.sh [OUTDIR] [extra bench arguments...]
#
# Writes OUTDIR/env.txt and OUTDIR/bench-*.txt (default OUTDIR=out): V4-Flash geometry, 4 blocks
# (window, window, CSA, HCA), at 4K (with a per-op profile), 128K and 1M tokens of context.
set -uo pipefail
out=${1:-out}
shift || true
mkdir -p "$out"
bin=${V4RT_BIN:-target/release/v4rt}
export V4RT_KERNEL_CACHE=${V4RT_KERNEL_CACHE:-/tmp/v4rt-kernels}
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  nproc
  "$bin" backends
} 2>&1 | tee "$out/env.txt"
flash=(bench --preset v4-flash --backend cuda "$@")
# 4K context: prefill, decode, per-op profile.
"$bin" "${flash[@]}" --layers 4 --context 4096 --decode 64 --profile 16 2>&1 | tee "$out/bench-flash4-4k.txt"
# 128K context, prefilled for real (32 chunks of 4096).
"$bin" "${flash[@]}" --layers 4 --context 131072 --decode 32 2>&1 | tee "$out/bench-flash4-128k.txt"
# 1M context, filled synthetically: one prefill chunk and decode at 1M.
"$bin" "${flash[@]}" --layers 4 --fill 1048576 --prompt 4096 --decode 32 2>&1 | tee "$out/bench-flash4-1m.txt"
