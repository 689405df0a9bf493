#!/usr/bin/env bash
# The project's GPU check: one short run (< 8 min on one H200-class GPU) that
#   1. runs the CUDA-marked tests (tests/test_cuda.py: every compute path of the layer on the GPU,
#      float32 and bfloat16, against the formula; the cached merge under fused AdamW), and
#   2. times one training step of an MLP block per method in bf16, side by side and interleaved
#      (benchmarks/step_time.py --device cuda --dtype bfloat16: BERT-base and LLaMA-like shapes,
#      N = 2048 and 8192), with exact bytes of the trainable state, and in float32 (where the SDDMM
#      runs) the column-major hand-off of the wide activations against the row-major layout, and W0
#      stored in the merge's layout against W0 as given.
# Writes JSON and logs to $OUT (the device tool's folder) or benchmarks/results/gpu:
#   gpu.txt, cuda_tests.log, cuda_tests.xml, step_time.{json,log,png}, fp32/step_time.json, step_time_fp32.log
# Needs python3 with torch (CUDA), transformers, peft, pytest, hypothesis, rich, matplotlib;
# uses the repository's src/ directly (no install).
#   bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" | tee -a "$out/gpu.txt"
status=0
timeout 150 "$py" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --junitxml "$out/cuda_tests.xml" 2>&1 | tee "$out/cuda_tests.log" || status=1
timeout 240 "$py" benchmarks/step_time.py --device cuda --dtype bfloat16 --tokens 2048 8192 --rounds 10 --out "$out" 2>&1 | tee "$out/step_time.log" || status=1
# float32, where the SDDMM runs: the column-major hand-off against the plain layout, W0 stored against given
timeout 60 "$py" benchmarks/step_time.py --device cuda --dtype float32 --tokens 2048 --rounds 10 \
  --methods sparsegrad-fixed-1side,sparsegrad-fixed-1side-rowmajor,sparsegrad-fixed-1side-w0given,meprop-fixed --out "$out/fp32" 2>&1 | tee "$out/step_time_fp32.log" || status=1
echo "gpu.sh: tests and benchmark done (status $status); results in $out"
exit $status
