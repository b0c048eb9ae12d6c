#!/usr/bin/env bash
# The speed benchmarks on a CUDA GPU in under 5 minutes: MoE layers vs timm (tools/bench_moe.py, fp32 and bf16)
# and the paper-scale model rows (tools/bench_model.py, bf16 autocast, torch.compile with inductor).
#   tools/bench_cuda.sh [OUT_DIR]        (default bench_out; extra arguments go to bench_model.py after OUT_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-bench_out}
shift || true
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to benchmark')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# each step has its own time limit, so that one slow step cannot take the whole budget
timeout 100 "$PY" tools/bench_moe.py --device cuda --repeats 20 --model-repeats 5 --out "$OUT/moe_cuda.json"
timeout 190 "$PY" tools/bench_model.py --device cuda --repeats 20 --warmup 3 --out "$OUT/model_cuda.json" "$@"
echo "wrote $OUT/moe_cuda.json and $OUT/model_cuda.json"
