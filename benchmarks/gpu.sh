#!/usr/bin/env bash
# The project's GPU check, as users see it: one command, under 6 minutes on one H100/H200-class GPU.
#   1. a real decoder (benchmarks/decoder_step.py: TinyLlama-1.1B shape, bf16, full / LoRA-MLP /
#      SHiRA / sparse-random, the default / the default with its merge cached / dynamic at 8x512 and
#      4x2048 tokens): step time vs LoRA and peak memory;
#   2. one MLP block per method (benchmarks/step_time.py --device cuda --dtype bfloat16): LLaMA-7B
#      4096x11008 and BERT-base 768x3072 at N = 2048, 8192 and 32768; the default (sparse-random)
#      and the one-sided rotation (sparsegrad-fixed-1side), each beside itself on the Triton
#      backend's sampled product (-triton), which keeps the sampled path in bf16;
#   3. `sparseft train --device cuda` end to end on MiniLM / Rotten Tomatoes (the embedded default),
#      when the payload is here: `python scripts/gpu_payload.py` makes .gpu/ (46 MB); carry it.
#      Its CPU reference on the same inputs: the command in scripts/gpu_payload.py's docstring.
#   4. the CUDA-marked tests (tests/test_cuda.py: every compute path of the layer on the GPU,
#      float32 and bfloat16, against the formula; the cached merge under fused AdamW;
#      tests/test_compile.py: a torch.compile'd bf16 step against the eager one), last, with the
#      time the benchmarks left. Each step prints how long it took.
# Writes to $OUT (the device tool's folder) or benchmarks/results/gpu, in 5 files, since the device
# tool brings back at most 8: gpu.log (everything printed), decoder_step.json, step_time.json,
# step_time.png and train/results.json.
# GPU_SH_SMOKE=1 runs the same steps on this CPU at toy sizes, Triton in its interpreter, so the
# script a lent GPU runs has run here first (tests/test_gpu_script.py); GPU_PAYLOAD: the payload's
# folder (default .gpu).
# Needs python3 with torch (CUDA), transformers, peft, pytest, hypothesis, rich, matplotlib, tqdm;
# uses the repository's src/ directly (no install).
#   bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log="$out/gpu.log"
: > "$log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"; } | tee -a "$log"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" | tee -a "$log"
payload="${GPU_PAYLOAD:-.gpu}"
if [ "${GPU_SH_SMOKE:-0}" = 1 ]; then
  device=cpu decoder=(--shape tiny --tokens 2x64 --rounds 1 --warmup 1) block=(--shapes bert --tokens 64 --rounds 1)
  train=(--steps 3 --max-length 32) ; export TRITON_INTERPRET=1
else
  device=cuda decoder=(--shape tinyllama --tokens 8x512 4x2048 --rounds 10) block=(--shapes llama7b bert --tokens 2048 8192 32768 --rounds 5)
  train=()
fi
status=0 start=$SECONDS
took() { echo "gpu.sh: $1 took $((SECONDS - ${2:-start}))s" | tee -a "$log"; }
t=$SECONDS; timeout 120 "$py" benchmarks/decoder_step.py "${decoder[@]}" --device "$device" --precision bf16 \
  --out "$out" 2>&1 | grep -v Warning | tee -a "$log" || status=1
took "the decoder" "$t"
t=$SECONDS; timeout 100 "$py" benchmarks/step_time.py --device "$device" --dtype bfloat16 "${block[@]}" \
  --methods sparse-random,sparse-random-triton,sparsegrad-fixed-1side,sparsegrad-fixed-1side-triton,sparsegrad-dynamic-1side,shira --out "$out" 2>&1 | tee -a "$log" || status=1
took "the blocks" "$t"
t=$SECONDS
if [ -f "$payload/minilm/config.json" ]; then
  timeout 50 "$py" -m sparseft.app.cli train --model "$payload/minilm" --data "$payload/rotten_tomatoes.csv" --group-column group \
    --device "$device" "${train[@]}" --no-save --no-progress --output-dir "$out/train" 2>&1 | tail -n 25 | tee -a "$log" || status=1
else
  echo "sparseft train --device $device: skipped (no $payload payload; run scripts/gpu_payload.py here and carry .gpu)" | tee -a "$log"
fi
rm -f "$out/train/.sparseft.lock"  # (the run's folder lock: not a result)
took "sparseft train" "$t"
# the tests last, with what is left of 350 s (at least 90): cold compiles on a GPU are not sized yet;
# -v names each test as it ends, so a time limit still says which ran
t=$SECONDS; left=$((350 - (SECONDS - start))); [ "$left" -ge 90 ] || left=90
timeout "$left" "$py" -m pytest -v --tb=short -m cuda tests/test_cuda.py tests/test_compile.py -p no:cacheprovider 2>&1 \
  | tee -a "$log" || status=1
took "the CUDA tests (limit ${left}s)" "$t"
files=$(find "$out" -type f | wc -l)  # (the device tool brings back 8 files, 2 folders down at most)
[ "$files" -le 8 ] || { echo "gpu.sh: $files files under $out, more than the 8 the device tool brings back" | tee -a "$log"; status=1; }
echo "gpu.sh: tests and benchmarks done (status $status); results in $out" | tee -a "$log"
exit $status
