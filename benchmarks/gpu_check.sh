#!/usr/bin/env bash
# The device check of issue 10 as one prepared run, ordered so that a run cut short keeps the most useful results:
# greedy identity in float32 (TF32 off), where a step's time goes (decode vs sibling forwards, torch.profiler), then
# the speed table (bf16, 3 interleaved rounds, medians and spread, plain dynamic and compiled static baselines).
# Every part has its own time limit and writes JSON + log under OUT as it goes.
#
#   bash benchmarks/gpu_check.sh benchmarks/gpu/h100                      # on the GPU machine: about 12 minutes
#   MODEL=tiny-random SMOKE=1 bash benchmarks/gpu_check.sh runs/gpu-smoke   # the same steps on a CPU, seconds
#
# Needs torch and transformers (the GPU image's are fine); mara_hf is used from this checkout (PYTHONPATH).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu/h100}
MODEL=${MODEL:-llama3-8b-random}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SMOKE_ARGS=()
if [ "${SMOKE:-0}" = 1 ]; then SMOKE_ARGS=(--max-new-tokens 8 --compile); fi
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; \
  git rev-parse HEAD 2>/dev/null; } > "$OUT/environment.txt"
timeout 240 python benchmarks/bench_generate.py --identity --model "$MODEL" "${SMOKE_ARGS[@]}" --out "$OUT/identity" \
  || echo "identity: exit $?" | tee -a "$OUT/environment.txt"
timeout 90 python benchmarks/profile_step.py --model "$MODEL" --out "$OUT/profile" \
  || echo "profile: exit $?" | tee -a "$OUT/environment.txt"
timeout 420 python benchmarks/bench_generate.py --model "$MODEL" "${SMOKE_ARGS[@]}" --out "$OUT/speed" \
  || echo "speed: exit $?" | tee -a "$OUT/environment.txt"
ls -R "$OUT"
