#!/usr/bin/env bash
# Every GPU check of clusterfuse in one device call: build every kernel library in parallel,
# run all GPU tests (primitives, fused attention, fused FFN, engine), then the engine's CLI run
# and the end-to-end decode benchmark (scripts/gpu_engine.sh; SKIP=engine leaves it out). Writes under $OUT.
#   OUT=/tmp/all scripts/gpu_all.sh [decode_step args...]
# Needs .weights/smollm2-135m-6layers.gguf (scripts/make_smollm2_subset.py) and, where the
# image lacks it, the gguf wheel: carry .weights and .whl (see the device README; gpu_common.sh
# installs what .whl holds). Kernels built here first (scripts/prebuild_gpu_suite.py --cache .kcache,
# carried, CLUSTERFUSE_CACHE_DIR=$PWD/.kcache) leave the device nothing to build.
DEFAULT_OUT=/tmp/gpu_all
# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"

echo "== build"
python3 scripts/prebuild_gpu_suite.py --jobs 16 2>&1 | tee "$OUT/build.log" | tail -2 || status=1

echo "== GPU tests"
python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rfE 2>&1 | tee "$OUT/pytest.log" \
  | grep -vE "^(tests/|\.|$)" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

skip engine || OUT="$OUT" SKIP="build tests" bash scripts/gpu_engine.sh "$@" || status=1
exit $status
