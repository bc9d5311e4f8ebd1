#!/usr/bin/env bash
# The GPU benchmark, one part per command so that each stays under the lent machine's 10-minute call:
#   bash benchmarks/gpu_cub.sh DATA_ROOT RESULTS_DIR throughput     # (a) ceiling, (b) udml step, (c) re-clustering
#   bash benchmarks/gpu_cub.sh DATA_ROOT RESULTS_DIR udml_ss [SEED]  # pretrained start + UDML-SS, full schedule
#   bash benchmarks/gpu_cub.sh DATA_ROOT RESULTS_DIR udml [SEED]     # UDML (lambda = 0), full schedule
#   bash benchmarks/gpu_cub.sh DATA_ROOT RESULTS_DIR both [SEED]     # UDML-SS and UDML at once on the one GPU
# A run stopped by TIMEOUT (default 540 s) is recorded as unfinished; its metrics so far are kept.
set -uo pipefail
data=${1:?data root}; results=${2:?results folder}; part=${3:?throughput, udml_ss, udml or both}; seed=${4:-0}
timeout=${TIMEOUT:-540}
root=$(cd "$(dirname "$0")/.." && pwd)  # the repository: python -m benchmarks.NAME finds the package from any folder
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
case "$part" in
  throughput) exec python3 -m benchmarks.throughput --config cub_lite0 --data "$data" --output "$results/throughput.json" ;;
  both) rows="udml_ss udml"; parallel=--parallel ;;
  udml_ss|udml) rows=$part; parallel= ;;
  *) echo "unknown part $part: throughput, udml_ss, udml or both" >&2; exit 2 ;;
esac
python3 -m benchmarks.cub --config cub_lite0 --data "$data" --out /tmp/udml_runs --rows $rows --seeds "$seed" $parallel \
    --timeout "$timeout" --results "$results/cub_${part}_seed$seed.json" eval_every=20 checkpoint_every=10
for row in $rows; do
    cp /tmp/udml_runs/${row}_seed$seed/metrics.jsonl "$results/${row}_seed$seed.metrics.jsonl" 2>/dev/null
    cp /tmp/udml_runs/${row}_seed$seed.log "$results/${row}_seed$seed.log" 2>/dev/null
done
