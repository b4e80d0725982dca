#!/usr/bin/env bash
# Re-create the tuning logs shipped under tuning_logs/x86/ on the machine you run it on.
# Resumable: every measured record is kept, so stop it at any time and run it again to add more.
# Pass 1 gives every task of V2, V1 and V3-Large a few trials (so no kernel is left on the naive
# fallback), later passes spend more trials where the time is (tvmnet's scheduler picks by weight x latency).
#   usage: bash bench/tune_shipped_logs.sh [TRIALS_PER_TASK_PASS1] [TRIALS_PER_TASK_PASS2]
set -euo pipefail
cd "$(dirname "$0")/.."
pass1=${1:-16}
pass2=${2:-64}
models=(mobilenet_v2 mobilenet_v1 mobilenet_v3_large)
for per_task in "$pass1" "$pass2"; do
  for model in "${models[@]}"; do
    echo "=== $(date -u +%FT%TZ) $model: up to $per_task trials per task"
    tvmnet tune "$model" --target x86 --trials-per-task "$per_task" --trials 100000
  done
done
