#!/bin/bash
# Run a sweep file as N workers side by side, one thread each (each takes every Nth line):
#   bash experiments/parallel.sh experiments/sweep_mmdvae.txt 2
# Each worker's runs are timed under load: sweep times compare runs of one sweep, not machines.
set -uo pipefail
cd "$(dirname "$0")/.."
workers=${2:-2}
for ((w = 0; w < workers; w++)); do
  part=$(mktemp)
  grep -v -E '^\s*(#|$)' "$1" | awk -v n="$workers" -v w="$w" 'NR % n == w' > "$part"
  OMP_NUM_THREADS=1 bash experiments/sweep.sh "$part" &
done
wait
