#!/usr/bin/env bash
# Fused FFN block on a Hopper GPU in one go: JIT build, GPU tests, compute-sanitizer memcheck on a
# small subset, benchmark (records + markdown + PNG). Everything it writes goes under $OUT.
#   OUT=/tmp/ffn scripts/gpu_ffn.sh [--quick]     (--quick: fewer benchmark repeats)
DEFAULT_OUT=/tmp/gpu_ffn
# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"

echo "== build"
python3 -c "from clusterfuse.ops.ffn_block import _lib; _lib()" 2>&1 | tee "$OUT/build.log" || status=1

echo "== smoke (a hang here means a barrier bug: stop before the long steps)"
timeout 120 python3 -m pytest -m gpu tests/gpu/test_ffn_block.py -q -p no:cacheprovider -x \
  -k "smollm2-bfloat16-b1 or smollm2-bfloat16-b16" 2>&1 | tee "$OUT/smoke.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "smoke failed"; exit 1; }

echo "== tests"
python3 -m pytest -m gpu tests/gpu/test_ffn_block.py -q -p no:cacheprovider --timeout=120 2>&1 \
  | tee "$OUT/pytest.log" | grep -vE "^(tests/|\.|$)" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark"
python3 -m bench.ffn_block "$@" --out "$OUT/ffn_block_${GPU_TAG}.json" --md "$OUT/ffn_block_${GPU_TAG}.md" \
  --png "$OUT/ffn_block_${GPU_TAG}.png" 2>&1 | tee "$OUT/bench.log" | grep -vE "^\|" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== compute-sanitizer memcheck (small shapes)"
timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
  python3 -m pytest -m gpu tests/gpu/test_ffn_block.py -q -p no:cacheprovider \
  -k "smollm2-bfloat16-b1-c1 or smollm2-bfloat16-b16-c16 or non-multiple-float16-b3-c4" 2>&1 \
  | tee "$OUT/memcheck.log" | tail -6
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

exit $status
