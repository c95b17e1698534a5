#!/usr/bin/env bash
# Runs the conformance suite on a CUDA machine with a v4rt binary built elsewhere.
#
#   Build (any x86-64 Linux with Rust; no CUDA needed):
#     cargo build --release -p v4rt-tools
#   Run on the GPU machine, from the repository root (the golden data in tests/data travels
#   with the tree; the binary is target/release/v4rt):
#     bash scripts/gpu-conformance.sh [OUTDIR]
#
# Writes OUTDIR/conformance.txt, conformance.json, sanitizer.txt, e2e.txt (default OUTDIR=out).
set -uo pipefail
out=${1:-out}
mkdir -p "$out"
bin=${V4RT_BIN:-target/release/v4rt}
export V4RT_KERNEL_CACHE=${V4RT_KERNEL_CACHE:-/tmp/v4rt-kernels}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  "$bin" backends
} 2>&1 | tee "$out/env.txt"

# The whole suite: every op × cases against cpu-ref, then end-to-end golden logits.
"$bin" conformance --backend cuda --json "$out/conformance.json" 2>&1 | tee "$out/conformance.txt"
status=${PIPESTATUS[0]}

# Out-of-bounds accesses that land outside any allocation are caught by memcheck only.
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 "$bin" conformance --backend cuda --no-e2e 2>&1 \
    | tail -n 40 > "$out/sanitizer.txt"
  echo "compute-sanitizer exit: ${PIPESTATUS[0]}" >> "$out/sanitizer.txt"
fi

# The main job on the GPU, and its speed (tiny model: launch-bound, reported for reference).
{ "$bin" generate --backend cuda --max-new 32 --temperature 0; "$bin" bench --backend cuda --prompt 128 --decode 128; } \
  2>&1 | tee "$out/e2e.txt"
exit "$status"
