#!/usr/bin/env bash
# The prepared GPU check (issue: GPU): kernels vs their torch references on the GPU, W4A16 / W8A8 throughput at
# Llama-3-8B layer shapes vs torch fp16 and torch's int4 kernel (share of HBM bandwidth), GPTQ on the GPU vs
# the CPU, vLLM serving quantkit's hf-gptq and ct folders when vLLM is installed. Writes
# benchmarks/results/gpu.{md,json}. Budget: 8 minutes on an H200.
#
#   benchmarks/gpu/run.sh            # on the GPU machine
#   benchmarks/gpu/run.sh --dry-run  # anywhere: every step on the CPU at small sizes (figures meaningless)
#   MODEL=/path/to/smollm2 benchmarks/gpu/run.sh   # GPTQ and vLLM steps on that model (default: embedded)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
args=("$@")
if [ -n "${MODEL:-}" ]; then args+=(--model "$MODEL"); fi
out=benchmarks/results/gpu.md
if [ "${1:-}" = "--dry-run" ]; then out=${OUT:-/tmp/gpu-dry-run.md}; fi
exec timeout 480 "$PY" benchmarks/gpu/check.py "${args[@]}" --out "$out"
