#!/usr/bin/env bash
# The real 1M-token prefill of an 8-block V4-Flash-geometry model on one GPU (issue 5), in three
# processes chained by `v4rt bench --save-cache` / `--load-cache`, because one command on our
# device machine may run at most 10 minutes and the whole prefill takes about 13.
#
#   bash scripts/gpu-prefill-1m.sh PART [OUTDIR] [CACHEDIR]    # PART = 1, 2, 3, or all
#
# Writes OUTDIR/prefill-1m-PART.txt (and .err: the per-chunk times). Part 3 ends with 32 decode
# steps at 1M and the calibrated rates. The saved caches (about 1 GB each) go to CACHEDIR
# (default /tmp); every part must use the same binary, preset, layers and --capacity.
set -uo pipefail
part=${1:?part 1, 2, 3 or all}
out=${2:-out}
dir=${3:-/tmp}
mkdir -p "$out"
bin=${V4RT_BIN:-target/release/v4rt}
export V4RT_KERNEL_CACHE=${V4RT_KERNEL_CACHE:-/tmp/v4rt-kernels}
common=(bench --preset v4-flash --backend cuda --layers 8 --capacity 1048704)
run() {
  case $1 in
    1) "$bin" "${common[@]}" --context 573440 --decode 1 --no-calibrate --save-cache "$dir/v4rt-kv1.safetensors" ;;
    2) "$bin" "${common[@]}" --context 245760 --decode 1 --no-calibrate --load-cache "$dir/v4rt-kv1.safetensors" --save-cache "$dir/v4rt-kv2.safetensors" ;;
    3) "$bin" "${common[@]}" --context 229376 --decode 32 --load-cache "$dir/v4rt-kv2.safetensors" ;;
  esac > "$out/prefill-1m-$1.txt" 2> "$out/prefill-1m-$1.err"
}
if [ "$part" = all ]; then
  for p in 1 2 3; do run $p || exit $?; done
else
  run "$part"
fi
