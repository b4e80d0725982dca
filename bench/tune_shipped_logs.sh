#!/usr/bin/env bash
# Re-create the tuning logs shipped under tuning_logs/x86/ on the machine you run it on, with the
# budgets they were made with (2026-11-23/24, AMD EPYC znver3, 2 cores; README's performance table):
#   MobileNetV2-1.0-224        4,576 trials: 1,504 at 32 per task per round (41 min), then 3,072 more at 16 (72 min)
#   MobileNetV1-1.0-224        3,490 trials: 2,162 at 16 per task per round (56 min), then 1,328 more on the 9 tasks
#                              that lost most to onnxruntime in bench/breakdown.py (31 min)
#   MobileNetV3-Large-1.0-224  3,314 trials, 16 per task per round   (36 min for 1,202, then 51 more)
#   MobileNetV3-Small-1.0-224    900 trials, 16 per task per round   (25 min)
#   MobileNetV2-0.5-160          600 trials, 16 per task per round   (16 min)
# A budget below 16 x the number of tasks (V3-Small has 52) leaves some tasks on their untuned kernel.
# Budgets count the trials of the CPU you run it on (records keep their mcpu; see README, "One log serves
# several CPUs"). On 2026-12-01 the same logs got records of a second CPU, an AMD EPYC Zen 5 (znver5, 2
# cores, AVX-512), in time-boxed runs rather than with these budgets: each first measured the znver3 best
# schedule of every task on znver5, then searched at 16 candidates per task per round (`timeout -s TERM`
# stops a tune after its batch, keeping every record):
#   MobileNetV2-1.0-224        2,082 trials (43 min) after the 34 ported schedules
#   MobileNetV3-Large-1.0-224  1,168 trials (24 min) after the 55 ported schedules
#   MobileNetV1-1.0-224          930 trials (21 min) after the 23 ported schedules
# and then a second round on the kernels bench/breakdown.py showed losing to onnxruntime by more than 5 µs
# (`--tasks` for each), then on the classifier's matmul alone (`--tasks matmul`):
#   MobileNetV2-1.0-224        1,184 trials on 7 tasks (25 min), 240 on the matmul (5 min)
#   MobileNetV1-1.0-224        1,120 trials on 10 tasks (25 min), 176 on the matmul (4 min)
#   MobileNetV3-Large-1.0-224    800 trials on 10 tasks (20 min), 192 on its 2 matmuls (4 min)
# V3-Small and V2-0.5-160 have no znver5 records: compile applies their znver3 records there, with a warning.
# Every trial above was measured on ONE thread: TVM's x86 default is half the logical CPUs, and neither machine
# has SMT. Since 2026-12-02 tune measures with one thread per physical core, as a loaded model runs; each znver5
# log then got `tvmnet tune MODEL --remeasure 8 --trials 0` (each task's 8 fastest schedules timed again on
# 2 threads, about 2 min per model) and a time-boxed search:
#   MobileNetV2-1.0-224          960 trials (25 min)
#   MobileNetV1-1.0-224          656 trials (16 min), then 528 more (14 min)
#   MobileNetV3-Large-1.0-224    640 trials (15 min), then 496 more (14 min)
# and, later that day (all on 2 threads; V3-Small and V2-0.5-160 first timed the 52 and 34 znver3 bests here):
#   MobileNetV1-1.0-224          736 trials (20 min), then 672 on the 5 pointwise convolutions that lost most in
#                                bench/breakdown.py and the matmul (15 min, `--tasks` for each)
#   MobileNetV3-Small-1.0-224    497 trials (15 min)
#   MobileNetV2-0.5-160          352 trials (10 min)
#   MobileNetV2-1.0-224          528 trials (15 min, after the scheduler change in 14cbd0f: 18 of 34 tasks got a batch)
# and in a third session that day (2 threads):
#   MobileNetV2-1.0-224          896 trials on the 16 tasks with the fewest znver5 trials or a loss in
#                                bench/breakdown.py (30 min, `--tasks fused_conv2dN_` for each), then 464 (12 min)
#   MobileNetV3-Large-1.0-224    768 trials (20 min)
#   MobileNetV1-1.0-224          736 trials (15 min)
# On 2026-12-03 (from 23:52 UTC, Zen 3, a busy host) the padded tasks' seeds (tvmnet/search_space.py) were timed
# side by side with each task's fastest record: `tvmnet tune MODEL --remeasure 1 --trials 0 --tasks ...` on
# V1's 2, V2's 5, V3-Large's 3 and V3-Small's 3 pointwise convolutions on 7x7 pixels (1.5-2.5 min per model;
# bench/README item 24). Run from scratch, this script's first tune of each model measures them itself.
# Since 2026-12-04 each tune below also rechecks its search (`--recheck 2`: each task's 2 fastest new
# candidates timed side by side with its earlier fastest record), so a later run on a busier host still
# adds what it finds on the log's scale (bench/README item 25).
# On 2026-12-04 the logs got records of a third CPU, an Intel Xeon with AVX-512 that LLVM names `rocketlake`
# (2 cores; bench/README item 26): `tvmnet tune MODEL --remeasure 8 --trials 0` for each model (8 min in all),
# then time-boxed searches at 16 per task per round: V3-Large 18 min (672 trials), V2-0.5-160 7 min (272),
# V1 12 min (416) and V3-Small 6 min (208).
# Later that day (item 27) the same searches for V2 30 min (1,024 trials), V3-Large 30 + 18 min (1,664) and V1
# 25 min (944).
# Then (item 28), once the search space split large feature maps across threads by rows (SplitRows), 4-6 min
# `--tasks` searches on the kernels whose applied record did not: V2 3 tasks (240 trials), V1 2 (128),
# V3-Large 2 (208), V3-Small 3 (240), V2-0.5-160 1 (96).
# On 2026-12-05 the logs got records of a fourth CPU, an Intel Xeon that LLVM names `emeraldrapids` (KVM model
# 207, 2 cores; bench/README item 33): `--remeasure 8 --trials 0` for each model (10.5 min in all), then time-boxed
# searches at 16 per task per round: V2 22 min (526 trials), V3-Large 20 min (368), V2-0.5-160 10 min (239) and
# V3-Small 10 min (192). Later that day (item 34): V2 50 min more (1,421 trials) and V3-Large 25 min (681).
# Then (item 35) the split seeds of V3-Large's 11 and V3-Small's 14 convolutions on one pixel (tvmnet/search_space.py:
# a serial fastest record with its outermost tile split across the threads), timed side by side with each task's
# fastest record: `tvmnet tune MODEL --remeasure 1 --trials 0 --tasks ...`. A task is seeded once it has a record,
# so from scratch the `--remeasure 1 --trials 0` runs at the end of this script measure them.
# Then (item 36) V1's first search on that CPU: 20 min, 511 trials over 10 of its 23 tasks.
# On 2026-12-06 (item 40, back on the `rocketlake` Xeon) `--remeasure 1 --trials 0` for each of the five models
# (26 min in all) timed that CPU's split and row seeds and other CPUs' fastest records there; the
# `--remeasure 1` runs at the end of this script do the same from scratch.
# Then V1's depthwise convolutions there (`--tasks` for the odd-numbered conv2d tasks): 429 trials (18 min).
# Then (item 41) the tasks of V3-Large (14) and V3-Small (12) with 2-3 trials there, their records ported from
# other CPUs (the heaviest of what `--undertuned 4` selects): 565 trials (21 min) and 431 (14 min).
# Then V2-0.5-160 with `--undertuned 4 --trials 460` (22 tasks): 399 trials (11 min).
# Resumable: every measured record is kept, so stop it at any time and run it again; a larger budget
# (first argument: a factor, default 1) adds trials where the time is (tvmnet's scheduler picks by
# weight x latency, tasks with no trial first).
#   usage: bash bench/tune_shipped_logs.sh [FACTOR]
set -euo pipefail
cd "$(dirname "$0")/.."
factor=${1:-1}
export TVMNET_TUNING_LOGS="${TVMNET_TUNING_LOGS:-$PWD/tuning_logs}"
tune() { echo "=== $(date -u +%FT%TZ) $*"; tvmnet tune "$@" --target x86 --recheck 2; }
tune mobilenet_v2 --trials $((1500 * factor)) --trials-per-iter 32
tune mobilenet_v2 --trials $((4576 * factor)) --trials-per-iter 16
tune mobilenet_v1 --trials $((2162 * factor)) --trials-per-iter 16
v1_losers=(fused_conv2d18_add9_relu91 fused_conv2d2_add1_relu11 fused_conv2d13_add7_relu71 fused_conv2d16_add9_relu91
  fused_conv2d7_add4_relu41 fused_conv2d9_add5_relu51 fused_conv2d12_add7_relu71 fused_conv2d_add_relu1 fused_conv2d1_add_relu1)
tune mobilenet_v1 --trials $((1600 * factor)) --trials-per-iter 16 "${v1_losers[@]/#/--tasks=}"
tune mobilenet_v3_large --trials $((3314 * factor)) --trials-per-iter 16
tune mobilenet_v3_small --trials $((900 * factor)) --trials-per-iter 16
tune mobilenet_v2 --alpha 0.5 --resolution 160 --trials $((600 * factor)) --trials-per-iter 16
# Each task's split seed (its fastest record runs on one thread) and row seed, timed beside its fastest record.
for model in mobilenet_v2 mobilenet_v1 mobilenet_v3_large mobilenet_v3_small; do
  tune $model --remeasure 1 --trials 0
done
tune mobilenet_v2 --alpha 0.5 --resolution 160 --remeasure 1 --trials 0
