#!/usr/bin/env bash
# A/B of the attention block's L2 weight prefetches in one device call (bench/results/l2_prefetch_*):
# the GPU tests that pin them as bit-neutral, the knob grid QKV_PREFETCH_STEPS x WO_L2_PREFETCH
# (bench.attention_knobs) on the default build, the same with the O-projection's GEMV one step
# deeper (CF_ATTN_O_GEMV_DEPTH=3) and with streamed loads evict-first in L2
# (CF_LD_STREAM_EVICT_FIRST=1), phase timelines per setting, and last the whole attention GPU test
# file for what is left of BUDGET_S seconds (the device's per-call limit). Everything goes under $OUT.
#   OUT=/tmp/l2ab SEQ_LENS=1024,4096 scripts/gpu_l2_prefetch_ab.sh
DEFAULT_OUT=/tmp/gpu_l2_prefetch_ab
# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
SEQ_LENS=${SEQ_LENS:-1024,4096}
GRID=${GRID:-qkv_prefetch_steps=4,16;wo_l2_prefetch=0,1,2}
VARIANT_GRID=${VARIANT_GRID:-qkv_prefetch_steps=16;wo_l2_prefetch=0,1,2}
VARIANT_SEQ_LENS=${VARIANT_SEQ_LENS:-1024}
BUDGET_S=${BUDGET_S:-570}
start=$SECONDS
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"

if ! skip tests; then
  python3 -m pytest -m gpu tests/gpu/test_attention_block.py -q -p no:cacheprovider \
    -k "weight_l2_prefetches or kv_prefetch_keys" 2>&1 | tee "$OUT/pytest_l2_prefetch.log" | tail -3
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

knob_grid() {  # knob_grid TAG GRID SEQ_LENS [EXTRA_DEFINES]
  CLUSTERFUSE_EXTRA_DEFINES=${4:-} python3 -m bench.attention_knobs --models llama-2-7b,llama-3-8b --batches 1 \
    --seq-lens "$3" --clusters 4,8,16 --grid "$2" --out "$OUT/l2_prefetch_${GPU_TAG}_$1.json" \
    --table "$OUT/l2_prefetch_${GPU_TAG}_$1.md" 2>&1 | tail -16
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
skip grid || knob_grid default "$GRID" "$SEQ_LENS"

if ! skip timeline; then
  for knobs in "--qkv-prefetch-steps 4 --wo-l2-prefetch 0" "--qkv-prefetch-steps 16 --wo-l2-prefetch 1" \
               "--qkv-prefetch-steps 16 --wo-l2-prefetch 2"; do
    for args in "--model llama-2-7b --cluster 4" "--model llama-3-8b --cluster 8" "--model llama-3-8b --cluster 16"; do
      # shellcheck disable=SC2086
      CLUSTERFUSE_EXTRA_DEFINES=CF_ATTN_TIMELINE=1 python3 -m bench.attention_timeline $args $knobs \
        --out "$OUT/l2_prefetch_timeline_${GPU_TAG}.json" 2>&1 | tail -13
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
  done
fi

if ! skip variants; then
  knob_grid odepth3 "$VARIANT_GRID" "$VARIANT_SEQ_LENS" CF_ATTN_O_GEMV_DEPTH=3
  knob_grid evict_first "$VARIANT_GRID" "$VARIANT_SEQ_LENS" CF_LD_STREAM_EVICT_FIRST=1
fi

left=$((BUDGET_S - (SECONDS - start)))
if ! skip suite && [ "$left" -gt 30 ]; then
  echo "== tests/gpu/test_attention_block.py ($left s left)"
  timeout "$left" python3 -m pytest -m gpu tests/gpu/test_attention_block.py -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest_attention.log" | tail -3
fi
exit $status
