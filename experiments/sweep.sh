#!/bin/bash
# Train and evaluate each line of a sweep file: "name --option=value ...". Each run goes to
# $RUNS/name/, its evaluate.py JSON to $RUNS/name.json and its wall-clock time to $RUNS/name.time.
# A run whose JSON exists is skipped, so an interrupted sweep continues where it stopped.
#
#   bash experiments/sweep.sh experiments/sweep_prior.txt
#   RUNS=runs/other DEVICE=cuda bash experiments/sweep.sh FILE
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-auto}
RUNS=${RUNS:-runs/sweep}
mkdir -p "$RUNS"
grep -v -E '^\s*(#|$)' "$1" | while read -r name args; do
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
