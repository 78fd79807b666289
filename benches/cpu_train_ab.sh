#!/usr/bin/env bash
# Two CPU builds of arenaflow side by side on one training job, A B A B (the CPU twin of
# benches/gpu_train_ab.sh): SmolLM2-135M-Instruct in f32, LoRA r 16 / alpha 32 on all seven
# projections, 4 rows a step in file order, gradient checkpointing, STEPS steps (default 2)
# over ROWS (a parquet of tokenized training rows without dev rows, e.g. the first 24
# training rows of device/parity/rows.parquet). Prints each run's summary line; the two
# sides' adapters should be the same to the bit when a change only drops work.
#
#   benches/cpu_train_ab.sh A_BIN B_BIN ROWS [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
for round in 1 2; do
  for side in a b; do
    bin=$1; [ "$side" = b ] && bin=$2
    rm -rf "$work/$side"
    "$bin" train --model .models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --input "$3" \
      --output "$work/$side" --dtype f32 --device cpu --lora-r 16 --lora-alpha 32 \
      --lora-dropout 0 --batch-rows 4 --no-shuffle --max-steps "${4:-2}" --checkpoint-every 0 \
      --gradient-checkpointing 2>&1 | grep -o 'distill_step: wrote.*' \
      | sed "s#^distill_step: wrote [^;]*;#$side (round $round):#"
  done
done
sha256sum "$work"/a/adapter_model.safetensors "$work"/b/adapter_model.safetensors | sed "s#$work/##"
rm -rf "$work"
