#!/usr/bin/env bash
# A/B of programmatic dependent launch (clusterfuse.ops.launch.PROGRAMMATIC_LAUNCH) in one device
# call: its GPU tests, the decode step with it off and on (same process order each time, per-kernel
# breakdown) and the attention kernel's timeline inside the decode step for both settings.
# Everything it writes goes under $OUT.
#   OUT=/tmp/pdl MODELS=llama-2-7b,llama-3-8b SEQ_LENS=1024 scripts/gpu_pdl.sh
# Stages can be skipped: SKIP="tests decode timeline" (any subset).
DEFAULT_OUT=/tmp/gpu_pdl
# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
MODELS=${MODELS:-llama-2-7b,llama-3-8b}
SEQ_LENS=${SEQ_LENS:-1024}

if ! skip tests; then
  echo "== tests (programmatic launch)"
  python3 -m pytest -m gpu tests/gpu/test_programmatic_launch.py -q -p no:cacheprovider -rfE 2>&1 \
    | tee "$OUT/pytest_pdl.log" | tail -4
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if ! skip decode; then
  for pdl in 0 1 2 3; do
    echo "== decode step, programmatic launch $pdl"
    python3 -m bench.decode_step --models "$MODELS" --batches 1 --seq-lens "$SEQ_LENS" --breakdown \
      --programmatic-launch "$pdl" $([ "$pdl" != 0 ] && echo --no-baseline) --out "$OUT/decode_step_pdl_${GPU_TAG}.json" \
      2>&1 | tee -a "$OUT/decode_pdl.log" | grep -E "ms/token|GPU time"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
fi

if ! skip timeline; then
  echo "== attention timeline inside the decode step"
  export CLUSTERFUSE_EXTRA_DEFINES=CF_ATTN_TIMELINE=1
  tl="$OUT/attention_timeline_pdl_${GPU_TAG}.json"
  for pdl in 0 1 2 3; do
    python3 -m bench.attention_timeline --model "${MODELS%%,*}" --engine --programmatic-launch "$pdl" --out "$tl" \
      2>&1 | tee -a "$OUT/timeline_pdl.log" | tail -16
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  done
  python3 -c "from bench.attention_timeline import markdown; from bench.common import load_records; \
import pathlib; pathlib.Path('$OUT/attention_timeline_pdl_${GPU_TAG}.md').write_text(markdown(load_records(['$tl'])))"
fi
exit $status
