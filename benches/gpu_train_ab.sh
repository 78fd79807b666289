#!/usr/bin/env bash
# Two CUDA builds of arenaflow side by side in one run on the GPU machine: the same fold-0
# training of SmolLM2-135M on the real sample (plans/train_teacher.sql at issue 14's settings,
# STEPS optimizer steps), alternating A B A B, each in its own run directory. Prints each
# run's tokens/s, its forward/backward/optimizer shares and its dev log loss (the same rows,
# seed and order: equal numerics give the same figure).
#
# After benches/gpu_recipe.sh stage (the data, the GGUF and the stash's arenaflow.xz = B):
#   benches/gpu_train_ab.sh A.xz [STEPS]        # A: the build to compare against
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/gpu_env.sh
steps=${2:-60}
unpack "$1" "$stash/bin/arenaflow-a"
unpack "$stash/arenaflow.xz" "$stash/bin/arenaflow"
smollm2
data=$stash/data
base=$stash/runs/ab
rm -rf "$base"
"$stash/bin/arenaflow" run plans/prepare.sql plans/folds.sql --run-dir "$base/data" \
  --set train="$data/lmsys-arena/train_sample.csv" --set pandalm= --set hh_rlhf= >/dev/null
for round in 1 2; do
  for side in a b; do
    bin=$stash/bin/arenaflow; [ "$side" = a ] && bin=$stash/bin/arenaflow-a
    run=$base/$side$round
    "$bin" run plans/train_teacher.sql --run-dir "$run" \
      --set folds="$base/data/folds/k5_seed2025_swaptrue/" \
      --set model="$SMOLLM2" \
      --set tokenizer="$SMOLLM2" \
      --set device=cuda:0 --set max_length=512 --set max_steps="$steps" 2>&1 \
      | grep -o 'distill_step: wrote .*' | sed "s#^distill_step: wrote [^;]*;#$side (round $round):#"
  done
done
