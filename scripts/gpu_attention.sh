#!/usr/bin/env bash
# Fused attention block on a Hopper GPU in one go: JIT build (resource report), GPU tests,
# compute-sanitizer memcheck on a small subset, benchmark (records + markdown + PNG), and one
# Nsight Compute profile of the headline shape. Everything it writes goes under $OUT.
#   OUT=/tmp/attn scripts/gpu_attention.sh [bench args...]   (e.g. --quick --batches 1)
# Stages can be skipped: SKIP="tests memcheck bench ncu" (any subset). NCU_METRICS: extra ncu metrics,
# e.g. the stall reasons: NCU_METRICS='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'.
DEFAULT_OUT=/tmp/gpu_attention
# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"

echo "== build (every specialisation the tests and benchmark use, in parallel)"
python3 scripts/prebuild_gpu_suite.py --jobs 16 2>&1 | tee "$OUT/build.log" | tail -2 || status=1

if ! skip tests; then
  echo "== tests"
  python3 -m pytest -m gpu tests/gpu/test_attention_block.py -q -p no:cacheprovider --timeout=90 2>&1 \
    | tee "$OUT/pytest.log" | grep -vE "^(tests/|\.|$)" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if ! skip memcheck; then
  echo "== compute-sanitizer memcheck (small shapes)"
  compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
    python3 -m pytest -m gpu tests/gpu/test_attention_block.py -q -p no:cacheprovider \
    -k "smollm2 or qwen2 or validation" 2>&1 | tee "$OUT/memcheck.log" | tail -6
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if ! skip bench; then
  echo "== benchmark"
  python3 -m bench.attention_block "$@" --out "$OUT/attention_block_${GPU_TAG}.json" --md "$OUT/attention_block_${GPU_TAG}.md" \
    --png "$OUT/attention_block_${GPU_TAG}.png" 2>&1 | tee "$OUT/bench.log" | grep -vE "^\|" | tail -45
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if ! skip ncu; then
  echo "== ncu: llama-2-7b, batch 1, S=1024, cluster 4"
  timeout 120 ncu --kernel-name regex:attention_block_kernel --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats ${NCU_METRICS:+--metrics "$NCU_METRICS"} \
    python3 -m bench.ncu_targets attention --model llama-2-7b --cluster 4 2>&1 | tee "$OUT/ncu.log" \
    | grep -vE "^==PROF==" | tail -80
fi
exit $status
