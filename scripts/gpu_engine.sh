#!/usr/bin/env bash
# The fused decode engine on a Hopper GPU in one go: pre-build the kernels of the benchmarked
# models, the engine's GPU tests (teacher-forced parity, greedy text, graphs, batching), the CLI
# on the GPU, and the end-to-end decode benchmark. Everything it writes goes under $OUT.
# Needs .weights/smollm2-135m-6layers.gguf (scripts/make_smollm2_subset.py; carry .weights).
#   OUT=/tmp/engine scripts/gpu_engine.sh [decode_step args...]
# Stages can be skipped: SKIP="build tests cli bench" (any subset).
DEFAULT_OUT=/tmp/gpu_engine
# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/gpu.txt"

if ! skip build; then
  echo "== build"
  for m in llama-2-7b llama-3-8b .weights/smollm2-135m-6layers.gguf; do
    python3 -m clusterfuse.cli.main build --model "$m" --dtype bf16 >>"$OUT/build.log" 2>&1 &
  done
  wait
  tail -3 "$OUT/build.log"
fi

if ! skip tests; then
  echo "== tests"
  python3 -m pytest -m gpu tests/gpu/test_fused_engine.py -q -p no:cacheprovider -rA 2>&1 \
    | tee "$OUT/pytest.log" | grep -vE "^(tests/|\.|$)" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if ! skip cli; then
  echo "== cli"
  { python3 -m clusterfuse.cli.main info
    python3 -m clusterfuse.cli.main generate --model llama-2-7b --backend reference --max-tokens 8 "Hello"
    python3 -m clusterfuse.cli.main generate --model llama-2-7b --max-tokens 32 "Hello" "A longer prompt here"
  } 2>&1 | tee "$OUT/cli.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if ! skip bench; then
  echo "== decode benchmark"
  python3 -m bench.decode_step --breakdown "$@" --out "$OUT/decode_step_${GPU_TAG}.json" --md "$OUT/decode_step_${GPU_TAG}.md" \
    --png "$OUT/decode_step_${GPU_TAG}.png" 2>&1 | tee "$OUT/bench.log" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
