#!/usr/bin/env bash
# Where the fused kernels' warp stalls fall, per SASS instruction, in one device call: Nsight Compute
# source counters (stall reasons, instructions executed) of one launch of each target below, exported
# as CSV (ncu --page source --csv --print-source sass) and gzipped under $OUT, with ncu's details page.
# Read them here, without a GPU, per source line:
#   python -m bench.ncu_source <(zcat OUT/attention_llama-3-8b_c16_source.csv.gz) attention/attention_block.cu \
#     -D CF_ATTN_GQA=4 -D CF_ATTN_DTYPE=0 -D CF_ATTN_HEAD_DIM=128 -D CF_ATTN_NT=1
# Clocks and caches are left as in the benchmarks (--clock-control none --cache-control none).
#   OUT=/tmp/ncu scripts/gpu_ncu_source.sh            TARGETS="attention:llama-2-7b:4 ffn:llama-2-7b:8" to choose
# A target is kernel:model:cluster[:batch[:seq_len]] (batch 1 and 1024 cached keys when left out).
# Commands as run on an H200 on 2026-12-04 (bench/results/instruction_fetch_h200.md).
DEFAULT_OUT=/tmp/gpu_ncu_source
# shellcheck source=scripts/gpu_common.sh
. "$(dirname "$0")/gpu_common.sh"
TARGETS=${TARGETS:-attention:llama-3-8b:16 attention:llama-2-7b:4 ffn:llama-2-7b:8}

for target in $TARGETS; do
  IFS=: read -r kernel model cluster batch seq_len <<<"$target"
  batch=${batch:-1} seq_len=${seq_len:-1024}
  name="${kernel}_${model}_c${cluster}"
  [ "$batch" = 1 ] || name="${name}_b${batch}"
  [ "$seq_len" = 1024 ] || name="${name}_s${seq_len}"
  echo "== ncu source counters: $kernel, $model, batch $batch, S $seq_len, cluster $cluster"
  timeout 180 ncu --kernel-name "regex:${kernel}_block_kernel" --launch-skip 3 --launch-count 1 --clock-control none \
    --cache-control none --section SourceCounters --section WarpStateStats --section SpeedOfLight --import-source no \
    -f -o "$OUT/$name" python3 -m bench.ncu_targets "$kernel" --model "$model" --cluster "$cluster" \
    --batch "$batch" --seq-len "$seq_len" \
    > "$OUT/$name.log" 2>&1 || status=1
  tail -2 "$OUT/$name.log"
  if [ -f "$OUT/$name.ncu-rep" ]; then
    ncu --import "$OUT/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/${name}_source.csv" || status=1
    ncu --import "$OUT/$name.ncu-rep" --page details > "$OUT/${name}_details.txt" 2>&1 || status=1
    gzip -f "$OUT/${name}_source.csv"
    rm -f "$OUT/$name.ncu-rep"  # ~5 MB each; the CSV and the details hold what is read
  fi
done
exit $status
