#!/usr/bin/env bash
# A/B of the replayed decode step under two environments, alternated in one command so that both
# share the machine and its clocks (runs on one H100 differ by about ±2 %; see docs/performance.md).
#
#   Build (any x86-64 Linux with Rust; no CUDA needed):
#     cargo build --release -p v4rt-tools
#   Run on the GPU machine, from the repository root:
#     bash scripts/gpu-ab.sh 'V4RT_CUDA_FP8_MMA=0' '' [ROUNDS] [extra bench arguments...]
#
# A and B are `VAR=value` lists ('' = the defaults). Each round runs A then B: V4-Flash geometry,
# 4 blocks, 4K of synthetic context, 64 decode steps, no calibration (about 40 s a run, mostly
# weight generation). Prints one line per run (the host-issued and replayed medians) and the
# medians of each side. V4RT_BIN picks the binary (default target/release/v4rt).
set -uo pipefail
a=${1?usage: gpu-ab.sh A B [ROUNDS] [bench args...]}
b=${2?usage: gpu-ab.sh A B [ROUNDS] [bench args...]}
rounds=${3:-2}
shift $(( $# < 3 ? $# : 3 ))
bin=${V4RT_BIN:-target/release/v4rt}
export V4RT_KERNEL_CACHE=${V4RT_KERNEL_CACHE:-/tmp/v4rt-kernels}
args=(bench --preset v4-flash --layers 4 --backend cuda --fill 4096 --decode 64 --no-calibrate "$@")
declare -A replayed
for ((i = 1; i <= rounds; i++)); do
  for side in A B; do
    vars=$a
    [ "$side" = B ] && vars=$b
    text=$(env $vars "$bin" "${args[@]}" 2>&1)
    host=$(grep -o 'Model::forward.*median step [0-9.]* ms' <<<"$text" | grep -o '[0-9.]* ms$')
    replay=$(grep -o 'Model::decode_step.*median step [0-9.]* ms' <<<"$text" | grep -o '[0-9.]* ms$')
    if [ -z "$replay" ]; then
      echo "round $i $side ($vars): no result" >&2
      tail -5 <<<"$text" >&2
      continue
    fi
    echo "round $i $side (${vars:-defaults}): host-issued $host, replayed $replay"
    replayed[$side]+="${replay% ms} "
  done
done
for side in A B; do
  echo "$side replayed: ${replayed[$side]:-none} → median $(tr ' ' '\n' <<<"${replayed[$side]:-}" | sed '/^$/d' | sort -n | awk '{v[NR] = $1} END {if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) " ms"; else print "none"}')"
done
