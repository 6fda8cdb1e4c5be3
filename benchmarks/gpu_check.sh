#!/usr/bin/env bash
# Every GPU measurement in one command, under 8 minutes on one H100 / H200:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: gpu-check)
#
# 1. benchmarks/full_size.py --device cuda: SDXL (float16) + Qwen2-VL-2B (bfloat16) at their real sizes,
#    1024x1024, 30 steps: UNet step overhead, MLLM encode vs FLOPs up to 112 references, batched vs
#    per-image vision tower (equal within float tolerance), seconds per image against IP-Adapter-SDXL
#    and bare SDXL (finite images), peak GPU memory per option (default, model / sequential offload,
#    8-bit MLLM) as ratios to bare SDXL.
# 2. benchmarks/scale_out.py --gpu: stage multi under configs/multi_gpu.yaml, fsdp.yaml and
#    deepspeed_zero2.yaml (pip install deepspeed first), losses compared step for step.
#
# Writes OUT_DIR/gpu.txt (the card), full_size.{json,md,log}, scale_out.{json,md,log}. Record the tables
# in docs/BENCHMARKS.md with the card's name. Nothing is downloaded: the weights are random.
set -uo pipefail
out=${1:-gpu-check}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
status=0
"$python" "$here/full_size.py" --device cuda --json "$out/full_size.json" --markdown "$out/full_size.md" \
    2> "$out/full_size.log" || status=1
"$python" "$here/scale_out.py" --gpu --json "$out/scale_out.json" > "$out/scale_out.md" \
    2> "$out/scale_out.log" || status=1
cat "$out/scale_out.md"
exit $status
