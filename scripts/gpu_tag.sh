# Sourced by the scripts/gpu_*.sh: $GPU_TAG names result files after the GPU (h100, h200, ...;
# "gpu" when nvidia-smi says nothing else), so records of different chips never mix.
GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oiE 'h[0-9]+' | head -1 \
  | tr 'A-Z' 'a-z')
GPU_TAG=${GPU_TAG:-gpu}
