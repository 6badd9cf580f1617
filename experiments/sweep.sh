#!/bin/bash
# Train and evaluate each line of a sweep file: "name --option=value ...". Each run goes to
# $RUNS/name/, its evaluate.py JSON to $RUNS/name.json and its wall-clock time to $RUNS/name.time.
# A run whose JSON exists is skipped, so an interrupted sweep continues where it stopped.
# WORKERS=2 runs two at a time, one thread each (each takes every 2nd line): their times are under
# load, so they compare runs of one sweep, not machines.
#
#   RUNS=runs/mmd WORKERS=2 bash experiments/sweep.sh experiments/sweep_mmdvae.txt
#   python experiments/sweep_table.py --code=$(git rev-parse --short HEAD)     # the docs' table
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-auto}
RUNS=${RUNS:-runs/sweep}
WORKERS=${WORKERS:-1}
mkdir -p "$RUNS"

worker() {  # the lines w, w + WORKERS, ... of the sweep file
  grep -v -E '^\s*(#|$)' "$1" | awk -v n="$WORKERS" -v w="$2" 'NR % n == w' | while read -r name args; do
    [ -e "$RUNS/$name.json" ] && continue
    echo "== $name $args"
    started=$(date +%s.%N)
    # shellcheck disable=SC2086
    if "$PYTHON" train.py --out_dir="$RUNS/$name" --overwrite=True --device="$DEVICE" $args > "$RUNS/$name.log" 2>&1; then
      awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f\n", b-a}' > "$RUNS/$name.time"
      # Written under another name and renamed once complete: a half-written JSON would read as a finished run.
      "$PYTHON" evaluate.py --checkpoint="$RUNS/$name/ckpt.pt" --device="$DEVICE" --json > "$RUNS/$name.json.part" \
        && mv "$RUNS/$name.json.part" "$RUNS/$name.json" || rm -f "$RUNS/$name.json.part"
    else
      tail -2 "$RUNS/$name.log"
    fi
  done
}

if [ "$WORKERS" = 1 ]; then
  worker "$1" 0
else
  for ((w = 0; w < WORKERS; w++)); do OMP_NUM_THREADS=1 worker "$1" "$w" & done
  wait
fi
