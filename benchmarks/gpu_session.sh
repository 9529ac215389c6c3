#!/usr/bin/env bash
# What needs a GPU, in one go: the CUDA postprocess path, training throughput and memory
# at the recipes' real sizes, the computed plan of every recipe against the measured
# max_memory_allocated and step time, the streaming ensemble, and a short real training
# of the FCN-8s recipe on a 2048 px phantom (then inference and the score of its
# submission).
#
#   bash benchmarks/gpu_session.sh [bench|train|all]      logs in $LOGS (default gpu-logs)
#
# Tables go to stdout and to one log per step; nothing is written in the repository
# except $LOGS. Steps keep going after a failure; the exit status says if any failed.
set -uo pipefail
PY=${PYTHON:-python3}
LOGS=${LOGS:-gpu-logs}
WORK=${WORK:-$(mktemp -d)}
WHAT=${1:-all}
mkdir -p "$LOGS"
failed=0
step() {  # step NAME COMMAND...: run, log, remember a failure
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
if [ "$WHAT" = bench ] || [ "$WHAT" = all ]; then
    step postprocess $PY benchmarks/bench_postprocess.py --no-memory
    step train_bench $PY benchmarks/bench_train.py --data "$WORK/bench-phantom"
    step plan_bench $PY benchmarks/bench_plan.py --json "$LOGS/plan.json"
    step infer_bench $PY benchmarks/bench_infer.py --train-seconds 40
fi
if [ "$WHAT" = train ] || [ "$WHAT" = all ]; then
    DATA="$WORK/phantom2048"
    SET=(data.root="$DATA" data.cache_dir="$WORK/cache" train.output_dir="$WORK/runs"
         model.encoder_weights=null data.num_workers=12 train.epochs=40 infer.out_dir="$WORK/sub")
    step phantom $PY scripts/make_phantom.py --out "$DATA" --train-patients 60 \
        --test-patients 8 --workers 16 --overwrite
    step fcn_train $PY scripts/train.py --config configs/fcn8s_r50_512.yaml --fold 0 "${SET[@]}"
    step fcn_infer $PY scripts/infer.py --config configs/fcn8s_r50_512.yaml --ensemble \
        "${SET[@]}" 'infer.ensemble=[{experiment: fcn8s_r50_512, folds: [0]}]' \
        --out "$WORK/sub/fcn.csv" --labels "$DATA/test_labels"
    cp "$WORK/runs/fcn8s_r50_512/fold0/summary.csv" "$LOGS/fcn_summary.csv" 2>/dev/null
fi
exit $failed
