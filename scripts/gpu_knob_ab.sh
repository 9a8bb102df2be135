#!/usr/bin/env bash
# A/B of one runtime knob of the fused kernels (bench.common.ATTENTION_KNOBS:
# kv_prefetch_keys, kv_mma, programmatic_launch) in one device call: the GPU tests that pin its
# semantics, the decode step at every value (same process order each time, per-kernel breakdown;
# the PyTorch baseline with the first value only) and the attention kernel's timeline inside the
# decode step at every value (first model, last length). Everything it writes goes under $OUT, named after the knob.
#   OUT=/tmp/ab KNOB=programmatic_launch VALUES="0 1 2 3" TESTS=tests/gpu/test_programmatic_launch.py \
#     MODELS=llama-2-7b,llama-3-8b SEQ_LENS=1024 scripts/gpu_knob_ab.sh
# TESTS: pytest arguments (default: none). Stages can be skipped: SKIP="tests decode timeline".
DEFAULT_OUT=/tmp/gpu_knob_ab
# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
KNOB=${KNOB:?KNOB: one of the knobs of bench.common.ATTENTION_KNOBS, e.g. kv_mma}
VALUES=${VALUES:?VALUES: the knob values to compare, e.g. \"0 1\"}
MODELS=${MODELS:-llama-2-7b,llama-3-8b}
SEQ_LENS=${SEQ_LENS:-1024}
TESTS=${TESTS:-}
flag="--${KNOB//_/-}"

if [ -n "$TESTS" ] && ! skip tests; then
  echo "== tests ($TESTS)"
  # shellcheck disable=SC2086
  python3 -m pytest -m gpu $TESTS -q -p no:cacheprovider -rfE 2>&1 | tee "$OUT/pytest_${KNOB}.log" | tail -4
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if ! skip decode; then
  baseline=""
  for v in $VALUES; do
    echo "== decode step, $KNOB $v"
    # shellcheck disable=SC2086
    python3 -m bench.decode_step --models "$MODELS" --batches 1 --seq-lens "$SEQ_LENS" --breakdown "$flag" "$v" \
      $baseline --out "$OUT/decode_step_${KNOB}_${GPU_TAG}.json" 2>&1 | tee -a "$OUT/decode_${KNOB}.log" \
      | grep -E "ms/token|GPU time"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    baseline=--no-baseline
  done
fi

if ! skip timeline; then
  echo "== attention timeline inside the decode step"
  export CLUSTERFUSE_EXTRA_DEFINES=CF_ATTN_TIMELINE=1
  tl="$OUT/attention_timeline_${KNOB}_${GPU_TAG}.json"
  for v in $VALUES; do
    python3 -m bench.attention_timeline --model "${MODELS%%,*}" --seq-len "${SEQ_LENS##*,}" --engine "$flag" "$v" \
      --out "$tl" \
      2>&1 | tee -a "$OUT/timeline_${KNOB}.log" | tail -16
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
  python3 -c "from bench.attention_timeline import markdown; from bench.common import load_records; \
import pathlib; pathlib.Path('$OUT/attention_timeline_${KNOB}_${GPU_TAG}.md').write_text(markdown(load_records(['$tl'])))"
fi
exit $status
