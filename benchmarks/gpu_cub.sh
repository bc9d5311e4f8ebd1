#!/usr/bin/env bash
# The GPU benchmark as one command: throughput (ceiling, udml step, re-clustering), then the CUB rows
# (pretrained start, UDML-SS, UDML) with METHOD.md's full schedule, both trainings at once on the one GPU.
#   bash benchmarks/gpu_cub.sh DATA_ROOT RESULTS_DIR [TIMEOUT_SECONDS]
set -uo pipefail
data=${1:?data root}; results=${2:?results folder}; timeout=${3:-520}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 "$here/throughput.py" --config cub_lite0 --data "$data" --output "$results/throughput.json"
python3 "$here/cub.py" --config cub_lite0 --data "$data" --out /tmp/udml_runs --parallel --timeout "$timeout" \
    --results "$results/cub.json" eval_every=20 checkpoint_every=10
for row in udml_ss_seed0 udml_seed0; do
    cp /tmp/udml_runs/$row/metrics.jsonl "$results/$row.metrics.jsonl" 2>/dev/null
    cp /tmp/udml_runs/$row.log "$results/$row.log" 2>/dev/null
done
