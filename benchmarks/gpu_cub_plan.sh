#!/usr/bin/env bash
# The CUB plan for a lent GPU (15 minutes of device time in all, each call under 10 minutes, the machine bare):
#   call 1: bash benchmarks/gpu_cub_plan.sh DATA OUT val
#           the settings of suite.VAL_ROWS side by side on the one GPU, ~1,200 iterations each, trained on 75 of
#           CUB's training classes (train_val) and evaluated on the other 25 (val); the rule in suite.VAL_ROWS
#           picks the winner and writes OUT/choice.txt. The test classes are not touched.
#   call 2: bash benchmarks/gpu_cub_plan.sh DATA OUT test "0 1"
#           docs/method.md's full schedule on the test classes with the chosen settings: UDML-SS and UDML (lambda = 0)
#           for each seed given, all side by side. Seed 2 in a third call if device time is left.
#   or, in ONE call (the whole 15-minute budget, issue #28): bash benchmarks/gpu_cub_plan.sh DATA OUT methods
#           UDML-SS (cub_lite0) and STML (its published recipe, benchmarks.cub's stml row) on CUB Lite0-512, each on
#           train_val -> val and on the protocol's split (classes 1-100 -> 101-200), seed 0: four trainings side by
#           side, 240 pseudo-epochs each (the same images seen: about 1,500 UDML-SS steps and 1,000 STML steps of
#           2 x 120 views). Floor for UDML-SS on the test classes: 56 Recall@1; STML's published figure: 60.6.
# Before spending device time, the same commands run on a CPU with TINY=1 (a tiny schedule at 64 px, evaluated at
# the start and the end only; on a 2-core CPU with two of the val rows: TINY=1 ROWS="paper head_lr" ...: six
# processes at once there spend ten minutes in each clustering and all run out of time).
# Runs stopped by TIMEOUT (default 540 s) are recorded as unfinished; their metrics so far are kept.
set -uo pipefail
data=${1:?data root}; out=${2:?results folder}; part=${3:?val, test or methods}; seeds=${4:-0}
timeout=${TIMEOUT:-540}
root=$(cd "$(dirname "$0")/.." && pwd)  # the repository: python -m benchmarks.NAME finds the package from any folder
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU: $(nproc) CPU cores"
extra=(eval_every=10 checkpoint_every=10)
if [ "${TINY:-0}" = 1 ]; then  # the dry run on a CPU: same commands, a schedule of minutes
    extra=(image_size=64 resize_size=72 pseudo_epochs=2 recluster_every=1 eval_every=0 eval_batch_size=64 pictures=false)
fi
case "$part" in
  val)
    python3 -m benchmarks.cub --data "$data" --out /tmp/udml_val --sweep val --parallel --timeout "$timeout" \
        --results "$out/cub_val.json" num_clusters=75 pseudo_epochs=260 "${extra[@]}" ${ROWS:+--rows $ROWS} || exit $?
    python3 -c "import json,sys; c=json.load(open(sys.argv[1]))['choice']; print(' '.join(c['overrides']))" \
        "$out/cub_val.json" > "$out/choice.txt"
    echo "chosen: $(cat "$out/choice.txt")" ;;
  test)
    [ -f "$out/choice.txt" ] || { echo "no $out/choice.txt: run the val part first" >&2; exit 2; }
    read -r -a chosen < "$out/choice.txt"
    # shellcheck disable=SC2086
    python3 -m benchmarks.cub --data "$data" --out /tmp/udml_test --seeds $seeds --parallel --timeout "$timeout" \
        --results "$out/cub_test_seeds_${seeds// /_}.json" "${chosen[@]}" "${extra[@]}" ;;
  methods)
    schedule=(pseudo_epochs=240 "${extra[@]}")
    [ "${TINY:-0}" = 1 ] && schedule=("${extra[@]}")
    for split in val test; do
        splits=(); [ "$split" = val ] && splits=(train_split=train_val test_split=val)
        python3 -m benchmarks.cub --data "$data" --out "/tmp/udml_methods_$split" --rows udml_ss stml --parallel \
            --timeout "$timeout" --results "$out/cub_methods_$split.json" "${splits[@]}" "${schedule[@]}" \
            > "$out/cub_methods_$split.log" 2>&1 &
    done
    wait
    tail -n 8 "$out"/cub_methods_*.log ;;
  *) echo "unknown part $part: val, test or methods" >&2; exit 2 ;;
esac
for f in /tmp/udml_val/*/metrics.jsonl /tmp/udml_test/*/metrics.jsonl; do
    [ -f "$f" ] && cp "$f" "$out/$(basename "$(dirname "$f")").metrics.jsonl"
done
for split in val test; do  # the methods part: the same run names on both splits
    for f in /tmp/udml_methods_$split/*/metrics.jsonl; do
        [ -f "$f" ] && cp "$f" "$out/${split}_$(basename "$(dirname "$f")").metrics.jsonl"
    done
done
exit 0
