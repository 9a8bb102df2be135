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
# Wheels the device image lacks (the gguf module, for the SmolLM2 GGUF tests), carried in .whl
# (see the device README): installed into a private folder on the PYTHONPATH.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
