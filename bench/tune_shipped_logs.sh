#!/usr/bin/env bash
# Re-create the tuning logs shipped under tuning_logs/x86/ on the machine you run it on, with the
# budgets they were made with (2026-11-23, AMD EPYC znver3, 2 cores; README's performance table):
#   MobileNetV2-1.0-224  1,500 trials, 32 per task per round   (about 40 min)
#   MobileNetV1-1.0-224    400 trials, 16 per task per round   (about 18 min)
# Resumable: every measured record is kept, so stop it at any time and run it again; a larger budget
# (first argument: a factor, default 1) adds trials where the time is (tvmnet's scheduler picks by
# weight x latency, tasks with no trial first).
#   usage: bash bench/tune_shipped_logs.sh [FACTOR]
set -euo pipefail
cd "$(dirname "$0")/.."
factor=${1:-1}
export TVMNET_TUNING_LOGS="${TVMNET_TUNING_LOGS:-$PWD/tuning_logs}"
echo "=== $(date -u +%FT%TZ) mobilenet_v2"
tvmnet tune mobilenet_v2 --target x86 --trials $((1500 * factor)) --trials-per-iter 32
echo "=== $(date -u +%FT%TZ) mobilenet_v1"
tvmnet tune mobilenet_v1 --target x86 --trials $((400 * factor)) --trials-per-iter 16
