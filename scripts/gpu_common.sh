# Sourced by the scripts/gpu_*.sh: strict-ish shell, repo root as cwd, $OUT (default given by the
# caller in DEFAULT_OUT), unbuffered Python, the kernel cache, $status and `skip STAGE` ($SKIP).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$DEFAULT_OUT}
SKIP=${SKIP:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CLUSTERFUSE_CACHE_DIR=${CLUSTERFUSE_CACHE_DIR:-/tmp/clusterfuse-kernels}
status=0
skip() { [[ " $SKIP " == *" $1 "* ]]; }
# shellcheck source=scripts/gpu_tag.sh
. "$(dirname "${BASH_SOURCE[0]}")/gpu_tag.sh"
