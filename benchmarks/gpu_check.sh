#!/usr/bin/env bash
# The device check of issue 10 as one prepared run that fits one 10-minute device call, ordered so that a run cut
# short keeps the most useful results, each part under its own time limit, writing JSON + log as it goes:
#   1. speed/     dynamic-cache methods (plain, processor, fused with accept-all / calibrated / reject-all), bf16
#   2. static/    compiled static-cache methods (plain-static, fused-static accept-all / calibrated) beside plain
#   3. identity/  greedy identity in float32, TF32 off, every method (static ones compiled), on Llama-3-8B's widths
#                 with 4 layers (the same kernels per layer; compiling 32 layers in float32 would not fit)
#   4. profile/   decode vs sibling forwards, timed and under torch.profiler (one tables file)
# At most 8 files in all (environment.txt and two per part, the profile's three packed into profile.tar.gz), so
# that a device that returns few files returns them all.
#
#   bash benchmarks/gpu_check.sh benchmarks/gpu/h100                      # on the GPU machine: under 10 minutes
#   MODEL=tiny-random SMOKE=1 bash benchmarks/gpu_check.sh runs/gpu-smoke   # the same steps on a CPU, ~2 minutes
#
# Needs torch and transformers (the GPU image's are fine); mara_hf is used from this checkout (PYTHONPATH).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu/h100}
MODEL=${MODEL:-llama3-8b-random}
IDENTITY_MODEL=${IDENTITY_MODEL:-llama3-8b-4layers-random}
SMOKE_ARGS=()
if [ "${SMOKE:-0}" = 1 ]; then SMOKE_ARGS=(--max-new-tokens 8 --compile); IDENTITY_MODEL=$MODEL; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; \
  echo "commit ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}"; } > "$OUT/environment.txt"
part() {  # part NAME SECONDS COMMAND...: run with a time limit, note a failure or timeout in environment.txt
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" || echo "$name: exit $? (limit $limit s)" | tee -a "$OUT/environment.txt"
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/environment.txt"
}
part speed 200 python benchmarks/bench_generate.py --model "$MODEL" "${SMOKE_ARGS[@]}" \
  --methods plain processor fused --out "$OUT/speed"
part static 270 python benchmarks/bench_generate.py --model "$MODEL" "${SMOKE_ARGS[@]}" \
  --methods plain plain-static fused-static --out "$OUT/static"
part identity 60 python benchmarks/bench_generate.py --identity --model "$IDENTITY_MODEL" "${SMOKE_ARGS[@]}" \
  --out "$OUT/identity"
part profile 40 python benchmarks/profile_step.py --model "$MODEL" --out "$OUT/profile"
tar -czf "$OUT/profile.tar.gz" -C "$OUT" profile && rm -r "$OUT/profile"
ls -lR "$OUT"
