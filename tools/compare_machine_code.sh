#!/usr/bin/env bash
# Does the working tree compile the kernels to the same sm_90a machine code as REV? No GPU needed
# (nvcc, readelf and cuobjdump only). A refactor that leaves every build's machine code identical
# cannot change speed or results; one that does not, needs a GPU run to show what it changes.
#
#   tools/compare_machine_code.sh REV                  every build of CONFIGS below
#   tools/compare_machine_code.sh REV 'attention/attention_block.cu -DCF_ATTN_GQA=4' ...   these builds
#
# Per build it prints one of:
#   same             the .text sections are byte-identical;
#   same-but-params  the SASS is identical once the kernel-parameter offsets (c[0x0][0x...]) are
#                    masked: only where a field sits in the parameter struct moved;
#   different        anything else (the first lines of the SASS diff follow).
# REV's cubins are cached under .mcache/<commit>/ (ignored by git). Exit status 1 when any build is
# "different".
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: $0 REV ['SOURCE -DNAME=value ...' ...]}
shift
commit=$(git rev-parse --short=12 "$rev")

# The builds the tuned decode paths use: both dtypes, head dims 64/128, GQA 1/4/7/8, batch tiles
# 1/2, both block sizes, the profiling build, the FFN, the persistent decode step and the primitives'
# defaults.
CONFIGS=(
  "attention/attention_block.cu"
  "attention/attention_block.cu -DCF_ATTN_GQA=4 -DCF_ATTN_NT=2"
  "attention/attention_block.cu -DCF_ATTN_GQA=4 -DCF_ATTN_THREADS=256"
  "attention/attention_block.cu -DCF_ATTN_GQA=8 -DCF_ATTN_NT=2 -DCF_ATTN_THREADS=256"
  "attention/attention_block.cu -DCF_ATTN_DTYPE=1 -DCF_ATTN_HEAD_DIM=64 -DCF_ATTN_GQA=7"
  "attention/attention_block.cu -DCF_ATTN_HEAD_DIM=64 -DCF_ATTN_GQA=3 -DCF_ATTN_TIMELINE=1"
  "ffn/ffn_block.cu"
  "step/decode_step.cu -DCF_STEP_GQA=4"
  "primitives/cluster_gather.cu"
  "primitives/cluster_reduce.cu"
)
[ $# -gt 0 ] && CONFIGS=("$@")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
base="$tmp/base"
mkdir -p "$base" "$tmp/work" ".mcache/$commit"
git archive "$rev" clusterfuse/kernels | tar -x -C "$base"

# md5 of the machine code: every .text section of the cubin, in section order.
text_md5() {
  for s in $(readelf -S -W "$1" 2>/dev/null | grep -o ' \.text\.[^ ]*'); do
    readelf -x "$s" "$1" 2>/dev/null | tail -n +3 | awk '{print $2, $3, $4, $5}'
  done | md5sum | cut -d' ' -f1
}
# The SASS (nvdisasm: on PATH, beside nvcc, or from the nvidia-cuda-nvdisasm wheel), instructions
# only; with "masked", the constant-bank-0 offsets (kernel parameters) replaced by P.
NVDISASM=$(command -v nvdisasm || python3 -c "from tools.machine_code import find_nvdisasm; print(find_nvdisasm() or '')")
[ -n "$NVDISASM" ] || { echo "compare_machine_code.sh: nvdisasm not found (pip install nvidia-cuda-nvdisasm)" >&2; exit 2; }
sass() {
  local out
  out=$("$NVDISASM" -c "$1" | grep -E '^\s+/\*[0-9a-f]{4,}\*/' | sed -E 's#/\*[0-9a-f]{4,}\*/##; s#;.*#;#; s#`\([^)]*\)#`(symbol)#g; s#[[:space:]]+# #g')
  [ -n "$out" ] || { echo "compare_machine_code.sh: no SASS from $1" >&2; exit 2; }
  if [ "${2:-}" = masked ]; then sed -E 's#c\[0x0\]\[(R[0-9]+\+)?0x[0-9a-f]+\]#c[0x0][\1P]#g' <<<"$out"; else echo "$out"; fi
}
compile() {  # root source defines out
  local root=$1 src=$2 defines=$3 out=$4 name
  name=$(basename "$src" .cu)
  mkdir -p "$(dirname "$out")/src"
  cp "$root/clusterfuse/kernels/$src" "$(dirname "$out")/src/$name.cu"  # one file name on both sides
  # shellcheck disable=SC2086
  nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 --expt-relaxed-constexpr $defines \
    -I"$root/clusterfuse/kernels/include" -I"$root/clusterfuse/kernels/$(dirname "$src")" -cubin \
    -o "$out" "$(dirname "$out")/src/$name.cu"
}

status=0
for config in "${CONFIGS[@]}"; do
  read -r src defines <<<"$config" || true
  key=$(echo "$config" | md5sum | cut -c1-12)
  base_cubin=".mcache/$commit/$key.cubin"
  if [ ! -f "$base_cubin" ]; then
    if [ ! -f "$base/clusterfuse/kernels/$src" ]; then echo "absent-in-base  $config"; continue; fi
    compile "$base" "$src" "$defines" "$tmp/base-build/$key.cubin"
    cp "$tmp/base-build/$key.cubin" "$base_cubin"
  fi
  compile . "$src" "$defines" "$tmp/work/$key.cubin"
  if [ "$(text_md5 "$base_cubin")" = "$(text_md5 "$tmp/work/$key.cubin")" ]; then
    echo "same             $config"
  elif diff -q <(sass "$base_cubin" masked) <(sass "$tmp/work/$key.cubin" masked) >/dev/null; then
    n=$(diff <(sass "$base_cubin") <(sass "$tmp/work/$key.cubin") | grep -c '^>' || true)
    echo "same-but-params  $config  ($n instructions differ, each only in a c[0x0] offset)"
  else
    echo "different        $config"
    diff <(sass "$base_cubin" masked) <(sass "$tmp/work/$key.cubin" masked) | head -8 || true
    status=1
  fi
done
exit $status
