#!/usr/bin/env bash
# Every GPU check and benchmark of clusterfuse, as stages of one entry point. Run from anywhere;
# works in the repo root. Writes under $OUT (default: ./.gpu_out).
#
#   tools/gpu_run.sh [STAGE ...] [-- ARGS for bench-decode]
#
# Stages (run in the order given; none given: info build tests):
#   info              GPU, driver, clocks, torch and nvcc versions
#   build             every kernel library the tests and benchmarks use (tools/prebuild_gpu_suite.py);
#                     a no-op when the prebuilt cache (below) is current
#   tests             the GPU tests but the big_memory ones: pytest -m "gpu and not big_memory"
#                     over TEST_FILES (default tests/gpu)                -> pytest.log
#   tests-big         the big_memory GPU tests, in a process of their own  -> pytest_big.log
#   cli               `clusterfuse info` and `generate` on the GPU
#   bench-decode      bench.decode_step (ARGS after --)                  -> decode_step_<gpu>.{json,md}
#   bench-compare     the decode step of .baseline/ (tools/make_baseline.sh) and of this tree, in one
#                     run, model by model alternating; COMPARE_ARGS (default below)
#                                                                        -> decode_compare_<gpu>.{json,md}
#   bench-attention   bench.attention_block                              -> attention_block_<gpu>.{json,md}
#   bench-ffn         bench.ffn_block                                    -> ffn_block_<gpu>.{json,md}
#   bench-moe         bench.moe_block (DeepSeek-V2-Lite's MoE layer)      -> moe_block_<gpu>.{json,md}
#   bench-mla         bench.mla_block (DeepSeek-V2-Lite's MLA layer)      -> mla_block_<gpu>.{json,md}
#   bench-primitives  bench.primitives                                   -> primitives_<gpu>.json
#   bench-prefill     bench.prefill: engine prefill vs plain PyTorch bf16 (Llama-3-8B, 1K/8K/32K) -> prefill_<gpu>.{json,md}
#   bench-serve       bench.serve: llama-3-8b behind `clusterfuse serve`, fused then torch backend, N = 1/4/16/64
#                     clients; SERVE_ARGS adds to each run            -> serve_<gpu>.{json,md,png}
#   serve-example     the README's serve example end to end (the SmolLM2 subset in .weights) -> serve_example.log
#   memcheck          compute-sanitizer memcheck over small attention and FFN tests
#   sanitize-primitives  compute-sanitizer memcheck + racecheck of the primitives (tools/sanitize_primitives.py)
#   timeline          bench.attention_timeline (Llama-2-7B c4, Llama-3-8B c16) -> attention_timeline_<gpu>.json
#   step-timeline     bench.step_timeline: a layer inside the persistent step, per phase (Llama-3-8B b1/b16,
#                     Llama-3.2-1B b1)                                  -> step_timeline_<gpu>.{json,md}
#   sanitize-step     compute-sanitizer memcheck + racecheck of the persistent step on small shapes
#   ncu               Nsight Compute profiles of the attention and FFN kernels -> ncu.log
#
# Everything printed also goes to $OUT/run.log. A device call returns at most 8 files from $OUT:
# name few stages per call. One device command runs at most 10 minutes: `tests` and
# `bench-compare` each want a call of their own.
#
# Kernel cache: $CLUSTERFUSE_CACHE_DIR, default ./.kcache (ignored by git, never /tmp). Build it on
# a CPU machine and carry it packed, so that the device builds nothing:
#   CLUSTERFUSE_CACHE_DIR=$PWD/.kcache python3 tools/prebuild_gpu_suite.py
#   python3 tools/pack_kcache.py            # -> .kcache.tar.xz, unpacked here when .kcache is absent
# Wheels the device image lacks (gguf, for the SmolLM2 GGUF tests): carried in ./.whl, installed
# into ./.whl/site (a private folder, first on PYTHONPATH after the repo).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/.gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CLUSTERFUSE_CACHE_DIR=${CLUSTERFUSE_CACHE_DIR:-$ROOT/.kcache}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
COMPARE_ARGS=${COMPARE_ARGS:---models llama-2-7b,llama-3-8b --batches 1,4,16 --seq-lens 1024,8192 --no-baseline}

stages=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do stages+=("$1"); shift; done
[ $# -gt 0 ] && shift  # "--": the rest goes to bench-decode
[ ${#stages[@]} -gt 0 ] || stages=(info build tests)
known=" info build tests tests-big cli bench-decode bench-compare bench-attention bench-ffn bench-moe bench-mla bench-primitives bench-prefill \
bench-serve serve-example memcheck sanitize-primitives timeline step-timeline sanitize-step ncu "
for s in "${stages[@]}"; do
  [[ "$known" == *" $s "* ]] || { echo "tools/gpu_run.sh: unknown stage '$s' (stages:$known)" >&2; exit 2; }
done

exec > >(tee -a "$OUT/run.log") 2>&1
status=0
fail() { echo "!! stage $1 failed"; status=1; }

# The packed kernel caches, where carried and not yet unpacked.
if [ ! -d "$ROOT/.kcache" ] && [ -f "$ROOT/.kcache.tar.xz" ]; then tar -xJf "$ROOT/.kcache.tar.xz" -C "$ROOT"; fi
if [ -d "$ROOT/.baseline" ] && [ ! -d "$ROOT/.baseline/.kcache" ] && [ -f "$ROOT/.baseline/kcache.tar.xz" ]; then
  tar -xJf "$ROOT/.baseline/kcache.tar.xz" -C "$ROOT/.baseline"
fi
if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$ROOT/.whl/site" \
    "$ROOT"/.whl/*.whl && export PYTHONPATH=$ROOT:$ROOT/.whl/site${PYTHONPATH#"$ROOT"}
fi
GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oiE 'h[0-9]+' | head -1 \
  | tr 'A-Z' 'a-z')
GPU_TAG=${GPU_TAG:-gpu}

# pytest over the tests of a marker expression, its summary on the console and the whole output in $OUT/$3.
gpu_pytest() {  # MARKERS FILES LOG [pytest args...]
  local markers=$1 files=$2 log=$3
  shift 3
  # shellcheck disable=SC2086
  python3 -m pytest -m "$markers" $files -q -p no:cacheprovider -rfE --durations=15 "$@" 2>&1 | tee "$OUT/$log" \
    | grep -vE "^(tests/[^ ]*py [.sxF]|\.|$)" | tail -45
  return "${PIPESTATUS[0]}"
}

# A block benchmark (bench.<NAME>) with its records in $OUT, the last LINES of its console without the
# markdown table: NAME LINES
block_bench() {
  python3 -m "bench.$1" --out "$OUT/$1_${GPU_TAG}.json" --md "$OUT/$1_${GPU_TAG}.md" 2>&1 | grep -vE "^\|" \
    | tail -"$2"
  return "${PIPESTATUS[0]}"
}

# The decode benchmark of one tree: ROOT_DIR CACHE_DIR OUT_JSON ARGS...
decode_bench() {
  local tree=$1 cache=$2 out=$3
  shift 3
  (cd "$tree" && CLUSTERFUSE_CACHE_DIR=$cache PYTHONPATH=$tree${PYTHONPATH#"$ROOT"} \
    python3 -m bench.decode_step "$@" --out "$out")
}

for stage in "${stages[@]}"; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    info)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
      python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
      nvcc --version 2>/dev/null | tail -2
      echo "kernel cache $CLUSTERFUSE_CACHE_DIR: $(ls "$CLUSTERFUSE_CACHE_DIR" 2>/dev/null | grep -c '\.so$') libraries" ;;
    build)
      python3 tools/prebuild_gpu_suite.py --jobs 16 2>&1 | tail -3
      [ "${PIPESTATUS[0]}" -eq 0 ] || fail build ;;
    tests)
      gpu_pytest "gpu and not big_memory" "${TEST_FILES:-tests/gpu}" pytest.log || fail tests ;;
    tests-big)
      gpu_pytest big_memory tests/gpu pytest_big.log || fail tests-big ;;
    cli)
      { python3 -m clusterfuse.cli.main info
        python3 -m clusterfuse.cli.main generate --model llama-2-7b --backend reference --max-tokens 8 "Hello"
        python3 -m clusterfuse.cli.main generate --model llama-2-7b --max-tokens 32 "Hello" "A longer prompt here"
      } 2>&1 | tail -30
      [ "${PIPESTATUS[0]}" -eq 0 ] || fail cli ;;
    bench-decode)
      python3 -m bench.decode_step --breakdown "$@" --out "$OUT/decode_step_${GPU_TAG}.json" \
        --md "$OUT/decode_step_${GPU_TAG}.md" 2>&1 | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || fail bench-decode ;;
    bench-compare)
      if [ ! -f "$ROOT/.baseline/COMMIT" ]; then
        echo "no .baseline/ (make it with tools/make_baseline.sh and carry it)"; fail bench-compare; continue
      fi
      before="$OUT/decode_before_${GPU_TAG}.json" after="$OUT/decode_after_${GPU_TAG}.json"
      rm -f "$before" "$after"
      # shellcheck disable=SC2086
      models=$(sed -nE 's/.*--models ([^ ]+).*/\1/p' <<<"$COMPARE_ARGS")
      rest=$(sed -E 's/--models [^ ]+//' <<<"$COMPARE_ARGS")
      IFS=, read -ra names <<<"${models:-llama-2-7b}"
      for m in "${names[@]}"; do  # alternating sides, model by model: slow drift hits both
        # shellcheck disable=SC2086
        CLUSTERFUSE_GIT_COMMIT=$(cat "$ROOT/.baseline/COMMIT") \
          decode_bench "$ROOT/.baseline" "$ROOT/.baseline/.kcache" "$before" --models "$m" $rest 2>&1 | tail -12
        [ "${PIPESTATUS[0]}" -eq 0 ] || fail "bench-compare (before, $m)"
        # shellcheck disable=SC2086
        decode_bench "$ROOT" "$CLUSTERFUSE_CACHE_DIR" "$after" --models "$m" $rest 2>&1 | tail -12
        [ "${PIPESTATUS[0]}" -eq 0 ] || fail "bench-compare (after, $m)"
      done
      python3 -c "
import json, sys
before, after = (json.load(open(p)) for p in sys.argv[1:3])
json.dump({'before': before, 'after': after}, open(sys.argv[3], 'w'), indent=1)" \
        "$before" "$after" "$OUT/decode_compare_${GPU_TAG}.json" && rm -f "$before" "$after"
      python3 - "$OUT/decode_compare_${GPU_TAG}.json" "$OUT/decode_compare_${GPU_TAG}.md" <<'EOF' || fail bench-compare
import json, sys
from tools.compare_decode import table
both = json.load(open(sys.argv[1]))
md = table(both["before"], both["after"])
open(sys.argv[2], "w").write(md)
print(md)
EOF
      ;;
    bench-attention) block_bench attention_block 45 || fail bench-attention ;;
    bench-ffn) block_bench ffn_block 20 || fail bench-ffn ;;
    bench-moe) block_bench moe_block 20 || fail bench-moe ;;
    bench-mla) block_bench mla_block 30 || fail bench-mla ;;
    bench-primitives)
      timeout 120 python3 -m bench.primitives --out "$OUT/primitives_${GPU_TAG}.json" 2>&1 | grep -vE "^\|" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || fail bench-primitives ;;
    bench-prefill)
      timeout 300 python3 -m bench.prefill --out "$OUT/prefill_${GPU_TAG}.json" --md "$OUT/prefill_${GPU_TAG}.md" 2>&1 \
        | tail -25
      [ "${PIPESTATUS[0]}" -eq 0 ] || fail bench-prefill ;;
    bench-serve)
      for backend in fused torch; do  # one server per backend, the same seeded load
        # shellcheck disable=SC2086
        timeout 280 python3 -m bench.serve --model llama-3-8b --backends "$backend" --device cuda \
          --clients 1,4,16,64 ${SERVE_ARGS:-} --out "$OUT/serve_${GPU_TAG}.json" 2>&1 | tail -10
        [ "${PIPESTATUS[0]}" -eq 0 ] || fail "bench-serve ($backend)"
      done
      python3 -m bench.serve --report-only --backends fused,torch --out "$OUT/serve_${GPU_TAG}.json" \
        --md "$OUT/serve_${GPU_TAG}.md" --png "$OUT/serve_${GPU_TAG}.png" 2>&1 | tail -30 ;;
    serve-example)
      log="$OUT/serve_example.log"
      timeout 150 python3 -m clusterfuse.cli.main serve --model .weights/smollm2-135m-4layers.gguf \
        --served-model-name smollm2 --port 8123 >"$log" 2>&1 &
      server=$!
      for _ in $(seq 120); do curl -sf localhost:8123/health >/dev/null && break; sleep 1; done
      curl -s localhost:8123/v1/chat/completions -H 'content-type: application/json' \
        -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 24}' | tee -a "$log"
      echo
      curl -s localhost:8123/metrics | grep -E "^clusterfuse_" | head -12 | tee -a "$log"
      kill -INT "$server"; wait "$server" || fail serve-example
      tail -4 "$log" ;;
    memcheck)
      compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 python3 -m pytest -m gpu \
        tests/gpu/test_attention_block.py tests/gpu/test_ffn_block.py -q -p no:cacheprovider \
        -k "smollm2 or qwen2 or validation or non-multiple" 2>&1 | tail -8
      [ "${PIPESTATUS[0]}" -eq 0 ] || fail memcheck ;;
    sanitize-primitives)
      for tool in memcheck racecheck; do
        timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 10 \
          python3 tools/sanitize_primitives.py 2>&1 | tail -4
        [ "${PIPESTATUS[0]}" -eq 0 ] || fail "sanitize-primitives ($tool)"
      done ;;
    timeline)
      for args in "--model llama-2-7b --cluster 4" "--model llama-3-8b --cluster 16"; do
        # shellcheck disable=SC2086
        python3 -m bench.attention_timeline $args --back-to-back 8 --out "$OUT/attention_timeline_${GPU_TAG}.json" \
          2>&1 | tail -16
        [ "${PIPESTATUS[0]}" -eq 0 ] || fail timeline
      done ;;
    step-timeline)
      for args in "--model llama-3-8b" "--model llama-3-8b --batch 16" "--model llama-3.2-1b"; do
        # shellcheck disable=SC2086
        timeout 150 python3 -m bench.step_timeline $args --out "$OUT/step_timeline_${GPU_TAG}.json" \
          --md "$OUT/step_timeline_${GPU_TAG}.md" 2>&1 | tail -24
        [ "${PIPESTATUS[0]}" -eq 0 ] || fail step-timeline
      done ;;
    sanitize-step)
      for tool in memcheck racecheck; do
        timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 10 python3 -m pytest -m gpu \
          tests/gpu/test_persistent_step.py -q -p no:cacheprovider -k "smollm2-L2-bfloat16 or validation" 2>&1 | tail -4
        [ "${PIPESTATUS[0]}" -eq 0 ] || fail "sanitize-step ($tool)"
      done ;;
    ncu)
      for target in "attention --model llama-2-7b --cluster 4" "ffn --model llama-2-7b --cluster 8"; do
        kernel=${target%% *}
        # shellcheck disable=SC2086
        timeout 180 ncu --kernel-name "regex:${kernel}_block_kernel" --launch-skip 3 --launch-count 1 \
          --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
          --section WarpStateStats python3 -m tools.ncu_targets $target >>"$OUT/ncu.log" 2>&1 || fail "ncu ($kernel)"
      done
      grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy" "$OUT/ncu.log" | tail -20 ;;
  esac
done
echo "== done: status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
