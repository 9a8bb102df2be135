#!/usr/bin/env bash
# A/B of the fused attention kernel's runtime knobs (KV_PREFETCH_KEYS, KV_MMA)
# in one device call: the GPU tests that pin the knobs' semantics, the knob grid on the same inputs
# (bench.attention_knobs), and phase timelines per setting (isolated and inside the decode step).
# Everything it writes goes under $OUT.
#   OUT=/tmp/knobs GRID="kv_prefetch_keys=0,64,256" TIMELINE_KNOBS="--kv-prefetch-keys 0;--kv-prefetch-keys 64" \
#     SEQ_LENS=1024,4096 CLUSTERS=4,8,16 TEST_FILTER="kv_prefetch or kv_mma" scripts/gpu_attention_knobs.sh
# TIMELINE_KNOBS: the knob settings whose timelines are recorded, as bench.attention_timeline
# arguments, one setting per ';'. TAG: appended to the output files' names (runs of one call under
# different builds, e.g. CLUSTERFUSE_EXTRA_DEFINES). Stages can be skipped: SKIP="tests grid
# timeline" (any subset). TIMELINE_RUNS: the bench.attention_timeline runs per setting, one per
# ';' (default: Llama-2 cluster 4, Llama-3 clusters 16 and 8, Llama-2 inside the decode step).
DEFAULT_OUT=/tmp/gpu_attention_knobs
# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
GRID=${GRID:-kv_prefetch_keys=0,64,256}
TIMELINE_KNOBS=${TIMELINE_KNOBS:---kv-prefetch-keys 0;--kv-prefetch-keys 64}
TAG=${TAG:-}
SEQ_LENS=${SEQ_LENS:-1024,4096}
CLUSTERS=${CLUSTERS:-4,8,16}
TEST_FILTER=${TEST_FILTER:-kv_prefetch or kv_mma}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"

if ! skip tests; then
  echo "== tests ($TEST_FILTER)"
  python3 -m pytest -m gpu tests/gpu/test_attention_block.py -q -p no:cacheprovider -k "$TEST_FILTER" 2>&1 \
    | tee "$OUT/pytest_knobs.log" | tail -3
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if ! skip grid; then
  echo "== knob grid: $GRID"
  python3 -m bench.attention_knobs --models llama-2-7b,llama-3-8b --batches 1 --seq-lens "$SEQ_LENS" \
    --clusters "$CLUSTERS" --grid "$GRID" --out "$OUT/attention_knobs_${GPU_TAG}${TAG}.json" \
    --table "$OUT/attention_knobs_${GPU_TAG}${TAG}.md" 2>&1 | tee "$OUT/grid.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if ! skip timeline; then
  echo "== timelines"
  export CLUSTERFUSE_EXTRA_DEFINES="${CLUSTERFUSE_EXTRA_DEFINES:+$CLUSTERFUSE_EXTRA_DEFINES,}CF_ATTN_TIMELINE=1"
  tl="$OUT/attention_timeline_${GPU_TAG}${TAG}.json"
  IFS=';' read -ra settings <<< "$TIMELINE_KNOBS"
  for knobs in "${settings[@]}"; do
    IFS=';' read -ra runs <<< "${TIMELINE_RUNS:---model llama-2-7b --cluster 4;--model llama-3-8b --cluster 16;\
--model llama-3-8b --cluster 8;--model llama-2-7b --engine}"
    for args in "${runs[@]}"; do
      # shellcheck disable=SC2086
      python3 -m bench.attention_timeline $args $knobs --out "$tl" 2>&1 | tee -a "$OUT/timeline.log" \
        | tail -16
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
  done
  python3 -c "from bench.attention_timeline import markdown; from bench.common import load_records; \
import pathlib; pathlib.Path('$OUT/attention_timeline_${GPU_TAG}${TAG}.md').write_text(markdown(load_records(['$tl'])))"
fi
exit $status
