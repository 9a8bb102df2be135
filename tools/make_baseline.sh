#!/usr/bin/env bash
# The "before" side of a before/after decode-step comparison (tools/gpu_run.sh bench-compare):
# REV's package and benchmarks in the ignored folder .baseline/, with REV's kernel libraries for
# the compared models built here (nvcc needs no GPU) and packed as .baseline/kcache.tar.xz, so
# the device builds nothing. Carry .baseline to the device call.
#   tools/make_baseline.sh [REV] [MODELS]      (defaults: 36a43be, llama-2-7b,llama-3-8b)
# Batches: COMPARE_BATCHES (default 1,4,16), as tools/gpu_run.sh bench-compare runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-36a43be}
models=${2:-llama-2-7b,llama-3-8b}
batches=${COMPARE_BATCHES:-1,4,16}
rm -rf .baseline
mkdir -p .baseline
git archive "$rev" clusterfuse bench | tar -x -C .baseline --exclude=bench/results
git rev-parse "$rev" >.baseline/COMMIT
echo "baseline: $(cat .baseline/COMMIT) -> .baseline/"
# REV's own prebuild path, with REV's sources: the cache keys are REV's. The libraries go under
# .baseline/.kcache and are packed (xz) beside it; the raw folder is dropped from the carry.
(
  cd .baseline
  export CLUSTERFUSE_CACHE_DIR=$PWD/.kcache PYTHONPATH=$PWD
  IFS=, read -ra names <<<"$models"
  for m in "${names[@]}"; do
    python3 -c "
import sys
from clusterfuse.ops.prebuild import prebuild_for_model
prebuild_for_model(sys.argv[1], batches=[int(b) for b in sys.argv[2].split(',')], dtype='bf16')" "$m" "$batches"
  done
)
python3 tools/pack_kcache.py --cache .baseline/.kcache --out .baseline/kcache.tar.xz --carry .baseline --limit-mib 1e9
rm -rf .baseline/.kcache
du -sh .baseline
