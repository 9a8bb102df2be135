#!/usr/bin/env bash
# Does the working tree compile every kernel source to the same sm_90a machine code as REV?
# A refactor that leaves every kernel's machine code byte-identical needs no GPU run to show it
# changes nothing; one that does not, does. No GPU needed (nvcc and readelf only).
#   scripts/compare_machine_code.sh REV [-DNAME=value ...]     (defines apply to every source)
#   BASE_DEFINES="-DNAME=value ..." scripts/compare_machine_code.sh REV   (REV built with them only:
#   does a new default equal what REV built with those defines?)
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: $0 REV [-DNAME=value ...]}
shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/base" "$tmp/cubin"
git archive "$rev" clusterfuse/kernels | tar -x -C "$tmp/base"

# md5 of the machine code: every .text section of the cubin, in section order.
text_md5() {
  for s in $(readelf -S -W "$1" 2>/dev/null | grep -o ' \.text\.[^ ]*'); do
    readelf -x "$s" "$1" 2>/dev/null | tail -n +3 | awk '{print $2, $3, $4, $5}'
  done | md5sum | cut -d' ' -f1
}

status=0
for src in clusterfuse/kernels/attention/*.cu clusterfuse/kernels/ffn/*.cu clusterfuse/kernels/primitives/*.cu; do
  name=$(basename "$src" .cu)
  sums=()
  for side in base work; do
    root=$([ "$side" = base ] && echo "$tmp/base" || echo .)
    if [ ! -f "$root/$src" ]; then sums+=(absent); continue; fi
    mkdir -p "$tmp/$side"
    cp "$root/$src" "$tmp/$side/$name.cu"  # the same file name on both sides (it is in the symbols)
    extra=$([ "$side" = base ] && echo "${BASE_DEFINES:-}" || true)
    # shellcheck disable=SC2086
    nvcc $extra -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr "$@" \
      -I"$root/clusterfuse/kernels/include" -I"$(dirname "$root/$src")" -cubin \
      -o "$tmp/cubin/$side-$name.cubin" "$tmp/$side/$name.cu"
    sums+=("$(text_md5 "$tmp/cubin/$side-$name.cubin")")
  done
  if [ "${sums[0]}" = "${sums[1]}" ]; then echo "same       $src"; else echo "different  $src"; status=1; fi
done
exit $status
