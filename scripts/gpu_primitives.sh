#!/usr/bin/env bash
# Cluster primitives on a Hopper GPU in one go: JIT build (parallel), a smoke test under a
# timeout (a hang = a barrier/phase bug), the GPU tests, compute-sanitizer ($SANITIZERS,
# default memcheck and racecheck) on a representative subset, and the benchmark (records + markdown +
# PNG). Everything it writes goes under $OUT.
#   OUT=/tmp/prim scripts/gpu_primitives.sh [PHASES] [-- bench args]
# PHASES: any of build smoke test bench sanitize (default: all of them), e.g.
#   scripts/gpu_primitives.sh build smoke test bench -- --quick
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_primitives}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# inside the checkout (git-ignored) so a warm device machine keeps it between calls
export CLUSTERFUSE_CACHE_DIR=${CLUSTERFUSE_CACHE_DIR:-$PWD/build/kernel_cache}
phases=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do phases+=("$1"); shift; done
[ $# -gt 0 ] && shift  # drop "--": the rest goes to the benchmark
[ ${#phases[@]} -gt 0 ] || phases=(build smoke test bench sanitize)
want() { [[ " ${phases[*]} " == *" $1 "* ]]; }
status=0
# shellcheck source=scripts/gpu_tag.sh
. "$(dirname "$0")/gpu_tag.sh"

LOG=$OUT/run.log
exec > >(tee -a "$LOG") 2>&1  # one log of everything (the device returns at most 8 files)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv

if want build; then
echo "== build"
python3 -c "
from clusterfuse.ops.build import prebuild
from clusterfuse.ops.primitives import all_library_specs
prebuild(all_library_specs(), jobs=16)" 2>&1 | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "build failed"; exit 1; }
fi

if want smoke; then
echo "== smoke"
timeout 60 python3 scripts/sanitize_primitives.py 2>&1 | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "smoke failed"; exit 1; }
fi

if want test; then
echo "== tests"
timeout 150 python3 -m pytest -m gpu tests/gpu/test_primitives.py -q -p no:cacheprovider --timeout=60 --maxfail=10 2>&1 \
  | tee "$OUT/pytest.log" | grep -vE "^(tests/|\.|$)" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want bench; then
echo "== benchmark"
timeout 80 python3 -m bench.primitives "$@" --out "$OUT/primitives_${GPU_TAG}.json" 2>&1 | grep -vE "^\|" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

want sanitize && for tool in ${SANITIZERS:-memcheck racecheck}; do
  echo "== compute-sanitizer $tool"
  timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 10 \
    python3 scripts/sanitize_primitives.py >"$OUT/sanitizer.log.part" 2>&1
  rc=$?
  cat "$OUT/sanitizer.log.part" >>"$OUT/sanitizer.log"; rm -f "$OUT/sanitizer.log.part"
  tail -4 "$OUT/sanitizer.log"
  [ $rc -eq 0 ] || { echo "$tool: exit $rc"; status=1; }
done
exit $status
