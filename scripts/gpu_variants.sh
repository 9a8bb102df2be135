#!/usr/bin/env bash
# Compile-time variants of the fused kernels in one device call (bench/variants.py): the isolated
# attention block, the isolated FFN block and the whole decode step, each once per define set.
# Prebuild the variants locally (scripts/prebuild_variants.py --cache .kcache [--kernels attention]), pack them
# (scripts/pack_kcache.py: .kcache.tar.xz without the primitives, ~0.15 MB a library, the carry
# checked against the 64 MiB limit) and carry the archive: then the device compiles nothing
# but the primitives (~25 s). Everything it writes goes under $OUT.
#   OUT=/tmp/v ATTN_VARIANTS=";CF_ATTN_GEMV_DEPTH=3" FFN_VARIANTS=";CF_FFN_GEMV_DEPTH=2" \
#     DECODE_VARIANTS="" SEQ_LENS=1024,8192 scripts/gpu_variants.sh
# An unset or empty *_VARIANTS skips that benchmark (give ";" for the defaults alone).
DEFAULT_OUT=/tmp/gpu_variants
if [ -f .kcache.tar.xz ] && [ -z "${CLUSTERFUSE_CACHE_DIR:-}" ]; then
  mkdir -p /tmp/kcache && tar xJf .kcache.tar.xz -C /tmp/kcache && export CLUSTERFUSE_CACHE_DIR=/tmp/kcache/.kcache
fi
# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
MODELS=${MODELS:-llama-2-7b,llama-3-8b}
SEQ_LENS=${SEQ_LENS:-1024,8192}
CLUSTERS=${CLUSTERS:-4,16}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"

run_variants() {  # bench variants name [bench args...]
  local bench=$1 variants=$2 name=$3
  shift 3
  [ -n "$variants" ] || return 0
  echo "== $bench variants: $variants"
  python3 -m bench.variants --bench "$bench" --variants "$variants" --out "$OUT/${name}_${GPU_TAG}.json" \
    --md "$OUT/${name}_${GPU_TAG}.md" -- "$@" 2>&1 | tee "$OUT/${name}.log" | grep -vE "^clusterfuse: buil" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

run_variants attention_block "${ATTN_VARIANTS:-}" attention_variants --models "$MODELS" --batches 1 \
  --seq-lens "$SEQ_LENS" --clusters "$CLUSTERS"
run_variants ffn_block "${FFN_VARIANTS:-}" ffn_variants --models "$MODELS" --batches 1
run_variants decode_step "${DECODE_VARIANTS:-}" decode_variants --models "$MODELS" --batches 1 \
  --seq-lens "$SEQ_LENS" --breakdown
exit $status
