#!/usr/bin/env bash
# QLoRA's setting on one GPU: the second device call, after benchmarks/gpu.sh (its payload and the
# bitsandbytes wheel do not fit one call's 64 MiB). Under 3 minutes:
#   1. the TinyLlama-shape decoder with its blocks in NF4 (benchmarks/decoder_step.py --quantize 4bit,
#      bf16): LoRA-MLP (QLoRA), the default (sparse-random) and sparsegrad, step time vs LoRA and
#      peak memory at 8x512 and 4x2048 tokens;
#   2. the CUDA tests of a 4-bit base (tests/test_cuda.py -k 4bit: trained on the GPU's NF4 base,
#      served on the float32 checkpoint).
# The device machine has no bitsandbytes: carry it as a wheel in .whl (ignored by git), made here once:
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# then run `bash benchmarks/gpu_quantized.sh` with carry [".whl"]. Writes gpu_quantized.log and
# decoder_step.json to $OUT (or benchmarks/results/gpu_quantized). GPU_SH_SMOKE=1: the same steps on
# this CPU at toy sizes, with the bitsandbytes installed here (tests/test_gpu_script.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu_quantized}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log="$out/gpu_quantized.log"
: > "$log"
if ! "$py" -c "import bitsandbytes" 2>/dev/null && ls .whl/bitsandbytes-*.whl > /dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tee -a "$log"
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$py" -c "import bitsandbytes, torch; print('bitsandbytes', bitsandbytes.__version__, 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" 2>&1 | tee -a "$log"
"$py" -c "import bitsandbytes" 2>/dev/null || { echo "gpu_quantized.sh: no bitsandbytes here; carry .whl (see the header)" | tee -a "$log"; exit 1; }
if [ "${GPU_SH_SMOKE:-0}" = 1 ]; then
  device=cpu decoder=(--shape tiny --tokens 2x64 --rounds 1 --warmup 1)
else
  device=cuda decoder=(--shape tinyllama --tokens 8x512 4x2048 --rounds 10)
fi
status=0
t=$SECONDS; timeout 120 "$py" benchmarks/decoder_step.py "${decoder[@]}" --device "$device" --precision bf16 --quantize 4bit \
  --methods lora-mlp,sparse-random,sparsegrad --out "$out" 2>&1 | grep -v Warning | tee -a "$log" || status=1
echo "gpu_quantized.sh: the 4-bit decoder took $((SECONDS - t))s" | tee -a "$log"
t=$SECONDS; SPARSEFT_TEST_DEVICE="$device" timeout 90 "$py" -m pytest -v --tb=short -m cuda tests/test_cuda.py -k 4bit \
  -p no:cacheprovider 2>&1 | tee -a "$log" || status=1
echo "gpu_quantized.sh: the 4-bit CUDA tests took $((SECONDS - t))s" | tee -a "$log"
echo "gpu_quantized.sh: done (status $status); results in $out" | tee -a "$log"
exit $status
