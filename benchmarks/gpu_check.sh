#!/usr/bin/env bash
# The device check of issue 10, in parts that each fit a 10-minute device call with room to spare, each under its
# own time limit and writing JSON + log as it goes (a part cut short keeps its finished rounds):
#   static    compiled static-cache methods (plain-static, fused-static accept-all / calibrated) beside plain, bf16,
#             batch sizes $STATIC_BATCHES; on an H100 compiling the 8B model takes about a minute per graph
#   identity  greedy identity in float32, TF32 off, every method (static ones compiled), on Llama-3-8B's widths with
#             4 layers (the same kernels per layer; compiling 32 layers in float32 would not fit)
#   speed     dynamic-cache methods (plain, processor, fused with accept-all / calibrated / reject-all under "auto"
#             and one-shot (40,): on a host-bound GPU a forward costs about the same whatever its width), bf16
#   profile   decode vs sibling forwards, timed and under torch.profiler (one tables file), packed as profile.tar.gz
# PARTS picks them, in order (default: static identity, about 9.5 minutes; speed and profile take about 5 and 1).
# Results: environment.txt and two files per part, so a device that returns few files returns them all.
#
#   bash benchmarks/gpu_check.sh benchmarks/gpu/h100                              # on the GPU machine
#   PARTS="speed profile" bash benchmarks/gpu_check.sh benchmarks/gpu/h100-dynamic
#   MODEL=tiny-random SMOKE=1 PARTS="static identity speed profile" bash benchmarks/gpu_check.sh runs/gpu-smoke
#                                                                                  # every part on a CPU, ~2 minutes
# Needs torch and transformers (the GPU image's are fine); mara_hf is used from this checkout (PYTHONPATH).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu/h100}
MODEL=${MODEL:-llama3-8b-random}
IDENTITY_MODEL=${IDENTITY_MODEL:-llama3-8b-4layers-random}
PARTS=${PARTS:-static identity}
STATIC_BATCHES=${STATIC_BATCHES:-1 16}
SMOKE_ARGS=()
if [ "${SMOKE:-0}" = 1 ]; then SMOKE_ARGS=(--max-new-tokens 8 --compile); IDENTITY_MODEL=$MODEL; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; \
  echo "commit ${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}"; echo "parts: $PARTS"; } > "$OUT/environment.txt"
part() {  # part NAME SECONDS COMMAND...: run with a time limit, note a failure or timeout in environment.txt
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" || echo "$name: exit $? (limit $limit s)" | tee -a "$OUT/environment.txt"
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/environment.txt"
}
for name in $PARTS; do
  case $name in
    static) part static 430 python benchmarks/bench_generate.py --model "$MODEL" "${SMOKE_ARGS[@]}" \
              --methods plain plain-static fused-static --batch-sizes $STATIC_BATCHES --out "$OUT/static" ;;
    identity) part identity 140 python benchmarks/bench_generate.py --identity --model "$IDENTITY_MODEL" \
              "${SMOKE_ARGS[@]}" --out "$OUT/identity" ;;
    speed) part speed 330 python benchmarks/bench_generate.py --model "$MODEL" "${SMOKE_ARGS[@]}" \
              --methods plain processor fused --schedules auto 40 --out "$OUT/speed" ;;
    profile) part profile 60 python benchmarks/profile_step.py --model "$MODEL" --iters 10 --profile-iters 2 \
              --out "$OUT/profile"
             tar -czf "$OUT/profile.tar.gz" -C "$OUT" profile && rm -r "$OUT/profile" ;;
    *) echo "unknown part $name (static, identity, speed, profile)" | tee -a "$OUT/environment.txt" ;;
  esac
done
ls -lR "$OUT"
