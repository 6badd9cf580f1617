#!/bin/bash
# The GPU check, in one go (98 s on an H200 before the batch-size lines were added):
# bench.py, both loops at larger batches, then the default training run timed end to end
# and evaluated. Results go to $OUT (default runs/gpu).
#
#   bash experiments/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
"$PYTHON" bench.py --json > "$OUT/bench.json" && "$PYTHON" - "$OUT/bench.json" <<'PY'
import json, sys
import bench
bench.print_table(json.load(open(sys.argv[1])))
PY
# Batch sizes that fill the GPU: both loops' throughput at larger batches (the default is 100).
for batch in 400 1600; do
  "$PYTHON" bench.py --quick --batch_size=$batch | grep -E "^(device|train|  +naive)" | tee -a "$OUT/gpu.txt"
done
started=$(date +%s.%N)
"$PYTHON" train.py --out_dir=runs/gpu_default --overwrite=True > "$OUT/train.log" 2>&1
echo "default run: exit $?, $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s wall-clock" | tee -a "$OUT/gpu.txt"
tr '\r' '\n' < "$OUT/train.log" | grep -a -E "^(training|epoch [0-9]+:|done)" | tee -a "$OUT/gpu.txt"
"$PYTHON" evaluate.py --checkpoint=runs/gpu_default/ckpt.pt | tee -a "$OUT/gpu.txt"
cp runs/gpu_default/log.csv "$OUT/log.csv"
